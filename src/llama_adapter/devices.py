"""Where a run computes, and in what precision, when its options leave that open: one choice for training and
inference alike; the device's name, and waiting for it."""

from __future__ import annotations

import torch


def pick_device(name: str | None = None) -> torch.device:
    """The device called `name`, else the GPU when one is visible, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pick_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """The torch dtype called `name`, else bf16 on CUDA (half fp32's memory and bandwidth, with its range: no loss
    scaling) and fp32 elsewhere (CPUs lack fast bf16 matrix products)."""
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's kernels run after the host has moved on): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
