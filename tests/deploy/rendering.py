"""Rendering and reading deploy/: kustomize output as Python objects, and what the code reads.

(Not a conftest.py: the test modules import these names, and `from conftest import ...`
finds whichever conftest.py was imported first when several are collected together.)

Every kustomize found is used (`kustomize` from tests/deploy/install-kustomize.sh, and
`kubectl kustomize` when kubectl is installed) and they must agree. Without any, the
manifest tests skip, unless OPENRL_DEPLOY_TOOLS_REQUIRED=1 (set by .ci/run): then they fail.
"""

from __future__ import annotations

import argparse
import ast
import base64
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = {name: DEPLOY / "kustomize" / "overlays" / name for name in ("dev-cpu", "gpu", "gpu-multihost")}
EXAMPLE = DEPLOY / "examples" / "custom-reward"
NAMESPACE = "openrl"
IMAGE_UID = 10001  # the images' USER; the manifests run pods as it
HF_CACHE = "/cache/huggingface"  # the images' HF_HOME, a volume in every worker pod
# Which NATS values each overlay is documented (deploy/README.md) to run against.
NATS_VALUES = {
    "dev-cpu": [DEPLOY / "nats" / "values.yaml", DEPLOY / "nats" / "values-auth.yaml", DEPLOY / "nats" / "values-dev.yaml"],
    "gpu": [DEPLOY / "nats" / "values.yaml", DEPLOY / "nats" / "values-auth.yaml"],
    "gpu-multihost": [DEPLOY / "nats" / "values.yaml", DEPLOY / "nats" / "values-auth.yaml"],
}
TOOLS_REQUIRED = os.environ.get("OPENRL_DEPLOY_TOOLS_REQUIRED") == "1"
# Objects the manifests reference but do not create: the operator creates them, as
# deploy/README.md says (checked in test_deploy_manifests.py). Stand-ins with the keys the manifests use.
OPERATOR_SECRETS = {
    ("Secret", "openrl-api-keys"): {"kind": "Secret", "metadata": {"name": "openrl-api-keys"},
                                    "data": {"OPENRL_API_KEYS": base64.b64encode(b"tml-operator-key").decode()}},
    # Each NATS role's user and password (the same passwords as the NATS side's openrl-nats-users).
    **{("Secret", f"openrl-nats-{role}"): {"kind": "Secret", "metadata": {"name": f"openrl-nats-{role}"},
                                          "data": {"user": base64.b64encode(role.encode()).decode(),
                                                   "password": base64.b64encode(b"operator-made").decode()}}
       for role in ("gateway", "trainer", "sampler", "rewarder", "operator")},
}


def need_tool(name: str, hint: str) -> None:
    msg = f"{name} not found: {hint}"
    if TOOLS_REQUIRED:
        pytest.fail(msg)
    pytest.skip(msg)


def kustomize_commands() -> list[list[str]]:
    found = []
    venv_bin = Path(sys.executable).parent / "kustomize"
    kustomize = str(venv_bin) if venv_bin.is_file() else shutil.which("kustomize")
    if kustomize:
        found.append([kustomize, "build"])
    kubectl = shutil.which("kubectl")
    if kubectl:
        found.append([kubectl, "kustomize"])
    return found


@pytest.fixture(scope="session")
def render():
    """render(path) -> the objects `kustomize build path` prints (every renderer agreeing)."""
    commands = kustomize_commands()
    if not commands:
        need_tool("kustomize", "bash tests/deploy/install-kustomize.sh (or install kubectl)")
    cache: dict[Path, list[dict]] = {}

    def build(path: Path) -> list[dict]:
        if path not in cache:
            outputs = []
            for cmd in commands:
                done = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, f"{' '.join(cmd)} {path}:\n{done.stderr}"
                outputs.append([d for d in yaml.safe_load_all(done.stdout) if d])
            for cmd, other in zip(commands[1:], outputs[1:]):
                assert other == outputs[0], f"{' '.join(commands[0])} and {' '.join(cmd)} disagree on {path}"
            cache[path] = outputs[0]
        return cache[path]

    return build


def helm_merge(a, b):
    """How helm combines -f files: maps merge key by key, anything else is replaced."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: helm_merge(a[k], b[k]) if k in a and k in b else b.get(k, a.get(k)) for k in {**a, **b}}
    return b


def nats_values(overlay: str) -> dict:
    """The NATS chart values an overlay runs against, its -f files merged as helm does."""
    values: dict = {}
    for f in NATS_VALUES[overlay]:
        values = helm_merge(values, yaml.safe_load(f.read_text()))
    return values


# -- reading rendered objects ------------------------------------------------------------


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


WORKLOAD_KINDS = ("Deployment", "Job", "StatefulSet", "DaemonSet")
# What the LeaderWorkerSet controller puts first in every container of its pods
# (kubernetes-sigs/lws, pkg/utils/pod/pod_utils.go, AddLWSVariables).
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")


def workloads(objs: list[dict]) -> list[dict]:
    """Objects with a pod template. A LeaderWorkerSet gives two, its leader's and its workers'
    templates, each as a view shaped like a Deployment (`spec.template`) with `lws` (the object)
    and `lws_role` ("leader" or "worker") added, named `<name>/leader` and `<name>/worker`."""
    out = []
    for o in objs:
        if o["kind"] in WORKLOAD_KINDS:
            out.append(o)
        elif o["kind"] == "LeaderWorkerSet":
            t = o["spec"]["leaderWorkerTemplate"]
            for role, template in (("leader", t.get("leaderTemplate", t["workerTemplate"])), ("worker", t["workerTemplate"])):
                out.append({"kind": o["kind"], "metadata": {"name": f"{o['metadata']['name']}/{role}"},
                            "spec": {"template": template}, "lws": o, "lws_role": role})
    return out


def lws_env(view: dict, worker_index: int | None = None) -> dict[str, str]:
    """What the LWS controller sets in a pod of group 0 (the leader is worker 0; a worker view
    stands for worker 1 unless `worker_index` says otherwise)."""
    lws = view["lws"]
    name, namespace = lws["metadata"]["name"], lws["metadata"].get("namespace", "default")
    index = worker_index if worker_index is not None else (0 if view["lws_role"] == "leader" else 1)
    return {
        "LWS_LEADER_ADDRESS": f"{name}-0.{name}.{namespace}",  # subdomainPolicy Shared: the LWS's headless Service
        "LWS_GROUP_SIZE": str(lws["spec"]["leaderWorkerTemplate"].get("size", 1)),
        "LWS_WORKER_INDEX": str(index),
    }


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels / matchExpressions) against a label set."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass
class Container:
    workload: dict
    spec: dict
    init: bool

    @property
    def where(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}/{self.spec['name']}"

    @property
    def openrl_subcommand(self) -> str | None:
        """The `openrl` subcommand it runs (the image's entrypoint is `openrl`), or None."""
        if self.spec.get("command") or not self.spec.get("args"):
            return None
        return self.spec["args"][0]


def containers(objs: list[dict], init: bool = True) -> list[Container]:
    out = []
    for w in workloads(objs):
        spec = pod_spec(w)
        out += [Container(w, c, False) for c in spec.get("containers", [])]
        if init:
            out += [Container(w, c, True) for c in spec.get("initContainers", [])]
    return out


def container_env(objs: list[dict], c: Container, external: dict[str, dict] | None = None,
                  worker_index: int | None = None) -> dict[str, str]:
    """The environment a container gets: what a controller injects (LWS), envFrom
    ConfigMaps/Secrets, then env (which wins), with $(VAR) references expanded as the kubelet
    does (a reference to a variable not defined before it would stay as it is: refused here).
    valueFrom entries get a stand-in (the pod name for fieldRef, the Secret's value if rendered)."""
    env: dict[str, str] = dict(lws_env(c.workload, worker_index)) if "lws" in c.workload else {}
    for src in c.spec.get("envFrom", []):
        for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if ref in src:
                obj = lookup(objs, kind, src[ref]["name"], external)
                env.update({src.get("prefix", "") + k: v for k, v in data_of(obj).items()})
    for e in c.spec.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env, f"{c.where} {e['name']}")
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = "pod-0"
        else:
            ref = e["valueFrom"].get("secretKeyRef") or e["valueFrom"].get("configMapKeyRef")
            kind = "Secret" if "secretKeyRef" in e["valueFrom"] else "ConfigMap"
            obj = lookup(objs, kind, ref["name"], external, optional=True)
            env[e["name"]] = data_of(obj).get(ref["key"], f"<{kind} {ref['name']}/{ref['key']}>") if obj else f"<{ref['name']}>"
    return env


def expand(value: str, env: dict[str, str], where: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        assert m.group(1) in env, f"{where}: $({m.group(1)}) names no variable defined before it"
        return env[m.group(1)]

    return re.sub(r"\$?\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


def lookup(objs: list[dict], kind: str, name: str, external: dict[str, dict] | None = None, optional: bool = False) -> dict | None:
    found = find(objs, kind, name)
    if found:
        return found[0]
    if external and (kind, name) in external:
        return external[(kind, name)]
    assert optional, f"{kind}/{name} is referenced but neither rendered nor a documented external object"
    return None


def data_of(obj: dict | None) -> dict[str, str]:
    if obj is None:
        return {}
    data = dict(obj.get("data") or {})
    if obj["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in data.items()}
        data.update(obj.get("stringData") or {})
    return {k: str(v) for k, v in data.items()}


def own_group_only(peers: list[dict], w: dict, objs: list[dict]) -> bool:
    """Whether a rule's peers are the pods of w's own trainer group and nothing else: its
    ranks talk to each other on ports NCCL picks, so such a rule may leave ports open."""
    if "lws" not in w or not peers or any(set(x) != {"podSelector"} for x in peers):
        return False
    views = workloads(objs)
    mine = [v for v in views if v.get("lws") is w["lws"]]
    others = [v for v in views if v.get("lws") is not w["lws"]]
    return all(all(selects(x["podSelector"], pod_labels(v)) for v in mine)
               and not any(selects(x["podSelector"], pod_labels(v)) for v in others) for x in peers)


# -- what the code reads ---------------------------------------------------------------


def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return dict(action.choices)


def env_read_by_subcommand() -> dict[str, set[str]]:
    """{subcommand: the environment variables it reads}.

    Flags: `openrl.cli.parser()` is built with `_env` recording which subparser was being
    filled when it was called. Runtime reads: the `_env("X")` / `os.environ` literals in the
    subcommand's function and in the module-level functions of cli.py it calls.
    """
    from openrl import cli

    current: list[str | None] = [None]
    reads: dict[str, set[str]] = defaultdict(set)
    real_env, real_add_parser = cli._env, argparse._SubParsersAction.add_parser  # noqa: SLF001

    def add_parser(self, name, **kwargs):
        current[0] = name
        return real_add_parser(self, name, **kwargs)

    def env(name, default=None):
        reads[current[0]].add(f"OPENRL_{name}")
        return real_env(name, default)

    cli._env = env  # noqa: SLF001
    argparse._SubParsersAction.add_parser = add_parser  # noqa: SLF001
    try:
        p = cli.parser()
    finally:
        cli._env = real_env  # noqa: SLF001
        argparse._SubParsersAction.add_parser = real_add_parser  # noqa: SLF001

    tree = ast.parse(inspect.getsource(cli))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}

    def literal_reads(name: str, seen: set[str]) -> set[str]:
        if name in seen or name not in functions:
            return set()
        seen.add(name)
        found = set()
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                f = node.func
                if isinstance(f, ast.Name) and f.id == "_env":
                    found.add(f"OPENRL_{node.args[0].value}")
                elif isinstance(f, ast.Attribute) and f.attr in ("get", "getenv") and "environ" in ast.unparse(f):
                    found.add(node.args[0].value)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                found |= literal_reads(node.func.id, seen)
        return found

    out = {}
    for name, sub in subparsers(p).items():
        func = sub.get_default("func")
        out[name] = set(reads.get(name, set())) | literal_reads(func.__name__, set())
    return out


def parse_openrl(argv: list[str], env: dict[str, str], monkeypatch):
    """`openrl ARGV` parsed by the real parser with exactly `env`'s OPENRL_* variables."""
    from openrl import cli

    for k in [k for k in os.environ if k.startswith("OPENRL_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        return cli.parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"openrl {shlex.join(argv)} does not parse") from None


# Variables read by libraries inside the image, not by OpenRL: each with the module whose
# source must mention it (checked, so a rename upstream fails here).
LIBRARY_ENV = {
    "HF_HOME": "huggingface_hub.constants",
    "HF_HUB_OFFLINE": "huggingface_hub.constants",
    "HF_TOKEN": "huggingface_hub.constants",
}
