"""`openrl export`: a saved checkpoint out of the object store, as a PEFT folder, or merged
into its base model as a plain Hugging Face model.

Every kind of tinker:// path becomes the same PEFT folder (adapter_config.json +
adapter_model.safetensors, loadable by `PeftModel.from_pretrained(base, folder)`):
save_weights_external's is one already; save_state's checkpoint is the adapter tensors
with its LoRA config in the safetensors metadata, plus AdamW state (dropped here);
save_weights_for_sampler's is the bare adapter tensors (rank from their shapes, alpha the
trainer's LORA_ALPHA, targets from their keys). `merge` folds the adapter into the base
weights (peft's merge_and_unload) and saves model and tokenizer with save_pretrained.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from openrl.bus.messages import LORA_ALPHA, WeightsRecord

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OPTIMIZER_PREFIX = "optimizer."  # openrl.trainer.engine's, for AdamW state in a save_state checkpoint


class ExportError(Exception):
    """A checkpoint that cannot be exported as asked (its message says why)."""


def _config(rank: int, alpha: int, targets: list[str], base_model: str) -> bytes:
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=sorted(targets), bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True).to_dict()  # fmt: skip
    config = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}
    return (json.dumps(config, indent=2, sort_keys=True, default=str) + "\n").encode()


def _targets(keys) -> list[str]:
    """Module names (the last part: q_proj, lm_head) of peft keys `...<module>.lora_A.weight`."""
    return sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in keys if ".lora_" in k})


def peft_folder(rec: WeightsRecord, files: dict[str, bytes]) -> dict[str, bytes]:
    """{file name: bytes} of the PEFT folder for a checkpoint whose stored files are `files`
    (an external folder's files by name, else {"checkpoint.safetensors": bytes})."""
    if rec.kind == "external":
        missing = [f for f in ADAPTER_FILES if f not in files]
        if missing:
            raise ExportError(f"{rec.path} lacks {', '.join(missing)}")
        return {f: files[f] for f in ADAPTER_FILES}
    from safetensors.torch import load, save

    blob = files["checkpoint.safetensors"]
    try:
        tensors = load(blob)
        header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    except Exception as e:  # noqa: BLE001 - whatever safetensors raises for bytes that are not its format
        raise ExportError(f"{rec.path} is not a safetensors checkpoint ({e})") from None
    meta = header.get("__metadata__") or {}
    adapter = {k: v.contiguous() for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}
    if not adapter or not all(".lora_" in k for k in adapter):
        raise ExportError(f"{rec.path} holds no LoRA adapter tensors")
    if rec.kind == "state" and "target_modules" in meta:
        rank, alpha, targets = int(meta["rank"]), int(meta["lora_alpha"]), json.loads(meta["target_modules"])
    else:
        ranks = {int(v.shape[0]) for k, v in adapter.items() if ".lora_A." in k}
        if len(ranks) != 1:
            raise ExportError(f"{rec.path}: one LoRA rank expected, found {sorted(ranks)}")
        rank, alpha, targets = ranks.pop(), LORA_ALPHA, _targets(adapter)
    return {"adapter_config.json": _config(rank, alpha, targets, rec.base_model),
            "adapter_model.safetensors": save(adapter, metadata={"format": "pt"})}  # fmt: skip


def write_folder(out: Path, files: dict[str, bytes]) -> None:
    """Write `files` into `out` all at once: built in a temporary folder beside it and renamed
    into place, so a failure leaves nothing behind. `out` must not exist or be empty."""
    _check_out(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        _place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge(adapter_dir: Path, base_path: str, out: Path) -> None:
    """The base model with the adapter folded in (peft merge_and_unload), saved with its
    tokenizer as a plain Hugging Face model: AutoModelForCausalLM loads it without peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_out(out)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
    targets = set(config.get("target_modules") or [])
    if "lm_head" in targets and model.config.tie_word_embeddings:
        # Merging into a tied lm_head would change the input embeddings too: untie it first,
        # so the merged model computes what base + adapter computed.
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
        _place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder; export writes a new folder")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent} is not a folder")


def _place(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty (checked)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
