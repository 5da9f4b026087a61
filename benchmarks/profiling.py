"""Where a benchmark's GPU time goes: the kernels of one call, under torch's profiler."""

from __future__ import annotations

import time

import torch

from llama_adapter.devices import synchronize


def print_profile(name: str, fn, device: torch.device) -> None:
    """The kernels that took the most GPU time (on a CPU: the operators that took the most time) during fn(), the
    table's last line summing them, and the call's wall time."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    synchronize(device)
    t = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(device)
    wall = time.perf_counter() - t
    events = prof.key_averages()
    print(f"profile of {name}: wall {1e3 * wall:.1f} ms (profiled)")
    print(events.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                       row_limit=18, max_name_column_width=70), flush=True)
