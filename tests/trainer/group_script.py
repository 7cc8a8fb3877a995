"""Run under torchrun by test_group.py: rank 0 drives a GroupEngine through the requests in
`requests.msgpack` and writes what it returns to `out.npz`; the other ranks follow."""

from __future__ import annotations

import sys

import msgspec
import numpy as np

from openrl.bus.messages import AdamParams, ForwardBackward, LoraSpec
from openrl.trainer import group as groups
from openrl.trainer.engine import LoraEngine


# Logits a few positions at a time, so that the chunked forward and backward run sharded too.
CHUNK_BYTES = 4 * 96 * 7


class Script(msgspec.Struct):
    creates: list[tuple[str, LoraSpec]]
    steps: list[ForwardBackward | tuple[str, AdamParams]]
    microbatch_tokens: int
    state: bytes = b""  # a checkpoint to import into the first model before the steps


def run_steps(engine, creates, steps, state: bytes = b"") -> dict[str, np.ndarray]:
    """Create the models, load `state` into the first, run the steps; what each step returned
    and every model's weights, keyed for comparison. `engine`: a LoraEngine or a GroupEngine."""
    from safetensors.torch import load

    for model_id, lora in creates:
        engine.create(model_id, lora)
    if state:
        engine.import_state(creates[0][0], load(state), groups.safetensors_metadata(state), with_optimizer=True)
    out = {}
    for k, step in enumerate(steps):
        if isinstance(step, ForwardBackward):
            res = engine.forward_backward(step)
            out[f"{k}.loss"] = np.array(res.metrics["loss:sum"])
            for d, lp in enumerate(res.logprobs):
                out[f"{k}.lp.{d}"] = lp
        else:
            out[f"{k}.grad_norm"] = np.array(engine.optim_step(*step)["grad_norm:mean"])
    for model_id, _ in creates:
        for name, t in engine.adapter_state(model_id).items():
            out[f"w.{model_id}.{name}"] = t.numpy()
    return out


def main(model_path: str, script_path: str, out_path: str) -> None:
    from safetensors.torch import save

    cfg = groups.GroupConfig(collective_timeout_s=120)
    rank = groups.init_rank(cfg, "cpu")
    script = msgspec.msgpack.decode(open(script_path, "rb").read(), type=Script)
    engine = LoraEngine(model_path, device="cpu", microbatch_tokens=script.microbatch_tokens, logits_chunk_bytes=CHUNK_BYTES, sharded=True)
    if rank.rank != 0:
        groups.follow(engine)
        return
    group = groups.GroupEngine(engine, cfg)
    out = run_steps(group, script.creates, script.steps, script.state)
    for model_id, _ in script.creates:
        tensors, metadata = group.export_state(model_id, with_optimizer=True)
        open(f"{out_path}.{model_id}.state", "wb").write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    np.savez(out_path, **out)
    group.stop()


if __name__ == "__main__":
    main(*sys.argv[1:])
