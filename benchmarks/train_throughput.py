"""Adapter training throughput on a named preset with random weights (no download needed).

Sample lengths are drawn from the real Alpaca length distribution (alpaca_lengths.txt, measured on
../shared/data with the LLaMA tokenizer). Each step runs forward, backward and AdamW on the adapter
through the library's own packed batches. Steps are built two ways: packed into rows of --row-len tokens
(ours), and one sample per row padded to --row-len (as the paper's code does).

Usage:
    python benchmarks/train_throughput.py --preset 7B --samples 16 --steps 10
It prints a table of real tokens/s, padded tokens/s, model TFLOP/s, % of a bf16 matmul measured in the
same run, and peak memory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from llama_adapter.batching import Batch, collate, pack_rows, token_loss_sum
from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.model import Transformer

LENGTHS = Path(__file__).with_name("alpaca_lengths.txt")


def alpaca_lengths() -> np.ndarray:
    return np.array([int(x) for x in LENGTHS.read_text().split("\n") if x and not x.startswith("#")])


def matmul_tflops(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def synthetic_step(rng, lengths, n, vocab, row_len, packed):
    """Batches for one step of n samples with real lengths (capped at row_len) and random tokens."""
    ls = np.minimum(rng.choice(lengths, n), row_len)
    samples = []
    for L in ls:
        t = rng.integers(3, vocab, L).astype(np.int32)
        t[0] = 1
        m = np.arange(L) >= L // 2  # about half prompt, half response
        samples.append((t, m))
    rows = pack_rows(ls, row_len) if packed else [[i] for i in range(n)]
    batch = collate([[samples[i] for i in r] for r in rows], pad_id=0)
    return batch if packed else pad_to(batch, row_len)  # the paper pads every sample to max_words


def pad_to(batch, T):
    """The batch widened to T positions of padding (each padded position attends only to itself)."""
    extra = T - batch.tokens.size(1)
    if extra <= 0:
        return batch
    pad = torch.nn.functional.pad
    mask = pad(batch.attn_mask, (0, extra, 0, extra))
    mask[..., range(T - extra, T), range(T - extra, T)] = True
    return Batch(pad(batch.tokens, (0, extra)), pad(batch.targets, (0, extra)), pad(batch.target_mask, (0, extra)),
                 pad(batch.positions, (0, extra)), mask, batch.real_tokens, batch.padded_tokens + extra * len(batch.tokens))


def run(model, opt, batches, device):
    torch.cuda.synchronize()
    t = time.perf_counter()
    real = padded = 0
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = token_loss_sum(model, batch) / batch.target_mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += batch.real_tokens
        padded += batch.padded_tokens
    torch.cuda.synchronize()
    return real, padded, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--adapter-len", type=int, default=10)
    p.add_argument("--adapter-layers", type=int, default=30)
    p.add_argument("--samples", type=int, default=16, help="samples per step (one micro-batch)")
    p.add_argument("--row-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    ns = p.parse_args()
    device = torch.device("cuda")
    args = ModelArgs.from_name(ns.preset)
    with torch.device(device):
        model = Transformer(args, AdapterArgs(ns.adapter_len, ns.adapter_layers)).cast_base(torch.bfloat16)
    with torch.no_grad():
        model.adapter_gate.normal_()  # a trained adapter: the branch really runs
    forward_model = torch.compile(model) if ns.compile else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                            weight_decay=0.02)
    lengths = alpaca_lengths()
    peak_matmul = matmul_tflops(device)
    # Forward (2N) + backward to the activations (2N); the frozen base needs no weight gradients.
    flops_per_token = 4 * sum(p.numel() for p in model.parameters())
    print(f"{ns.preset}, adapter {ns.adapter_len}x{ns.adapter_layers}, {ns.samples} samples/step, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 matmul {peak_matmul:.0f} TFLOP/s")
    print(f"{'batching':<22}{'real tok/s':>12}{'padded tok/s':>14}{'real %':>8}{'TFLOP/s':>9}{'% matmul':>10}{'peak GiB':>10}")
    for name, packed in (("packed (ours)", True), ("padded to row (paper)", False)):
        rng = np.random.default_rng(0)
        batches = [synthetic_step(rng, lengths, ns.samples, args.vocab_size, ns.row_len, packed)
                   for _ in range(ns.steps + 2)]
        run(forward_model, opt, batches[:2], device)  # warm-up (and compilation)
        torch.cuda.reset_peak_memory_stats()
        real, padded, seconds = run(forward_model, opt, batches[2:], device)
        total = real + padded
        tflops = flops_per_token * total / seconds / 1e12
        print(f"{name:<22}{real / seconds:>12.0f}{total / seconds:>14.0f}{100 * real / total:>8.1f}"
              f"{tflops:>9.0f}{100 * tflops / peak_matmul:>10.1f}{torch.cuda.max_memory_allocated() / 2**30:>10.1f}")


if __name__ == "__main__":
    main()
