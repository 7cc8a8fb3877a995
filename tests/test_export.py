"""`openrl export` on the `stack`: every kind of tinker:// path becomes a PEFT folder that
peft loads on the base model and that computes what the trainer computes; `--merge` a plain
Hugging Face model computing the same; the local stack is found from its data dir
(run/stack.json: URL, API key; the operator's credentials file), and neither export nor
`openrl dlq` changes any stream's configuration. Bad input writes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdk_helpers import logprobs, sdk_steps, training_client
from stack_helpers import OTHER_KEY, nats_options

pytestmark = pytest.mark.timeout(900)  # the stack may first build the default model


def run(stack, *args: str, **env: str) -> subprocess.CompletedProcess:
    """An operator command run as a user of the local stack would: no NATS URL, key or
    credentials given, only the stack's data dir."""
    base = {k: v for k, v in os.environ.items() if k not in ("OPENRL_NATS_CREDS", "OPENRL_NATS_URL", "TINKER_API_KEY")}
    return subprocess.run([sys.executable, "-m", "openrl", *args, "--data-dir", str(stack.data_dir)], capture_output=True,
                          text=True, timeout=300, env={**base, **env})  # fmt: skip


@pytest.fixture(scope="module")
def saved(stack, data):
    """A trained model and one checkpoint of each kind, all of the same weights."""
    _, tc = training_client(stack, seed=171)
    sdk_steps(tc, [data[:4], data[4:]], lr=2e-2)
    paths = {
        "state": tc.save_state("export-state").result().path,
        "sampler": tc.save_weights_for_sampler("export-sampler").result().path,
        "external": tc.save_weights_external("export-external").result().path,
    }
    want = logprobs(tc.forward(data[:2], loss_fn="cross_entropy").result())
    return tc, paths, want


def _logprobs(model, data) -> list[np.ndarray]:
    import torch

    out = []
    for d in data:
        tokens = torch.tensor([d.model_input.to_ints()])
        targets = torch.tensor(d.loss_fn_inputs["target_tokens"].to_numpy())
        with torch.no_grad():
            out.append(torch.log_softmax(model(input_ids=tokens).logits[0].float(), -1).gather(1, targets[:, None])[:, 0].numpy())
    return out


@pytest.mark.parametrize("kind", ["state", "sampler", "external"])
def test_every_kind_of_checkpoint_exports_a_peft_folder(stack, data, default_model, saved, tmp_path, kind):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, paths, want = saved
    out = run(stack, "export", paths[kind], str(tmp_path / "peft"))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == "openrl/tiny-qwen3"
    assert not [k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors") if "optimizer" in k or "lora_" not in k]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model), tmp_path / "peft").eval()
    for got, lp in zip(_logprobs(model, data[:2]), want, strict=True):
        np.testing.assert_allclose(got, lp, atol=1e-4)


def test_merge_writes_a_plain_model_computing_base_plus_adapter(stack, data, default_model, saved, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    _, paths, want = saved
    out = run(stack, "export", paths["state"], str(tmp_path / "merged"), "--merge")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(default_model).eval()
    # The adapter trains lm_head: the merged head is its own, the input embeddings the base's.
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(merged.lm_head.weight, base.lm_head.weight)
    for got, lp in zip(_logprobs(merged, data[:2]), want, strict=True):
        np.testing.assert_allclose(got, lp, atol=1e-4)


def test_bad_exports_say_why_and_write_nothing(stack, saved, tmp_path):
    tc, paths, _ = saved
    target = tmp_path / "out"
    cases = [
        ((f"tinker://{tc.model_id}/weights/no-such-name", str(target)), {}, "no checkpoint at"),
        ((paths["state"], str(target)), {"TINKER_API_KEY": OTHER_KEY}, "no checkpoint at"),  # another key's
        (("not-a-path", str(target)), {}, "must start with tinker://"),
        ((paths["state"], str(tmp_path / "missing-parent" / "out")), {}, "is not a folder"),
    ]
    for args, env, says in cases:
        out = run(stack, "export", *args, **env)
        assert out.returncode == 1 and says in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == [], (args, list(tmp_path.iterdir()))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    out = run(stack, "export", paths["state"], str(full))
    assert out.returncode == 1 and "is not an empty folder" in out.stderr
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


async def _stream_configs(url: str) -> dict[str, dict]:
    import nats

    nc = await nats.connect(url, **nats_options("operator"))
    try:
        return {s.config.name: s.config.as_dict() for s in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


async def _set_description(url: str, stream: str, description: str | None) -> None:
    import nats

    nc = await nats.connect(url, **nats_options("operator"))
    try:
        js = nc.jetstream()
        config = (await js.stream_info(stream)).config
        config.description = description
        await js.update_stream(config)
    finally:
        await nc.close()


def test_operator_commands_leave_the_streams_as_they_are(stack, saved, tmp_path):
    """A mark the stack's own config does not have (a description) would be undone by a
    client that brings the streams to its config; export and dlq only bind."""
    _, paths, _ = saved
    before = asyncio.run(_stream_configs(stack.nats_url))
    stream = sorted(before)[0]
    asyncio.run(_set_description(stack.nats_url, stream, "marked by test_export"))
    try:
        marked = asyncio.run(_stream_configs(stack.nats_url))
        assert marked[stream]["description"] == "marked by test_export"
        assert run(stack, "export", paths["external"], str(tmp_path / "peft")).returncode == 0
        listed = run(stack, "dlq", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        json.loads(listed.stdout)
        assert asyncio.run(_stream_configs(stack.nats_url)) == marked
    finally:
        asyncio.run(_set_description(stack.nats_url, stream, None))
    assert asyncio.run(_stream_configs(stack.nats_url)) == before
