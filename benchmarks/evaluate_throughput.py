"""ScienceQA evaluation throughput, generation mode (the paper's): questions/s on a named preset's shapes.

The questions are real: a ScienceQA source (by default LLaVA's 4,241-question test file in ../shared/data) goes
through the library's own fetch and validate, and each question is asked as `evaluate --mode generate` asks it
(`evaluate.answer_by_generation`: the paper's prompt, batched greedy decoding of up to --max-new-tokens, the
answer parsed). The model is random (no download): the preset's shapes in bf16, projections fused as the CLI loads
them, an adapter with non-zero gates. A random model never says EOS, so every question decodes all
--max-new-tokens tokens: an upper bound on a trained adapter's time, whose answers ("The answer is (A).") end
sooner.

Rows: our decoding with the CUDA graph, and with the compiled step (`--compile`), each one pass over the
questions; the compiled pass includes its compilation (one per job), as a job's would, and the time after its
first batch is shown beside it.

Usage:
    python benchmarks/evaluate_throughput.py --preset 7B --batch-size 32 --compile
    python benchmarks/evaluate_throughput.py --preset SmolLM2-135M --adapter-layers 2 --limit 4 --batch-size 2 \
        --max-new-tokens 4
        (a smoke check on the CPU: a small preset whose vocabulary holds the LLaMA tokenizer's ids)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from random_models import random_model  # benchmarks/random_models.py

from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.data.fetch import fetch
from llama_adapter.data.validate import validate
from llama_adapter.devices import device_name, pick_device, pick_dtype, synchronize
from llama_adapter.evaluate import ANSWER_TOKENS, answer_by_generation
from llama_adapter.io import read_jsonl
from llama_adapter.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PAPER_CONFIG = Path(__file__).resolve().parents[1] / "config" / "paper-7b.yaml"


def questions(source: Path, limit: int | None) -> list[dict]:
    """The source's validated ScienceQA records, through the library's fetch and validate (all splits)."""
    with tempfile.TemporaryDirectory() as tmp:
        fetch("scienceqa", str(source), Path(tmp) / "fetched", assign_splits={"test": 1.0})
        validate("scienceqa", Path(tmp) / "fetched", Path(tmp) / "validated")
        records = read_jsonl(Path(tmp) / "validated" / "records.jsonl")
    return records[:limit] if limit else records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--adapter-len", type=int, default=AdapterArgs.adapter_len,
                   help=f"default: {AdapterArgs.adapter_len}, AdapterArgs'")
    p.add_argument("--adapter-layers", type=int, default=AdapterArgs.adapter_layers,
                   help=f"default: {AdapterArgs.adapter_layers}, AdapterArgs'")
    p.add_argument("--questions", type=Path, default=SHARED / "scienceqa" / "test_4241_llava_cqm.json",
                   help="a ScienceQA source that fetch reads (default: LLaVA's test file in ../shared/data)")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llama_sentencepiece_32k.model")
    paper_batch = yaml.safe_load(PAPER_CONFIG.read_text())["evaluate"]["batch_size"]
    p.add_argument("--batch-size", type=int, default=paper_batch,
                   help=f"questions per batch (default: {paper_batch}, config/paper-7b.yaml's evaluate.batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=ANSWER_TOKENS,
                   help=f"evaluate's answer length (default: {ANSWER_TOKENS}, evaluate.ANSWER_TOKENS)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--compile", action="store_true", help="also time a pass with the compiled decode step")
    ns = p.parse_args()

    records = questions(ns.questions, ns.limit)
    tokenizer = load_tokenizer(ns.tokenizer)
    args = ModelArgs.from_name(ns.preset)
    if tokenizer.vocab_size > args.vocab_size:
        p.error(f"--tokenizer has {tokenizer.vocab_size} tokens, more than the {ns.preset} preset's {args.vocab_size}")
    device = pick_device(None)
    model = random_model(args, AdapterArgs(ns.adapter_len, ns.adapter_layers), pick_dtype(device), device)
    print(f"{ns.preset}, adapter {ns.adapter_len}x{ns.adapter_layers}, {len(records)} questions, batch "
          f"{ns.batch_size}, up to {ns.max_new_tokens} new tokens, {device_name(device)}, torch {torch.__version__}")
    print(f"{'decoding':<24}{'seconds':>9}{'questions/s':>13}{'after 1st batch, q/s':>22}")
    for compile in [False, True] if ns.compile else [False]:
        first = records[: ns.batch_size]
        synchronize(device)
        t = time.perf_counter()
        answer_by_generation(model, tokenizer, first, ns.batch_size, ns.max_new_tokens, compile=compile)
        synchronize(device)
        t_first = time.perf_counter()
        answer_by_generation(model, tokenizer, records[ns.batch_size:], ns.batch_size, ns.max_new_tokens,
                             compile=compile)
        synchronize(device)
        done = time.perf_counter()
        rest = len(records) - len(first)
        after = f"{rest / (done - t_first):.1f}" if rest else ""
        label = "compiled, CUDA graph" if compile else "CUDA graph" if device.type == "cuda" else "eager"
        print(f"{label:<24}{done - t:>9.1f}{len(records) / (done - t):>13.1f}{after:>22}", flush=True)


if __name__ == "__main__":
    main()
