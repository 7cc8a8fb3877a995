"""The plain-torch LoRA reference the trainer tests compare LoraEngine against.

An independent copy of the base model with each adapted nn.Linear replaced by
`W x + (alpha / r) B A x` written out in torch (no peft), and AdamW with global-norm clipping
and decoupled weight decay written out by hand. Nothing here imports openrl.trainer: the
tests pass the engine's alpha in, and write each loss out themselves.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from openrl.bus.messages import AdamParams


class RefLoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.a = torch.nn.Parameter(a.clone())
        self.b = torch.nn.Parameter(b.clone())

    def forward(self, x):
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale


def cross_entropy(lp, d):
    """Tinker's cross_entropy: -sum(weights * logprob), weights 1 where not sent."""
    w = d.get("weights", torch.ones(lp.shape))
    return -(w * lp).sum()


class Reference:
    """The base model with hand-written LoRA layers and hand-written AdamW."""

    def __init__(self, path: str, adapter_state: dict[str, torch.Tensor], *, rank: int, alpha: float):
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.params: dict[str, torch.nn.Parameter] = {}
        for key in sorted({name.split(".lora_")[0] for name in adapter_state}):
            parent_name, _, child = key.removeprefix("base_model.model.").rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            a, b = adapter_state[f"{key}.lora_A.weight"], adapter_state[f"{key}.lora_B.weight"]
            layer = RefLoraLinear(getattr(parent, child), a, b, alpha / rank)
            setattr(parent, child, layer)
            self.params[f"{key}.lora_A.weight"], self.params[f"{key}.lora_B.weight"] = layer.a, layer.b
        self.m = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.t = 0

    def logprobs(self, tokens, targets) -> torch.Tensor:
        """One datum alone: lp of targets (N,) or (N, K)."""
        logits = self.model(input_ids=torch.tensor(np.asarray(tokens)[None])).logits[0].float()
        targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        lp = torch.log_softmax(logits, dim=-1)
        return lp.gather(1, targets.reshape(len(tokens), -1)).reshape(targets.shape)

    def forward_backward(self, data: list[dict], loss_fn=cross_entropy) -> tuple[list[np.ndarray], float]:
        """data: dicts of numpy inputs (tokens, target_tokens, ...); loss_fn(lp, d) per datum,
        each datum run alone; the losses are summed and backpropagated."""
        loss = torch.zeros(())
        lps = []
        for d in data:
            lp = self.logprobs(d["tokens"], d["target_tokens"])
            loss = loss + loss_fn(lp, {k: torch.as_tensor(np.asarray(v)) for k, v in d.items()})
            lps.append(lp.detach().numpy())
        loss.backward()
        return lps, loss.item()

    @torch.no_grad()
    def optim_step(self, adam: AdamParams) -> float:
        """One AdamW step on the accumulated gradients; returns their global norm before clipping."""
        grads = {k: p.grad for k, p in self.params.items() if p.grad is not None}
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).float().item()
        coef = min(1.0, adam.grad_clip_norm / (norm + 1e-6)) if adam.grad_clip_norm > 0 else 1.0
        self.t += 1
        for k, g in grads.items():
            g, p = g * coef, self.params[k]
            p.mul_(1 - adam.learning_rate * adam.weight_decay)  # decoupled weight decay
            self.m[k] = adam.beta1 * self.m[k] + (1 - adam.beta1) * g
            self.v[k] = adam.beta2 * self.v[k] + (1 - adam.beta2) * g * g
            m_hat, v_hat = self.m[k] / (1 - adam.beta1**self.t), self.v[k] / (1 - adam.beta2**self.t)
            p.sub_(adam.learning_rate * m_hat / (v_hat.sqrt() + adam.eps))
            p.grad = None
        return norm

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def grads(self) -> dict[str, torch.Tensor | None]:
        return {k: None if p.grad is None else p.grad.clone() for k, p in self.params.items()}
