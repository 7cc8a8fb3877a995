"""deploy/nats: the chart values against a schema of the chart's values layout, and the
server configuration they make, run in real nats-servers: one for the dev values, a 3-node
JetStream cluster for the production ones, with OpenRL's bus on top (R1 / R3 streams,
messages up to MAX_PAYLOAD).

Helm is not installable from the registries CI reaches, so the chart's template is not run:
`nats_conf` below writes the part of nats.conf these values drive the way the chart's
files/config/*.yaml do (server name, ports, cluster routes, JetStream store, `merge` with
`<< >>` unquoted, the client port's TLS from the certificate Secret, the users' passwords from
the pods' environment). Both enforce the users and permissions of values-auth.yaml, which
must be what openrl/bus/auth.py generates; the production values also TLS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

from openrl.bus import auth, subjects
from openrl.bus.client import MAX_PAYLOAD, Bus, BusConfig
from openrl.bus.server import find_binary, free_port, wait_for_port
from rendering import DEPLOY, NATS_VALUES, nats_values

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "nats-values.schema.json").read_text())


def unquote(value):
    """The chart's rule: a string "<< x >>" is written into nats.conf as x, unquoted."""
    m = re.fullmatch(r"<<\s*(.*?)\s*>>", value) if isinstance(value, str) else None
    return m.group(1) if m else value


def nats_conf(values: dict, *, name: str, port: int, http_port: int, store_dir: Path,
              cluster_port: int | None = None, routes: list[str] = (), tls: Path | None = None) -> str:
    """`tls`: the folder the chart mounts the certificate Secret in (tls.crt, tls.key)."""
    cfg = values["config"]
    conf: dict = {"server_name": name, "port": port, "lame_duck_grace_period": "10s", "lame_duck_duration": "30s"}
    if cfg.get("nats", {}).get("tls", {}).get("enabled"):
        conf["tls"] = {"cert_file": str(tls / "tls.crt"), "key_file": str(tls / "tls.key")}
    if cfg["monitor"]["enabled"]:
        conf["http_port"] = http_port
    if cfg["cluster"]["enabled"]:
        conf["cluster"] = {"name": "nats", "port": cluster_port, "routes": list(routes)}
    js = cfg["jetstream"]
    if js["enabled"]:
        conf["jetstream"] = {"store_dir": str(store_dir)}
        if not js.get("memoryStore", {}).get("enabled", False):
            conf["jetstream"]["max_memory_store"] = 0
    conf.update(cfg.get("merge") or {})
    text = json.dumps(conf, indent=2)
    return re.sub(r'"<<\s*(.*?)\s*>>"', r"\1", text)


def varz(http_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/varz", timeout=5) as r:
        return json.loads(r.read())


def pod_env(values: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The NATS container's environment as the chart sets it (container.env), from `secrets`."""
    env = {}
    for name, spec in (values.get("container", {}).get("env") or {}).items():
        ref = spec["valueFrom"]["secretKeyRef"] if isinstance(spec, dict) else None
        env[name] = secrets[ref["name"]][ref["key"]] if ref else str(spec)
    return env


def make_certs(folder: Path, hosts: list[str]) -> Path:
    """A CA and a server certificate for `hosts`, as cert-manager's Certificate makes them
    (tls.crt, tls.key, ca.crt in one Secret)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found: the TLS test makes its certificates with it")
    folder.mkdir(parents=True, exist_ok=True)
    run = lambda *a: subprocess.run([openssl, *a], cwd=folder, check=True, capture_output=True, timeout=60)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca")
    san = ",".join(f"IP:{h}" if h[0].isdigit() else f"DNS:{h}" for h in hosts)
    (folder / "ext.cnf").write_text(f"subjectAltName={san}\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", f"/CN={hosts[0]}")
    run("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "tls.crt", "-days", "1",
        "-extfile", "ext.cnf")
    return folder


def role_users() -> tuple[dict[str, dict[str, str]], dict[str, auth.Credentials]]:
    """The operator's Secret `openrl-nats-users` (role -> password) and each role's credentials."""
    creds = auth.generate()
    return {"openrl-nats-users": {role: c.password for role, c in creds.items()}}, creds


def as_role(creds: dict[str, auth.Credentials], role: str, **kw) -> dict:
    return {"role": role, "user": creds[role].user, "password": creds[role].password, **kw}


class Servers:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, conf_text: str, path: Path, port: int, env: dict[str, str] | None = None) -> None:
        path.write_text(conf_text)
        env = {**os.environ, **(env or {})}
        check = subprocess.run([find_binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30, env=env)
        assert check.returncode == 0, check.stdout + check.stderr  # nats-server's own config check
        log = open(path.with_suffix(".log"), "wb")
        self.procs.append(subprocess.Popen([find_binary(), "-c", str(path)], stdout=log, stderr=subprocess.STDOUT, env=env))
        log.close()
        wait_for_port(port, 15, self.procs[-1])

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.stop()


# -- the values ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", list(NATS_VALUES))
def test_values_fit_the_charts_layout(overlay):
    jsonschema.validate(nats_values(overlay), SCHEMA)


def test_schema_rejects_a_misspelt_key():
    values = yaml.safe_load((DEPLOY / "nats" / "values.yaml").read_text())
    values["config"]["jetstream"]["filestore"] = values["config"]["jetstream"].pop("fileStore")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, SCHEMA)


def test_production_values_are_three_nodes_on_volumes_with_our_max_payload():
    cfg = nats_values("gpu")["config"]
    assert cfg["cluster"] == {"enabled": True, "replicas": 3}
    fs = cfg["jetstream"]["fileStore"]
    assert cfg["jetstream"]["enabled"] and fs["enabled"] and fs["pvc"]["enabled"]
    assert int(unquote(cfg["merge"]["max_payload"])) == MAX_PAYLOAD


# -- the server they configure ------------------------------------------------------------


def test_the_users_and_permissions_are_what_the_code_generates():
    assert (DEPLOY / "nats" / "values-auth.yaml").read_text() == auth.helm_values(), (
        "deploy/nats/values-auth.yaml is stale: python -m openrl.bus.auth > deploy/nats/values-auth.yaml")
    values = nats_values("gpu")
    users = values["config"]["merge"]["authorization"]["users"]
    assert [u["user"] for u in users] == list(auth.ROLES)
    env = values["container"]["env"]
    for u in users:  # every password comes from the operator's Secret, through the pod's environment
        var = auth.password_env(u["user"])
        assert unquote(u["password"]) == f"${var}"
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "openrl-nats-users", "key": u["user"]}
    assert values["config"]["nats"]["tls"]["enabled"] and values["config"]["nats"]["tls"]["secretName"]
    assert not nats_values("dev-cpu")["config"]["nats"]["tls"]["enabled"]


def test_dev_values_run_a_server_with_our_limits(tmp_path, servers):
    """One node (values-dev.yaml): R1 streams, a MAX_PAYLOAD-sized body goes through; no
    connection without a user; each role binds, the operator having made the streams."""
    values = nats_values("dev-cpu")
    secrets, creds = role_users()
    port, http = free_port(), free_port()
    servers.start(nats_conf(values, name="nats-0", port=port, http_port=http, store_dir=tmp_path / "js"), tmp_path / "nats.conf", port,
                  env=pod_env(values, secrets))
    v = varz(http)
    assert v["max_payload"] == MAX_PAYLOAD
    assert v["max_pending"] == 128 * 2**20  # the same as the embedded server's "128MB"
    assert v["jetstream"]["config"]["store_dir"].startswith(str(tmp_path / "js"))

    async def go():
        url = f"nats://127.0.0.1:{port}"
        with pytest.raises(auth.Refused):
            await Bus.connect(BusConfig(url=url, replicas=1))
        bus = await Bus.connect(BusConfig(url=url, replicas=1, **as_role(creds, "operator")))
        for role in ("gateway", "trainer", "sampler", "rewarder"):
            await (await asyncio.wait_for(Bus.connect(BusConfig(url=url, replicas=1, **as_role(creds, role))), 15)).close()
        try:
            info = await bus.js.stream_info(subjects.TRAIN_STREAM)
            assert info.config.num_replicas == 1
            body = b"x" * (MAX_PAYLOAD - 256 * 1024)  # the gateway's body limit
            ack = await bus.js.publish(subjects.train("deploy-test", "m"), body, timeout=10)
            assert (await bus.js.get_msg(subjects.TRAIN_STREAM, ack.seq)).data == body
        finally:
            await bus.close()

    asyncio.run(go())


def test_production_values_run_a_three_node_cluster_with_r3_streams(tmp_path, servers):
    """Three nodes as values.yaml describes them, routes between them, JetStream on each, TLS
    on the client port: OpenRL's bus (the operator, over tls:// verifying the server against
    the CA) with the gpu overlay's OPENRL_NATS_REPLICAS makes R3 streams and buckets, and a
    large message published on one node is stored on all three. A client that does not trust
    the CA is refused."""
    values = nats_values("gpu")
    secrets, creds = role_users()
    certs = make_certs(tmp_path / "certs", ["127.0.0.1", "localhost", "nats.nats.svc.cluster.local"])
    n = values["config"]["cluster"]["replicas"]
    ports, https, cports = ([free_port() for _ in range(n)] for _ in range(3))
    routes = [f"nats://127.0.0.1:{p}" for p in cports]
    for i in range(n):
        text = nats_conf(values, name=f"nats-{i}", port=ports[i], http_port=https[i], store_dir=tmp_path / f"js{i}",
                         cluster_port=cports[i], routes=routes, tls=certs)
        servers.start(text, tmp_path / f"nats-{i}.conf", ports[i], env=pod_env(values, secrets))
    replicas = int(re.search(r"OPENRL_NATS_REPLICAS=(\d+)", (DEPLOY / "kustomize" / "overlays" / "gpu" / "kustomization.yaml").read_text()).group(1))
    assert replicas == n

    async def go():
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # the JetStream meta leader is elected a moment after the routes form
            try:
                bus = await Bus.connect(BusConfig(url=f"tls://127.0.0.1:{ports[0]}", replicas=replicas,
                                                  **as_role(creds, "operator", tls_ca=str(certs / "ca.crt"))))
                break
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.5)
        try:
            for stream in (subjects.TRAIN_STREAM, subjects.SAMPLE_STREAM, subjects.REWARD_STREAM, f"KV_{subjects.WORKERS_BUCKET}"):
                info = await bus.js.stream_info(stream)
                assert info.config.num_replicas == replicas, stream
                assert len(info.cluster.replicas or []) == replicas - 1, stream
            body = b"y" * (20 * 2**20)
            ack = await bus.js.publish(subjects.sample("deploy-test"), body, timeout=15)
            assert (await bus.js.get_msg(subjects.SAMPLE_STREAM, ack.seq)).data == body
            sampler = await asyncio.wait_for(Bus.connect(BusConfig(url=f"tls://127.0.0.1:{ports[1]}", replicas=replicas,
                                                                   **as_role(creds, "sampler", tls_ca=str(certs / "ca.crt")))), 30)
            await sampler.close()
            import nats

            with pytest.raises(Exception, match="(?i)certificate|ssl"):  # the system CAs do not vouch for the server
                await asyncio.wait_for(nats.connect(f"tls://127.0.0.1:{ports[0]}", allow_reconnect=False, max_reconnect_attempts=0,
                                                    **auth.connect_options("sampler", creds["sampler"])), 15)
        finally:
            await bus.close()

    asyncio.run(go())
    for h in https:
        assert varz(h)["max_payload"] == MAX_PAYLOAD
