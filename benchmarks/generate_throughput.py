"""Generation throughput with the adapter on: this library against HF `generate` + PEFT AdaptionPrompt.

A named preset with random bf16 weights (no download), an adapter with non-zero gates (so its branch runs),
prompts of --prompt-len random tokens, greedy decoding of exactly --new-tokens tokens (no EOS can stop it),
at each --batch size; ours eager, with the CUDA-graph decode step, and compiled as well, or the --rows chosen
(each timed after a warm-up call, which compiles: its seconds are the "first call s" column). Also measures the
device's copy bandwidth and prints the memory-bandwidth floor at batch 1: the bytes a decoded token reads from
the weights (`step_bytes`: every weight once, less the token embedding, of which a token reads one row) / copy
rate. Our rows keep the decode step from one call to the next (DecodeGraphs), as a job's batches do: a timed call
replays the graph of the warm-up call before it. Each row's tokens/s is the median of --repeats timed calls (3): a
call's fixed cost moved by 20-80 ms from one call to the next on an H100 (BENCHMARKS.md, eleventh readings), a
sixth of a 128-token int8 call. Calls of half as many new tokens (after one untimed call of it) follow: the
difference of the two medians is what a decoded token costs at the margin ("marginal" tokens/s, and its % of the
floor), the rest of a call is its fixed cost ("fixed ms": prefill, which gives the first token, and the host's
set-up), so a call of n tokens is its fixed ms and n - 1 marginal steps. The half call's KV
cache is shorter (the prompt and its tokens, rounded up), so its steps read less of it: at batch 16 on 7B that
makes the marginal rate about 3% low; at batch 1 it is within 0.2%.

--quantize int8 [int8-g32] adds our rows with the blocks' weights in weight-only int8, a scale per row or per 32
inputs (generate --quantize); their floor counts their int8 values and scales (step_bytes).

--profile prints, after each row's timed call, the kernels of one more call: where the time per token goes
against the floor.

--processes N runs the whole table in N fresh processes, one after another, and then sums them up: each row's
tokens/s as the median and range over the processes, and each int8 row's ratio to bf16 (the same row and batch of
the same process) likewise. A compiled int8 row's rate moves by up to 9% from one process to the next on an H100
(BENCHMARKS.md, eighth and tenth readings), more than a goal's margin: one process's ratio says little. The
processes share the node-local inductor cache, as jobs on one node do: the first compiles and tunes (unless an
earlier run left the cache), the others reuse what it compiled. With --fresh-caches each process compiles and tunes
anew, in empty inductor and Triton caches, as the first job of an experiment on a new node does: the one-row
products' speed follows what the tuning picks in each (eleventh readings), so this samples that spread (with
--processes 1 too: one such process, then its summary).

--startup measures starting a job instead: fresh processes, each with an empty node-local inductor cache (as on
another node), build the model and decode with the compiled step: the first decoded token's time from the
process's start, cold (an empty --compile-cache) and warm (the folder the cold job wrote), and the first
compilation's time (the first compiled step's call, CUDA graph capture included). Each then decodes a smaller
last batch filled up to the first's rows and counts the compiled graphs (one serves them all); "cache MB" is the
size of the compile-cache file after the job. Each job's cache hits and slowest compile phases (torch._dynamo's
timings) follow its row.

Usage:
    python benchmarks/generate_throughput.py --preset 7B --batch 1 16 [--quantize int8 int8-g32]
    python benchmarks/generate_throughput.py --preset 7B --batch 1 --rows compiled --quantize int8 --processes 5 \
        [--fresh-caches]
    python benchmarks/generate_throughput.py --preset tiny-gqa --adapter-layers 2 --device cpu --batch 1 --rows graph \
        --new-tokens 4 --quantize int8 --processes 2 --repeats 1 --fresh-caches   (a smoke check)
    python benchmarks/generate_throughput.py --preset 7B --batch 1 16 --startup [--quantize int8 int8-g32]
    python benchmarks/generate_throughput.py --preset tiny-gqa --layers 32 --batch 2 --startup --device cpu
Prints one row per implementation and batch size: new tokens/s over whole calls and at the margin, at batch 1
each as a % of the floor, and a call's fixed ms; with --processes, every process's table, then the summary; with
--startup, one row per weight format, batch size and cache state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from statistics import median

import torch
from profiling import print_profile  # benchmarks/profiling.py
from random_models import random_model  # benchmarks/random_models.py

from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.config import QUANTIZATIONS, AdapterArgs, CompileConfig, ModelArgs, Sampling
from llama_adapter.devices import device_name, synchronize
from llama_adapter.generate import DecodeGraphs, generate


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    synchronize(device)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    synchronize(device)
    return 10 * 2 * a.numel() / (time.perf_counter() - t)


def timed(fn, new_tokens: int, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Seconds of the warm-up call fn(new_tokens) (which compiles where anything does), then the median seconds of
    `repeats` more, and of `repeats` calls fn(new_tokens // 2) after one untimed call of it: the difference of the
    two medians is the marginal cost of decoding, the rest a call's fixed cost (prefill, the host's set-up, and
    where no kept step serves the call, the CUDA graph's warm-up and capture). The two lengths run one after the
    other, not in turn (each change of length captures the kept step again), so a drift between the two runs lands
    in the marginal rate."""
    def seconds(n: int) -> float:
        synchronize(device)
        t = time.perf_counter()
        fn(n)
        synchronize(device)
        return time.perf_counter() - t

    first = seconds(new_tokens)
    full = median(seconds(new_tokens) for _ in range(repeats))
    seconds(new_tokens // 2)
    return first, full, median(seconds(new_tokens // 2) for _ in range(repeats))


def step_bytes(model: AdaptedTransformer) -> int:
    """Bytes a decoded token reads from the weights: every base weight once (int8 values and their scales where
    quantized; a fused projection's parts are views of it, counted once), less the token embedding, of which a
    token reads one row, unless the output layer is tied to it and reads it whole. Not counted: the adapter's
    prompts, which a call reads once into the KV cache, and an int8 weight's zero points, which its symmetric
    product does not read."""
    skip = set() if model.args.tie_embeddings else {"tok_embeddings.weight"}
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if name in skip or model.is_added_param(name):
            continue
        for t in [p.qdata, p.scale] if hasattr(p, "qdata") else [p]:
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def ours(args: ModelArgs, adapter: AdapterArgs, prompts: torch.Tensor, new_tokens: int, device: torch.device,
         repeats: int, cuda_graph: bool, compile: bool = CompileConfig.compile, quantize: str | None = None,
         profile: str | None = None) -> tuple[float, float, float]:
    """`timed`'s seconds (profile: one more call's kernels are printed under this name)."""
    model = random_model(args, adapter, torch.bfloat16, device, quantize)
    rows = prompts.tolist()
    graphs = DecodeGraphs(model)  # as a job's batches decode (complete_texts): a call of the last one's shapes

    def run(n: int):  # replays its step
        generate(model, rows, n, eos_id=-1, cuda_graph=cuda_graph, compile=compile, graphs=graphs)

    with graphs:
        seconds = timed(run, new_tokens, device, repeats)
        if profile:
            print_profile(profile, partial(run, new_tokens), device)
    model = graphs = None  # frees the weights before the next measurement (the closure above still names them)
    torch.cuda.empty_cache()
    torch._dynamo.reset()  # each row compiles as a job of its own would (and no row meets the recompile limit)
    return seconds


def hf_peft(args: ModelArgs, adapter: AdapterArgs, prompts: torch.Tensor, new_tokens: int, device: torch.device,
            repeats: int, profile: str | None = None) -> tuple[float, float, float]:
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
                         max_position_embeddings=4096)
    with device:
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model = get_peft_model(model, AdaptionPromptConfig(adapter_len=adapter.adapter_len,
                                                       adapter_layers=adapter.adapter_layers, task_type="CAUSAL_LM"))
    ids = prompts.to(device)

    def run(n: int):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    seconds = timed(run, new_tokens, device, repeats)
    if profile:
        print_profile(profile, partial(run, new_tokens), device)
    model = None  # frees the weights before the next measurement (the closure above still names it)
    torch.cuda.empty_cache()
    return seconds


ROWS = {"compiled": ("ours (compiled, graph)", partial(ours, cuda_graph=True, compile=True)),
        "graph": ("ours (CUDA graph)", partial(ours, cuda_graph=True)),
        "eager": ("ours (eager)", partial(ours, cuda_graph=False)), "hf": ("HF + PEFT", hf_peft)}
QUANTIZED_ROWS = ("compiled", "graph")  # eager int8 says nothing the graphed rows do not


def preset(ns: argparse.Namespace) -> ModelArgs:
    args = ModelArgs.from_name(ns.preset)
    return dataclasses.replace(args, n_layers=ns.layers) if ns.layers else args


def startup_job(ns: argparse.Namespace) -> None:
    """One fresh job (--child): model built, then the first decoded token through the compiled step under
    --compile-cache; prints its timeline (seconds since the epoch, which the parent turns into seconds since it
    started this process) and the number of compiled graphs after a smaller last batch."""
    from torch._dynamo.utils import counters

    from llama_adapter.compile_cache import compile_cache

    imported = time.time()
    torch.empty(1, device=ns.device)  # the device's start (CUDA's context), apart from the model's build
    synchronize(torch.device(ns.device))
    device_ready = time.time()
    args, adapter = preset(ns), AdapterArgs(ns.adapter_len, ns.adapter_layers)
    [quantize] = ns.quantize or [None]  # a job has one weight format
    model = random_model(args, adapter, torch.bfloat16, ns.device, quantize)
    synchronize(torch.device(ns.device))
    built = time.time()
    batch = ns.batch[0]
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(3, args.vocab_size, (batch, ns.prompt_len), generator=gen).tolist()
    kind = {"command": "decode", "benchmark": ns.preset, "layers": args.n_layers, "quantize": quantize,
            "rows": batch}
    with compile_cache(ns.compile_cache, kind):
        generate(model, rows, 2, eos_id=-1, compile=True)  # the prefill's token, then one compiled step
        synchronize(torch.device(ns.device))
        first = time.time()
        generate(model, rows[: batch // 2 + 1], 2, eos_id=-1, compile=True, rows=batch)  # a smaller last batch
    from torch._dynamo.utils import compilation_time_metrics

    print(json.dumps({"imported": imported, "device_ready": device_ready, "built": built, "first": first,
                      "graphs": counters["stats"]["unique_graphs"], "inductor": dict(counters["inductor"]),
                      "aot_autograd": dict(counters["aot_autograd"]),
                      "seconds": {k: round(sum(v), 2) for k, v in compilation_time_metrics.items()}}))


def startup(ns: argparse.Namespace) -> None:
    """Cold and warm starts of a compiling job (startup_job), each in a fresh process and node-local cache."""
    print(f"{ns.preset}, adapter {ns.adapter_len}x{ns.adapter_layers}, prompt {ns.prompt_len}, "
          f"{device_name(torch.device(ns.device))} ({os.cpu_count()} CPU cores), torch {torch.__version__}; seconds "
          "from the process's start")
    print(f"{'weights':<8}{'batch':>6}{'cache':>7}{'model ready':>13}{'first token':>13}{'compile':>9}{'graphs':>8}"
          f"{'cache MB':>10}")
    for quantize in [None, *ns.quantize]:
        for batch in ns.batch:
            with tempfile.TemporaryDirectory() as shared:
                for state in ("cold", "warm"):
                    with tempfile.TemporaryDirectory() as local:  # an empty node-local cache: another node
                        command = [sys.executable, __file__, "--child", "--preset", ns.preset, "--adapter-len",
                                   str(ns.adapter_len), "--adapter-layers", str(ns.adapter_layers), "--prompt-len",
                                   str(ns.prompt_len), "--batch", str(batch), "--compile-cache", shared,
                                   "--device", ns.device, *(["--layers", str(ns.layers)] if ns.layers else []),
                                   *(["--quantize", quantize] if quantize else [])]
                        started = time.time()
                        out = subprocess.run(command, capture_output=True, text=True,
                                             env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": local})
                    if out.returncode:
                        sys.exit(f"{' '.join(command)} failed:\n{out.stderr[-4000:]}")
                    t = json.loads(out.stdout.strip().splitlines()[-1])
                    megabytes = sum(f.stat().st_size for f in os.scandir(shared)) / 1e6  # the file jobs share
                    print(f"{quantize or 'bf16':<8}{batch:>6}{state:>7}{t['built'] - started:>13.1f}"
                          f"{t['first'] - started:>13.1f}{t['first'] - t['built']:>9.1f}{t['graphs']:>8}"
                          f"{megabytes:>10.1f}", flush=True)
                    counted = {**t["inductor"], **t["aot_autograd"]}  # cache hits, and configurations tuning timed
                    caches = {k: v for k, v in counted.items() if "cache" in k or "coordesc" in k}
                    slowest = dict(sorted(t["seconds"].items(), key=lambda kv: -kv[1])[:12])
                    print(f"  model ready: imports {t['imported'] - started:.1f} s, device's start "
                          f"{t['device_ready'] - t['imported']:.1f} s, model built "
                          f"{t['built'] - t['device_ready']:.1f} s\n  caches and tuning: {caches}\n"
                          f"  compile phases (s): {slowest}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--adapter-len", type=int, default=AdapterArgs.adapter_len,
                   help=f"default: {AdapterArgs.adapter_len}, AdapterArgs'")
    p.add_argument("--adapter-layers", type=int, default=AdapterArgs.adapter_layers,
                   help=f"default: {AdapterArgs.adapter_layers}, AdapterArgs'")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=Sampling.max_new_tokens,
                   help=f"tokens each timed call decodes (default: {Sampling.max_new_tokens}, Sampling's)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="which implementations to time (default: all; each compiled batch size compiles)")
    p.add_argument("--quantize", nargs="+", choices=QUANTIZATIONS, default=[],
                   help="also time our rows with weights in these formats")
    p.add_argument("--startup", action="store_true", help="time cold and warm job starts instead (see above)")
    p.add_argument("--profile", action="store_true",
                   help="after each row's timed call, print where one more call's GPU time goes (its kernels)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (inductor's C++ kernels when compiled)")
    p.add_argument("--layers", type=int, help="the preset with this many layers")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls of each length, of which each row takes the median (default 3)")
    p.add_argument("--processes", type=int, default=1,
                   help="run the table in this many fresh processes and sum them up (median and range; see above)")
    p.add_argument("--fresh-caches", action="store_true",
                   help="each process (one too) in empty inductor and Triton caches (see above)")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one --processes process: its rows
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one --startup job
    p.add_argument("--compile-cache", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (a call of half as many follows each timed call)")
    if ns.repeats < 1:
        p.error("--repeats must be at least 1")
    if ns.processes < 1 or (ns.processes > 1 and ns.startup):
        p.error("--processes must be at least 1, and is for the throughput table (--startup starts its own)")
    if ns.child:
        return startup_job(ns)
    if ns.startup:
        return startup(ns)
    if (ns.processes > 1 or ns.fresh_caches) and not ns.json:  # a --json process is one of across_processes'
        return across_processes(ns)
    rows = throughput_table(ns)
    if ns.json:
        print(json.dumps(rows))


def throughput_table(ns: argparse.Namespace) -> list[dict]:
    """Time each implementation (--rows, and their int8 rows) at each batch size; print the table; return its rows
    (implementation, weights, batch, tokens/s, marginal tokens/s or None)."""
    args = preset(ns)
    adapter = AdapterArgs(ns.adapter_len, ns.adapter_layers)
    device = torch.device(ns.device)
    rate = copy_bandwidth(device)
    print(f"{ns.preset}, adapter {ns.adapter_len}x{ns.adapter_layers}, prompt {ns.prompt_len}, {ns.new_tokens} new "
          f"tokens, {device_name(device)}, torch {torch.__version__}; copy rate {rate / 1e12:.2f} TB/s")
    impls = {name: (name, None, fn) for row, (name, fn) in ROWS.items() if row in ns.rows}
    floors = {}
    for quantize in [None, *ns.quantize]:
        weights = step_bytes(random_model(args, adapter, torch.bfloat16, device, quantize))
        torch.cuda.empty_cache()
        floors[quantize] = rate / weights
        print(f"{quantize or 'bf16'}: batch-1 bandwidth floor {floors[quantize]:.0f} tokens/s ({weights / 1e9:.3f} GB "
              "a decoded token reads from the weights)")
        if quantize is None:
            continue
        for name, fn in [ROWS[row] for row in QUANTIZED_ROWS if row in ns.rows]:
            impls[f"{name[:-1]}, {quantize})"] = (name, quantize, partial(fn, quantize=quantize))
    print(f"{'implementation':<34}{'batch':>6}{'tokens/s':>10}{'% of floor':>12}{'marginal':>10}{'% of floor':>12}"
          f"{'fixed ms':>10}{'first call s':>14}")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (bf16_name, quantize, fn) in impls.items():
        for batch in ns.batch:
            prompts = torch.randint(3, args.vocab_size, (batch, ns.prompt_len), generator=gen)
            first, seconds, half = fn(args, adapter, prompts, ns.new_tokens, device, ns.repeats,
                                      profile=ns.profile and f"{name}, batch {batch}")
            step = (seconds - half) / (ns.new_tokens - ns.new_tokens // 2)  # a decoded token's marginal seconds
            rates = [batch * ns.new_tokens / seconds, batch / step if step > 0 else None]  # None: within noise
            shares = [f"{100 * r / floors[quantize]:.0f}" if batch == 1 and r else "" for r in rates]
            fixed = f"{1000 * (seconds - (ns.new_tokens - 1) * step):.0f}" if rates[1] else "n/a"  # prefill: token 1
            marginal = f"{rates[1]:.0f}" if rates[1] else "n/a"
            print(f"{name:<34}{batch:>6}{rates[0]:>10.0f}{shares[0]:>12}{marginal:>10}{shares[1]:>12}{fixed:>10}"
                  f"{first:>14.1f}", flush=True)
            rows.append({"implementation": name, "bf16": bf16_name, "weights": quantize or "bf16", "batch": batch,
                         "tokens_s": rates[0], "marginal": rates[1]})
    return rows


def across_processes(ns: argparse.Namespace) -> None:
    """The table in ns.processes fresh processes, each printed as it ends, then every row's median and range over
    them, and each quantized row's ratio to its bf16 row of the same process and batch."""
    command = [sys.executable, __file__, *sys.argv[1:], "--processes", "1", "--json"]  # the last --processes holds
    tables = []
    for k in range(ns.processes):
        with tempfile.TemporaryDirectory() as caches:
            env = ({**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "inductor"),
                    "TRITON_CACHE_DIR": os.path.join(caches, "triton")} if ns.fresh_caches else None)
            out = subprocess.run(command, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"process {k + 1} of {ns.processes} ({' '.join(command)}) failed:\n{out.stderr[-4000:]}")
        *table, last = out.stdout.strip().splitlines()
        print(f"process {k + 1} of {ns.processes}:", *table, sep="\n", flush=True)
        tables.append(json.loads(last))

    def spread(values: list[float], form: str) -> str:
        return f"{form.format(median(values))} [{form.format(min(values))}, {form.format(max(values))}]"

    print(f"\nover {ns.processes} processes: median [min, max]")
    print(f"{'implementation':<34}{'batch':>6}{'tokens/s':>22}{'marginal':>22}{'/ bf16 (tokens/s)':>26}")
    for i, row in enumerate(tables[0]):
        runs = [table[i] for table in tables]
        marginal = [r["marginal"] for r in runs]
        ratio = ""
        if row["weights"] != "bf16":  # its bf16 row is in every table (--rows chose both)
            base = [next(b for b in table if b["implementation"] == row["bf16"] and b["batch"] == row["batch"])
                    for table in tables]
            ratio = spread([r["tokens_s"] / b["tokens_s"] for r, b in zip(runs, base)], "{:.2f}x")
        print(f"{row['implementation']:<34}{row['batch']:>6}{spread([r['tokens_s'] for r in runs], '{:.0f}'):>22}"
              f"{spread(marginal, '{:.0f}') if all(marginal) else 'n/a':>22}{ratio:>26}", flush=True)

if __name__ == "__main__":
    main()
