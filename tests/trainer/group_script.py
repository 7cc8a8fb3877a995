"""Run under torchrun by test_group.py: rank 0 drives a GroupEngine through the requests in
`requests.msgpack` and writes what it returns to `out.npz`; the other ranks follow."""

from __future__ import annotations

import sys

import msgspec
import numpy as np

from openrl.bus.messages import AdamParams, ForwardBackward, LoraSpec
from openrl.trainer import group as groups
from openrl.trainer.engine import LoraEngine


class Script(msgspec.Struct):
    creates: list[tuple[str, LoraSpec]]
    steps: list[ForwardBackward | tuple[str, AdamParams]]
    microbatch_tokens: int
    state: bytes = b""  # a checkpoint to import into the first model before the steps


def main(model_path: str, script_path: str, out_path: str) -> None:
    cfg = groups.GroupConfig(collective_timeout_s=120)
    rank = groups.init_rank(cfg, "cpu")
    script = msgspec.msgpack.decode(open(script_path, "rb").read(), type=Script)
    engine = LoraEngine(model_path, device="cpu", microbatch_tokens=script.microbatch_tokens, sharded=True)
    if rank.rank != 0:
        groups.follow(engine)
        return
    group = groups.GroupEngine(engine, cfg)
    for model_id, lora in script.creates:
        group.create(model_id, lora)
    if script.state:
        from safetensors.torch import load

        model_id = script.creates[0][0]
        group.import_state(model_id, load(script.state), groups._metadata(script.state), with_optimizer=True)
    out = {}
    for k, step in enumerate(script.steps):
        if isinstance(step, ForwardBackward):
            res = group.forward_backward(step)
            out[f"{k}.loss"] = np.array(res.metrics["loss:sum"])
            for d, lp in enumerate(res.logprobs):
                out[f"{k}.lp.{d}"] = lp
        else:
            out[f"{k}.grad_norm"] = np.array(group.optim_step(*step)["grad_norm:mean"])
    for model_id, _ in script.creates:
        for name, t in group.adapter_state(model_id).items():
            out[f"w.{model_id}.{name}"] = t.numpy()
        tensors, metadata = group.export_state(model_id, with_optimizer=True)
        from safetensors.torch import save

        open(f"{out_path}.{model_id}.state", "wb").write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    np.savez(out_path, **out)
    group.stop()


if __name__ == "__main__":
    main(*sys.argv[1:])
