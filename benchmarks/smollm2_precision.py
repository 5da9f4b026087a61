"""SmolLM2-135M-Instruct in lower precision against bf16: the two numerics goals of the performance issue.

1. `--precision fp8` training: the paper's adapter trained on Alpaca with config/smollm2.yaml's recipe, once on
   the bf16 base and once with the frozen projections in float8; the held-out loss after the same training
   (goal: within 1% of bf16's).
2. `--quantize` decoding: an adapter trained on ScienceQA's training part (the same recipe, the `scienceqa`
   experiment's epochs) answers the test part greedily, on the bf16 base and on the int8 ones (a scale per row,
   and per 32 inputs); the share of questions whose parsed letter is the same, of all the questions (two
   answers that parse to no letter do not count as the same; goal: >= 98%). On a GPU the base in
   float32 answers too: how often bf16's own rounding changes an answer is the floor this share is read against,
   and each int8 format's share is also given on the questions bf16's rounding does not change (those not
   resting on a near tie that bf16's rounding alone flips). --answers (with --goals int8) keeps every question's
   letter in each format, for paired tests.

The data are prepared where the library's data stages run (tokenize draws a plot, which needs matplotlib), with
the GGUF `llama-adapter fetch-smollm2` prints as the tokenizer:

    llama-adapter fetch --dataset alpaca --source ../shared/data/alpaca/alpaca_sample_5000.json --out a/fetched
    llama-adapter validate --dataset alpaca --fetched a/fetched --out a/validated
    llama-adapter tokenize --dataset alpaca --validated a/validated --tokenizer $G --out a/tok
    llama-adapter fetch --dataset scienceqa --source ../shared/data/scienceqa/test_4241_llava_cqm.json \\
        --assign-splits train=0.45 val=0.05 test=0.5 --out s/fetched
    llama-adapter validate --dataset scienceqa --fetched s/fetched --out s/validated
    llama-adapter tokenize --dataset scienceqa --validated s/validated --tokenizer $G --out s/tok

Usage:
    python benchmarks/smollm2_precision.py --gguf $G --alpaca a/tok --scienceqa s/tok --questions s/validated
    python benchmarks/smollm2_precision.py --gguf $G --goals int8 --scienceqa s/tok --questions s/validated
    python benchmarks/smollm2_precision.py ... --device cpu --max-steps 2 --limit 8   (a smoke check: fp32, and
        float8 emulated by torchao: quantize.float8_matmuls)
Prints the held-out losses and the answer agreement, each beside its goal.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml

from llama_adapter.cli import load_for_inference
from llama_adapter.config import QUANTIZATIONS, TrainConfig
from llama_adapter.devices import device_name, pick_device, pick_dtype
from llama_adapter.evaluate import score_scienceqa
from llama_adapter.io import read_jsonl, write_json
from llama_adapter.report import wilson_interval
from llama_adapter.tokenizer import load_tokenizer
from llama_adapter.train import train

CONFIG = Path(__file__).resolve().parents[1] / "config" / "smollm2.yaml"


def train_adapter(ns: argparse.Namespace, recipe: dict, data: Path, out: Path, precision: str) -> dict:
    """config/smollm2.yaml's training `recipe` on `data` (its train and val splits); train()'s metrics."""
    cfg = TrainConfig(**recipe, base=str(ns.gguf),
                      train_data=str(data / "train"), val_data=str(data / "val"), out_dir=str(out),
                      device=ns.device, compile=ns.compile, precision=precision, max_steps=ns.max_steps,
                      run_name=f"smollm2-precision-{out.name}")
    return train(cfg)


def answers(ns: argparse.Namespace, tokenizer, adapter: Path, records: list[dict], quantize: str | None,
            dtype: str | None = None) -> list[int | None]:
    """The letter (index) each test question's greedy answer gives, None where none is parsed; the base in `dtype`
    (None: the device's)."""
    model = load_for_inference(ns.gguf, adapter, ns.device, dtype, quantize, ns.compile)
    _, predictions = score_scienceqa(model, tokenizer, records, mode="generate",
                                     batch_size=ns.batch_size, compile=ns.compile)
    return [p["prediction"] for p in predictions]


def fp8_goal(ns: argparse.Namespace, recipe: dict, tmp: Path) -> None:
    """Goal 1: the Alpaca held-out loss after training on the fp8 base against the device dtype's."""
    runs = {precision: train_adapter(ns, recipe, ns.alpaca, tmp / f"alpaca-{precision}", precision)
            for precision in ("auto", "fp8")}
    base, fp8 = (runs[precision]["val_loss"][-1] for precision in ("auto", "fp8"))
    print(f"Alpaca held-out loss after {runs['auto']['steps']} steps: base in the device's dtype {base:.4f} "
          f"(before training {runs['auto']['initial_val_loss']:.4f}), fp8 {fp8:.4f} "
          f"(before {runs['fp8']['initial_val_loss']:.4f}): {100 * (fp8 - base) / base:+.2f}% (goal: within 1%)")


def int8_goal(ns: argparse.Namespace, config: dict, tmp: Path) -> None:
    """Goal 2: a ScienceQA-trained adapter's test answers on each int8 base against the device dtype's."""
    out = tmp / "scienceqa"
    scienceqa = {**config["train"], **config["experiments"]["scienceqa"]["train"]}  # its epochs
    adapter = out / train_adapter(ns, scienceqa, ns.scienceqa, out, "auto")["weights"]
    records = [r for r in read_jsonl(ns.questions / "records.jsonl") if r["split"] == "test"][: ns.limit]
    tokenizer = load_tokenizer(ns.gguf)
    formats = {"base dtype": (None, None), **{q: (q, None) for q in ns.quantize}}
    if pick_dtype(torch.device(ns.device)) != torch.float32:
        formats["float32"] = (None, "float32")  # the rounding floor: the same answers without bf16's rounding
    runs = {name: answers(ns, tokenizer, adapter, records, quantize, dtype)
            for name, (quantize, dtype) in formats.items()}
    plain = runs.pop("base dtype")
    counts = {"questions": len(records)}
    for name, answered in {"base dtype": plain, **runs}.items():
        counts[f"parsed ({name})"] = sum(a is not None for a in answered)
        counts[f"correct ({name})"] = sum(a == r["answer"] for a, r in zip(answered, records))
    print(json.dumps(counts))
    for name, answered in runs.items():
        goal = "the floor: bf16's own rounding" if name == "float32" else "goal: >= 98%"
        print_agreement(name, answered, "the base dtype", plain, goal)
    if reference := runs.get("float32"):  # how far each format's answers move from the least rounded ones
        for name, answered in {"base dtype": plain, **runs}.items():
            if name != "float32":
                print_agreement(name, answered, "float32", reference, "against the least rounding")
        # On an adapter near chance many answers are near ties that any rounding flips (bf16's own included): the
        # questions whose answer bf16's rounding leaves as float32 gives it are the ones not resting on a tie that
        # bf16's rounding alone flips.
        stable = [i for i, (a, b) in enumerate(zip(plain, reference)) if a == b and a is not None]
        for name, answered in runs.items():
            if name != "float32":
                print_agreement(name, [answered[i] for i in stable], "the base dtype", [plain[i] for i in stable],
                                "on the questions bf16's rounding does not change")
    if ns.answers:  # every question's letter in each format, for paired comparisons later
        write_json(ns.answers, {"pids": [r["pid"] for r in records], "answer": [r["answer"] for r in records],
                                "base dtype": plain, **runs})
        print(f"answers written to {ns.answers}")


def print_agreement(name: str, answered: list, reference_name: str, reference: list, note: str) -> None:
    if not reference:  # e.g. no question that bf16 and float32 answer alike
        print(f"ScienceQA test answers, {name} against {reference_name}: no questions ({note})")
        return
    same = sum(a == b and a is not None for a, b in zip(answered, reference))  # two unparsed answers: not a match
    low, high = wilson_interval(same, len(reference))
    print(f"ScienceQA test answers, {name} against {reference_name}: {same} of {len(reference)} the same "
          f"({100 * same / len(reference):.2f}%, 95% [{low:.1f}, {high:.1f}]; {note})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct's GGUF (fetch-smollm2)")
    p.add_argument("--goals", nargs="+", choices=("fp8", "int8"), default=["fp8", "int8"],
                   help="which measurements to make (default: both)")
    p.add_argument("--alpaca", type=Path, help="Alpaca tokenized with the GGUF (train, val); for fp8")
    p.add_argument("--scienceqa", type=Path, help="ScienceQA tokenized with the GGUF (train, val); for int8")
    p.add_argument("--questions", type=Path, help="ScienceQA's validated folder (its test split); for int8")
    p.add_argument("--device", default=None, help="default: the GPU when there is one")
    p.add_argument("--compile", action="store_true", help="compile training's blocks and the decode step")
    p.add_argument("--max-steps", type=int, default=None, help="stop each training early (a smoke check)")
    p.add_argument("--batch-size", type=int, default=64, help="questions per decoded batch")
    p.add_argument("--limit", type=int, default=None, help="only the first N test questions")
    p.add_argument("--answers", type=Path,
                   help="write each question's parsed letter in every format (JSON; --goals int8)")
    p.add_argument("--quantize", nargs="+", choices=QUANTIZATIONS, default=list(QUANTIZATIONS),
                   help="the int8 formats whose answers to compare with the base dtype's (default: all)")
    ns = p.parse_args()
    needed = {"fp8": ("alpaca",), "int8": ("scienceqa", "questions")}
    missing = [f"--{name}" for goal in ns.goals for name in needed[goal] if getattr(ns, name) is None]
    if missing:
        p.error(f"{', '.join(missing)} needed for --goals {' '.join(ns.goals)}")
    ns.device = str(pick_device(ns.device))
    print(f"SmolLM2-135M-Instruct, {device_name(torch.device(ns.device))}, torch {torch.__version__}")
    config = yaml.safe_load(CONFIG.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        if "fp8" in ns.goals:
            fp8_goal(ns, config["train"], Path(tmp))
        if "int8" in ns.goals:
            int8_goal(ns, config, Path(tmp))


if __name__ == "__main__":
    main()
