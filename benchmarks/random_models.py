"""The benchmarks' stand-in for a loaded model: a preset's shapes with random weights (no download), laid out as
cli.load_for_inference lays out a loaded base (frozen, eval mode, projections fused, block weights quantized if
asked), with the adapter's gates drawn non-zero so that its branch does the work a trained adapter's does."""

from __future__ import annotations

import torch

from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.config import AdapterArgs, ModelArgs


def random_model(args: ModelArgs, adapter: AdapterArgs, dtype: torch.dtype, device: str | torch.device,
                 quantize: str | None = None) -> AdaptedTransformer:
    """The model on `device`, its base in `dtype`; `quantize`: a --quantize format for the blocks' weights."""
    with torch.device(device):
        model = AdaptedTransformer(args, adapter).cast_base(dtype).eval().requires_grad_(False)
    model.fuse_projections()
    with torch.no_grad():
        model.adapter_gate.normal_()
    if quantize is not None:
        from llama_adapter.quantize import int8_group_size, quantize_int8

        quantize_int8(model, int8_group_size(quantize))
    return model
