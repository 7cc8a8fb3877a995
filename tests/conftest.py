"""Shared fixtures: a real nats-server, a real `openrl up` stack, real tinker clients.

Both enforce NATS authorization, as deployments do: one set of role credentials for the
session (`nats_credentials`), exported as OPENRL_NATS_CREDS, so every process a test starts
connects as its own role; in-process clients take `stack_helpers.bus_config(url, role)`.

The default model is built once into a test HF cache (outside the repo, reused across
runs; its revision changes when the recipe does) and every process, the tests' own
included, runs with HF_HUB_OFFLINE=1: nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stack_helpers import API_KEY, OTHER_KEY, bus_config, free_port, run_stack

# Must be set before huggingface_hub is imported anywhere (it reads them at import).
os.environ.setdefault("OPENRL_TEST_HF_HOME", str(Path.home() / ".cache" / "openrl-tests" / "hf"))
os.environ["HF_HOME"] = os.environ["OPENRL_TEST_HF_HOME"]
os.environ.pop("HF_HUB_CACHE", None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TINKER_TELEMETRY", "0")


@pytest.fixture(scope="session")
def nats_credentials(tmp_path_factory) -> Path:
    """Every role's NATS credentials for this session, in a 0600 file named by OPENRL_NATS_CREDS
    (the processes tests start read it, each taking its own role's entry). The session's
    nats-server enforces them, and so does the `stack`: `openrl up` reuses the credentials file
    it finds in its data dir."""
    from openrl.bus import auth

    path = tmp_path_factory.mktemp("nats-creds") / auth.LOCAL_FILE
    auth.save(path, auth.generate())
    os.environ["OPENRL_NATS_CREDS"] = str(path)
    return path


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory, nats_credentials):
    """A nats-server enforcing the session's role credentials, its streams and buckets made
    (by the operator, as `openrl up` does), so workers started against it can bind."""
    import asyncio

    from openrl.bus import auth
    from openrl.bus.client import Bus
    from openrl.bus.server import NatsServer

    async def ensure(url: str) -> None:
        await (await Bus.connect(bus_config(url, "operator"))).close()

    with NatsServer(tmp_path_factory.mktemp("nats"), credentials=auth.load_all(nats_credentials)) as server:
        asyncio.run(ensure(server.url))
        yield server


@pytest.fixture
async def bus(nats_server):
    """An operator's client of the session's nats-server, closed after the test."""
    from openrl.bus.client import Bus

    b = await Bus.connect(bus_config(nats_server.url))
    yield b
    await b.close()


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default model's snapshot in the test HF cache, built on first use (a few minutes)."""
    from openrl.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, default_model, nats_credentials):
    """The session's stack: `openrl up` with two samplers, shared by the tests that drive one."""
    yield from run_stack(tmp_path_factory.mktemp("stack"), nats_credentials, args=("--samplers", "2"))


def _gateway(stack, tmp_path_factory, name: str, env: dict[str, str]):
    """Another `openrl gateway` on the stack's bus, configured the way the Kubernetes manifests
    do it (OPENRL_* environment variables); yields its URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp(name) / "gateway.log"
    log = open(log_path, "wb")
    env = {
        **os.environ,
        "OPENRL_HOST": "127.0.0.1",
        "OPENRL_PORT": str(port),
        "OPENRL_NATS_URL": stack.nats_url,
        "OPENRL_API_KEYS": f"{API_KEY},{OTHER_KEY}",
        **env,
    }
    proc = subprocess.Popen([sys.executable, "-m", "openrl", "gateway"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway {name} did not start:\n" + log_path.read_text())
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(15)
    log.close()


@pytest.fixture(scope="module")
def retention_stack(tmp_path_factory, default_model, nats_credentials):
    """A stack of its own (one sampler) with the retention gateway's settings (below), so that
    its JetStream dir holds only what one test leaves there (tests/test_storage.py's RL loop:
    the session stack's store also holds every other test's leftovers)."""
    env = {"OPENRL_SAMPLER_WEIGHTS_KEEP": "2", "OPENRL_COLLECT_EVERY_S": "0.5", "OPENRL_COLLECT_GRACE_S": "1"}
    yield from run_stack(tmp_path_factory.mktemp("retention-stack"), nats_credentials, args=("--samplers", "1"), env=env)


@pytest.fixture(scope="session")
def extra_gateway(stack, tmp_path_factory):
    """A second gateway replica on the same bus, serving fwdbwd_max_chunk_len=2, asking
    clients to zstd-compress forward_backward bodies, and refusing all sampling with 429."""
    env = {
        "OPENRL_FWDBWD_MAX_CHUNK_LEN": "2",
        "OPENRL_PROTO_COMPRESS": "1",
        "OPENRL_SAMPLE_QUEUE_MAX": "0",  # every asample is over the bound: 429
    }
    yield from _gateway(stack, tmp_path_factory, "gw2", env)


@pytest.fixture(scope="session")
def jwt_gateway(stack, tmp_path_factory):
    """A second gateway replica on the same bus with JWT mode on (OPENRL_JWT_AUTH=1): its
    client/config tells the SDK to trade its API key for a JWT at auth/token."""
    yield from _gateway(stack, tmp_path_factory, "gw-jwt", {"OPENRL_JWT_AUTH": "1"})


@pytest.fixture(scope="session")
def quota_gateway(stack, tmp_path_factory):
    """A second gateway replica on the same bus with small per-key quotas (tests/gateway/test_quotas.py):
    3 live sessions, 2 models in them, 2 checkpoints, 4 reward items and 4 sample sequences in
    flight, 16 KiB of training requests in flight (test_bounds)."""
    env = {"OPENRL_QUOTA_SESSIONS": "3", "OPENRL_QUOTA_MODELS": "2", "OPENRL_QUOTA_CHECKPOINTS": "2", "OPENRL_QUOTA_REWARD_ITEMS": "4",
           "OPENRL_QUOTA_SAMPLES": "4", "OPENRL_QUOTA_TRAIN_GB": str(16 * 1024 / 1024**3)}
    yield from _gateway(stack, tmp_path_factory, "gw-quota", env)


@pytest.fixture(scope="session")
def admission_gateway(stack, tmp_path_factory):
    """A second gateway replica on the same bus with admission by share as a cluster's gateway
    has it (pools apart; tests/gateway/test_admission.py): it counts only what it admitted, so
    other tests' keys on the stack's own gateway do not weigh in. Its capacity is 4 requests in
    flight per pool: 2 each for two active keys."""
    env = {"OPENRL_ADMISSION_PER_KEY": "2", "OPENRL_ADMISSION_CAPACITY": "4", "OPENRL_ADMISSION_SLACK": "2"}
    yield from _gateway(stack, tmp_path_factory, "gw-admission", env)


@pytest.fixture(scope="session")
def retention_gateway(stack, tmp_path_factory):
    """A second gateway replica on the same bus whose sampler retention is tight and fast: the
    newest 2 unnamed sampler weights per model kept, a sweep every 0.5 s, deleted after 1 s
    unreferenced (tests/test_storage.py)."""
    env = {"OPENRL_SAMPLER_WEIGHTS_KEEP": "2", "OPENRL_COLLECT_EVERY_S": "0.5", "OPENRL_COLLECT_GRACE_S": "1"}
    yield from _gateway(stack, tmp_path_factory, "gw-retention", env)


@pytest.fixture(scope="module")
def tokenizer(stack):
    """The default model's tokenizer, as the SDK gets it (once per test module)."""
    from sdk_helpers import training_client

    _, tc = training_client(stack, seed=0, rank=1)
    return tc.get_tokenizer()


@pytest.fixture(scope="module")
def data(tokenizer):
    """Eight chat SFT datums (the demo's examples)."""
    from openrl.demo import make_datum, sft_examples

    return [make_datum(tokenizer, q, a) for q, a in sft_examples(8, seed=1)]
