"""The fine-tuning methods compared in the report, each defined by one predicate: which parameters train, which
is also exactly what its file holds.

- adapter: the paper's adaption prompts and gates (adapter.py), written as `adapter.safetensors`;
- lora: LoRA's A and B (lora.py), written in PEFT's layout (`adapter_model.safetensors`, `adapter_config.json`);
- full: every weight, written as a base checkpoint of its own (`model/`, safetensors in the base's layout);
- zero-shot: nothing; the base answers with the same prompt template, and there is no file.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .adapter import AdaptedTransformer, is_adapter_param
from .config import METHODS, WEIGHTS, AdapterArgs, LoRAArgs
from .lora import add_lora, is_lora_param


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    return method


def trains(method: str, name: str) -> bool:
    """The predicate: whether parameter `name` trains under `method` (and so is saved by it)."""
    check_method(method)
    if method == "adapter":
        return is_adapter_param(name)
    if method == "lora":
        return is_lora_param(name)
    return method == "full"


def tuned_state(model: nn.Module, method: str) -> dict:
    """The parameters a method trains (a tied output is the embedding, listed once)."""
    return {name: p for name, p in model.named_parameters() if trains(method, name)}


def load_for_training(method: str, base: str | os.PathLike, adapter: AdapterArgs, lora: LoRAArgs, device, dtype
                      ) -> AdaptedTransformer:
    """The base with the method's fresh trainable parameters; everything else frozen. Full fine-tuning keeps its
    weights in fp32 (the optimizer updates them; autocast runs the matmuls in bf16 on a GPU)."""
    from .checkpoint import load_base

    check_method(method)
    if method == "zero-shot":
        raise ValueError("method zero-shot trains nothing: evaluate the base directly")
    if method == "adapter":
        return load_base(base, adapter, device, dtype)
    if method == "full":
        model = load_base(base, None, device)
        model.requires_grad_(True)
        return model
    model = load_base(base, None, device, dtype)
    return add_lora(model, lora, device)


def save_tuned(model: AdaptedTransformer, method: str, out_dir: str | os.PathLike, base_model: str,
               state: dict | None = None) -> Path:
    """Write what `method` trained to its file under out_dir (WEIGHTS); the path written. `state`: the trained
    tensors by name, whole, where the model holds only shards of them (FSDP); default the model's own."""
    from .checkpoint import save_adapter, save_full
    from .lora import save_lora

    out_dir = Path(out_dir)
    if method == "adapter":  # never sharded: the prompts and gates stay whole on every process
        save_adapter(model, out_dir / WEIGHTS["adapter"], base_model)
    elif method == "lora":
        save_lora(model, out_dir, base_model, state)
    else:
        save_full(model, (out_dir / WEIGHTS["full"]).parent, base_model, state)
    return out_dir / WEIGHTS[method]
