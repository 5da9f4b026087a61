"""Training throughput of the adapter and of LoRA on a named preset with random weights (no download needed),
each against PEFT's implementation of the same method.

Sample lengths are drawn from the real Alpaca length distribution (alpaca_lengths.txt, measured on
../shared/data with the LLaMA tokenizer, capped at --row-len as the paper truncates). --methods picks the
methods timed (default: the adapter alone); each gets these rows, in the same run:
- ours, packed: the library's own training step (`train.train_step`: packed rows, flash varlen attention,
  the gradient all-reduce; then `train.step_unless_non_finite`: the gradients checked for NaN or infinity and the
  optimizer's step, as `train` ends every step) over a synthetic token split, --global-batch samples per step;
  under torchrun each process takes its share, as in training. Eager, and with the blocks compiled (--compile).
- ours, padded: one sample per row padded to --row-len, as the paper's code does (equal padding for the
  comparison with PEFT), --samples per step.
- PEFT on HF LlamaForCausalLM (sdpa), when importable: padded to --row-len as the paper, and padded only to
  the longest sample of the step (its best padding), --samples per step.
Our model is the base in bf16 with the method's trainable parameters in fp32: the adapter (--adapter-len x
--adapter-layers, random gates so the branch really runs), or `lora.add_lora` with LoRAArgs' defaults
(Alpaca-LoRA's: rank 8, alpha 16, dropout 0.05 on wq and wv). PEFT gets the same settings:
AdaptionPromptConfig, or LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj",
"v_proj"]), on the HF model in bf16.

Usage:
    python benchmarks/train_throughput.py --preset 7B --compile
    python benchmarks/train_throughput.py --preset 7B --compile --methods adapter lora
    torchrun --standalone --nproc-per-node 4 benchmarks/train_throughput.py --preset 7B --compile --no-peft
    python benchmarks/train_throughput.py --preset tiny --adapter-layers 4 --methods adapter lora --steps 1 \
        --warmup 1 --global-batch 16 --samples 4
        (without a GPU: a smoke check, in fp32, without the matmul reference)
    python benchmarks/train_throughput.py --preset 7B --compile --precision fp8 --no-padded --no-peft
        (adds the packed step with the frozen projections in float8: `train --precision fp8 --compile`)
It prints real tokens/s, padded tokens/s, model TFLOP/s and its % of a bf16 matmul timed in the same run, peak
memory, and the paper's recipe (52,002 samples x 5 epochs) projected from each rate. TFLOP/s counts the matrix
products a step needs (`step_flops`): forward through every block for each processed token (padding included),
backward to the activations through the blocks the gradient passes (the adapter's top --adapter-layers; every
block for LoRA), and the output layer forward and backward at the target positions only (the loss reads no
other; the samples' target share sets their number). The frozen base needs no weight gradients under either
method (LoRA's A and B are the only weights with gradients, and their few FLOPs are not counted); the embedding
is a lookup (no product); attention's own products are not counted, nor what the lowest adapted block's
backward skips (the gradient to its input: within its q/k/v projections' share of one block).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from profiling import print_profile  # benchmarks/profiling.py

from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.batching import collate, token_loss_sum
from llama_adapter.config import PRECISIONS, AdapterArgs, LoRAArgs, ModelArgs, TrainConfig
from llama_adapter.data.tokens import Encoded, TokenDataset, write_split
from llama_adapter.devices import device_name, pick_dtype, synchronize
from llama_adapter.lora import HF_MODULES, add_lora
from llama_adapter.quantize import cast_float8_weights, float8_matmuls
from llama_adapter.train import (
    Dist,
    autocast,
    setup_distributed,
    step_samples,
    step_unless_non_finite,
    train_step,
)

LENGTHS = Path(__file__).with_name("alpaca_lengths.txt")
PAPER_SAMPLES, PAPER_EPOCHS = 52_002, 5
METHODS = ("adapter", "lora")


def alpaca_lengths(row_len: int) -> np.ndarray:
    lengths = np.array([int(x) for x in LENGTHS.read_text().split("\n") if x and not x.startswith("#")])
    return np.minimum(lengths, row_len)


def matmul_tflops(device) -> float:
    """An 8192^3 bf16 matmul's rate on the GPU (NaN on the CPU: no reference there)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    synchronize(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    synchronize(device)
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
    def __init__(self, name: str, real: float, padded: float, seconds: float, losses: list[float], device):
        self.name, self.real, self.padded, self.seconds, self.losses = name, real, padded, seconds, losses
        self.method = ""
        self.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def time_steps(name: str, step, n_warmup: int, n_steps: int, d: Dist, profile: bool = False) -> Result:
    """Run `step(k)` -> (loss, real tokens, padded tokens) for warm-up then timed steps; with `profile`, the last
    warm-up step runs under the profiler, which prints where its GPU time went."""
    for k in range(n_warmup):
        if profile and k == n_warmup - 1 and d.rank == 0:
            print_profile(name, lambda: step(k), d.device)
        else:
            step(k)
    synchronize(d.device)
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    t = time.perf_counter()
    real = padded = 0.0
    losses = []
    for k in range(n_warmup, n_warmup + n_steps):
        loss, r, p = step(k)
        real, padded = real + r, padded + p
        losses.append(loss)
    synchronize(d.device)
    return Result(name, real, padded, time.perf_counter() - t, losses, d.device)


def optimizer(model, fused: bool):
    """AdamW over what trains: fused on the GPU for ours, as `train` builds it; PEFT's rows keep the default."""
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=TrainConfig.betas, weight_decay=TrainConfig.weight_decay,
                            fused=fused or None)
    return opt, params


def optimizer_step(opt, loss: torch.Tensor) -> None:
    """PEFT's step: the backward and the optimizer's step (PEFT's own loop checks no gradient)."""
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def checked_step(model, opt, method: str, d: Dist) -> None:
    """Our step's end as `train` runs it: the gradients checked for NaN or infinity, then the optimizer's step."""
    if found := step_unless_non_finite(model, opt, method, d):
        raise RuntimeError(f"non-finite gradients: {found}")


def ours_packed(model, ds: TokenDataset, cfg: TrainConfig, d: Dist, opt, params, n_warmup, n_steps, name,
                profile: bool) -> Result:
    def step(k):
        loss, real, padded = train_step(model, ds, step_samples(len(ds), cfg, k), cfg, d, params)
        checked_step(model, opt, cfg.method, d)
        return loss, real, padded

    return time_steps(name, step, n_warmup, n_steps, d, profile)


def ours_padded(model, method: str, samples, n: int, row_len: int, opt, n_warmup, n_steps, d: Dist,
                profile: bool) -> Result:
    batches = [collate([[s] for s in samples[k * n: (k + 1) * n]], pad_id=TrainConfig.pad_id, width=row_len)
               for k in range(n_warmup + n_steps)]

    def step(k):
        batch = batches[k].to(d.device)
        with autocast(d.device):
            loss = token_loss_sum(model, batch) / batch.target_mask.sum()
        loss.backward()
        checked_step(model, opt, method, d)
        return loss.item(), batch.real_tokens, batch.padded_tokens

    return time_steps(f"ours, padded to {row_len}", step, n_warmup, n_steps, d, profile)


def our_model(method: str, args: ModelArgs, adapter: AdapterArgs, lora: LoRAArgs, device) -> AdaptedTransformer:
    """The base (bf16 on a GPU) with the method's fresh trainable parameters in fp32, everything else frozen."""
    with torch.device(device):
        model = AdaptedTransformer(args, adapter if method == "adapter" else None).cast_base(pick_dtype(device))
    if method == "adapter":
        with torch.no_grad():
            model.adapter_gate.normal_()  # a trained adapter: the branch really runs
    else:
        add_lora(model, lora, device)  # B starts at zero, as PEFT's: the same work as a trained LoRA
    return model.train()


def ours_rows(method: str, ns, args: ModelArgs, adapter: AdapterArgs, lora: LoRAArgs, ds: TokenDataset, samples,
              global_batch: int, tmp: str, d: Dist, table: Table) -> None:
    """Our packed rows (eager, and compiled with --compile) and the padded one; the model is released on return."""
    model = our_model(method, args, adapter, lora, d.device)
    opt, params = optimizer(model, fused=d.device.type == "cuda")

    def packed(rows: int, variant: str, precision: str = TrainConfig.precision) -> None:
        cfg = TrainConfig(base="", train_data="", out_dir=tmp, row_len=ns.row_len, global_batch=global_batch,
                          rows_per_micro_batch=rows, method=method, precision=precision)
        name = f"ours, packed, {rows} rows/micro{variant}"
        table.add(method, ours_packed(model, ds, cfg, d, opt, params, ns.warmup, ns.steps, name, ns.profile))

    for rows in ns.micro_rows:
        packed(rows, "")
    if ns.compile:
        model.compile_blocks()
        for rows in ns.micro_rows:
            packed(rows, ", compiled")
    if d.world == 1 and not ns.no_padded:
        table.add(method, ours_padded(model, method, samples, ns.samples, ns.row_len, opt, ns.warmup, ns.steps, d,
                                      ns.profile))
    if ns.compile:
        torch._dynamo.reset()  # the next method's blocks compile afresh (no recompile limit shared with these)
    if ns.precision == "fp8":
        # The same model with its frozen projections in float8, compiled as `train --precision fp8 --compile` runs:
        # first with the weights cast at every matmul (as a sharded base is), then cast once (as one on one GPU).
        float8_matmuls(model, d.device, cast_weights=False)
        for cast, variant in ((False, ", compiled, fp8 (cast per step)"), (True, ", compiled, fp8")):
            if cast:
                cast_float8_weights(model)
            model.compile_blocks()
            for rows in ns.micro_rows:
                packed(rows, variant, "fp8")
            torch._dynamo.reset()


def peft_model(method: str, args: ModelArgs, adapter: AdapterArgs, lora: LoRAArgs, device):
    """HF LlamaForCausalLM of the same shapes (bf16 on a GPU) under PEFT's implementation of the method."""
    from peft import AdaptionPromptConfig, LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
                         max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):
        base = LlamaForCausalLM(config).to(pick_dtype(device))
    if method == "adapter":
        peft_config = AdaptionPromptConfig(adapter_len=adapter.adapter_len, adapter_layers=adapter.adapter_layers,
                                           task_type="CAUSAL_LM")
    else:
        peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=[HF_MODULES[t].split(".")[1] for t in lora.targets],
                                 task_type="CAUSAL_LM")
    return get_peft_model(base, peft_config).train()


def peft_padded(model, samples, n: int, width: int | None, row_len: int, n_warmup, n_steps, d: Dist) -> Result:
    opt, _ = optimizer(model, fused=False)

    def inputs(k):
        part = samples[k * n: (k + 1) * n]
        T = width or max(len(t) for t, _ in part)
        ids = torch.zeros(n, T, dtype=torch.long)
        labels = torch.full((n, T), -100, dtype=torch.long)
        attention = torch.zeros(n, T, dtype=torch.long)
        for b, (t, m) in enumerate(part):
            ids[b, : len(t)], attention[b, : len(t)] = torch.from_numpy(t), 1
            labels[b, : len(t)] = torch.where(torch.from_numpy(m), torch.from_numpy(t).long(), -100)
        return ids.to(d.device), attention.to(d.device), labels.to(d.device), sum(len(t) for t, _ in part)

    def step(k):
        ids, attention, labels, real = inputs(k)
        with autocast(d.device):
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer_step(opt, loss)
        return loss.item(), real, ids.numel() - real

    label = f"padded to {row_len} (paper)" if width else "padded to longest"
    return time_steps(f"PEFT, {label}", step, n_warmup, n_steps, d)


def peft_rows(method: str, ns, args: ModelArgs, adapter: AdapterArgs, lora: LoRAArgs, samples, d: Dist,
              table: Table) -> None:
    """PEFT padded to --row-len and to the longest sample; the model is released on return."""
    try:
        model = peft_model(method, args, adapter, lora, d.device)
    except ImportError as e:
        print(f"PEFT reference skipped: {e}")
        return
    for width in (ns.row_len, None):
        table.add(method, peft_padded(model, samples, ns.samples, width, ns.row_len, ns.warmup, ns.steps, d))


def step_flops(args: ModelArgs, backward_layers: int, target_share: float) -> tuple[float, float]:
    """(FLOPs per processed token, per real token) of the matrix products a training step needs (see above): the
    blocks' forward (all layers) and backward to the activations (`backward_layers`) on every processed token, the
    output layer's forward and backward on the `target_share` of the real tokens the loss reads."""
    block = (args.parameter_count() - args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
             - args.dim) // args.n_layers  # its projections and two norms; the norms' vectors are rounding here
    head = args.vocab_size * args.dim
    return 2 * block * (args.n_layers + backward_layers), 4 * head * target_share


def target_share(samples) -> float:
    """Targets per real token: a sample's position counts where the next token is a loss target (collate's
    target_mask)."""
    return sum(int(mask[1:].sum()) for _, mask in samples) / sum(len(t) for t, _ in samples)


class Table:
    """The rows, each printed (on rank 0) as soon as it is measured: a run cut short still shows what it timed."""

    ROWS_WIDTH = 60  # the "rows" column: the longest row description

    def __init__(self, flops: dict[str, tuple[float, float]], peak_matmul: float, mean_len: float, d: Dist):
        """flops: step_flops of each method."""
        self.flops, self.peak_matmul, self.mean_len, self.d = flops, peak_matmul, mean_len, d
        self.results: list[Result] = []

    def header(self, title: str) -> None:
        if self.d.rank == 0:
            print(title)
            print(f"{'method':<9}{'rows':<{self.ROWS_WIDTH}}{'real tok/s':>11}{'padded tok/s':>13}{'real %':>7}"
                  f"{'TFLOP/s':>8}{'% matmul':>9}{'peak GiB':>9}{'paper recipe min':>17}", flush=True)

    def add(self, method: str, r: Result) -> None:
        r.method = method
        self.results.append(r)
        if self.d.rank == 0:
            total = r.real + r.padded
            per_token, per_real_token = self.flops[method]
            tflops = (per_token * total + per_real_token * r.real) / r.seconds / 1e12 / self.d.world
            recipe = PAPER_SAMPLES * PAPER_EPOCHS * self.mean_len / (r.real / r.seconds) / 60
            print(f"{r.method:<9}{r.name:<{self.ROWS_WIDTH}}{r.real / r.seconds:>11.0f}{total / r.seconds:>13.0f}"
                  f"{100 * r.real / total:>7.1f}{tflops:>8.0f}{100 * tflops / self.peak_matmul:>9.1f}"
                  f"{r.peak_gib:>9.1f}{recipe:>17.1f}", flush=True)

    def losses(self) -> None:
        if self.d.rank == 0:
            for r in self.results:
                print(f"losses {r.method}, {r.name}: " + " ".join(f"{x:.4f}" for x in r.losses))


def release(device: torch.device) -> None:
    """Give the previous model's memory back, so that the next one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["adapter"],
                   help="methods timed, each with its PEFT reference (default: adapter)")
    p.add_argument("--adapter-len", type=int, default=AdapterArgs.adapter_len,
                   help=f"default: {AdapterArgs.adapter_len}, AdapterArgs'")
    p.add_argument("--adapter-layers", type=int, default=AdapterArgs.adapter_layers,
                   help=f"default: {AdapterArgs.adapter_layers}, AdapterArgs'")
    p.add_argument("--global-batch", type=int, default=None,
                   help=f"samples per step, all ranks (default {TrainConfig.global_batch} x ranks, TrainConfig's)")
    p.add_argument("--micro-rows", type=int, nargs="+", default=[32], help="packed rows per micro-batch")
    p.add_argument("--samples", type=int, default=16, help="samples per step, padded rows")
    p.add_argument("--row-len", type=int, default=TrainConfig.row_len,
                   help=f"tokens per packed row (default: {TrainConfig.row_len}, TrainConfig's)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time the packed step with compiled blocks")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--no-padded", action="store_true", help="skip the padded rows (ours and PEFT)")
    p.add_argument("--precision", choices=PRECISIONS, default=TrainConfig.precision,
                   help="fp8: also time the packed step with the frozen projections in float8, compiled")
    p.add_argument("--profile", action="store_true", help="print where one step's GPU time goes, for each of our rows")
    ns = p.parse_args()

    lengths = alpaca_lengths(ns.row_len)
    methods = list(dict.fromkeys(ns.methods))
    adapter, lora = AdapterArgs(ns.adapter_len, ns.adapter_layers), LoRAArgs()
    settings = {"adapter": f"adapter {ns.adapter_len}x{ns.adapter_layers}",
                "lora": f"LoRA r{lora.rank} alpha {lora.alpha:g} dropout {lora.dropout:g} on {','.join(lora.targets)}"}
    with tempfile.TemporaryDirectory() as tmp:
        d = setup_distributed(TrainConfig(base="", train_data="", out_dir=tmp))
        global_batch = ns.global_batch or TrainConfig.global_batch * d.world
        args = ModelArgs.from_name(ns.preset)
        n_samples = max(global_batch, ns.samples) * (ns.warmup + ns.steps)
        samples = synthetic_samples(np.random.default_rng(0), lengths, n_samples, args.vocab_size)
        ds = synthetic_split(Path(tmp) / f"split-{d.rank}", samples)
        peak_matmul = matmul_tflops(d.device)
        share = target_share(samples)
        flops = {m: step_flops(args, ns.adapter_layers if m == "adapter" else args.n_layers, share) for m in methods}
        table = Table(flops, peak_matmul, float(lengths.mean()), d)
        table.header(f"{ns.preset}, {'; '.join(settings[m] for m in methods)}, {d.world} GPU(s) x "
                     f"{device_name(d.device)}, torch {torch.__version__}, packed global batch {global_batch}, "
                     f"padded {ns.samples} samples/step, bf16 matmul {peak_matmul:.0f} TFLOP/s; counted GFLOP per real "
                     "token (packed): " + ", ".join(f"{m} {(a + b) / 1e9:.2f}" for m, (a, b) in flops.items()))
        for method in methods:
            ours_rows(method, ns, args, adapter, lora, ds, samples, global_batch, tmp, d, table)
            release(d.device)
            if d.world == 1 and not ns.no_peft and not ns.no_padded:
                peft_rows(method, ns, args, adapter, lora, samples, d, table)
                release(d.device)
    table.losses()
    if d.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
