"""The adapter's prompt attention alone, forward and backward, in each way torch can compute it: which is fastest
on a packed training batch?

In a 7B training step on an H200 the prompt attention's backward (SDPA, which picked cuDNN's kernel) took
364 us per layer on packed batches (one row of 8,192 tokens) against 132 us on padded ones (16 rows of 512),
about 3% of the step (BENCHMARKS.md). With 10 prompt keys the attention is two thin matrix products and a
softmax over 10 values, which inductor can fuse; this script times the model's own code
(`AdaptedAttention.prompt_attention`) under each SDPA backend, that written out as its matrix products, eager
and compiled, as reductions (no products; compiled), and as two wide products over every head at once (the
prompts placed block-diagonally; eager and compiled), on the same inputs, and checks each forward against the
math backend in fp32. The queries are laid out as the model's projection gives them ((B, T, nh, hs) in memory).

Each call is a layer's prompt attention during training: the queries (rows, heads, tokens, head dim) require a
gradient (earlier layers' adapters need it), and so do the prompts and the gate; the backward computes all
three. Times are the median of --repeat calls, after a warm-up (which compiles); on a GPU also the mean of the
calls' kernel times ("GPU us", forward and backward), which leaves out the host's launches.

Usage:
    python benchmarks/prompt_attention.py --preset 7B                  (packed: 1 row of 8,192; padded: 16 x 512)
    python benchmarks/prompt_attention.py --preset tiny --device cpu --tokens 256 --rows 2 --repeat 5  (a smoke check)
Prints one row per way and layout: forward us, forward + backward us, and the largest error against fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llama_adapter.adapter import AdaptedAttention
from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.devices import device_name, pick_device, pick_dtype, synchronize


def written_out(attention: AdaptedAttention, q, prompt, gate):
    """prompt_attention's result as two matrix products and a softmax (the candidate to SDPA)."""
    pk, pv = attention.prompt_keys_values(prompt, gate, q.dtype)  # (1, nh, L, hs), values gated
    scores = (q @ pk.transpose(-1, -2)) * q.size(-1) ** -0.5  # (B, nh, T, L)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ pv  # (B, nh, T, hs)


def as_reductions(attention: AdaptedAttention, q, prompt, gate):
    """prompt_attention's result without matrix products: each query's L scores as a reduction over the head dim
    and its output as the softmax-weighted sum of the L values. Compiled, inductor can fuse each into a kernel that
    reads the queries (and in the backward their gradient) once, where a product with L = 10 columns runs far below
    the tensor cores' rate; eager, it would materialise (B, nh, T, L, hs), so it is timed compiled only. On an H200
    it took 3.0-3.6x SDPA's time forward and backward (BENCHMARKS.md, sixteenth readings)."""
    pk, pv = attention.prompt_keys_values(prompt, gate, q.dtype)  # (1, nh, L, hs), values gated
    scores = (q.unsqueeze(-2) * pk.unsqueeze(-3)).float().sum(-1) * q.size(-1) ** -0.5  # (B, nh, T, L)
    weights = torch.softmax(scores, dim=-1)
    return (weights.unsqueeze(-1) * pv.unsqueeze(-3).float()).sum(-2).to(q.dtype)  # (B, nh, T, hs)


def block_diagonal(attention: AdaptedAttention, q, prompt, gate):
    """prompt_attention's result as two wide matrix products: the queries of every head side by side (B*T, nh*hs),
    as the model's projection lays them out, times the prompt keys placed block-diagonally (nh*hs, nh*L), and the
    softmax weights (B*T, nh*L) times the values placed likewise (nh*L, nh*hs). The zeros off the diagonal blocks
    cost nh times the products' few FLOPs, but each product is one tensor-core GEMM whose prompt side is nh*L = 320
    wide (7B: the scores' columns, the second product's inner size), where a product per head has L = 10."""
    pk, pv = attention.prompt_keys_values(prompt, gate, q.dtype)  # (1, nh, L, hs), values gated
    B, nh, T, hs = q.shape
    L = pk.size(2)
    eye = torch.eye(nh, dtype=q.dtype, device=q.device)
    keys = (pk[0].transpose(1, 2)[:, :, None, :] * eye[:, None, :, None]).reshape(nh * hs, nh * L)
    values = (pv[0][:, :, None, :] * eye[:, None, :, None]).reshape(nh * L, nh * hs)
    scores = (q.transpose(1, 2).reshape(B * T, nh * hs) @ keys) * hs ** -0.5  # (B*T, nh*L)
    weights = torch.softmax(scores.view(B * T, nh, L).float(), dim=-1).to(q.dtype).view(B * T, nh * L)
    return (weights @ values).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median microseconds of fn()."""
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def kernel_time(fn, repeat: int) -> float:
    """Mean microseconds of the GPU's work per fn() (its kernels, memsets and copies), summed by torch's profiler:
    what a call costs a training step, in which the host runs ahead of the GPU. The wall time above also counts
    the host's launches, which for an eager way of many small kernels are most of it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in kernels) / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--adapter-len", type=int, default=AdapterArgs.adapter_len,
                   help=f"default: {AdapterArgs.adapter_len}, AdapterArgs'")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the packed row")
    p.add_argument("--rows", type=int, default=16, help="rows of the padded layout (--tokens // rows each)")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--device", default=None)
    ns = p.parse_args()
    device = pick_device(ns.device)
    dtype = pick_dtype(device)
    args = ModelArgs.from_name(ns.preset)
    with torch.device(device):
        attention = AdaptedAttention(args).to(dtype).requires_grad_(False)
    gen = torch.Generator(device).manual_seed(0)
    prompt = torch.randn(ns.adapter_len, args.dim, device=device, generator=gen, requires_grad=True)
    gate = torch.randn(args.n_heads, device=device, generator=gen, requires_grad=True)
    compiled, reductions = torch.compile(written_out), torch.compile(as_reductions)
    wide = torch.compile(block_diagonal)
    backends = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)
                if device.type == "cuda"]
    ways = {"ours (SDPA, its choice)": (attention.prompt_attention, contextlib.nullcontext),
            **{f"ours (SDPA, {b.name.lower()})": (attention.prompt_attention, lambda b=b: sdpa_kernel(b))
               for b in backends},
            "written out, eager": (lambda *a: written_out(attention, *a), contextlib.nullcontext),
            "written out, compiled": (lambda *a: compiled(attention, *a), contextlib.nullcontext),
            "as reductions, compiled": (lambda *a: reductions(attention, *a), contextlib.nullcontext),
            "block-diagonal, eager": (lambda *a: block_diagonal(attention, *a), contextlib.nullcontext),
            "block-diagonal, compiled": (lambda *a: wide(attention, *a), contextlib.nullcontext)}
    print(f"{ns.preset} (heads {args.n_heads}, kv heads {args.n_kv_heads}, head dim {args.head_dim}), "
          f"{ns.adapter_len} prompts, {device_name(device)}, {dtype}, torch {torch.__version__}")
    print(f"{'way':<32}{'layout':>12}{'forward us':>12}{'fwd+bwd us':>12}{'GPU us':>9}{'max error':>11}")
    for layout, rows in (("packed", 1), ("padded", ns.rows)):
        # laid out as the model's projection gives them: (B, T, nh, hs) in memory, seen as (B, nh, T, hs)
        q = torch.randn(rows, ns.tokens // rows, args.n_heads, args.head_dim, device=device, generator=gen,
                        dtype=dtype).transpose(1, 2).requires_grad_()
        dy = torch.randn_like(q)
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():  # the reference: fp32, the math backend
            reference = attention.float().prompt_attention(q.detach().float(), prompt, gate)
            attention.to(dtype)
        for name, (fn, context) in ways.items():
            try:
                with context():
                    out = fn(q, prompt, gate)  # the warm-up, which compiles
                    out.backward(dy)
                    error = float((out.detach().float() - reference).abs().max() / reference.abs().max())
                    forward = timed(lambda: fn(q, prompt, gate), device, ns.repeat)
                    both = timed(lambda: fn(q, prompt, gate).backward(dy), device, ns.repeat)
                    gpu = (f"{kernel_time(lambda: fn(q, prompt, gate).backward(dy), ns.repeat):>9.0f}"
                           if device.type == "cuda" else f"{'':>9}")
            except RuntimeError as e:  # a backend that does not take these shapes
                print(f"{name:<32}{layout:>12}  not run: {' '.join(str(e).split())[:80]}")
                continue
            print(f"{name:<32}{layout:>12}{forward:>12.0f}{both:>12.0f}{gpu}{error:>11.1e}", flush=True)
            q.grad = prompt.grad = gate.grad = None


if __name__ == "__main__":
    main()
