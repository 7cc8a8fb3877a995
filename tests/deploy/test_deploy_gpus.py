"""Trainer groups in the GPU overlays, against the code that runs them: a multi-GPU trainer
pod (gpu) asks for one GPU per rank, and the multi-host group (gpu-multihost, a
LeaderWorkerSet) gives every host the torchrun settings of one group, from what the LWS
controller injects. The LeaderWorkerSet schema itself is checked in test_deploy_manifests.py
with every other object; here, how it was derived."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from rendering import (  # noqa: F401 - render is a fixture
    NAMESPACE,
    OPERATOR_SECRETS,
    OVERLAYS,
    container_env,
    containers,
    find,
    lws_env,
    one,
    own_group_only,
    parse_openrl,
    pod_labels,
    pod_spec,
    render,
    workloads,
)

SCHEMAS = Path(__file__).parent / "schemas"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def gpus_of(c) -> int:
    return int(c.spec["resources"]["limits"]["nvidia.com/gpu"])


def group_of(args):
    """The group `openrl trainer` builds from these arguments, checked as it checks it."""
    from openrl import cli

    return cli._trainer_group(args)  # noqa: SLF001


@pytest.mark.parametrize("overlay", ["gpu", "gpu-multihost"])
def test_every_trainer_rank_has_a_gpu_of_its_own(render, overlay, monkeypatch):
    objs = render(OVERLAYS[overlay])
    trainers = [c for c in containers(objs, init=False) if c.openrl_subcommand == "trainer"]
    assert trainers
    for c in trainers:
        args = parse_openrl(c.spec["args"], container_env(objs, c, OPERATOR_SECRETS), monkeypatch)
        assert args.nproc_per_node == gpus_of(c), f"{c.where}: {args.nproc_per_node} ranks on {gpus_of(c)} GPUs"
        group_of(args).check(gpus_of(c))  # what the trainer checks at start, with the GPUs the pod gets
        assert args.device in ("", "cuda"), c.where


def test_the_gpu_overlay_trainer_is_one_pod_with_several_gpus(render, monkeypatch):
    objs = render(OVERLAYS["gpu"])
    (c,) = [c for c in containers(objs, init=False) if c.openrl_subcommand == "trainer"]
    assert c.workload["kind"] == "Deployment"
    args = parse_openrl(c.spec["args"], container_env(objs, c, OPERATOR_SECRETS), monkeypatch)
    assert args.nproc_per_node >= 2 and args.nnodes == 1, "the gpu overlay's trainer is a multi-GPU group"
    assert group_of(args).world_size == gpus_of(c)
    # NCCL between the ranks of one pod goes through shared memory: more than Docker's 64 MiB.
    shm = {m["name"] for m in c.spec["volumeMounts"] if m["mountPath"] == "/dev/shm"}
    assert any(v["name"] in shm and v.get("emptyDir", {}).get("medium") == "Memory" for v in pod_spec(c.workload)["volumes"])


def lws(objs) -> dict:
    (group,) = find(objs, "LeaderWorkerSet")
    return group


def test_the_multihost_group_replaces_the_one_pod_trainer(render):
    objs = render(OVERLAYS["gpu-multihost"])
    assert not find(objs, "Deployment", "openrl-trainer") and not find(objs, "PodDisruptionBudget", "openrl-trainer")
    trainer_workloads = {c.workload["metadata"]["name"] for c in containers(objs) if c.openrl_subcommand == "trainer"}
    assert trainer_workloads == {"openrl-trainer-group/leader", "openrl-trainer-group/worker"}
    gpu = render(OVERLAYS["gpu"])  # and everything else is the gpu overlay's
    others = {(o["kind"], o["metadata"]["name"]) for o in objs} - {("LeaderWorkerSet", "openrl-trainer-group"),
                                                                   ("NetworkPolicy", "trainer-group-peers")}
    assert others == {(o["kind"], o["metadata"]["name"]) for o in gpu} - {("Deployment", "openrl-trainer"),
                                                                         ("PodDisruptionBudget", "openrl-trainer")}


def test_every_host_of_the_group_joins_one_torchrun_group(render, monkeypatch):
    objs = render(OVERLAYS["gpu-multihost"])
    group = lws(objs)
    name = group["metadata"]["name"]
    size = group["spec"]["leaderWorkerTemplate"]["size"]
    assert size >= 2, "a multi-host group"
    views = {v["lws_role"]: v for v in workloads(objs) if v.get("lws") is group}
    seen = []
    for index in range(size):
        view = views["leader" if index == 0 else "worker"]
        (c,) = [c for c in containers(objs, init=False) if c.workload["metadata"] == view["metadata"]]
        env = container_env(objs, c, OPERATOR_SECRETS, worker_index=index)
        args = parse_openrl(c.spec["args"], env, monkeypatch)
        assert args.command == "trainer"
        assert (args.nnodes, args.node_rank) == (size, index), f"host {index}: --nnodes {args.nnodes} --node-rank {args.node_rank}"
        assert args.master_addr == f"{name}-0.{name}.{NAMESPACE}", f"host {index} looks for node 0 at {args.master_addr}"
        group_of(args).check(gpus_of(c))
        seen.append((args.nproc_per_node, args.master_port, args.base_model, args.nats_replicas))
    assert len(set(seen)) == 1, f"the hosts disagree on ranks, port, model or replicas: {seen}"
    (leader,) = [c for c in containers(objs, init=False) if c.workload["metadata"] == views["leader"]["metadata"]]
    assert seen[0][1] in {p["containerPort"] for p in leader.spec["ports"]}, "the leader declares its rendezvous port"


def test_the_group_starts_and_fails_as_one(render):
    spec = lws(render(OVERLAYS["gpu-multihost"]))["spec"]
    # Workers must start with the leader, not once it is ready: it turns ready only after
    # every rank has joined and the model is loaded (LeaderReady would never start them).
    assert spec.get("startupPolicy", "LeaderCreated") == "LeaderCreated"
    # A dead rank ends its pod's launcher; the whole group must then restart together.
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    # The leader address the hosts are given (LWS_LEADER_ADDRESS) is the Shared subdomain's.
    assert spec.get("networkConfig", {}).get("subdomainPolicy", "Shared") == "Shared"


def test_leader_and_workers_run_the_same_trainer(render):
    """The two templates differ only in what only the leader serves (probes, ports, scraping)."""
    objs = render(OVERLAYS["gpu-multihost"])
    views = {v["lws_role"]: v for v in workloads(objs) if "lws" in v}
    leader, worker = (json.loads(json.dumps(views[r]["spec"]["template"])) for r in ("leader", "worker"))
    for t in (leader, worker):
        t["metadata"].pop("annotations", None)
        for c in t["spec"]["containers"]:
            for key in (*PROBES, "ports"):
                c.pop(key, None)
    assert leader == worker
    assert pod_labels(views["leader"]) == pod_labels(views["worker"])


def test_group_pods_reach_each_other_and_nothing_else_reaches_them(render):
    objs = render(OVERLAYS["gpu-multihost"])
    (policy,) = find(objs, "NetworkPolicy", "trainer-group-peers")
    views = [v for v in workloads(objs) if "lws" in v]
    for v in views:
        assert own_group_only(policy["spec"]["ingress"][0]["from"], v, objs)
        assert own_group_only(policy["spec"]["egress"][0]["to"], v, objs)
    # What own_group_only must refuse (test_deploy_manifests.py relies on it to let only these rules through).
    everyone = [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "openrl"}}}]
    other_namespace = [{**policy["spec"]["ingress"][0]["from"][0], "namespaceSelector": {}}]
    sampler = next(w for w in workloads(objs) if w["metadata"]["name"] == "openrl-sampler")
    assert not own_group_only(everyone, views[0], objs)
    assert not own_group_only(other_namespace, views[0], objs)
    assert not own_group_only(policy["spec"]["ingress"][0]["from"], sampler, objs)


def test_lws_env_is_what_the_controller_injects(render):
    """The stand-in the tests expand $(LWS_...) with, against the controller's rules: the leader
    is `<name>-<group>` in the LWS's headless Service (the subdomain), in the namespace."""
    group = lws(render(OVERLAYS["gpu-multihost"]))
    view = {"lws": group, "lws_role": "worker"}
    env = lws_env(view, worker_index=3)
    assert env == {"LWS_LEADER_ADDRESS": f"openrl-trainer-group-0.openrl-trainer-group.{NAMESPACE}",
                   "LWS_GROUP_SIZE": str(group["spec"]["leaderWorkerTemplate"]["size"]), "LWS_WORKER_INDEX": "3"}


# -- the LeaderWorkerSet schema ------------------------------------------------------------


def test_lws_schema_is_derived_from_the_real_crd():
    schema = json.loads((SCHEMAS / "lws-leaderworkerset.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "kubernetes-sigs/lws v0.10.0" in schema["description"]
    assert "config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml" in schema["description"]
    assert schema["$id"] == "leaderworkerset.x-k8s.io/v1/LeaderWorkerSet"
    lwt = schema["properties"]["spec"]["properties"]["leaderWorkerTemplate"]
    assert lwt["required"] == ["workerTemplate"] and lwt["additionalProperties"] is False
    assert lwt["properties"]["restartPolicy"]["enum"] == ["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"]


def test_crd_conversion():
    from crd_schema import convert, share_repeats

    crd = {
        "type": "object",
        "description": "dropped",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "bare": {"x-kubernetes-int-or-string": True},
            "maybe": {"type": "string", "nullable": True},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "free": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
            "list": {"type": "array", "x-kubernetes-list-type": "atomic", "items": {"type": "object", "properties": {"k": {"type": "string", "default": "x"}}}},
        },
    }
    out = convert(crd)
    v = jsonschema.Draft202012Validator(out)
    assert v.is_valid({"port": 8080, "bare": "50%", "maybe": None, "labels": {"a": "b"}, "free": {"a": "x", "b": 1}, "list": [{"k": "v"}]})
    assert not v.is_valid({"prot": 1})  # an unknown field: the server would prune it, so it fails here
    assert not v.is_valid({"list": [{"kk": "v"}]})
    assert not v.is_valid({"labels": {"a": 1}})
    assert not v.is_valid({"bare": 1.5})
    assert "description" not in out and "default" not in json.dumps(out)
    with pytest.raises(ValueError, match="CEL"):
        convert({"type": "object", "x-kubernetes-validations": [{"rule": "self.a > 0"}]})
    with pytest.raises(ValueError, match="unknown schema marker"):
        convert({"type": "object", "x-kubernetes-new-thing": True})
    big = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(400)}}
    twice = {"type": "object", "properties": {"a": json.loads(json.dumps(big)), "b": json.loads(json.dumps(big))}}
    defs = share_repeats(twice)
    assert list(defs) == ["a+b"] and twice["properties"] == {"a": {"$ref": "#/$defs/a+b"}, "b": {"$ref": "#/$defs/a+b"}}
