"""The kustomize overlays and the custom-reward example, rendered and checked offline:
Kubernetes schemas (strict: an unknown field fails), KEDA's schema, every reference between
objects, and every command, flag, environment variable and probe against the code."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest

from openrl.bus import subjects
from openrl.bus.client import MAX_PAYLOAD

from rendering import (  # noqa: F401 - render is a fixture
    DEPLOY,
    EXAMPLE,
    HF_CACHE,
    IMAGE_UID,
    LIBRARY_ENV,
    LWS_ENV,
    NAMESPACE,
    OPERATOR_SECRETS,
    OVERLAYS,
    ROOT,
    container_env,
    containers,
    data_of,
    env_read_by_subcommand,
    find,
    lookup,
    nats_values,
    one,
    own_group_only,
    parse_openrl,
    pod_labels,
    pod_spec,
    render,
    selects,
    workloads,
)

SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSIONS = ("1.29", "1.33")  # an older and a newer supported Kubernetes

OPTIONAL_REFS = {("Secret", "openrl-hf-token")}  # gated models only; referenced with optional: true


def targets(render) -> dict[str, tuple[list[dict], dict]]:
    """name -> (rendered objects, the external objects it may reference)."""
    dev = render(OVERLAYS["dev-cpu"])
    return {
        "dev-cpu": (dev, {}),
        "gpu": (render(OVERLAYS["gpu"]), OPERATOR_SECRETS),
        "gpu-multihost": (render(OVERLAYS["gpu-multihost"]), OPERATOR_SECRETS),
        # Applied next to an overlay: it reads that overlay's openrl-common ConfigMap.
        "custom-reward": (render(EXAMPLE), {**OPERATOR_SECRETS, ("ConfigMap", "openrl-common"): one(dev, "ConfigMap", "openrl-common")}),
    }


@pytest.fixture(scope="module", params=["dev-cpu", "gpu", "gpu-multihost", "custom-reward"])
def target(request, render):
    objs, external = targets(render)[request.param]
    return request.param, objs, external


# -- schemas ---------------------------------------------------------------------------


def test_every_object_validates_against_its_schema(target):
    import kubernetes_validate

    name, objs, _ = target
    keda = json.loads((SCHEMAS / "keda-scaledobject.schema.json").read_text())
    kinds = set()
    for obj in objs:
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(obj, keda)
            continue
        if obj["apiVersion"].startswith("leaderworkerset.x-k8s.io/"):
            validate_lws(obj)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{name}: {obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: {e.message} at {list(e.path)}") from None
    assert "Deployment" in kinds


def validate_lws(obj: dict) -> None:
    """Against the LeaderWorkerSet CRD's schema, and each pod template, strictly, as the
    PodTemplateSpec of every Kubernetes version we support (the CRD embeds the one LWS was
    built against, which may have fields an older cluster lacks)."""
    import kubernetes_validate

    jsonschema.validate(obj, json.loads((SCHEMAS / "lws-leaderworkerset.schema.json").read_text()))
    lwt = obj["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        if role not in lwt:
            continue
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{obj['metadata']['name']}-{role}"},
                        "template": lwt[role]}
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(pod_template, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"LeaderWorkerSet/{obj['metadata']['name']} {role} on Kubernetes {version}: {e.message} at {list(e.path)}") from None


def test_schemas_reject_what_the_cluster_would_drop(render):
    """The strict schemas catch a misspelt field (the API server would silently drop it)."""
    import kubernetes_validate

    dev = render(OVERLAYS["dev-cpu"])
    deployment = json.loads(json.dumps(one(dev, "Deployment", "openrl-trainer")))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    scaled = json.loads(json.dumps(one(render(OVERLAYS["gpu"]), "ScaledObject", "openrl-sampler")))
    scaled["spec"]["maxReplicas"] = 3  # HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, json.loads((SCHEMAS / "keda-scaledobject.schema.json").read_text()))
    lws = one(render(OVERLAYS["gpu-multihost"]), "LeaderWorkerSet", "openrl-trainer-group")
    validate_lws(lws)
    bad_fields = [
        (jsonschema.ValidationError, ("spec", "startupPolicy"), "LeaderStarted"),
        (jsonschema.ValidationError, ("spec", "leaderWorkerTemplate", "sizes"), 2),
        (jsonschema.ValidationError, ("spec", "leaderWorkerTemplate", "workerTemplate", "spec", "terminationGracePeriodSecond"), 60),
        # Pod-level resources: in the PodSpec LWS embeds (Kubernetes 1.32+), not in 1.29's.
        (AssertionError, ("spec", "leaderWorkerTemplate", "leaderTemplate", "spec", "resources"), {"limits": {"cpu": "1"}}),
    ]
    for error, (*path, key), value in bad_fields:
        bad = json.loads(json.dumps(lws))
        node = bad
        for k in path:
            node = node[k]
        node[key] = value
        with pytest.raises(error):
            validate_lws(bad)


def test_everything_lives_in_the_openrl_namespace(target):
    _, objs, _ = target
    for obj in objs:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


# -- references between objects ----------------------------------------------------------


def test_selectors_select_what_they_mean(target):
    name, objs, _ = target
    pods = workloads(objs)
    for w in pods:
        if w["kind"] == "Deployment":
            assert selects(w["spec"]["selector"], pod_labels(w)), f"{w['metadata']['name']}: selector misses its own pods"
            others = [o for o in pods if o is not w and o["kind"] == "Deployment" and selects(w["spec"]["selector"], pod_labels(o))]
            assert not others, f"{w['metadata']['name']}'s selector also takes {[o['metadata']['name'] for o in others]}"
    for pdb in find(objs, "PodDisruptionBudget"):
        matched = [w for w in pods if selects(pdb["spec"]["selector"], pod_labels(w))]
        assert len(matched) == 1, f"PDB {pdb['metadata']['name']} selects {[w['metadata']['name'] for w in matched]}"
    for policy in find(objs, "NetworkPolicy"):
        sel = policy["spec"]["podSelector"]
        if sel:
            assert any(selects(sel, pod_labels(w)) for w in pods), f"NetworkPolicy {policy['metadata']['name']} selects no pod"
    for svc in find(objs, "Service"):
        matched = [w for w in pods if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
        assert matched, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for w in matched:
                names = {p.get("name") for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
                numbers = {p["containerPort"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names | numbers, f"Service {svc['metadata']['name']}: no port {port['targetPort']}"
    for ing in find(objs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = one(objs, "Service", backend["name"])
                assert backend["port"].get("name") in {p["name"] for p in svc["spec"]["ports"]} or \
                    backend["port"].get("number") in {p["port"] for p in svc["spec"]["ports"]}
    scaled = {}
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for obj in find(objs, kind):
            ref = obj["spec"]["scaleTargetRef"]
            assert ref.get("kind", "Deployment") == "Deployment"
            one(objs, "Deployment", ref["name"])
            assert ref["name"] not in scaled, f"{ref['name']} is scaled by both a {scaled.get(ref['name'])} and a {kind}"
            scaled[ref["name"]] = kind


def test_configmaps_secrets_and_volumes_resolve(target):
    name, objs, external = target
    for c in containers(objs):
        for src in c.spec.get("envFrom", []):
            if "configMapRef" in src:
                lookup(objs, "ConfigMap", src["configMapRef"]["name"], external)
            if "secretRef" in src:
                lookup(objs, "Secret", src["secretRef"]["name"], external)
        for e in c.spec.get("env", []):
            ref = e.get("valueFrom", {})
            for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if key in ref:
                    optional = ref[key].get("optional", False)
                    assert optional or (kind, ref[key]["name"]) not in OPTIONAL_REFS
                    obj = lookup(objs, kind, ref[key]["name"], external, optional=optional)
                    if obj is not None:
                        assert ref[key]["key"] in data_of(obj), f"{c.where}: {kind} {ref[key]['name']} has no key {ref[key]['key']}"
            if "fieldRef" in ref:
                assert ref["fieldRef"]["fieldPath"] in ("metadata.name", "metadata.namespace", "spec.nodeName", "status.podIP")
        mounts = {m["name"] for m in c.spec.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod_spec(c.workload).get("volumes", [])}
        assert mounts <= set(volumes), f"{c.where}: mounts {mounts - set(volumes)} are not volumes"
    for w in workloads(objs):
        for v in pod_spec(w).get("volumes", []):
            assert len([k for k in v if k != "name"]) == 1, f"{w['metadata']['name']}: volume {v['name']} has two sources"
            if "persistentVolumeClaim" in v:
                one(objs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
            if "configMap" in v:
                lookup(objs, "ConfigMap", v["configMap"]["name"], external)
            if "secret" in v:
                lookup(objs, "Secret", v["secret"]["secretName"], external)


def test_api_keys_are_ones_the_gateway_and_sdk_accept(render):
    objs = render(OVERLAYS["dev-cpu"])
    gateway = next(c for c in containers(objs) if c.openrl_subcommand == "gateway")
    keys = container_env(objs, gateway)["OPENRL_API_KEYS"].split(",")
    assert keys and all(k.strip().startswith("tml-") for k in keys)


def test_operator_created_objects_are_documented():
    readme = (DEPLOY / "README.md").read_text()
    assert "create secret generic openrl-api-keys" in readme and "OPENRL_API_KEYS=tml-" in readme
    assert "openrl-hf-token" in readme


# -- commands, flags, environment -------------------------------------------------------


def test_containers_run_real_subcommands_with_real_flags(target, monkeypatch):
    name, objs, external = target
    seen = set()
    for c in containers(objs):
        sub = c.openrl_subcommand
        if sub is None:
            continue
        seen.add(sub)
        args = parse_openrl(c.spec["args"], container_env(objs, c, external), monkeypatch)
        assert args.command == sub
        if sub in ("gateway", "trainer", "sampler", "rewarder", "bus-init"):
            assert urlparse(args.nats_url).scheme in ("nats", "tls")
            assert args.log_format == "json"
        if sub == "gateway":
            ports = {p["containerPort"] for p in c.spec["ports"]}
            assert args.port in ports and args.host == "0.0.0.0"
        if sub in ("trainer", "sampler", "rewarder"):
            assert args.worker_id == "pod-0", f"{c.where}: worker id is not the pod name"
    if name != "custom-reward":  # bus-init: the operator makes the streams before the gateway starts
        assert seen == {"gateway", "trainer", "sampler", "rewarder", "bus-init"}


def test_every_environment_variable_is_read(target):
    """Each variable a container gets is one its process reads; a typo or a stale name fails."""
    import importlib
    import inspect

    _, objs, external = target
    reads = env_read_by_subcommand()
    for var, module in LIBRARY_ENV.items():
        assert var in inspect.getsource(importlib.import_module(module)), f"{module} no longer reads {var}"
    for c in containers(objs):
        env = container_env(objs, c, external)
        sub = c.openrl_subcommand
        for var in env:
            if var in LIBRARY_ENV:
                continue
            if "lws" in c.workload and var in LWS_ENV:
                continue  # the LWS controller's; the manifest reads them through $(...) in its own variables
            if sub is not None:
                assert var in reads[sub], f"{c.where}: `openrl {sub}` does not read {var}"
            else:  # a plain command: it must name the variable itself
                assert var in " ".join(c.spec.get("command", []) + c.spec.get("args", [])), f"{c.where}: nothing reads {var}"


def test_trainer_and_samplers_serve_one_base_model(target, monkeypatch):
    name, objs, external = target
    models = set()
    for c in containers(objs, init=False):
        if c.openrl_subcommand in ("trainer", "sampler"):
            models.add(parse_openrl(c.spec["args"], container_env(objs, c, external), monkeypatch).base_model)
    assert len(models) == (0 if name == "custom-reward" else 1), models


def test_rewarders_load_their_functions_and_fit_their_memory(target, monkeypatch):
    from openrl import cli
    from openrl.rewarder.child import load_reward_fn

    _, objs, external = target
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for c in containers(objs, init=False):
        if c.openrl_subcommand != "rewarder":
            continue
        args = parse_openrl(c.spec["args"], container_env(objs, c, external), monkeypatch)
        fn = cli._reward_fn(args.fn)  # noqa: SLF001
        assert callable(load_reward_fn(fn)), f"{c.where}: {fn}"
        assert cli.REWARD_NAME.fullmatch(args.name), f"{c.where}: reward name {args.name!r}"
        assert args.concurrency >= 1, f"{c.where}: set the concurrency; the default is the node's CPUs, not the pod's"
        limit_mib = quantity_mib(c.spec["resources"]["limits"]["memory"])
        assert limit_mib >= args.concurrency * args.memory_mb, f"{c.where}: {args.concurrency} workers x {args.memory_mb} MB > {limit_mib} MiB"


def quantity_mib(q: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    return float(m.group(1)) * units.get(m.group(2), 1 / 2**20)


# -- probes, shutdown, resources ---------------------------------------------------------

# Plain commands the manifests run besides `openrl` and `python -m openrl.probe`: coreutils,
# which the Debian-based image has (test_images.py checks the base).
COREUTILS = {"sleep", "cp"}


def gateway_routes() -> set[str]:
    from openrl.gateway.app import GatewayConfig, make_app

    app = make_app(GatewayConfig(api_keys=("tml-x",)), bus=None)
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET"}


def check_command(c, command: list[str], kind: str) -> None:
    from openrl import probe

    if command[:3] == ["python", "-m", "openrl.probe"]:
        try:
            args = probe.parser().parse_args(command[3:])
        except SystemExit:
            raise AssertionError(f"{c.where}: bad probe {command}") from None
        assert args.kind == c.openrl_subcommand, f"{c.where}: probes --kind {args.kind}"
        if args.kind == "gateway":
            url = urlparse(args.url)
            assert url.port in {p["containerPort"] for p in c.spec["ports"]} and url.hostname == "127.0.0.1"
            assert url.path in gateway_routes(), f"{c.where}: the gateway serves no {url.path}"
        if kind == "liveness" and args.kind != "gateway":
            assert args.unreachable_ok, f"{c.where}: a NATS outage would restart every worker"
        if kind != "liveness":
            assert not args.unreachable_ok, f"{c.where}: {kind} passes while NATS is unreachable"
    else:
        assert command[0] in COREUTILS, f"{c.where}: unknown command {command}"


def metrics_port(objs, c, external=None) -> int:
    """The port the container serves /metrics on: OPENRL_METRICS_PORT as its env sets it,
    which must be its port named `metrics`."""
    port = int(container_env(objs, c, external).get("OPENRL_METRICS_PORT", "0"))
    assert port, f"{c.where}: OPENRL_METRICS_PORT unset: no /metrics, /healthz or /livez"
    named = {pt.get("name"): pt["containerPort"] for pt in c.spec.get("ports", [])}
    assert named.get("metrics") == port, f"{c.where}: port 'metrics' {named.get('metrics')} != OPENRL_METRICS_PORT {port}"
    return port


def check_http_probe(objs, c, get: dict, kind: str, external=None) -> None:
    from openrl import metrics

    if get["port"] in ("metrics", 9090):
        metrics_port(objs, c, external)
        assert get["path"] in metrics.ROUTES, f"{c.where}: the metrics server serves no {get['path']}"
        # Readiness means bus connected and model loaded (/healthz); liveness must not fail
        # while NATS is down, or an outage would restart every pod (/livez).
        assert get["path"] == ("/livez" if kind == "liveness" else "/healthz"), f"{c.where}: {kind} probes {get['path']}"
    else:
        assert get["path"] in gateway_routes(), f"{c.where}: the gateway serves no {get['path']}"


def test_pods_are_scraped_on_their_metrics_port(target):
    _, objs, external = target
    for c in containers(objs, init=False):
        if c.openrl_subcommand not in ("gateway", "trainer", "sampler", "rewarder"):
            continue
        annotations = c.workload["spec"]["template"]["metadata"].get("annotations", {})
        if c.workload.get("lws_role") == "worker":
            # A trainer group's other hosts only compute: nothing there serves metrics.
            assert "prometheus.io/scrape" not in annotations, f"{c.where}: a scrape target that is always down"
            continue
        port = metrics_port(objs, c, external)
        assert annotations.get("prometheus.io/scrape") == "true", c.where
        assert annotations.get("prometheus.io/port") == str(port), c.where
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics", c.where


def test_probes_exist_and_check_real_readiness(target):
    _, objs, external = target
    for c in containers(objs, init=False):
        sub = c.openrl_subcommand
        if sub is None:
            continue
        if c.workload.get("lws_role") == "worker":
            # Nothing serves a probe on a trainer group's other hosts; their process is the
            # check: a dead rank ends it, and the LWS then restarts the whole group.
            assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(c.spec), f"{c.where}: probes nothing serves"
            assert c.workload["lws"]["spec"]["leaderWorkerTemplate"].get("restartPolicy") == "RecreateGroupOnPodRestart", c.where
            continue
        assert "readinessProbe" in c.spec and "livenessProbe" in c.spec, c.where
        if sub in ("trainer", "sampler", "rewarder"):
            assert "startupProbe" in c.spec, f"{c.where}: loading a model takes minutes"
        for kind in ("startup", "readiness", "liveness"):
            p = c.spec.get(f"{kind}Probe")
            if p is None:
                continue
            if "exec" in p:
                check_command(c, p["exec"]["command"], kind)
                assert p.get("timeoutSeconds", 1) >= 5, f"{c.where}: a Python probe needs more than {p.get('timeoutSeconds', 1)} s"
            elif "httpGet" in p:
                check_http_probe(objs, c, p["httpGet"], kind, external)
            else:
                port = p["tcpSocket"]["port"]
                assert port in {pt.get("name") for pt in c.spec["ports"]} | {pt["containerPort"] for pt in c.spec["ports"]}
        hook = c.spec.get("lifecycle", {}).get("preStop", {}).get("exec")
        if hook:
            check_command(c, hook["command"], "preStop")
    for c in containers(objs):
        if c.init and c.openrl_subcommand is None:  # `openrl bus-init` is checked with the other subcommands
            check_command(c, c.spec["command"], "init")


def drain_budget_s(c) -> float:
    """What a process may need after SIGTERM: nats-py's drain timeout, plus for the gateway
    its preStop sleep and aiohttp's shutdown timeout (5 s, openrl/cli.py)."""
    import nats.aio.client

    budget = float(nats.aio.client.DEFAULT_DRAIN_TIMEOUT)
    hook = c.spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if hook[:1] == ["sleep"]:
        budget += float(hook[1])
    if c.openrl_subcommand == "gateway":
        budget += 5
    return budget


def test_termination_grace_covers_the_drain(target):
    _, objs, _ = target
    for c in containers(objs, init=False):
        if c.openrl_subcommand is None:
            continue
        grace = pod_spec(c.workload).get("terminationGracePeriodSeconds", 30)
        assert grace >= drain_budget_s(c), f"{c.where}: {grace} s < {drain_budget_s(c)} s"
        if c.openrl_subcommand == "trainer":
            assert grace >= 60, f"{c.where}: a trainer finishes its step in flight"


def test_resources_and_gpus(target):
    name, objs, _ = target
    for c in containers(objs):
        res = c.spec.get("resources", {})
        assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{c.where}: requests"
        assert "memory" in res.get("limits", {}), f"{c.where}: memory limit"
        gpus = res.get("limits", {}).get("nvidia.com/gpu")
        assert gpus == res["requests"].get("nvidia.com/gpu"), f"{c.where}: GPU request and limit differ"
        wants_gpu = name.startswith("gpu") and c.openrl_subcommand in ("trainer", "sampler")
        assert (gpus is not None) == wants_gpu, f"{c.where}: GPUs {gpus}"
        if name != "custom-reward":  # that one runs the user's own image
            assert c.spec["image"].endswith("-cuda" if name.startswith("gpu") else "-cpu"), f"{c.where}: {c.spec['image']}"


def test_pods_run_unprivileged(target):
    """As the images' user, which owns nothing but the volumes it is given."""
    _, objs, _ = target
    for w in workloads(objs):
        ps = pod_spec(w)
        assert ps["securityContext"]["runAsNonRoot"] and ps["securityContext"]["runAsUser"] == IMAGE_UID
        assert ps.get("automountServiceAccountToken") is False, w["metadata"]["name"]
        for c in ps["containers"] + ps.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            if sc.get("readOnlyRootFilesystem"):
                mounted = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert c["name"] == "seed-hf-cache" or "/tmp" in mounted, f"{w['metadata']['name']}/{c['name']}: no writable /tmp"


# -- network ------------------------------------------------------------------------------


def test_only_the_gateway_is_reachable(render):
    for name in OVERLAYS:
        objs = render(OVERLAYS[name])
        policies = find(objs, "NetworkPolicy")
        deny = [p for p in policies if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
                and not p["spec"].get("ingress") and not p["spec"].get("egress")]
        assert deny, f"{name}: no default-deny policy"
        for w in workloads(objs):
            labels = pod_labels(w)
            ingress = [p for p in policies if "Ingress" in p["spec"]["policyTypes"] and p["spec"].get("ingress")
                       and selects(p["spec"]["podSelector"], labels)]
            # Prometheus may reach the metrics port, from its own namespace only.
            rules = [rule for p in ingress for rule in p["spec"]["ingress"] if not own_group_only(rule.get("from", []), w, objs)]
            scrape = [r for r in rules if {pt["port"] for pt in r["ports"]} == {9090}]
            for rule in scrape:
                assert rule.get("from") and all(x["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
                                                and "podSelector" not in x for x in rule["from"]), f"{name}: metrics open to {rule}"
            if labels.get("app.kubernetes.io/part-of") == "openrl" and labels.get("app.kubernetes.io/component") != "model-download":
                assert scrape, f"{name}: {w['metadata']['name']} cannot be scraped"
            ports = {pt["port"] for rule in rules if rule not in scrape for pt in rule["ports"]}
            if labels.get("app.kubernetes.io/component") == "gateway":
                assert ports == {c["ports"][0]["containerPort"] for c in pod_spec(w)["containers"]}
            else:
                assert not ports, f"{name}: {w['metadata']['name']} accepts connections on {ports}"


def test_workers_talk_to_nats_and_dns_only(render):
    for name in OVERLAYS:
        objs = render(OVERLAYS[name])
        url = urlparse(data_of(one(objs, "ConfigMap", "openrl-common"))["OPENRL_NATS_URL"])
        nats_ns = url.hostname.split(".")[1]
        for w in workloads(objs):
            labels = pod_labels(w)
            for p in find(objs, "NetworkPolicy"):
                if "Egress" not in p["spec"]["policyTypes"] or not selects(p["spec"]["podSelector"], labels):
                    continue
                for rule in p["spec"].get("egress", []):
                    if own_group_only(rule.get("to", []), w, objs):
                        continue
                    ports = {(pt["port"], pt["protocol"]) for pt in rule["ports"]}
                    peers = rule.get("to", [])
                    if ports == {(53, "UDP"), (53, "TCP")}:
                        assert peers and all(x["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"} for x in peers)
                    elif ports == {(url.port, "TCP")}:
                        assert all(x["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": nats_ns} for x in peers)
                        assert all(x["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "nats"} for x in peers)
                    else:  # the internet: only the Job that downloads model weights
                        assert labels.get("app.kubernetes.io/component") == "model-download", f"{name}: {w['metadata']['name']} egress {ports}"
            assert any(
                p["spec"].get("egress") and selects(p["spec"]["podSelector"], labels) and
                any({(pt["port"], pt["protocol"]) for pt in r.get("ports", [])} == {(url.port, "TCP")} for r in p["spec"]["egress"])
                for p in find(objs, "NetworkPolicy")
            ) or labels.get("app.kubernetes.io/component") == "model-download", f"{name}: {w['metadata']['name']} cannot reach NATS"


# -- NATS and autoscaling ---------------------------------------------------------------


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_stream_replicas_match_the_nats_cluster(render, overlay, monkeypatch):
    objs = render(OVERLAYS[overlay])
    values = nats_values(overlay)
    cluster = values["config"]["cluster"]
    servers = cluster["replicas"] if cluster.get("enabled") else 1
    for c in containers(objs):  # bus-init, which creates them, above all
        if c.openrl_subcommand:
            args = parse_openrl(c.spec["args"], container_env(objs, c, OPERATOR_SECRETS), monkeypatch)
            assert args.nats_replicas == servers, f"{overlay}: {c.where} makes R{args.nats_replicas} streams on {servers} servers"


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_nats_url_is_the_charts_client_service(render, overlay):
    url = urlparse(data_of(one(render(OVERLAYS[overlay]), "ConfigMap", "openrl-common"))["OPENRL_NATS_URL"])
    values = nats_values(overlay)
    tls = values["config"].get("nats", {}).get("tls", {}).get("enabled", False)
    assert url.scheme == ("tls" if tls else "nats") and url.hostname == "nats.nats.svc.cluster.local"  # release `nats`, namespace `nats`
    assert url.port == values["config"].get("nats", {}).get("port", 4222)


KEDA_NATS_KEYS = {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold", "activationLagThreshold", "useHttps"}


def test_keda_watches_the_consumers_the_workers_use(render, monkeypatch):
    objs = render(OVERLAYS["gpu"])
    scaled = find(objs, "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == {
        w["metadata"]["name"] for w in find(objs, "Deployment") if pod_labels(w)["app.kubernetes.io/component"] in ("sampler", "rewarder")
    }
    values = nats_values("gpu")
    assert values["config"]["monitor"]["enabled"]
    assert "accounts" not in values["config"].get("merge", {})  # so clients are in $G
    for so in scaled:
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "nats-jetstream" and set(meta) <= KEDA_NATS_KEYS
        assert meta["account"] == "$G"
        assert meta["natsServerMonitoringEndpoint"] == f"nats-headless.nats.svc.cluster.local:{values['config']['monitor']['port']}"
        assert int(meta["lagThreshold"]) > 0
        target = one(objs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
        (c,) = [c for c in containers(objs, init=False) if c.workload is target]
        args = parse_openrl(c.spec["args"], container_env(objs, c, OPERATOR_SECRETS), monkeypatch)
        if args.command == "sampler":
            assert (meta["stream"], meta["consumer"]) == (subjects.SAMPLE_STREAM, subjects.sampler_consumer(args.base_model))
        else:
            assert (meta["stream"], meta["consumer"]) == (subjects.REWARD_STREAM, subjects.rewarder_consumer(args.name))


def test_ingress_lets_the_largest_body_through(render):
    (ing,) = find(render(OVERLAYS["gpu"]), "Ingress")
    size = ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size.endswith("m") and int(size[:-1]) * 2**20 >= MAX_PAYLOAD
    from openrl.gateway.app import GatewayConfig

    assert int(ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > GatewayConfig().long_poll_s


def test_dev_cpu_seeds_the_baked_default_model(render):
    """Trainer and samplers load the one copy of the default model the CPU image carries."""
    from openrl.cli import DEFAULT_BASE_MODEL

    objs = render(OVERLAYS["dev-cpu"])
    dockerfile = (DEPLOY / "docker" / "cpu.Dockerfile").read_text()
    baked = re.search(r"HF_HOME=(\S+) HF_HUB_OFFLINE=1 openrl prepare", dockerfile).group(1)
    for c in containers(objs):
        if c.openrl_subcommand in ("trainer", "sampler"):
            assert container_env(objs, c)["OPENRL_BASE_MODEL"] == DEFAULT_BASE_MODEL
            (seed,) = pod_spec(c.workload)["initContainers"]
            assert seed["command"] == ["cp", "-a", f"{baked}/.", f"{HF_CACHE}/"]
            hf = {m["mountPath"]: m["name"] for m in c.spec["volumeMounts"]}[HF_CACHE]
            assert {m["mountPath"]: m["name"] for m in seed["volumeMounts"]}[HF_CACHE] == hf


def test_custom_reward_example_scores():
    from openrl.rewarder.child import load_reward_fn, to_score

    sys.path.insert(0, str(EXAMPLE))
    try:
        fn = load_reward_fn("my_rewards.scoring:keyword_recall")
    finally:
        sys.path.remove(str(EXAMPLE))
    good = to_score(fn("Name two colors.", "Red and blue.", ["red", "blue"]))
    half = to_score(fn("Name two colors.", "Red, then nothing.", ["red", "blue"]))
    assert good.reward == 1.0 and half.reward == 0.5 and good.error is None


def test_main_readme_links_the_deploy_guide():
    assert "deploy/README.md" in (ROOT / "README.md").read_text()
