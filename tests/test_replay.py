"""Recorded bus streams as fixtures: `openrl record` captures a live stack's traffic, and
`openrl replay` publishes it into a fresh, gateway-less bus whose workers must reproduce
the same results (adapter weights, rewards)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from stack_helpers import BASE_MODEL
from openrl.bus import record as rec
from openrl.bus.messages import ForwardBackward, ForwardBackwardResult, Future, ScoreRequest, ScoreResult, TrainRequest, decode
from openrl.client import RewardClient
from sdk_helpers import logprobs, sdk_steps, training_client

pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------------- the file format


def test_the_file_format_round_trips_and_refuses_other_files(tmp_path):
    path = tmp_path / "r.orlrec"
    w = rec.Writer(path, ["openrl.>"])
    frames = [rec.Frame(t=0.5 * i, s=f"openrl.x.{i}", h={"Nats-Msg-Id": f"m{i}"} if i % 2 else None, d=bytes([i]) * i) for i in range(50)]
    for f in frames[:20]:
        w.add(f)
    w.flush()
    for f in frames[20:]:
        w.add(f)
    w.close()
    got = rec.read(path)
    assert got.header.format == "openrl-record" and got.header.version == 1 and got.header.subjects == ["openrl.>"]
    assert got.frames == frames

    # A recorder killed mid-write leaves a truncated tail: everything flushed before it reads.
    truncated = tmp_path / "cut.orlrec"
    w = rec.Writer(truncated, ["openrl.>"])
    for f in frames[:20]:
        w.add(f)
    w.flush()
    w._z.write(b"\x05\x00\x00\x00partial")  # noqa: SLF001 - simulate a half-written frame
    w._z.flush()  # noqa: SLF001
    w._file.flush()  # noqa: SLF001
    assert rec.read(truncated).frames == frames[:20]

    junk = tmp_path / "junk"
    junk.write_bytes(b"not a recording at all")
    with pytest.raises(rec.RecordFormatError, match="not an openrl recording"):
        rec.read(junk)
    future = tmp_path / "v99.orlrec"
    w = rec.Writer(future, [])
    w.close()
    raw = rec.read(future)  # rewrite the header with an unknown version
    import zstandard

    body = msgspec.msgpack.encode(msgspec.structs.replace(raw.header, version=99))
    future.write_bytes(zstandard.ZstdCompressor().compress(rec._LEN.pack(len(body)) + body))  # noqa: SLF001
    with pytest.raises(rec.RecordFormatError, match="version 99"):
        rec.read(future)


@pytest.mark.parametrize(
    "subject, pattern, want",
    [
        ("openrl.train.a.b", "openrl.>", True),
        ("openrl.train.a.b", "openrl.train.*", False),
        ("openrl.train.a", "openrl.train.*", True),
        ("openrl", "openrl.>", False),
        ("$KV.openrl-models.x", "$KV.openrl-models.>", True),
        ("openrl.reward.math", "openrl.sample.>", False),
    ],
)
def test_subject_patterns(subject, pattern, want):
    assert rec.matches(subject, pattern) is want


def test_replay_of_a_file_that_is_not_a_recording_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 64)
    r = subprocess.run([sys.executable, "-m", "openrl", "replay", str(junk), "--to", "nats://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not an openrl recording" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------- helpers


class Recorder:
    def __init__(self, nats_url: str, subjects: str, out: Path):
        self.out = out
        self.log = out.with_suffix(".log")
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openrl", "record", "--nats-url", nats_url, "--subjects", subjects, "--out", str(out)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while "recording" not in self.log.read_text():  # logged once subscribed
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> rec.Recording:
        time.sleep(0.5)  # let the last messages arrive
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.log.read_text()
        self._log.close()
        return rec.read(self.out)


class FreshBus:
    """A new nats-server (empty store) and the workers a test starts on it; no gateway."""

    def __init__(self, tmp_path: Path):
        from openrl.bus.server import NatsServer

        self.server = NatsServer(tmp_path / "nats")
        self.server.__enter__()
        self.url = self.server.url
        self.procs: list[subprocess.Popen] = []
        self.tmp = tmp_path

    def start(self, *argv: str, name: str) -> None:
        log = open(self.tmp / f"{name}.log", "wb")
        env = {**os.environ, "OPENRL_NATS_URL": self.url, "OPENRL_THREADS": "1", "OPENRL_LOG_FORMAT": "json"}
        self.procs.append(subprocess.Popen([sys.executable, "-m", "openrl", *argv], stdout=log, stderr=subprocess.STDOUT, env=env))

    def wait_worker(self, kind: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.run(self._has_worker(kind)):
            assert time.monotonic() < deadline, f"no {kind} came up on the fresh bus"
            assert all(p.poll() is None for p in self.procs), "a worker died"
            time.sleep(0.5)

    async def _has_worker(self, kind: str) -> bool:
        from openrl.bus.messages import WorkerInfo

        bus = await self._bus()
        try:
            for key in await bus.kv_keys(bus.workers):
                info = await bus.kv_get(bus.workers, key, WorkerInfo)
                if info is not None and info.kind == kind:
                    return True
            return False
        finally:
            await bus.close()

    async def _bus(self):
        from openrl.bus.client import Bus, BusConfig

        return await Bus.connect(BusConfig(url=self.url, name="test-fresh"))

    def futures(self, request_ids: list[str], timeout_s: float = 180) -> dict[str, Future]:
        """Wait until every one of these futures is finished on the fresh bus."""

        async def poll() -> dict[str, Future]:
            bus = await self._bus()
            try:
                deadline = time.monotonic() + timeout_s
                while True:
                    got = {rid: await bus.kv_get(bus.futures, rid, Future) for rid in request_ids}
                    if all(f is not None and f.state != "pending" for f in got.values()):
                        return got
                    assert time.monotonic() < deadline, {k: (v.state if v else None) for k, v in got.items()}
                    await asyncio.sleep(0.3)
            finally:
                await bus.close()

        return self.run(poll())

    @staticmethod
    def run(coro):
        return asyncio.run(coro)

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.server.__exit__(None, None, None)


@pytest.fixture
def fresh_bus(tmp_path):
    b = FreshBus(tmp_path)
    yield b
    b.close()


def replay(path: Path, url: str, *extra: str) -> None:
    r = subprocess.run([sys.executable, "-m", "openrl", "replay", str(path), "--to", url, *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "replayed" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------- recorded streams as fixtures


def test_a_recorded_training_stream_replayed_into_a_gateway_less_trainer_gives_the_same_weights(stack, data, tmp_path, fresh_bus):
    recorder = Recorder(stack.nats_url, "openrl.train.>,openrl.create.>,$KV.openrl-models.>", tmp_path / "train.orlrec")
    _, tc = training_client(stack, seed=801)
    sdk_steps(tc, [data[:4], data[4:], data[2:6]])
    want = logprobs(tc.forward(data, loss_fn="cross_entropy").result())
    recording = recorder.stop()

    ours = [f for f in recording.frames if f.s.startswith("openrl.train.")]
    requests = [decode(f.d, TrainRequest) for f in ours]
    requests = [r for r in requests if r.model_id == tc.model_id]
    assert [r.seq_id for r in requests] == list(range(1, 8)), [r.seq_id for r in requests]  # 3 x (fwdbwd, optim) + forward
    forwards = [r for r in requests if isinstance(r, ForwardBackward) and r.forward_only]
    assert any(f.s.startswith("$KV.openrl-models.") for f in recording.frames)

    fresh_bus.start("trainer", "--base-model", BASE_MODEL, name="trainer")
    fresh_bus.wait_worker("trainer")
    replay(recording_path := recorder.out, fresh_bus.url)
    done = fresh_bus.futures([f.request_id for f in forwards])
    got = []
    for f in forwards:
        fut = done[f.request_id]
        assert fut.state == "done", fut.error
        result = msgspec.msgpack.decode(fut.payload, type=ForwardBackwardResult)
        got += [np.frombuffer(b, dtype="<f4") for b in result.logprobs]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)  # bit for bit: the same requests, in the same order
    assert recording_path.stat().st_size < 200_000  # compact: zstd over msgpack


def test_recorded_rollouts_replayed_into_reward_workers_give_the_same_rewards(stack, tmp_path, fresh_bus):
    recorder = Recorder(stack.nats_url, "openrl.reward.>,$KV.openrl-futures.>", tmp_path / "reward.orlrec")
    client = RewardClient(stack.url, stack.api_key, timeout_s=120)
    client.score("exact_match", [{"completion": c, "reference": r} for c, r in [("Yes.", "yes"), ("no", "yes"), (" Paris ", "paris")]])
    client.score("math", [{"completion": c, "reference": r} for c, r in [("so \\boxed{6}", "6"), ("The answer is 3/4", "0.75"), ("7", "8")]])
    recording = recorder.stop()

    asked = {}
    for f in recording.frames:
        if f.s.startswith("openrl.reward."):
            msg = decode(f.d, ScoreRequest)
            asked[msg.request_id] = msg
    assert len(asked) == 2, list(asked)
    recorded = {}
    for f in recording.frames:
        if f.s.startswith("$KV.openrl-futures.") and f.d:
            fut = decode(f.d, Future)
            if fut.request_id in asked and fut.state == "done":
                recorded[fut.request_id] = msgspec.json.decode(fut.payload, type=ScoreResult)
    assert set(recorded) == set(asked)

    for name in ("exact_match", "math"):
        fresh_bus.start("rewarder", "--fn", name, "--name", name, "--concurrency", "1", name=f"rewarder-{name}")
    fresh_bus.wait_worker("rewarder")
    replay(recorder.out, fresh_bus.url, "--subjects", "openrl.reward.>")
    done = fresh_bus.futures(list(asked))
    for rid, fut in done.items():
        assert fut.state == "done", fut.error
        again = msgspec.json.decode(fut.payload, type=ScoreResult)
        assert [(s.reward, s.metrics, s.error) for s in again.scores] == [(s.reward, s.metrics, s.error) for s in recorded[rid].scores]
    assert sum(s.reward for r in recorded.values() for s in r.scores) == 4.0  # the rewards are real: 2 + 2 right
