"""Adapter training throughput on a named preset with random weights (no download needed), against PEFT.

Sample lengths are drawn from the real Alpaca length distribution (alpaca_lengths.txt, measured on
../shared/data with the LLaMA tokenizer, capped at --row-len as the paper truncates). Rows:
- ours, packed: the library's own optimizer step (`train.train_step`: packed rows, flash varlen attention,
  the gradient all-reduce) over a synthetic token split, --global-batch samples per step; under torchrun
  each process takes its share, as in training. Eager, and with the blocks compiled (--compile).
- ours, padded: one sample per row padded to --row-len, as the paper's code does (equal padding for the
  comparison with PEFT), --samples per step.
- PEFT AdaptionPrompt on HF LlamaForCausalLM (sdpa), when importable: padded to --row-len as the paper, and
  padded only to the longest sample of the step (its best padding), --samples per step.

Usage:
    python benchmarks/train_throughput.py --preset 7B --compile
    torchrun --standalone --nproc-per-node 4 benchmarks/train_throughput.py --preset 7B --compile --no-peft
It prints real tokens/s, padded tokens/s, model TFLOP/s (4 x parameters per processed token: forward, and
backward to the activations; the frozen base needs no weight gradients) and its % of a bf16 matmul timed
in the same run, peak memory, and the paper's recipe (52,002 samples x 5 epochs) projected from each rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llama_adapter.batching import collate, token_loss_sum
from llama_adapter.config import AdapterArgs, ModelArgs, TrainConfig
from llama_adapter.data.tokens import Encoded, TokenDataset, write_split
from llama_adapter.model import Transformer
from llama_adapter.train import Dist, setup_distributed, step_samples, train_step

LENGTHS = Path(__file__).with_name("alpaca_lengths.txt")
PAPER_SAMPLES, PAPER_EPOCHS = 52_002, 5


def alpaca_lengths(row_len: int) -> np.ndarray:
    lengths = np.array([int(x) for x in LENGTHS.read_text().split("\n") if x and not x.startswith("#")])
    return np.minimum(lengths, row_len)


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


def synthetic_samples(rng, lengths: np.ndarray, n: int, vocab: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n samples of real lengths: BOS and random tokens, the second half a response (loss target)."""
    samples = []
    for L in rng.choice(lengths, n):
        t = rng.integers(3, vocab, L).astype(np.int32)
        t[0] = 1
        samples.append((t, np.arange(L) >= L // 2))
    return samples


def synthetic_split(path: Path, samples) -> TokenDataset:
    enc = Encoded([t for t, _ in samples], [m for _, m in samples], list(range(len(samples))), [])
    write_split(path, enc, np.arange(len(samples)))
    return TokenDataset(path)


class Result:
    def __init__(self, name: str, real: float, padded: float, seconds: float, losses: list[float]):
        self.name, self.real, self.padded, self.seconds, self.losses = name, real, padded, seconds, losses
        self.peak_gib = torch.cuda.max_memory_allocated() / 2**30


def time_steps(name: str, step, n_warmup: int, n_steps: int, d: Dist) -> Result:
    """Run `step(k)` -> (loss, real tokens, padded tokens) for warm-up then timed steps."""
    for k in range(n_warmup):
        step(k)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    real = padded = 0.0
    losses = []
    for k in range(n_warmup, n_warmup + n_steps):
        loss, r, p = step(k)
        real, padded = real + r, padded + p
        losses.append(loss)
    torch.cuda.synchronize()
    return Result(name, real, padded, time.perf_counter() - t, losses)


def ours_packed(model, ds: TokenDataset, cfg: TrainConfig, d: Dist, opt, params, n_warmup, n_steps, name) -> Result:
    def step(k):
        loss, real, padded = train_step(model, ds, step_samples(len(ds), cfg, k), cfg, d, params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, real, padded

    return time_steps(name, step, n_warmup, n_steps, d)


def ours_padded(model, samples, n: int, row_len: int, opt, n_warmup, n_steps, d: Dist) -> Result:
    batches = [collate([[s] for s in samples[k * n: (k + 1) * n]], pad_id=0, width=row_len)
               for k in range(n_warmup + n_steps)]

    def step(k):
        batch = batches[k].to(d.device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = token_loss_sum(model, batch) / batch.target_mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), batch.real_tokens, batch.padded_tokens

    return time_steps(f"ours, padded to {row_len}", step, n_warmup, n_steps, d)


def peft_model(args: ModelArgs, adapter: AdapterArgs):
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
                         max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device("cuda"):
        base = LlamaForCausalLM(config).to(torch.bfloat16)
    return get_peft_model(base, AdaptionPromptConfig(adapter_len=adapter.adapter_len,
                                                     adapter_layers=adapter.adapter_layers, task_type="CAUSAL_LM"))


def peft_padded(model, samples, n: int, width: int | None, row_len: int, n_warmup, n_steps, d: Dist) -> Result:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                            weight_decay=0.02)

    def inputs(k):
        part = samples[k * n: (k + 1) * n]
        T = width or max(len(t) for t, _ in part)
        ids = torch.zeros(n, T, dtype=torch.long)
        labels = torch.full((n, T), -100, dtype=torch.long)
        attention = torch.zeros(n, T, dtype=torch.long)
        for b, (t, m) in enumerate(part):
            ids[b, : len(t)], attention[b, : len(t)] = torch.from_numpy(t), 1
            labels[b, : len(t)] = torch.where(torch.from_numpy(m), torch.from_numpy(t).long(), -100)
        return ids.cuda(), attention.cuda(), labels.cuda(), sum(len(t) for t, _ in part)

    def step(k):
        ids, attention, labels, real = inputs(k)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), real, ids.numel() - real

    label = f"padded to {row_len} (paper)" if width else "padded to longest"
    return time_steps(f"PEFT, {label}", step, n_warmup, n_steps, d)


def free(model) -> None:
    del model
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--adapter-len", type=int, default=10)
    p.add_argument("--adapter-layers", type=int, default=30)
    p.add_argument("--global-batch", type=int, default=None, help="samples per step, all ranks (default 64 x ranks)")
    p.add_argument("--micro-rows", type=int, nargs="+", default=[32], help="packed rows per micro-batch")
    p.add_argument("--samples", type=int, default=16, help="samples per step, padded rows")
    p.add_argument("--row-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time the packed step with compiled blocks")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--no-padded", action="store_true", help="skip the padded rows (ours and PEFT)")
    ns = p.parse_args()

    lengths = alpaca_lengths(ns.row_len)
    with tempfile.TemporaryDirectory() as tmp:
        d = setup_distributed(TrainConfig(base="", train_data="", out_dir=tmp))
        global_batch = ns.global_batch or 64 * d.world
        args = ModelArgs.from_name(ns.preset)
        adapter = AdapterArgs(ns.adapter_len, ns.adapter_layers)
        n_samples = max(global_batch, ns.samples) * (ns.warmup + ns.steps)
        samples = synthetic_samples(np.random.default_rng(0), lengths, n_samples, args.vocab_size)
        ds = synthetic_split(Path(tmp) / f"split-{d.rank}", samples)
        peak_matmul = matmul_tflops(d.device)
        with torch.device(d.device):
            model = Transformer(args, adapter).cast_base(torch.bfloat16)
        with torch.no_grad():
            model.adapter_gate.normal_()  # a trained adapter: the branch really runs
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02, fused=True)
        flops_per_token = 4 * args.parameter_count()

        results = []
        variants = [(False, r) for r in ns.micro_rows] + ([(True, r) for r in ns.micro_rows] if ns.compile else [])
        for compiled, rows in variants:
            if compiled and not getattr(model.layers[0], "_compiled_call_impl", None):
                model.compile_blocks()
            cfg = TrainConfig(base="", train_data="", out_dir=tmp, row_len=ns.row_len, global_batch=global_batch,
                              rows_per_micro_batch=rows, seed=0)
            name = f"ours, packed, {rows} rows/micro{', compiled' if compiled else ''}"
            results.append(ours_packed(model, ds, cfg, d, opt, params, ns.warmup, ns.steps, name))
        if d.world == 1 and not ns.no_padded:
            results.append(ours_padded(model, samples, ns.samples, ns.row_len, opt, ns.warmup, ns.steps, d))
        free(model)
        if d.world == 1 and not ns.no_peft and not ns.no_padded:
            try:
                peft = peft_model(args, adapter)
            except ImportError as e:
                print(f"PEFT reference skipped: {e}")
            else:
                for width in (ns.row_len, None):
                    results.append(peft_padded(peft, samples, ns.samples, width, ns.row_len, ns.warmup, ns.steps, d))
                free(peft)

    if d.rank == 0:
        print(f"{ns.preset}, adapter {ns.adapter_len}x{ns.adapter_layers}, {d.world} GPU(s) x "
              f"{torch.cuda.get_device_name()}, torch {torch.__version__}, packed global batch {global_batch}, "
              f"padded {ns.samples} samples/step, bf16 matmul {peak_matmul:.0f} TFLOP/s")
        mean_len = float(lengths.mean())
        print(f"{'rows':<40}{'real tok/s':>11}{'padded tok/s':>13}{'real %':>7}{'TFLOP/s':>8}{'% matmul':>9}"
              f"{'peak GiB':>9}{'paper recipe min':>17}")
        for r in results:
            total = r.real + r.padded
            tflops = flops_per_token * total / r.seconds / 1e12 / d.world
            recipe = PAPER_SAMPLES * PAPER_EPOCHS * mean_len / (r.real / r.seconds) / 60
            print(f"{r.name:<40}{r.real / r.seconds:>11.0f}{total / r.seconds:>13.0f}{100 * r.real / total:>7.1f}"
                  f"{tflops:>8.0f}{100 * tflops / peak_matmul:>9.1f}{r.peak_gib:>9.1f}{recipe:>17.1f}")
        for r in results:
            print(f"losses {r.name}: " + " ".join(f"{x:.4f}" for x in r.losses))
    if d.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
