"""The offline default model: built locally, installed as an HF cache entry, loadable by name."""

from __future__ import annotations

import threading

import pytest

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrl import default_model as dm


def test_small_build_installs_a_loadable_hf_cache_entry(tmp_path):
    snap = dm.ensure_default_model(tmp_path, warmup_steps=5)
    assert snap == tmp_path / "models--openrl--tiny-qwen3" / "snapshots" / dm.revision(5)
    assert (tmp_path / "models--openrl--tiny-qwen3" / "refs" / "main").read_text() == snap.name
    # Loads by its hub name, offline, the way the tinker SDK and cookbook look tokenizers up.
    tok = AutoTokenizer.from_pretrained(dm.DEFAULT_MODEL, cache_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(dm.DEFAULT_MODEL, cache_dir=tmp_path)
    assert model.config.model_type == "qwen3"
    assert model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Specials are single tokens; digits split one per token; any unicode round-trips.
    assert len(tok.encode("<|im_start|>", add_special_tokens=False)) == 1
    assert len(tok.encode("123", add_special_tokens=False)) == 3
    for s in ("What is 12+34?", "naïve café ✓ 日本"):
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    # Built once: a second call reuses it.
    mtime = (snap / "model.safetensors").stat().st_mtime_ns
    assert dm.ensure_default_model(tmp_path, warmup_steps=5) == snap
    assert (snap / "model.safetensors").stat().st_mtime_ns == mtime


def test_build_is_deterministic_and_concurrent_callers_share_one_build(tmp_path):
    results, errors = [], []

    def call():
        try:
            results.append(dm.ensure_default_model(tmp_path / "a", warmup_steps=3))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results[0] == results[1]
    leftovers = [p.name for p in (tmp_path / "a" / "models--openrl--tiny-qwen3").iterdir() if p.name.startswith(".build-")]
    assert leftovers == []
    other = dm.ensure_default_model(tmp_path / "b", warmup_steps=3)
    a = AutoModelForCausalLM.from_pretrained(results[0]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_revision_tracks_the_recipe_the_builder_and_the_packages(monkeypatch):
    assert dm.revision() != dm.revision(dm.WARMUP_STEPS + 1)
    assert len(dm.revision()) == 40
    before = dm.revision()
    # Another version of a package the numbers depend on: another cache entry, a fresh build.
    versions = dm._package_versions()
    monkeypatch.setattr(dm, "_package_versions", lambda: {**versions, "transformers": "0.0.1"})
    assert dm.revision() != before
    monkeypatch.undo()
    # Another builder: its recipe's source is part of the key...
    real = dm.Path.read_bytes

    def edited(where: str):
        def read(self):
            source = real(self)
            if self.name != "default_model.py":
                return source
            return b"# changed\n" + source if where == "recipe" else source + b"# changed\n"

        return read

    monkeypatch.setattr(dm.Path, "read_bytes", edited("recipe"))
    assert dm.revision() != before
    # ...and what follows the end-of-recipe marker (cache, lock, fetching) is not.
    monkeypatch.setattr(dm.Path, "read_bytes", edited("tail"))
    assert dm.revision() == before


def test_the_build_report_is_checked_against_its_bounds(default_model):
    """A full build passed its bounds (or it would not exist); a report below them is refused,
    naming each figure that is short."""
    stats = dm.build_stats(default_model)
    dm.check_bounds(stats)
    assert stats["warmup_steps"] == dm.WARMUP_STEPS and len(stats["weights_sha256"]) == 64
    assert set(stats["packages"]) == set(dm.BUILD_PACKAGES)
    low = {**stats, "copy_accuracy": 0.1, "loss_end": stats["loss_start"]}
    with pytest.raises(dm.BuildOutOfBounds, match="copy_accuracy.*loss_end"):
        dm.check_bounds(low)


def test_a_full_build_outside_its_bounds_installs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "WARMUP_STEPS", 3)  # a short build judged as a full one
    with pytest.raises(dm.BuildOutOfBounds):
        dm.ensure_default_model(tmp_path, warmup_steps=3)
    repo = tmp_path / "models--openrl--tiny-qwen3"
    assert not (repo / "refs" / "main").exists()
    assert not (repo / "snapshots").exists() or not any((repo / "snapshots").iterdir())


def test_sdk_tokenizer_lookup_finds_it_offline(default_model):
    from tinker.lib.public_interfaces.sampling_client import _load_tokenizer_from_model_info

    tok = _load_tokenizer_from_model_info(dm.DEFAULT_MODEL)
    assert tok.eos_token == "<|im_end|>"
    assert tok.chat_template is not None


def test_resolve_model_path_leaves_other_names_alone():
    assert dm.resolve_model_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert dm.resolve_model_path("/models/mine") == "/models/mine"


def test_copy_prompt_is_chat_messages():
    assert dm.copy_prompt("apple") == [{"role": "user", "content": "Say the word: apple"}]


def test_alias_loads_the_default_model_under_another_name(tmp_path):
    snap = dm.ensure_default_model(tmp_path, warmup_steps=5)
    link = dm.install_alias("Qwen/Qwen3-8B", tmp_path, warmup_steps=5)
    assert link.resolve() == snap.resolve()
    tok = AutoTokenizer.from_pretrained("Qwen/Qwen3-8B", cache_dir=tmp_path)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(dm.DEFAULT_MODEL, cache_dir=tmp_path).get_vocab()
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-8B", cache_dir=tmp_path)
    assert model.config.num_hidden_layers == dm.ARCH["num_hidden_layers"]
    assert dm.install_alias("Qwen/Qwen3-8B", tmp_path, warmup_steps=5) == link  # idempotent
    assert dm.remove_alias("Qwen/Qwen3-8B", tmp_path)
    assert not (tmp_path / "models--Qwen--Qwen3-8B").exists() and snap.exists()
    assert not dm.remove_alias("Qwen/Qwen3-8B", tmp_path)


def test_alias_never_touches_an_entry_it_did_not_make(tmp_path):
    real = tmp_path / "models--Qwen--Qwen3-8B" / "snapshots" / "abc"
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    with pytest.raises(dm.AliasError, match="not an openrl alias"):
        dm.install_alias("Qwen/Qwen3-8B", tmp_path, warmup_steps=5)
    assert not dm.remove_alias("Qwen/Qwen3-8B", tmp_path)
    assert (real / "config.json").read_text() == "{}"
    for bad in ("Qwen3-8B", "a/b/c", "../evil", "Qwen/..", "Qwen/x y", dm.DEFAULT_MODEL):
        with pytest.raises(dm.AliasError):
            dm.install_alias(bad, tmp_path, warmup_steps=5)


def test_a_build_waits_for_the_lock_holder_and_goes_on_when_it_dies(tmp_path):
    """The build lock (filelock) of a process that is killed mid-build is released with it:
    the next caller, waiting meanwhile, then builds."""
    import signal
    import subprocess
    import sys
    import time

    from structlog.testing import capture_logs

    repo = tmp_path / "models--openrl--tiny-qwen3"
    repo.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)",
         str(repo / ".openrl-build.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        done = []
        with capture_logs() as logs:
            builder = threading.Thread(target=lambda: done.append(dm.ensure_default_model(tmp_path, warmup_steps=1)))
            builder.start()
            deadline = time.monotonic() + 30
            while not any(e["event"] == "default_model_waiting" for e in logs) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            assert builder.is_alive() and not done and not any(e["event"] == "default_model_building" for e in logs)
            holder.send_signal(signal.SIGKILL)
            builder.join(300)
        assert done == [dm.snapshot_path(tmp_path, warmup_steps=1)] and (done[0] / "model.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
