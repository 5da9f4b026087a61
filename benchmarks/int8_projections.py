"""Weight-only int8 against bf16 for each projection of a decode step, one matrix product alone: which way of
computing it reads the int8 weight fastest at batch 1, and at 16 rows, where the compiled int8 decode step is 40x
slower than bf16's (BENCHMARKS.md, sixth readings)?

In the compiled int8 decode step of 7B on an H100 (BENCHMARKS.md, fifth readings) inductor's fused products read
`wqkv` at 87% of the copy rate but `w2` and `wo` at about half of it, which keeps int8 at 1.27x bf16 where halving
the bytes promised 2x. This script times each projection's shape (`wqkv`, `wo`, `w1`/`w3` fused, `w2`) as one
product of --batch rows, in each way torch offers:
- bf16: F.linear on the bf16 weight (cuBLAS), the reference;
- bf16, compiled as the decode step compiles its blocks (coordinate-descent tuning: at one row a reduction of
  inductor's own, tuned for the shape);
- int8, eager: F.linear on torchao's int8 weight (the weight converted to bf16 at every call);
- int8, compiled as the decode step compiles its blocks (generate.compiled_block's options: coordinate-descent
  tuning, its narrow search);
- int8, compiled with the search in all directions (what torchao's own inductor settings turn on);
- int8, compiled without tuning;
- int8, compiled without inductor's pattern matching. Where the product stays a matrix product (more than one
  row, or one row untuned), a post-grad pattern of inductor's (`_register_woq_lowerings`, registered for CUDA
  too) rewrites torchao's `mm(x, qdata.t().to(bf16)) * scale` into ATen's `_weight_int8pack_mm`, the slow way
  below; without it inductor converts the weight, then calls cuBLAS;
- int8, compiled with max-autotune and without the pattern (inductor also tries its Triton matmul templates,
  which can convert the int8 weight as they load it, where cuBLAS needs a converted copy);
- int8 through ATen's `torch._weight_int8pack_mm` (a scale per row only), where the device has it;
and, where the step computes something just before the product (RMSNorm before `wqkv` and `w1`/`w3`, SwiGLU
before `w2`), the product with it as the step compiles them:
- bf16, compiled with its prologue (a pointwise kernel, then cuBLAS: the bf16 step's way);
- int8 under the step's tuning with its prologue fused: at one row, inductor writes the product as a reduction
  (its matrix-vector decomposition under coordinate-descent tuning) and computes the prologue inside it, once for
  every block of outputs, so the prologue's inputs are read again and again;
- int8 under the step's tuning with its prologue compiled apart (its output written once, then read by the
  product): what keeping the prologue out of the reduction would give.
On a GPU each way's calls are captured in one CUDA graph and replayed, so the time is the kernels' alone (no
launches); on the CPU they are timed as a loop. The calls read the same weight again and again, so a weight that
fits the GPU's L2 (50 MB on H100/H200: int8 `wo` and `w2`, bf16 `wo`) may partly come from it, where the decode
step reads each from memory once per token: the ways' times compare with each other, and the step's own profile
(generate_throughput.py --profile) says what each projection reads in place. Each way's result is checked
against the int8 weight's own eager product of the same input (the same rounding of the weight; other kernels
sum in another order).

Usage:
    python benchmarks/int8_projections.py --preset 7B [--batch 1 16]
    python benchmarks/int8_projections.py --preset tiny --device cpu --repeat 5   (a smoke check)
Prints one row per projection, batch and way: microseconds per call, the weight's bytes per second as a % of the
device's copy rate, and the largest difference from the eager int8 product relative to its largest value.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from generate_throughput import copy_bandwidth  # benchmarks/generate_throughput.py

from llama_adapter.config import ModelArgs
from llama_adapter.devices import device_name, synchronize
from llama_adapter.model import RMSNorm
from llama_adapter.quantize import int8_weight

# The options generate.compiled_block compiles blocks with, and the other searches to compare.
TUNINGS = {"compiled (the step's tuning)": {"coordinate_descent_tuning": True},
           "compiled, all directions": {"coordinate_descent_tuning": True,
                                        "coordinate_descent_check_all_directions": True},
           "compiled, untuned": {},
           "compiled, no pattern matching": {"coordinate_descent_tuning": True, "pattern_matcher": False},
           "compiled, max-autotune, no patterns": {"max_autotune": True, "pattern_matcher": False}}


def projections(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(outputs, inputs) of each weight a decode step reads per block, fused as the inference commands load it."""
    heads, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"wqkv": (heads + 2 * kv, args.dim), "wo": (args.dim, heads), "w1/w3": (2 * args.hidden_dim, args.dim),
            "w2": (args.dim, args.hidden_dim)}


def prologue(name: str, args: ModelArgs, batch: int, gen: torch.Generator, device: torch.device):
    """(what the decode step computes just before the projection's product, or None, and its inputs): the
    block's RMSNorm before `wqkv` and `w1`/`w3`, SwiGLU (model.FeedForward's) before `w2`, nothing before `wo`
    (attention's output, written by its own kernel)."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(torch.bfloat16)

    if name == "w2":
        return (lambda gate, up: F.silu(gate) * up), (rand(batch, args.hidden_dim), rand(batch, args.hidden_dim))
    if name == "wo":
        return None, (rand(batch, args.n_heads * args.head_dim),)
    norm = RMSNorm(args.dim, args.norm_eps).to(device, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * rand(args.dim))
    return norm, (rand(batch, args.dim),)


def ways(bf16: torch.Tensor, int8: torch.Tensor, before) -> dict:
    """Each way of computing x @ W^T: (a function, whether it takes the prologue's inputs). The product alone
    takes the prologue's output (computed once, outside the timing); the ways with the prologue (`before`, where
    there is one) take its inputs."""
    step_tuning = TUNINGS["compiled (the step's tuning)"]
    found = {"bf16 (cuBLAS)": lambda x: F.linear(x, bf16),
             "bf16, compiled (the step's tuning)": torch.compile(lambda x: F.linear(x, bf16), fullgraph=True,
                                                                 dynamic=False, options=step_tuning),
             "int8, eager": lambda x: F.linear(x, int8)}
    for name, options in TUNINGS.items():
        found[f"int8, {name}"] = torch.compile(lambda x: F.linear(x, int8), fullgraph=True, dynamic=False,
                                               options=options)
    scale = int8.scale.reshape(-1).to(bf16.dtype)
    found["int8, _weight_int8pack_mm"] = lambda x: torch._weight_int8pack_mm(x, int8.qdata, scale)
    alone = {way: (fn, False) for way, fn in found.items()}  # False: takes the prologue's output
    if before is None:
        return alone
    apart = torch.compile(before, fullgraph=True, dynamic=False)
    with_prologue = {
        "bf16, compiled with its prologue": torch.compile(lambda *i: F.linear(before(*i), bf16), fullgraph=True,
                                                          dynamic=False),
        "int8, step's tuning, prologue fused": torch.compile(lambda *i: F.linear(before(*i), int8), fullgraph=True,
                                                             dynamic=False, options=step_tuning),
        "int8, step's tuning, prologue apart": (lambda product: lambda *i: product(apart(*i)))(
            torch.compile(lambda x: F.linear(x, int8), fullgraph=True, dynamic=False, options=step_tuning)),
    }
    return alone | {way: (fn, True) for way, fn in with_prologue.items()}


def timed(fn, inputs: tuple[torch.Tensor, ...], repeat: int) -> float:
    """Microseconds per call of fn(*inputs): on a GPU the kernels of `repeat` calls captured as one CUDA graph
    (the best of three replays), on the CPU a loop."""
    for _ in range(3):  # compiles, tunes, initialises cuBLAS: nothing of it inside the capture
        fn(*inputs)
    device = inputs[0].device
    synchronize(device)
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeat):
            fn(*inputs)
        return 1e6 * (time.perf_counter() - start) / repeat
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn(*inputs)
    best = float("inf")
    for _ in range(3):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, 1e3 * begin.elapsed_time(end) / repeat)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--repeat", type=int, default=50, help="calls per timing")
    p.add_argument("--device", default="cuda")
    ns = p.parse_args()
    device, args = torch.device(ns.device), ModelArgs.from_name(ns.preset)
    rate = copy_bandwidth(device)
    print(f"{ns.preset}, {device_name(device)}, torch {torch.__version__}; copy rate {rate / 1e12:.2f} TB/s")
    print(f"{'projection':<10}{'batch':>6}  {'way':<42}{'us':>9}{'% of copy':>11}{'max diff':>10}")
    gen = torch.Generator(device).manual_seed(0)
    for name, (outputs, inputs) in projections(args).items():
        bf16 = (0.02 * torch.randn(outputs, inputs, generator=gen, device=device)).to(torch.bfloat16)
        int8 = int8_weight(bf16)
        bytes_read = {"bf16": bf16.numel() * 2, "int8": int8.qdata.numel() + int8.scale.numel() * int8.scale.itemsize}
        for batch in ns.batch:
            before, given = prologue(name, args, batch, gen, device)
            with torch.no_grad():
                x = before(*given) if before is not None else given[0]  # the product's own input
                reference = F.linear(x, int8).float()
                for way, (fn, takes_prologue) in ways(bf16, int8, before).items():
                    torch._dynamo.reset()  # each compiled way compiles under its own options
                    inputs = given if takes_prologue else (x,)
                    try:
                        us = timed(fn, inputs, ns.repeat)
                        diff = (fn(*inputs).float() - reference).abs().max().item() / reference.abs().max().item()
                    except (RuntimeError, NotImplementedError) as e:  # an op this device or build lacks
                        print(f"{name:<10}{batch:>6}  {way:<42}  n/a: {str(e).splitlines()[0][:80]}")
                        continue
                    share = 100 * bytes_read["bf16" if way.startswith("bf16") else "int8"] / (us * 1e-6) / rate
                    print(f"{name:<10}{batch:>6}  {way:<42}{us:>9.1f}{share:>11.0f}{diff:>10.1e}", flush=True)

if __name__ == "__main__":
    main()
