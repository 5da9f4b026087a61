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
With --more-ways, three ways of laying out the one-row int8 reduction besides (each under the step's tuning):
- without persistent reductions (inductor loops over a row's inputs instead of holding the row in registers);
- split-K: partial sums over 8 slices of the inputs, then their sum (more programs for a narrow product);
- the int8 weight stored K×N (inputs by outputs), read along the outputs.
On a GPU each way's calls are captured in one CUDA graph and replayed, so the time is the kernels' alone (no
launches); on the CPU they are timed as a loop. With one copy of each weight (--copies 1) the calls read the same
weight again and again, so a weight that fits the GPU's L2 (50 MB on H100/H200: int8 `wo` and `w2`, bf16 `wo`) may
partly come from it, where the decode step reads each from memory once per token. --copies N makes N copies of
each weight (and input) and cycles through them call by call: with 6, no weight of 7B's is read again before five
others (at least 100 MB) have passed through L2. Each way's result is checked against the int8 weight's own eager
product of the same input (the same rounding of the weight; other kernels sum in another order).

Usage:
    python benchmarks/int8_projections.py --preset 7B [--batch 1 16] [--copies 6] [--more-ways]
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


def split_k(slices: int):
    """x @ W^T for int8 values W (N, K) and their scales (N,): partial sums over `slices` slices of the K inputs, then
    their sum."""
    def product(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        (n, k), rows = qdata.shape, x.size(0)
        if k % slices:
            raise ValueError(f"{k} inputs do not split into {slices} slices")
        parts = (qdata.view(1, n, slices, k // slices).to(x.dtype).float()
                 * x.view(rows, 1, slices, k // slices).float()).sum(-1)  # (rows, N, slices)
        return (parts.sum(-1) * scale.float()).to(x.dtype)
    return product


# The forms a way takes the weight in: bf16, torchao's int8 tensor, or its int8 values (N, K) or (K, N) and scales.
FORMS = ("bf16", "int8", "packed", "kxn")


def weight_forms(bf16: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    """One weight in each of FORMS (the arguments a way takes after its input)."""
    int8 = int8_weight(bf16)
    scale = int8.scale.reshape(-1).to(bf16.dtype)
    return {"bf16": (bf16,), "int8": (int8,), "packed": (int8.qdata, scale),
            "kxn": (int8.qdata.t().contiguous(), scale)}


def ways(before, more: bool) -> dict[str, tuple]:
    """Each way of computing x @ W^T: (a function of its input and the weight in its form, the form (FORMS), whether
    its input is the prologue's inputs). The product alone takes the prologue's output (computed once, outside the
    timing); the ways with the prologue (`before`, where there is one) take its inputs."""
    step_tuning = TUNINGS["compiled (the step's tuning)"]

    def compiled(fn, options=step_tuning):
        return torch.compile(fn, fullgraph=True, dynamic=False, options=options)

    def linear(x, w):
        return F.linear(x, w)

    found = {"bf16 (cuBLAS)": (linear, "bf16"), "bf16, compiled (the step's tuning)": (compiled(linear), "bf16"),
             "int8, eager": (linear, "int8")}
    for name, options in TUNINGS.items():
        found[f"int8, {name}"] = (compiled(linear, options), "int8")
    found["int8, _weight_int8pack_mm"] = (torch._weight_int8pack_mm, "packed")
    if more:
        found["int8, no persistent reductions"] = (
            compiled(linear, step_tuning | {"triton.persistent_reductions": False}), "int8")
        found["int8, split-K 8 (the step's tuning)"] = (compiled(split_k(8)), "packed")
        found["int8, weight stored KxN (the step's tuning)"] = (
            compiled(lambda x, qt, scale: (x @ qt.to(x.dtype)) * scale), "kxn")
    alone = {way: (fn, form, False) for way, (fn, form) in found.items()}  # False: takes the prologue's output
    if before is None:
        return alone
    apart, product = compiled(before, {}), compiled(linear)
    with_prologue = {
        "bf16, compiled with its prologue": (compiled(lambda *i: F.linear(before(*i[:-1]), i[-1]), {}), "bf16"),
        "int8, step's tuning, prologue fused": (compiled(lambda *i: F.linear(before(*i[:-1]), i[-1])), "int8"),
        "int8, step's tuning, prologue apart": (lambda *i: product(apart(*i[:-1]), i[-1]), "int8"),
    }
    return alone | {way: (fn, form, True) for way, (fn, form) in with_prologue.items()}


def timed(fn, calls: list[tuple[torch.Tensor, ...]], repeat: int) -> float:
    """Microseconds per call of fn, call k taking calls[k % len(calls)]: on a GPU the kernels of `repeat` calls
    captured as one CUDA graph (the best of three replays), on the CPU a loop."""
    for k in range(3):  # compiles, tunes, initialises cuBLAS: nothing of it inside the capture
        fn(*calls[k % len(calls)])
    device = calls[0][0].device
    synchronize(device)
    if device.type != "cuda":
        start = time.perf_counter()
        for k in range(repeat):
            fn(*calls[k % len(calls)])
        return 1e6 * (time.perf_counter() - start) / repeat
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(repeat):
            fn(*calls[k % len(calls)])
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
    p.add_argument("--copies", type=int, default=1, help="copies of each weight, cycled call by call (see above)")
    p.add_argument("--more-ways", action="store_true", help="also the reduction's other layouts (see above)")
    p.add_argument("--device", default="cuda")
    ns = p.parse_args()
    if ns.copies < 1:
        p.error("--copies must be at least 1")
    device, args = torch.device(ns.device), ModelArgs.from_name(ns.preset)
    rate = copy_bandwidth(device)
    print(f"{ns.preset}, {device_name(device)}, torch {torch.__version__}; copy rate {rate / 1e12:.2f} TB/s; "
          f"{ns.copies} cop{'y' if ns.copies == 1 else 'ies'} of each weight")
    print(f"{'projection':<10}{'batch':>6}  {'way':<44}{'us':>9}{'% of copy':>11}{'max diff':>10}")
    gen = torch.Generator(device).manual_seed(0)
    for name, (outputs, inputs) in projections(args).items():
        copies = [weight_forms((0.02 * torch.randn(outputs, inputs, generator=gen, device=device)).to(torch.bfloat16))
                  for _ in range(ns.copies)]
        int8 = copies[0]["int8"][0]
        bytes_read = {"bf16": outputs * inputs * 2,
                      "int8": int8.qdata.numel() + int8.scale.numel() * int8.scale.itemsize}
        for batch in ns.batch:
            acts = [prologue(name, args, batch, gen, device) for _ in range(ns.copies)]  # (before, its inputs)
            before = acts[0][0]
            with torch.no_grad():
                products = [b(*given) if b is not None else given[0] for b, given in acts]  # the products' inputs
                reference = F.linear(products[0], int8).float()
                for way, (fn, form, takes_prologue) in ways(before, ns.more_ways).items():
                    torch._dynamo.reset()  # each compiled way compiles under its own options
                    calls = [(*(given if takes_prologue else (x,)), *forms[form])
                             for (_, given), x, forms in zip(acts, products, copies)]
                    try:
                        us = timed(fn, calls, ns.repeat)
                        diff = (fn(*calls[0]).float() - reference).abs().max().item() / reference.abs().max().item()
                    except (RuntimeError, NotImplementedError, ValueError) as e:  # an op this device lacks, a shape
                        print(f"{name:<10}{batch:>6}  {way:<44}  n/a: {str(e).splitlines()[0][:80]}")
                        continue
                    share = 100 * bytes_read["bf16" if form == "bf16" else "int8"] / (us * 1e-6) / rate
                    print(f"{name:<10}{batch:>6}  {way:<44}{us:>9.1f}{share:>11.0f}{diff:>10.1e}", flush=True)


if __name__ == "__main__":
    main()
