"""The bus is closed: against the session's nats-server, which enforces the role credentials
(openrl/bus/auth.py), as `openrl up` and the Helm values do. No credentials or a wrong
password are refused; each role is refused outside its permissions; the signing secrets are
the gateway's alone. And the local stack's secrets: never on a command line, files 0600 from
their first byte, the data dir 0700, reward functions without credentials in their environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import nats
import pytest
from nats.js import api

from openrl.bus import auth, subjects
from openrl.bus.client import Bus, BusConfig
from openrl.bus.messages import ScoreItem, Secret
from stack_helpers import API_KEY, OTHER_KEY, bus_config, free_port

pytestmark = pytest.mark.timeout(180)

TIMEOUT = 1.0  # a refused JetStream API request gets no answer: it times out


async def raw(url: str, role: str) -> nats.NATS:
    """A bare connection as `role`; `nc.violations` collects the server's permission errors."""
    creds = auth.load(Path(os.environ["OPENRL_NATS_CREDS"]), role)
    violations: list[str] = []

    async def on_error(e: Exception) -> None:
        if "permissions violation" in str(e).lower():
            violations.append(str(e))

    nc = await nats.connect(url, allow_reconnect=False, error_cb=on_error, **auth.connect_options(role, creds))
    nc.violations = violations  # type: ignore[attr-defined]
    return nc


async def refused(coro) -> bool:
    """True if the JetStream API call gets no answer or an error (the server dropped it)."""
    try:
        await asyncio.wait_for(coro, TIMEOUT + 1)
    except (asyncio.TimeoutError, nats.errors.TimeoutError, nats.js.errors.Error, nats.errors.Error):
        return True
    return False


async def test_no_credentials_are_refused(nats_server):
    with pytest.raises(auth.Refused, match="authorization violation with no credentials"):
        await asyncio.wait_for(Bus.connect(BusConfig(url=nats_server.url)), 10)


async def test_a_wrong_password_is_refused(nats_server):
    with pytest.raises(auth.Refused, match="user 'sampler'"):
        await asyncio.wait_for(Bus.connect(BusConfig(url=nats_server.url, role="sampler", user="sampler", password="guess")), 10)


async def test_every_role_binds_to_what_it_uses(nats_server):
    for role in ("gateway", "trainer", "sampler", "rewarder", "operator"):
        bus = await asyncio.wait_for(Bus.connect(bus_config(nats_server.url, role)), 15)
        try:
            assert bus.futures is not None and bus.workers is not None
            if role in ("gateway",):
                assert bus.secrets is not None
            else:
                with pytest.raises(AttributeError, match="may not use it"):
                    bus.secrets  # noqa: B018
        finally:
            await bus.close()


@pytest.mark.parametrize("role", ["sampler", "trainer", "rewarder", "operator"])
async def test_only_the_gateway_reads_the_signing_secrets(nats_server, role):
    gateway = await Bus.connect(bus_config(nats_server.url, "gateway"))
    try:
        secret = Secret(secret=os.urandom(32), created_at=time.time())
        key = f"test-{uuid.uuid4().hex[:8]}"
        await gateway.kv_put(gateway.secrets, key, secret)
        assert (await gateway.kv_get(gateway.secrets, key, Secret)).secret == secret.secret  # the gateway can
    finally:
        await gateway.close()
    nc = await raw(nats_server.url, role)
    try:
        js = nc.jetstream(timeout=TIMEOUT)
        stream = f"KV_{subjects.SECRETS_BUCKET}"
        assert await refused(js.key_value(subjects.SECRETS_BUCKET))
        assert await refused(js.get_last_msg(stream, f"$KV.{subjects.SECRETS_BUCKET}.{key}"))
        assert await refused(js.get_msg(stream, seq=1))
        assert await refused(js.pull_subscribe(f"$KV.{subjects.SECRETS_BUCKET}.>", durable="steal", stream=stream))
        # a stream that would copy the secrets, or one that captures their subjects
        copy = api.StreamConfig(name=f"COPY_{uuid.uuid4().hex[:6]}", sources=[api.StreamSource(name=stream)])
        assert await refused(js.add_stream(copy))
        await nc.subscribe(f"$KV.{subjects.SECRETS_BUCKET}.>")
        await nc.flush()
        await asyncio.sleep(0.3)
        assert any(subjects.SECRETS_BUCKET in v for v in nc.violations), nc.violations
        assert len(nc.violations) >= 6, nc.violations  # each refusal above was the server's, not a slow answer
    finally:
        await nc.close()


async def test_a_rewarder_cannot_publish_training_requests(nats_server, bus):
    base, model = f"auth-{uuid.uuid4().hex[:6]}", "m"
    nc = await raw(nats_server.url, "rewarder")
    try:
        payload = b"forged"
        js = nc.jetstream(timeout=TIMEOUT)
        assert await refused(js.publish(subjects.train(base, model), payload))
        await nc.publish(subjects.create(base), payload)
        await nc.publish(subjects.sample(base), payload)
        await nc.flush()
        await asyncio.sleep(0.3)
        assert len(nc.violations) >= 3, nc.violations
    finally:
        await nc.close()
    for stream, subject in ((subjects.TRAIN_STREAM, subjects.train(base, model)), (subjects.CREATE_STREAM, subjects.create(base)),
                            (subjects.SAMPLE_STREAM, subjects.sample(base))):  # fmt: skip
        with pytest.raises(nats.js.errors.NotFoundError):
            await bus.js.get_last_msg(stream, subject)  # nothing got in


@pytest.mark.parametrize("role", ["trainer", "sampler", "rewarder", "gateway"])
async def test_workers_cannot_change_the_topology(nats_server, role):
    nc = await raw(nats_server.url, role)
    try:
        js = nc.jetstream(timeout=TIMEOUT)
        info = await BusInfo.train(nats_server.url)
        info.config.max_msgs = 1  # would throw the training log away
        assert await refused(js.update_stream(info.config))
        assert await refused(js.delete_stream(subjects.TRAIN_STREAM))
        assert await refused(js.add_stream(api.StreamConfig(name=f"X{uuid.uuid4().hex[:6]}", subjects=["mine.>"])))
        await asyncio.sleep(0.2)
        assert len(nc.violations) >= 3, nc.violations
    finally:
        await nc.close()
    assert (await BusInfo.train(nats_server.url)).config.max_msgs != 1


class BusInfo:
    @staticmethod
    async def train(url: str):
        bus = await Bus.connect(bus_config(url))
        try:
            return await bus.js.stream_info(subjects.TRAIN_STREAM)
        finally:
            await bus.close()


async def test_a_role_cannot_read_another_roles_replies(nats_server):
    nc = await raw(nats_server.url, "sampler")
    try:
        await nc.subscribe(f"{auth.inbox_prefix('gateway')}.>")
        await nc.subscribe("_INBOX.>")
        await nc.flush()
        await asyncio.sleep(0.3)
        assert len(nc.violations) == 2, nc.violations
    finally:
        await nc.close()


async def test_a_sampler_does_its_work_and_nothing_more(nats_server, bus):
    """Reads weights and futures, writes futures and heartbeats; may not write weights or keys."""
    sampler = await Bus.connect(bus_config(nats_server.url, "sampler"))
    try:
        rid = f"auth-{uuid.uuid4().hex[:8]}"
        from openrl.bus.messages import Future

        await bus.kv_put(bus.futures, rid, Future(request_id=rid, owner="k", request_type="Sample", created_at=time.time()))
        assert (await sampler.pending_future(rid)) is not None
        await sampler.finish_future(Future(request_id=rid, owner="k", request_type="Sample", state="done", payload=b"{}"))
        assert (await bus.kv_get(bus.futures, rid, Future)).state == "done"
        assert await refused(sampler.weights.put("x", b"forged"))  # weights: read-only for samplers
        assert await refused(sampler.js.publish(f"$KV.{subjects.KEYS_BUCKET}.x", b"forged"))
    finally:
        await sampler.close()


# -- files and processes of the local stack ------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_private_files_are_0600_from_the_first_byte_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tmp_path / "secret.json"
        auth.write_private(path, "one")
        assert _mode(path) == 0o600 and path.read_text() == "one"
        auth.write_private(path, "two")  # replaced atomically, still 0600
        assert _mode(path) == 0o600 and path.read_text() == "two"
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["secret.json"]  # no temporary file left


def test_openrl_nats_makes_credentials_and_enforces_them(tmp_path):
    """The embedded server as `openrl up` runs it: a 0700 data dir, a 0600 credentials file and
    server config, no connection without a user, and operator commands find the credentials."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRL_NATS_")}
    proc = subprocess.Popen([sys.executable, "-m", "openrl", "nats", "--data-dir", str(data), "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        from openrl.bus.server import wait_for_port

        wait_for_port(port, 30, proc)
        assert _mode(data) == 0o700
        creds = data / auth.LOCAL_FILE
        assert _mode(creds) == 0o600 and _mode(data / "nats" / "nats-server.conf") == 0o600
        assert set(json.loads(creds.read_text())) == set(auth.ROLES)
        url = f"nats://127.0.0.1:{port}"

        async def go():
            with pytest.raises(auth.Refused):
                await asyncio.wait_for(Bus.connect(BusConfig(url=url)), 10)

        asyncio.run(go())
        run = lambda *a: subprocess.run([sys.executable, "-m", "openrl", *a], env={**env, "OPENRL_DATA_DIR": str(data)},  # noqa: E731
                                        capture_output=True, text=True, timeout=60)  # fmt: skip
        init = run("bus-init", "--nats-url", url)  # the operator's credentials from the data dir
        assert init.returncode == 0, init.stderr
        status = run("status", "--nats-url", url)
        assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
        denied = subprocess.run([sys.executable, "-m", "openrl", "bus-init", "--nats-url", url],
                                env={**env, "OPENRL_NATS_USER": "operator", "OPENRL_NATS_PASSWORD": "wrong"},
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert denied.returncode != 0 and "authorization violation" in denied.stderr and "Traceback" not in denied.stderr
    finally:
        proc.terminate()
        proc.wait(15)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _environ(pid: int) -> dict[str, str]:
    pairs = (x.split(b"=", 1) for x in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in x)
    return {k.decode(): v.decode() for k, v in pairs}


@pytest.mark.timeout(900)  # the stack may first build the default model
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_the_stack_keeps_its_secrets_off_command_lines_and_in_private_files(stack):
    data = stack.data_dir
    creds = auth.load_all(data / auth.LOCAL_FILE)
    secrets_ = [API_KEY, OTHER_KEY, *(c.password for c in creds.values())]
    assert _mode(data) == 0o700
    for path in (data / auth.LOCAL_FILE, data / "run" / "stack.json", data / "nats" / "nats-server.conf"):
        assert _mode(path) == 0o600, path
    pids = {p.stem: int(p.read_text()) for p in (data / "run").glob("*.pid")}
    assert {"gateway", "trainer", "nats"} <= set(pids)
    for role, pid in pids.items():
        line = _cmdline(pid)
        assert not [s for s in secrets_ if s in line], f"{role}'s command line shows a secret: {line}"
        env = _environ(pid)
        kind = role.split("-")[0]
        own = creds.get(kind)
        others = [c.password for r, c in creds.items() if r != kind]
        assert not [v for v in env.values() if v in others], f"{role} holds another role's NATS password"
        if kind in ("gateway", "trainer", "sampler", "rewarder"):
            assert env.get("OPENRL_NATS_PASSWORD") == own.password and "OPENRL_NATS_CREDS" not in env, role
        if kind != "gateway":
            assert API_KEY not in env.values() and "OPENRL_API_KEYS" not in env, f"{role} holds the API keys"
    assert API_KEY in _environ(pids["gateway"])["OPENRL_API_KEYS"].split(",")


# -- reward functions ------------------------------------------------------------------------------

REWARD = '''
import json, os

def env_report(prompt, completion, reference):
    names = json.loads(completion)
    return {"seen": float(sum(1 for n in names if n in os.environ)), "reward": 0.0}
'''


async def test_reward_functions_see_no_credentials_or_secrets(tmp_path, monkeypatch):
    from openrl.rewarder.pool import Pool

    (tmp_path / "env_reward.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    secret_env = {
        "OPENRL_NATS_USER": "rewarder", "OPENRL_NATS_PASSWORD": "pw", "OPENRL_NATS_CREDS": "/x/creds.json",
        "OPENRL_API_KEYS": API_KEY, "TINKER_API_KEY": API_KEY, "NATS_TOKEN": "t", "HF_TOKEN": "hf",
        "AWS_SECRET_ACCESS_KEY": "aws", "OPENAI_API_KEY": "sk", "DB_PASSWORD": "db",
    }  # fmt: skip
    for k, v in {**secret_env, "PLAIN_SETTING": "ok"}.items():
        monkeypatch.setenv(k, v)
    pool = Pool("env_reward:env_report", "env", 1, pass_env=("OPENAI_API_KEY", "OPENRL_NATS_PASSWORD"))
    await pool.start()
    try:
        async def seen(names: list[str]) -> float:
            score = await pool.score(ScoreItem(completion=msgspec.json.encode(names).decode()))
            assert score.error is None, score.error
            return score.metrics["seen"]

        hidden = [k for k in secret_env if k != "OPENAI_API_KEY"]
        assert await seen(hidden) == 0  # OPENRL_NATS_PASSWORD cannot be passed, even by name
        assert await seen(["OPENAI_API_KEY"]) == 1  # passed by name (--pass-env)
        assert await seen(["PLAIN_SETTING", "PATH"]) == 2
    finally:
        await pool.close()
