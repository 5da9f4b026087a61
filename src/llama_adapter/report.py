"""The paper's tables and figures, regenerated from the runs of a pipeline.

The report is told every file it reads, by role (ReportInputs; the workflow's report rule passes them), and
derives no path itself. Per experiment (a name such as `scienceqa` or
`ablations/adapter_layers~4/gate_init~zero/epochs~5`):
  scores        its scores.json                                    (llama_adapter.evaluate)
  training      the folder its training wrote: config.json, metrics.json and the method's weights
                (llama_adapter.train; none for zero-shot, which trains nothing)
  train_bench   that training's Snakemake benchmark file (wall time; optional)
  generations   its generations JSONL, for an instruction experiment (llama_adapter.generate)
and once: each dataset's tokenize folder (stats.json for data provenance, the Alpaca lengths figure) and the
folder of Snakemake benchmark files (the jobs table; optional).
Every table puts the paper's published number in a column beside ours, and every row of ours names the
MLflow runs, config hash, the hash of the records it trained on (its training's train_data, not the --tokens
folder's) and git commit it came from. Every accuracy has a 95% Wilson interval
(ci95_low, ci95_high) from its number of questions; two rows of the same questions are compared by the paired
test (p_paired), which their intervals are not. Each ablation's section opens with a verdict in words computed from
its paired tests and, along an axis of ordered numbers, the paired linear trend of its score. Tables are written
as CSV, Markdown and LaTeX; the whole report folder is written at once or not at all.
"""

from __future__ import annotations

import collections
import decimal
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import (
    ADAPTER_SETTINGS,
    EVALUATION_OUTPUTS,
    METHODS,
    REPORT_PAGE,
    TRAINING_CONFIG,
    TRAINING_METRICS,
    WEIGHTS,
    AdapterArgs,
    ModelArgs,
    TrainConfig,
    is_number,
)
from .data import TOKEN_STATS
from .data.scienceqa import CATEGORIES
from .errors import InputError
from .io import atomic_dir, read_json_object

# Zhang et al. 2023 (arXiv 2303.16199). ScienceQA test accuracy per category; the text-only variant is
# published as an average only.
PAPER_SCIENCEQA = {
    "LLaMA-Adapter": {"accuracy": 85.19, "NAT": 84.37, "SOC": 88.30, "LAN": 84.36, "TXT": 83.72, "IMG": 80.32,
                      "NO": 86.90, "G1-6": 85.83, "G7-12": 84.05},
    "LLaMA-Adapter_T": {"accuracy": 78.31},
}
PAPER_LAYERS = [(10, 0.97, 55.95), (20, 1.37, 73.36), (30, 1.79, 83.85)]  # of 32; params (millions); val acc
# val acc; zero-init is the row the paper's three ablation tables share (30 layers, 30 epochs): 83.85 - 40.77 is
# the +43.08 gain it reports.
PAPER_GATE_INIT = {"zero": 83.85, "random": 40.77}
PAPER_EPOCHS = [(15, 0.022, 0.136, 82.08), (30, 0.004, 0.241, 83.85), (60, 0.001, 0.282, 83.94)]
# Efficiency on Alpaca: (tuned parameters in millions, storage in MB, training time in hours, hardware), the
# paper's 7B, 13G, 4.2M, 16.8M, 1.2M and 4.7M in the units of our columns.
PAPER_EFFICIENCY = {
    "Alpaca (full fine-tuning)": (7000, 13000, 3, "8 A100"),
    "Alpaca-LoRA": (4.2, 16.8, None, None),
    "LLaMA-Adapter": (1.2, 4.7, 1, "8 A100"),
}
PAPER_METHOD = {"full": "Alpaca (full fine-tuning)", "lora": "Alpaca-LoRA", "adapter": "LLaMA-Adapter"}
METHOD_NAMES = {"adapter": "LLaMA-Adapter", "lora": "LoRA", "full": "full fine-tuning", "zero-shot": "zero-shot base"}
PROVENANCE = ["mlflow_run", "eval_run", "config_hash", "data_sha256", "git_commit"]
PAIRED = ["paired_with", "only_this_right", "only_paired_right", "lower_loss_here", "lower_loss_paired",
          "p_paired"]  # paired_columns: ScienceQA's questions, or Alpaca's samples
# A multimodal adapter's columns (answer_columns), shown as a table of their own in report.md.
IMAGE_COLUMNS = ("images_missing", "trained_with_image", "trained_samples")


@dataclass
class Run:
    """One experiment's outputs."""

    name: str
    dataset: str
    config: dict
    metrics: dict
    scores: dict
    adapter_bytes: int | None  # the trained weights' file (None: zero-shot)
    seconds: float | None
    data: dict  # the provenance of the dataset it scored (its --tokens folder's stats.json)
    point: dict[str, str] = field(default_factory=dict)  # an ablation grid point's settings, read from its name
    # The provenance of the records it trained on (the stats.json beside its config.json's train_data split); {}
    # where none is recorded there, and for zero-shot, which trains on nothing.
    trained_on: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.get("method", TrainConfig.method)

    def axis_value(self, axis: str) -> Any:
        """The value of an ablation axis at this grid point, as a number where it is one."""
        value = self.point[axis]
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value

    def sets(self, axis: str, value: Any) -> bool:
        """Whether this grid point sets `axis` to the config's `value`. Its name writes the value as the workflow's
        Paramspace does, from a pandas column: 1 as 1.0 where the column holds floats, a null as NA."""
        if axis not in self.point:
            return False
        named = self.axis_value(axis)
        if value is None:
            return named in ("NA", "None") or (isinstance(named, float) and math.isnan(named))
        if isinstance(value, int | float) and not isinstance(value, bool):
            return isinstance(named, int | float) and not isinstance(named, bool) and named == value
        return self.point[axis] == str(value)

    @property
    def provenance(self) -> dict[str, str | None]:
        # A training's tags; a row without a training (zero-shot: nothing trained) takes its evaluation's. A trained
        # row whose metrics lack them (an older run's) shows none rather than the evaluation's as the training's.
        tags = (self.metrics.get("tags") if self.metrics else self.scores.get("tags")) or {}
        return {"mlflow_run": self.metrics.get("mlflow_run_id"), "eval_run": self.scores.get("mlflow_run_id"),
                "config_hash": tags.get("config_hash"),
                "data_sha256": (self.trained_on.get("records_sha256") or "")[:12] or None,
                "git_commit": (tags.get("git_commit") or "")[:12] or None}

    def last_epoch_loss(self) -> float:
        """Mean training loss over the last epoch's steps (one step's loss is too noisy to compare)."""
        history = self.metrics["history"]
        last = [h["loss"] for h in history if h["epoch"] > history[-1]["epoch"] - 1]
        return float(np.mean(last))

    def gates(self) -> dict[int, float]:
        if not self.metrics:
            return {}
        last = self.metrics["history"][-1]
        return {int(k.removeprefix(GATE_KEY)): v for k, v in last.items() if k.startswith(GATE_KEY)}


# The stage that writes each file a run is read from (the fields the tables read from it: FILE_FIELDS, and
# SCORE_FIELDS for scores.json).
WRITTEN_BY = {TRAINING_CONFIG: "train", TRAINING_METRICS: "train", EVALUATION_OUTPUTS[0]: "evaluate",
              TOKEN_STATS: "tokenize", WEIGHTS["adapter"]: "train"}
GATE_KEY = "gate/layer_"  # a training step's gate magnitude of one layer: gate/layer_NN (train's gate_magnitudes)


def _real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


def _finite(v: Any) -> bool:
    return _real(v) and math.isfinite(v)


def _training_step(step: Any) -> bool:
    """Whether a step of a training's history is one the tables and figures can read: its epoch and loss finite
    numbers (train stops at a loss that is not: a NaN here would show as a train_loss of n/a, as if not measured),
    and each gate magnitude a finite number under a layer's number."""
    return (isinstance(step, dict) and _finite(step.get("epoch")) and _finite(step.get("loss"))
            and all(k.removeprefix(GATE_KEY).isdecimal() and _finite(v) for k, v in step.items()
                    if k.startswith(GATE_KEY)))


# A validation loss that is not finite would read n/a, as a zero-shot row's missing loss does.
DIVERGED = "a NaN or infinity there: the training's validation diverged or scored no targets; train it again"


# The kinds of value a field of scores.json, or of a training's config.json and metrics.json, holds: (test, what
# was expected). A NaN is no number of any kind.
KINDS = {
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a count (an integer >= 0)"),
    "percent": (lambda v: _real(v) and 0 <= v <= 100, "a percentage (a number in 0..100)"),
    "number": (_finite, "a finite number"),
    "perplexity": (lambda v: _real(v) and v > 0, "a positive number (inf where exp(loss) overflows)"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "ids": (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v) and len(set(v)) == len(v),
            "a list of distinct question ids (strings)"),
    "task": (lambda v: isinstance(v, str) and v in SCORE_FIELDS, "scienceqa or alpaca"),
    "method": (lambda v: isinstance(v, str) and v in METHODS, f"one of {', '.join(METHODS)}"),
    "steps": (lambda v: isinstance(v, list) and all(map(_training_step, v)),
              f"a list of each step's metrics (objects with a finite epoch and loss, each {GATE_KEY}N a finite "
              "number)"),
    "val_loss": (_finite, f"a finite validation loss ({DIVERGED})"),
    "val_losses": (lambda v: isinstance(v, list) and all(map(_finite, v)),
                   f"a list of finite validation losses ({DIVERGED})"),
    "split_counts": (lambda v: isinstance(v, dict) and all(KINDS["count"][0](n) for n in v.values()),
                     "an object of each split's record count"),
    "losses": (lambda v: isinstance(v, list) and all(x is None or (_finite(x) and x >= 0) for x in v),
               "a list of per-sample losses (numbers >= 0, null for a sample without targets)"),
}
# The tags of an MLflow run that the provenance columns read, in scores.json and in a training's metrics.json.
TAG_FIELDS = [("tags", "object?", False), ("tags.config_hash", "text?", False), ("tags.git_commit", "text?", False)]
# The fields of scores.json that the report reads, as evaluate writes them: (dotted key, kind, whether it must be
# present). A kind ending in "?" may be null (an accuracy over no questions, a split of every question); a field
# inside an object is checked when the object is there and not null.
COMMON_SCORE_FIELDS = [("task", "task", True), ("method", "text?", False), ("split", "text?", False),
                       ("training", "text?", False), ("mlflow_run_id", "text?", False), *TAG_FIELDS]
SCORE_FIELDS = {
    "scienceqa": [
        ("n", "count", True), ("correct", "count?", False), ("accuracy", "percent?", True),
        ("chance", "percent?", False), ("unparsed", "count?", False),
        ("any_format", "object?", False), ("any_format.accuracy", "percent?", True),
        ("any_format.correct", "count", False),
        ("categories", "object", True),
        *((f"categories.{c}{key}", kind, required) for c in CATEGORIES
          for key, kind, required in (("", "object", True), (".accuracy", "percent?", True), (".n", "count", True),
                                      (".correct", "count", False))),
        ("floor", "object?", False), ("floor.letter", "text", True), ("floor.correct", "count", True),
        ("floor.n", "count", True), ("floor.accuracy", "percent?", True),
        ("questions_sha256", "text", False), ("correct_pids", "ids", False), ("images_missing", "ids", False),
    ],
    "alpaca": [("heldout_loss", "number", True), ("perplexity", "perplexity", True),
               ("heldout_samples", "count", True), ("samples_sha256", "text", False),
               ("sample_losses", "losses", False)],
}
ZERO_SHOT_FIELDS = [("base", "text", True)]  # the base a zero-shot evaluation scored: it has no training folder
# The fields of a training's files and of a tokenize folder's stats.json that the report reads, as train and
# tokenize write them (as SCORE_FIELDS): the provenance is fetch's record of the data, with the splits it assigned
# where the source had none (protocol_notes).
FILE_FIELDS = {
    TOKEN_STATS: [
        ("dataset", "text", True), ("provenance", "object", False), ("provenance.records_sha256", "text?", False),
        ("provenance.source", "text?", False), ("provenance.assigned_splits", "object?", False),
        ("provenance.assigned_splits.records", "split_counts", True),
        ("provenance.assigned_splits.rule", "text", True), ("provenance.assigned_splits.seed", "count", True),
    ],
    TRAINING_CONFIG: [("base", "text", True), ("train_data", "text", True), ("method", "method", False)],
    TRAINING_METRICS: [
        ("history", "steps", True), ("trainable_parameters", "count", True), ("world_size", "count", True),
        ("weights", "text", True), ("val_loss", "val_losses?", False), ("initial_val_loss", "val_loss?", False),
        ("nodes", "count", False), ("processes_per_node", "count", False), ("device", "text", False),
        ("mlflow_run_id", "text?", False), *TAG_FIELDS,
        ("image_samples", "object?", False), ("image_samples.train", "object?", False),
        ("image_samples.train.with_image", "count", False), ("image_samples.train.samples", "count", False),
    ],
}


@dataclass
class ReportInputs:
    """Every file the report reads, by role (the module's docstring draws them); the report derives no path."""

    experiments: list[str]  # named experiments: the per-method tables
    ablations: list[str] = field(default_factory=list)  # grid points, named ablations/KEY~VALUE/...
    scores: dict[str, Path] = field(default_factory=dict)  # every experiment and point: its scores.json
    # Every trained experiment and point: its training's folder; a point with a named experiment's settings
    # names that experiment's folder (one training serves both).
    trainings: dict[str, Path] = field(default_factory=dict)
    # A training's wall time: a file named here must be there; an optional one (the workflow names each before
    # the training writes it) may be missing, its wall time then n/a.
    train_benchmarks: dict[str, Path] = field(default_factory=dict)
    optional_train_benchmarks: dict[str, Path] = field(default_factory=dict)
    generations: dict[str, Path] = field(default_factory=dict)  # every instruction experiment
    tokens: dict[str, Path] = field(default_factory=dict)  # dataset (alpaca, scienceqa): its tokenize folder
    benchmarks: Path | None = None  # the folder of Snakemake benchmark files (the jobs table); None: no table

    def check(self) -> None:
        """Every role names only rows of the report, and every row has its scores: a typo in a name is an
        error here, not a silently missing row."""
        rows = [*self.experiments, *self.ablations]
        repeated = sorted({r for r in rows if rows.count(r) > 1})
        if repeated:
            raise InputError(f"--experiment/--ablation: {repeated} given twice; expected each row once")
        for flag, named in (("--scores", self.scores), ("--training", self.trainings),
                            ("--train-benchmark", self.train_benchmarks),
                            ("--optional-train-benchmark", self.optional_train_benchmarks),
                            ("--generations", self.generations)):
            stray = sorted(set(named) - set(rows))
            if stray:
                raise InputError(f"{flag}: {stray} name(s) no --experiment or --ablation; expected NAME=PATH for "
                                 "a row of the report")
        both = sorted(set(self.train_benchmarks) & set(self.optional_train_benchmarks))
        if both:
            raise InputError(f"--train-benchmark, --optional-train-benchmark: both name {both}; expected one benchmark "
                             "file per training")
        unscored = [r for r in rows if r not in self.scores]
        if unscored:
            raise InputError(f"--scores: none for {unscored}; expected NAME=PATH of each row's scores.json "
                             "(written by evaluate)")
        if "alpaca" not in self.tokens:
            raise InputError("--tokens: no alpaca=DIR; expected the Alpaca tokenize folder (the lengths figure)")

    def check_benchmark_files(self) -> None:
        """Every --train-benchmark file is there (the file system's to say, after the options' check: a failure,
        as a missing --scores file is)."""
        for name, path in self.train_benchmarks.items():
            if not Path(path).is_file():
                what = "is a folder" if Path(path).is_dir() else "missing"
                raise InputError(f"--train-benchmark {name}={path}: {what}; expected the Snakemake benchmark file of "
                                 f"{name}'s training (or --optional-train-benchmark, where its wall time may be n/a)")


def _read_json(path: Path, fields=()) -> dict:
    """The JSON object at `path`, each of its `fields` (FILE_FIELDS' kind) checked (_checked_fields)."""
    stage = WRITTEN_BY.get(path.name, "the stage that writes it")
    if not path.is_file():
        raise InputError(f"{path}: {'is a folder' if path.is_dir() else 'missing'}; run {stage} first "
                         "(or leave this experiment out of the report)")
    return _checked_fields(path, read_json_object(path, f"the file {stage} writes", InputError), fields)


# How far a scores.json accuracy (%) may lie from the share its counts give: evaluate stores it rounded to two
# decimals (half of 0.01 off at most), so anything further is a count that does not match it.
ACCURACY_ROUND_OFF = 0.01


def _share_off(correct: int, n: int, accuracy: float | None) -> float | None:
    """correct of n in percent, where a stored `accuracy` lies further from it than its round-off; else None."""
    share = 100 * correct / n if n else None
    return share if share is not None and accuracy is not None and abs(accuracy - share) > ACCURACY_ROUND_OFF else None


def _checked_scores(path: Path, scores: dict) -> dict:
    """`scores`, read from `path`, if it holds every field the report reads, each of its kind (SCORE_FIELDS): a
    wrong type or a NaN is one error naming the file and the key, not a traceback (or an error naming no file)
    while the tables are built."""
    expected = f"the file {WRITTEN_BY[EVALUATION_OUTPUTS[0]]} writes"
    _checked_fields(path, scores, _score_fields(scores))
    tallies = (("", scores), ("floor.", scores.get("floor")),
               ("any_format.", scores.get("any_format") and {**scores["any_format"], "n": scores["n"]}),
               *((f"categories.{c}.", scores["categories"][c]) for c in CATEGORIES)
               ) if scores["task"] == "scienceqa" else ()
    right = scores.get("correct_pids")
    if right is not None and scores.get("correct") is not None and len(right) != scores["correct"]:
        raise InputError(f"{path}: key correct_pids names {len(right)} questions, but correct is {scores['correct']}; "
                         f"expected {expected}")  # the paired test would count other questions than the accuracy
    if right is not None and scores.get("correct") is None and scores["task"] == "scienceqa":
        # No count to hold them to (a hand-edited file, correct left out): the accuracy over n is that count, and
        # the paired test, which reads correct_pids, would otherwise count other questions than the accuracy.
        n, accuracy = scores["n"], scores["accuracy"]
        if len(right) > n:
            raise InputError(f"{path}: key correct_pids names {len(right)} questions, more than n ({n}); expected "
                             f"{expected}")
        if (share := _share_off(len(right), n, accuracy)) is not None:
            raise InputError(f"{path}: key correct_pids names {len(right)} of n {n} questions, {share:.2f}%, but "
                             f"accuracy is {accuracy}; expected {expected}")
    losses = scores.get("sample_losses")
    if scores["task"] == "alpaca" and losses is not None and len(losses) != scores["heldout_samples"]:
        raise InputError(f"{path}: key sample_losses holds {len(losses)} losses, but heldout_samples is "
                         f"{scores['heldout_samples']}; expected {expected}")  # else pairs of other samples
    for prefix, counts in tallies:
        if not counts or counts.get("correct") is None:
            continue
        if counts["correct"] > counts["n"]:  # else an interval of a proportion above 1
            raise InputError(f"{path}: key {prefix}correct is {counts['correct']}, more than n ({counts['n']}); "
                             f"expected {expected}")
        if (share := _share_off(counts["correct"], counts["n"], counts.get("accuracy"))) is not None:
            raise InputError(f"{path}: key {prefix}accuracy is {counts['accuracy']}, but {counts['correct']} correct "
                             f"of {counts['n']} is {share:.2f}; expected {expected}")  # its interval would not hold it
    return scores


def _checked_fields(path: Path, data: dict, fields) -> dict:
    """`data`, read from `path`, if it holds each of `fields` ((dotted key, kind, whether it must be present), as
    SCORE_FIELDS) of its kind (KINDS), a field inside an object once that object is checked: else one error naming
    the file and the key."""
    expected = f"the file {WRITTEN_BY.get(path.name, 'the stage that writes it')} writes"
    for key, kind, required in fields:
        *parents, name = key.split(".")
        holder: Any = data
        for parent in parents:
            holder = holder.get(parent) if holder is not None else None
        if holder is None or (name not in holder and not required):  # in an object that is null, or absent
            continue
        if name not in holder:
            raise InputError(f"{path}: missing key {key}; expected {expected}")
        test, what = KINDS[kind.rstrip("?")]
        if not (holder[name] is None and kind.endswith("?")) and not test(holder[name]):
            raise InputError(f"{path}: key {key} holds {holder[name]!r:.60}; expected {what} ({expected})")
    return data


def _score_fields(scores: dict):
    """The fields `_checked_scores` checks, in order: a task's own once its task is known to be one."""
    yield from COMMON_SCORE_FIELDS
    yield from SCORE_FIELDS[scores["task"]]
    if scores.get("method") == "zero-shot":
        yield from ZERO_SHOT_FIELDS


def point_settings(name: str) -> dict[str, str]:
    """The settings an ablation grid point's name holds, one folder level each: ablations/KEY~VALUE/KEY~VALUE."""
    parts = name.split("/")[1:]
    if not parts or any("~" not in p for p in parts):
        raise InputError(f"--ablation {name}: not a grid point's name; expected ablations/KEY~VALUE[/KEY~VALUE...] "
                         "(as the workflow names them)")
    return dict(p.split("~", 1) for p in parts)


def load_run(name: str, inputs: ReportInputs) -> Run:
    """`name`'s evaluation, the dataset it scored, and its training (none for zero-shot: the base alone)."""
    scores_path = inputs.scores[name]
    scores = _checked_scores(scores_path, _read_json(scores_path))
    task = scores["task"]
    if task not in inputs.tokens:
        raise InputError(f"--tokens: no {task}=DIR, the dataset {scores_path} scores; expected the folder tokenize "
                         f"wrote for {task}")
    stats = _read_json(Path(inputs.tokens[task]) / TOKEN_STATS, FILE_FIELDS[TOKEN_STATS])
    if stats["dataset"] != task:
        raise InputError(f"--tokens {task}={inputs.tokens[task]}: holds the {stats['dataset']} dataset; expected "
                         f"the tokenize folder of {task}")
    training = inputs.trainings.get(name)
    if scores.get("method") == "zero-shot":
        if training is not None:
            raise InputError(f"--training {name}={training}: {scores_path} scores the base alone (zero-shot), "
                             "which trains nothing; expected no --training for it")
        zero_shot = Run(name=name, dataset=task, config={"base": scores["base"], "method": "zero-shot"},
                        metrics={}, scores=scores, adapter_bytes=None, seconds=None, data=stats.get("provenance", {}))
        return with_point(zero_shot, inputs, f"{scores_path} (the base alone, zero-shot)")
    if training is None:
        raise InputError(f"--training: none for {name}, whose {scores_path} scores a trained model; expected "
                         f"{name}=DIR, the folder its training wrote")
    adapter_dir = Path(training)
    config, metrics = (_read_json(adapter_dir / name, FILE_FIELDS[name])
                       for name in (TRAINING_CONFIG, TRAINING_METRICS))
    if not metrics["history"]:
        raise InputError(f"{adapter_dir / TRAINING_METRICS}: 'history' holds no training steps; expected the file "
                         "train writes")
    check_same_training(name, scores_path, scores, adapter_dir, config)
    adapter = adapter_dir / str(metrics["weights"])
    if not adapter.is_file():
        raise InputError(f"{adapter}: missing; run train first (or leave this experiment out of the report)")
    bench = inputs.train_benchmarks.get(name)  # there (ReportInputs.check); an optional one where it is
    if bench is None and (optional := inputs.optional_train_benchmarks.get(name)) is not None:
        bench = optional if Path(optional).exists() else None
    # What it trained on: the tokenize folder of its train_data split (tokenize writes <folder>/<split>), which
    # need not be the --tokens folder of the dataset it is scored on.
    trained_stats = Path(config["train_data"]).parent / TOKEN_STATS
    trained_on = (_read_json(trained_stats, FILE_FIELDS[TOKEN_STATS]).get("provenance") or {}
                  if trained_stats.is_file() else {})
    run = Run(name=name, dataset=task, config=config, metrics=metrics, scores=scores,
              adapter_bytes=adapter.stat().st_size,
              seconds=benchmark_seconds(Path(bench)) if bench is not None else None,
              data=stats.get("provenance", {}), trained_on=trained_on)
    return with_point(run, inputs, f"{adapter_dir / TRAINING_CONFIG} (--training {name}={training})")


def with_point(run: Run, inputs: ReportInputs, trained: str) -> Run:
    """`run` with its grid point's settings (an ablation's; a named experiment has none), each checked against
    what trained it: the tables show a point's values from its name, so a name of other settings than its
    training's config.json (adapter_layers~7 over a training of 2 layers, gate_init~random over a zero-init one)
    would be reported as what it is not. Compared as Run.sets reads the name (1.0 is 1); not compared: a null in
    the name (NA: the grid sets nothing there, the method's own setting in ablations.methods or the library's
    default trains, common.smk experiment), a setting the config does not hold (a zero-shot row holds its method
    only), or one its method does not read (the adapter's own on LoRA or full fine-tuning, lora_* elsewhere: the
    workflow reuses such a training, common.smk trained_as). `trained` names the file the config was read from, for
    the error."""
    if run.name not in inputs.ablations:
        return run
    run = replace(run, point=point_settings(run.name))
    config = {**run.config, "method": run.method}
    for key in run.point:
        if key not in config or (key in ADAPTER_SETTINGS and run.method != "adapter") or (
                key.startswith("lora_") and run.method != "lora") or run.sets(key, None):
            continue
        if not run.sets(key, config[key]):
            raise InputError(f"--ablation {run.name}: its name sets {key} to {run.point[key]}, but {trained} holds "
                             f"{key} = {config[key]!r}; expected the scores and training of that grid point")
    return run


def check_same_training(name: str, scores_path: Path, scores: dict, training: Path, config: dict) -> None:
    """That a row's scores.json scored the training its --training names: the method evaluate scored (scores.json's
    `method`) is the one the training's config.json trained, and the training folder evaluate recorded
    (`training`, where it still exists: results moved elsewhere are not compared) is this one. Else the row would
    show one model's numbers under another's label."""
    trained = config.get("method", TrainConfig.method)
    scored = scores.get("method")
    if scored is not None and scored != trained:
        raise InputError(f"--scores {name}={scores_path}: scores method {scored!r}, but --training {name}={training} "
                         f"trained {trained!r} ({training / TRAINING_CONFIG}); expected the evaluation of that "
                         "training")
    recorded = scores.get("training")
    if recorded is not None and Path(recorded).is_dir() and Path(recorded).resolve() != training.resolve():
        raise InputError(f"--training {name}={training}: {scores_path} scored the training in {recorded}; expected "
                         "the folder of the training those scores are of")


def read_benchmark(path: Path) -> pd.Series:
    """The first row of a Snakemake benchmark file (columns s, max_rss, ...); its max_rss NaN where Snakemake wrote
    NA (a job that ended before its memory was first sampled), its s always a number."""
    try:
        row = pd.read_csv(path, sep="\t").iloc[0]
        float(row["max_rss"])
        if math.isnan(float(row["s"])):
            raise ValueError(f"s is {row['s']}")
    except Exception as e:  # pandas raises EmptyDataError, ParserError, KeyError, IndexError...
        raise InputError(f"{path}: not a Snakemake benchmark file ({type(e).__name__}: {e}); expected a "
                         "tab-separated table with columns s and max_rss") from None
    return row


def benchmark_seconds(path: Path) -> float:
    return float(read_benchmark(path)["s"])


def adapter_parameters(args: ModelArgs, adapter: AdapterArgs) -> int:
    """Trainable parameters of the adapter on a model of `args` shapes: prompts (L, len, dim), gates (L, heads)."""
    return adapter.adapter_layers * (adapter.adapter_len * args.dim + args.n_heads)


# The normal's 97.5% quantile, scipy.stats.norm.ppf(0.975) to the last bit: the two-sided 95% z. Rounded to 1.96 it
# moves a Wilson bound by up to 0.01 point at two decimals (0 of 9: 29.92 for 29.91), unlike scipy's and
# statsmodels' Wilson intervals. Written out, not computed: every Snakefile parse (each cluster job's too) imports
# this module, and scipy.stats alone took 0.6 s of it; paired_trend() imports scipy for its t quantile.
Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """The 95% Wilson score interval of a binomial proportion, in percent: unlike the normal approximation it
    stays inside [0, 100] and is usable at the small counts of the demo and of single categories."""
    if not n:
        return None, None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2)


def accuracy_interval(accuracy: float | None, n: int | None, correct: int | None = None):
    """(ci95_low, ci95_high) of an accuracy (%) over n questions; the count of correct ones when the scores
    hold it, else recovered from the rounded percentage."""
    if accuracy is None or not n:
        return None, None
    return wilson_interval(correct if correct is not None else round(accuracy * n / 100), n)


def millions(n: float | None) -> float | None:
    """A count in millions, the unit of every tuned_params_m column (ours and the paper's)."""
    return None if n is None else n / 1e6


def megabytes(n_bytes: float | None) -> float | None:
    """A size in MB (10^6 bytes), the unit of every storage_mb column (ours and the paper's)."""
    return None if n_bytes is None else n_bytes / 1e6


def hours(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 3600, 4)


def mcnemar_p(only_this: int, only_other: int) -> float:
    """McNemar's exact two-sided test: were two evaluations of the same questions equally accurate (each question
    that only one of them answered right as likely to be either's), the probability of a split of those questions
    at least as uneven as (only_this, only_other)."""
    n = only_this + only_other
    term = tail = 1  # C(n, 0); each next binomial coefficient from the last (one product each, not a new comb)
    for k in range(min(only_this, only_other)):
        term = term * (n - k) // (k + 1)  # C(n, k + 1), exact: the division leaves no remainder
        tail += term
    # Exact in integers; a p below the smallest float is given as that float, not as 0 (no p is 0).
    return min(1.0, max(2 * tail / 2**n, math.ulp(0.0)))


def item_key(r: Run) -> tuple | None:
    """What a run's scores are paired by: ("questions" or "samples", digest, count) where its scores.json holds its
    outcomes one by one (ScienceQA's questions answered right, Alpaca's per-sample losses); two runs are paired item
    by item where their keys are equal. None: no outcomes one by one, or no digest to pair them by. The count too:
    two files of one digest but other counts are not of the same items, whatever they claim (item_outcomes would
    take the first one's n for both)."""
    if "correct_pids" in r.scores:
        return ("questions", r.scores["questions_sha256"], r.scores["n"]) if r.scores.get("questions_sha256") else None
    if "sample_losses" in r.scores and r.scores.get("samples_sha256"):
        return "samples", r.scores["samples_sha256"], len(r.scores["sample_losses"])
    return None


def item_outcomes(runs: list[Run]) -> tuple[str, np.ndarray] | None:
    """Each run's outcome on each of the same ScienceQA questions (1 right, 0 not) or Alpaca held-out samples (its
    loss, the token mean over the sample): ("questions" or "samples", an array of a row per run and a column per
    question or sample). What every paired comparison reads (the paired tests, the ablations' trend). None unless
    every run's scores.json holds them one by one for the same questions or samples (one item_key)."""
    keys = {item_key(r) for r in runs}
    if len(keys) != 1 or None in keys:
        return None
    scores = [r.scores for r in runs]
    if next(iter(keys))[0] == "questions":
        right = [set(s["correct_pids"]) for s in scores]
        named = sorted(set().union(*right))
        # evaluate names the questions answered right only: the others of the same n (one digest, one n) are
        # wrong in every run, a column of zeros each.
        unnamed = np.zeros((len(runs), max(0, scores[0]["n"] - len(named))))
        return "questions", np.hstack([np.array([[pid in r for pid in named] for r in right], float)
                                       .reshape(len(runs), len(named)), unnamed])
    losses = [s["sample_losses"] for s in scores]
    # A sample without targets has no loss in any run: no outcome to pair.
    kept = [i for i in range(len(losses[0])) if all(x[i] is not None for x in losses)]
    return "samples", np.array([[x[i] for i in kept] for x in losses], float).reshape(len(runs), len(kept))


def trend_points(runs: list[Run]) -> list[bool]:
    """Which runs an axis's trend pairs item by item: the most runs that share one item_key (of equally many, those
    of the first listed), where at least two do; else none. A run of other questions or samples, or one whose
    scores keep no outcomes one by one (an older evaluation), is left out of the trend, not the trend left out."""
    keys = [item_key(r) for r in runs]
    # most_common orders equal counts as first met: the tie goes to the first listed point's questions.
    shared = collections.Counter(k for k in keys if k is not None).most_common(1)
    if not shared or shared[0][1] < 2:
        return [False] * len(runs)
    return [k == shared[0][0] for k in keys]


def paired_columns(r: Run, reference: Run | None) -> dict:
    """`r` against `reference` on the same ScienceQA questions or Alpaca samples, one by one (item_outcomes).
    ScienceQA: the questions each alone answered right, and McNemar's p of that split. Alpaca: the samples on which
    each has the lower loss (its own token mean), and the sign test's p (McNemar's, over the samples whose losses
    differ); the tables' loss_after, a token-weighted mean, may favour the other row. None (n/a) for the reference
    itself, for other questions or samples than the reference's, and for a scores.json that does not hold them one
    by one (written before evaluate kept them)."""
    if reference is None or r is reference:
        return {}
    outcomes = item_outcomes([r, reference])
    if outcomes is None:
        return {}
    kind, (this, other) = outcomes
    if kind == "questions":
        only_this, only_other = int(np.sum(this > other)), int(np.sum(this < other))
        return {"paired_with": reference.name, "only_this_right": only_this, "only_paired_right": only_other,
                "p_paired": mcnemar_p(only_this, only_other)}
    lower, higher = int(np.sum(this < other)), int(np.sum(this > other))  # equal losses count for neither
    return {"paired_with": reference.name, "lower_loss_here": lower, "lower_loss_paired": higher,
            "p_paired": mcnemar_p(lower, higher)}


def paired_reference(runs: list[Run]) -> Run | None:
    """The row the others are paired with: the first text-only LLaMA-Adapter row (the paper's LLaMA-Adapter_T,
    what the baselines compare with), else the first multimodal one, among the rows whose scores.json holds its
    questions or samples one by one."""
    one_by_one = ("correct_pids", "sample_losses")
    adapters = [r for r in runs if r.method == "adapter" and any(k in r.scores for k in one_by_one)]
    return next((r for r in adapters if not r.config.get("image_features")), adapters[0] if adapters else None)


def ablation_axis(runs: list[Run], axis: str, center: dict, values: list) -> list[Run]:
    """The grid points that set `axis` to each of `values` (in their order, as ablations.vary lists them) while
    every other axis holds the center. A value without such a point is an error, not a shorter table."""
    at_center = [r for r in runs if all(r.sets(k, v) for k, v in center.items() if k != axis)]
    found = [next((r for r in at_center if r.sets(axis, v)), None) for v in values]
    missing = [v for v, r in zip(values, found) if r is None]
    if missing:
        raise InputError(f"--vary {axis}: no --ablation point sets {axis} to {missing} with the other axes at the "
                         f"center {json.dumps(center)}; expected one point per listed value")
    # A value listed twice (4 and 4, or 1 and 1.0) would be one point shown twice: a third "point" that gives two
    # settings a trend line through them, or one setting a slope of 0/0.
    repeated = {r.name: same for r in found if len(same := [v for v, s in zip(values, found) if s is r]) > 1}
    if repeated:
        raise InputError(f"--vary {axis}: " + "; ".join(f"values {vs} all name the grid point {name}"
                                                        for name, vs in repeated.items())
                         + "; expected each value once")
    return found


def check_every_point_shown(grid: list[Run], axes: dict[str, list[Run]], center: dict) -> None:
    """That every --ablation point is shown: in the table of an axis (ablation_axis), or the center's own point
    (every axis at --center), which the workflow's grid always holds and a table shows where its axis lists the
    center's value. Any other point was left out of every table without a word (a typo in a name, a value left out
    of --vary, two axes off the center)."""
    shown = {id(r) for runs in axes.values() for r in runs}
    stray = [r.name for r in grid if id(r) not in shown and not all(r.sets(k, v) for k, v in center.items())]
    if stray:
        raise InputError(f"--ablation: {stray} set(s) no --vary value with every other axis at the --center "
                         f"{json.dumps(center)}, so no table would show them; expected each point to be the center "
                         "or one listed value of one axis, the others at the center (or leave it out)")


def paper_pairs(ours: list, paper: list) -> list:
    """The paper's row (its setting first) beside each of our settings, None (n/a) where there is none. An axis of
    as many numbers as the paper's table is paired by rank, whatever order the config lists ours in (our settings
    are the paper's scaled to another model, smallest beside smallest; the paper's rows are in increasing order of
    theirs); an axis of another count by equal value only: a setting the paper measured beside that row, any other
    beside none. The `*_paper` setting column says which row each of ours stands beside."""
    if len(ours) == len(paper) and all(map(_real, ours)):
        paired: list = [None] * len(ours)
        for rank, i in enumerate(sorted(range(len(ours)), key=lambda i: ours[i])):
            paired[i] = paper[rank]
        return paired
    measured = {row[0]: row for row in paper}
    return [measured.get(v) if _real(v) else None for v in ours]


def run_hardware(metrics: dict) -> str:
    """What a training ran on: processes x device, with its nodes when there were several."""
    nodes = metrics.get("nodes", 1)
    device = metrics.get("device", "unknown")
    if nodes > 1:
        return f"{nodes} nodes x {metrics.get('processes_per_node', metrics['world_size'] // nodes)} x {device}"
    return f"{metrics['world_size']} x {device}"


def efficiency_table(runs: list[Run]) -> pd.DataFrame:
    """Per method: the paper's numbers, the parameter count at LLaMA-7B's shapes, and each of our trainings
    measured (tuned parameters, size of the file written, wall time of its job, hardware)."""
    seven_b = ModelArgs.from_name("7B")
    computed = {"adapter": adapter_parameters(seven_b, AdapterArgs(10, 30)),
                "lora": 2 * seven_b.n_layers * 8 * (2 * seven_b.dim)}  # Alpaca-LoRA: rank 8 on wq and wv

    def paper(method: str) -> dict:
        params, storage, time, hardware = PAPER_EFFICIENCY[PAPER_METHOD[method]]
        return {"tuned_params_m_paper": params, "storage_mb_paper": storage, "training_h_paper": time,
                "hardware_paper": hardware}

    rows = [{"method": METHOD_NAMES["full"], "model": PAPER_METHOD["full"], "tuned_params_m": None,
             "storage_mb": None, "training_h": None, "hardware": None, **paper("full")}]
    for method, n in computed.items():
        rows.append({"method": METHOD_NAMES[method], "model": "LLaMA-7B shapes (computed; fp32 file)",
                     "tuned_params_m": millions(n), "storage_mb": megabytes(4 * n), "training_h": None,
                     "hardware": None, **paper(method)})
    for r in runs:
        if r.method == "zero-shot":
            continue
        rows.append({"method": METHOD_NAMES[r.method], "model": f"{r.name} (base {Path(r.config['base']).name})",
                     "tuned_params_m": millions(r.metrics["trainable_parameters"]),
                     "storage_mb": megabytes(r.adapter_bytes), "training_h": hours(r.seconds),
                     "hardware": run_hardware(r.metrics),
                     **paper(r.method), **r.provenance})
    columns = ["method", "model", "tuned_params_m", "tuned_params_m_paper", "storage_mb", "storage_mb_paper",
               "training_h", "training_h_paper", "hardware", "hardware_paper", *PROVENANCE]
    return pd.DataFrame(rows, columns=columns)


def paper_model(r: Run) -> str | None:
    """The paper's ScienceQA model a row stands beside: an adapter with images (LLaMA-Adapter) or without
    (LLaMA-Adapter_T); none for the other methods, which the paper does not score."""
    if r.method != "adapter":
        return None
    return "LLaMA-Adapter" if r.config.get("image_features") else "LLaMA-Adapter_T"


def scienceqa_table(runs: list[Run]) -> pd.DataFrame:
    """A row per experiment (each method, zero-shot included), each paired question by question with the
    LLaMA-Adapter row (paired_reference), then per split scored the no-model floor: always the answer position
    most often right in the training questions."""
    # One row per split and floor: rows of one split scored on other questions (another digest) can have another
    # floor, each shown (naming the rows it is of), not the last one read in place of all.
    floors: dict[tuple, tuple[dict, list[Run]]] = {}  # (split, the floor as text) -> (the floor, its runs)
    for r in runs:
        if floor := r.scores.get("floor"):
            floors.setdefault((r.scores.get("split"), json.dumps(floor, sort_keys=True)), (floor, []))[1].append(r)
    floor_rows, floor_of = [], {}  # floor_of: id(run) -> its floor row's experiment (floor_sentence reads it)
    for (split, _), (floor, of) in floors.items():
        low, high = wilson_interval(floor["correct"], floor["n"])
        shared = sum(s == split for s, _ in floors) > 1  # the split has other floors: say whose this one is
        name = f"no model: always ({floor['letter']})" + (f", the questions of {', '.join(r.name for r in of)}"
                                                          if shared else "")
        floor_of |= {id(r): name for r in of}
        floor_rows.append({"experiment": name, "method": "floor", "split": split, "questions": floor["n"],
                           "accuracy": floor["accuracy"], "ci95_low": low, "ci95_high": high})
    rows = []
    adapter = paired_reference(runs)
    for r in runs:
        row = {"experiment": r.name, "method": METHOD_NAMES[r.method], "paper_model": paper_model(r),
               "questions": r.scores["n"]}
        paper = PAPER_SCIENCEQA.get(row["paper_model"], {})
        row |= {**score_columns(r), "accuracy_paper": paper.get("accuracy"), **answer_columns(r),
                **paired_columns(r, adapter)}
        for c in CATEGORIES:
            category = r.scores["categories"][c]
            low, high = accuracy_interval(category["accuracy"], category["n"], category.get("correct"))
            row |= {c: category["accuracy"], f"{c}_n": category["n"], f"{c}_ci95_low": low, f"{c}_ci95_high": high,
                    f"{c}_paper": paper.get(c)}
        rows.append(row | {"floor_row": floor_of.get(id(r))} | r.provenance)
    rows += floor_rows
    return with_integer_counts(pd.DataFrame(rows, columns=None if rows else [  # no rows: the columns still
        "experiment", "method", "paper_model", "questions", "accuracy", "ci95_low", "ci95_high", "split",
        "accuracy_paper"]))


def perplexity(loss: float) -> float:
    """exp(loss), inf past a float's range (as evaluate writes it)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def instruction_table(runs: list[Run]) -> pd.DataFrame:
    """Held-out Alpaca loss before the first step (with zero-initialised gates: the base model's) and after
    training (the evaluate stage), with perplexities; each row paired sample by sample with the LLaMA-Adapter row
    (paired_reference)."""
    rows = []
    adapter = paired_reference(runs)
    for r in runs:
        before = r.metrics.get("initial_val_loss")
        rows.append({"experiment": r.name, "method": METHOD_NAMES[r.method],
                     "heldout_samples": r.scores["heldout_samples"],
                     "gate_init": r.config.get("gate_init") if r.method == "adapter" else None,
                     "loss_before": before, "loss_after": r.scores["heldout_loss"],
                     "perplexity_before": None if before is None else perplexity(before),
                     "perplexity_after": r.scores["perplexity"], **paired_columns(r, adapter), **r.provenance})
    return with_integer_counts(pd.DataFrame(rows, columns=None if rows else [  # no rows: the columns still
        "experiment", "method", "heldout_samples", "gate_init", "loss_before", "loss_after", "perplexity_before",
        "perplexity_after"]))


def answer_columns(r: Run) -> dict:
    """What a ScienceQA accuracy rests on, beside it in every table: how it was read (`mode`), the uniform guess's
    accuracy over the same questions, the questions answered nothing (`unparsed`), with generated answers the
    accuracy read in any wording, with its interval (a score that moves with the format alone is not a gain in
    knowledge), and for a multimodal adapter the image questions scored without their image (`images_missing`)
    and the training samples that read one (`trained_with_image`, of `trained_samples`)."""
    if "accuracy" not in r.scores:
        return {}
    any_format = r.scores.get("any_format") or {}
    low, high = accuracy_interval(any_format.get("accuracy"), r.scores["n"], any_format.get("correct"))
    images = bool(r.config.get("image_features"))
    trained = (r.metrics.get("image_samples") or {}).get("train") or {}
    return {"mode": r.scores.get("mode"), "chance": r.scores.get("chance"), "unparsed": r.scores.get("unparsed"),
            "accuracy_any_format": any_format.get("accuracy"), "any_format_ci95_low": low,
            "any_format_ci95_high": high,
            "images_missing": len(r.scores.get("images_missing") or []) if images else None,
            "trained_with_image": trained.get("with_image"), "trained_samples": trained.get("samples")}


def score_columns(r: Run) -> dict:
    """An evaluation's headline: accuracy with its 95% interval (ScienceQA), or held-out loss (Alpaca): over every
    target token (`heldout_loss`, as evaluate writes it), and the mean of each sample's own (`sample_mean_loss`,
    where the scores keep them)."""
    if "accuracy" in r.scores:
        low, high = accuracy_interval(r.scores["accuracy"], r.scores["n"], r.scores.get("correct"))
        return {"accuracy": r.scores["accuracy"], "ci95_low": low, "ci95_high": high, "split": r.scores.get("split")}
    losses = [x for x in r.scores.get("sample_losses") or [] if x is not None]
    return {"heldout_loss": r.scores["heldout_loss"],
            # The samples weighing alike, as the paired test and the trend read them; heldout_loss weighs tokens.
            "sample_mean_loss": float(np.mean(losses)) if losses else None, "perplexity": r.scores["perplexity"]}


def paper_ablation(axis: str, runs: list[Run]) -> list[dict]:
    """The paper's row beside each of ours, for the axes it published (settings paired as paper_pairs says, gate
    init by value; its columns on every row, n/a where no paper row is paired): ScienceQA's, so none beside an
    ablation scored on another dataset."""
    if any(r.dataset != "scienceqa" for r in runs):
        return [{} for _ in runs]
    values = [r.axis_value(axis) for r in runs]
    if axis == "adapter_layers":  # every column on every row, n/a where no paper row stands beside ours
        return [{"adapter_layers_paper": p and f"{p[0]} of 32", "tuned_params_m_paper": p and p[1],
                 "accuracy_paper": p and p[2]} for p in paper_pairs(values, PAPER_LAYERS)]
    if axis == "gate_init":
        return [{"accuracy_paper": PAPER_GATE_INIT.get(r.axis_value(axis))} for r in runs]
    if axis == "epochs":
        return [{"epochs_paper": p and p[0], "train_loss_paper": p and p[1], "val_loss_paper": p and p[2],
                 "accuracy_paper": p and p[3]} for p in paper_pairs(values, PAPER_EPOCHS)]
    return [{} for _ in runs]


def ablation_table(runs: list[Run], axis: str, center: Any) -> pd.DataFrame:
    """One ablation axis, a row per value: what trained (tuned parameters, the last epoch's training loss, the
    final validation loss; n/a for zero-shot), the score with its interval, each point paired question by question
    (ScienceQA) or sample by sample (Alpaca) with the axis's `center` value's point (when the axis lists it), and
    the paper's numbers beside them."""
    rows = []
    reference = next((r for r in runs if r.sets(axis, center)), None)
    for r, paper in zip(runs, paper_ablation(axis, runs)):
        trained = bool(r.metrics)
        rows.append({axis: r.axis_value(axis), "method": METHOD_NAMES[r.method],
                     "tuned_params_m": millions(r.metrics["trainable_parameters"]) if trained else None,
                     "train_loss": r.last_epoch_loss() if trained else None,
                     "val_loss": (r.metrics.get("val_loss") or [None])[-1] if trained else None,
                     **score_columns(r), **answer_columns(r), **paired_columns(r, reference), **paper,
                     **r.provenance})
    return with_integer_counts(pd.DataFrame(rows))


# One unit of an ordered ablation axis, as the trend names it ("per adapted layer"); another axis's: "per unit of
# AXIS".
AXIS_UNITS = {"adapter_layers": "adapted layer", "adapter_len": "prompt vector", "epochs": "epoch"}
# Axes whose values are set by ratios (a learning rate by decades, a LoRA rank by doublings): the line runs over
# their logarithm, so its slope is per 10x or per doubling. Over the values themselves one end's step would set the
# line alone (0.0009, 0.009, 0.09: the last step is 90% of the range) and "per unit of blr" says nothing.
LOG_AXES = {"blr": (10, "10× blr"), "lora_rank": (2, "doubling of lora_rank")}
TREND_POINTS = 3  # a line through two points fits them exactly: its slope is their difference, not a trend
NAMING_AXES = ("seed",)  # numbers that name a point, not an amount: no line runs through them


def ordered_axis(axis: str, values: list) -> bool:
    """Whether an axis's values are amounts in order (a trend can run along them): finite numbers (a point named
    epochs~Infinity reads as inf, which puts a line's every number at NaN), and not seeds."""
    return axis not in NAMING_AXES and all(_finite(v) for v in values)


def log_base(axis: str) -> int | None:
    """The base of the logarithm an axis's trend runs over (LOG_AXES); None: over its values."""
    return LOG_AXES[axis][0] if axis in LOG_AXES else None


def trend_x(axis: str, values: list) -> list[float]:
    """What a trend's slope is per: the values of an ordered axis, or their logarithms along LOG_AXES (above 0)."""
    base = log_base(axis)
    return list(values) if base is None else [math.log(v, base) for v in values]


# Why points have no paired test: other questions (samples), or a scores.json that keeps no answers one by one; the
# table does not tell which.
UNPAIRED_WHY = "(other questions or samples, or no answers kept one by one)"
UNPAIRED = f"none: points not paired one by one {UNPAIRED_WHY}"
TREND_COLUMNS = ["axis", "table", "points", "left_out", "trend", "measure", "per", "items", "slope", "ci95_low",
                 "ci95_high", "monotone"]
# What a trend is of: the ablation table's column whose points its line runs through (the rows' means of the items'
# outcomes), by item_outcomes' kind; accuracy in points.
TREND_MEASURES = {"questions": ("accuracy", 100), "samples": ("sample_mean_loss", 1)}


def paired_trend(x: list[float], outcomes: np.ndarray) -> dict:
    """The least-squares slope of the outcomes over the axis values `x` (a row of `outcomes` per value, a column per
    question or sample), paired: each column's own slope, whose mean is the slope of the rows' means (least
    squares is linear in the outcome), its standard error sd / sqrt(n) over the n columns, and its 95% interval
    mean +- t * SE with Student's t of n - 1 degrees of freedom (exact at any n, where the normal's 1.96 is not).
    Pairing leaves out how much the questions differ from each other, as the paired tests do. `monotone`: whether
    the rows' means move one way along x (ties allowed)."""
    x = np.asarray(x, float)
    weights = (x - x.mean()) / np.sum((x - x.mean()) ** 2)
    # Each column less its mean first: the same slopes, and a column that never changes has a slope of exactly 0
    # (not a rounding error's, which an interval of no width would call a trend). Its mean need not be its value in
    # floating point (0.1 three times over three is not 0.1): such a column is set to 0 outright.
    centered = outcomes - outcomes.mean(axis=0)
    centered[:, np.all(outcomes == outcomes[:1], axis=0)] = 0.0
    slopes = weights @ centered
    slope, n = float(np.mean(slopes)), slopes.size
    # Slopes that cancel (every point's accuracy the same, the questions right trading places) leave a rounding
    # error's mean, not 0: "+3.55e-16 points per adapted layer" for accuracies of 50, 50 and 50. A mean that small
    # beside the items' own slopes is 0.
    slope = 0.0 if abs(slope) <= 1e-12 * float(np.max(np.abs(slopes), initial=0.0)) else slope
    sd = float(np.std(slopes, ddof=1))
    sd = 0.0 if sd <= 1e-12 * abs(slope) else sd  # equal slopes: no spread, not a rounding error's
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    steps = np.diff(outcomes.mean(axis=1)[np.argsort(x)])
    return {"items": n, "slope": slope, "ci95_low": slope - half, "ci95_high": slope + half,
            "monotone": bool(np.all(steps >= 0) or np.all(steps <= 0))}


def ablation_trend(runs: list[Run], axis: str) -> dict:
    """One ablation axis's row of the trends table: where its values are numbers, at least TREND_POINTS of them
    scored on the same questions or samples (trend_points; `left_out`: the values of the others), the paired
    linear trend (paired_trend) of the accuracy, in points per unit of the axis (per 10× or doubling along
    LOG_AXES), or of the held-out loss of each sample (its token mean, as the paired test reads it), the samples
    weighing alike (sample_mean_loss); else `trend` says why there is none."""
    row = {"axis": axis, "table": ablation_table_name(axis)[0], "points": len(runs), "left_out": []}
    values = [r.axis_value(axis) for r in runs]
    if not ordered_axis(axis, values):
        return row | {"trend": "none: values not amounts in order"}
    if len(runs) < TREND_POINTS:
        return row | {"trend": f"none: {len(runs)} point{'s' * (len(runs) != 1)}, a trend needs {TREND_POINTS}"}
    paired = trend_points(runs)
    if not any(paired):
        return row | {"trend": UNPAIRED}
    row["left_out"] = [v for v, p in zip(values, paired) if not p]
    runs, values = [r for r, p in zip(runs, paired) if p], [v for v, p in zip(values, paired) if p]
    if len(runs) < TREND_POINTS:
        return row | {"trend": f"none: {len(runs)} of {row['points']} points paired one by one, a trend needs "
                               f"{TREND_POINTS}"}
    outcomes = item_outcomes(runs)
    if outcomes[1].shape[1] < 2:  # no spread to give an interval
        return row | {"trend": "none: fewer than 2 questions or samples scored at every point"}
    base = log_base(axis)
    per = LOG_AXES[axis][1] if base else AXIS_UNITS.get(axis, f"unit of {axis}")
    if base and min(values) <= 0:
        return row | {"trend": f"none: a line over {axis}'s logarithm needs values above 0"}
    kind, by_item = outcomes
    measure, scale = TREND_MEASURES[kind]
    trend = paired_trend(trend_x(axis, values), scale * by_item)
    if trend["ci95_low"] == trend["ci95_high"]:
        # Every item's slope the same: their sd is 0 and the interval has no width, which is no measure of the
        # noise (three questions flipping together would read as a trend beyond it, and 80 questions that never
        # change as ruling out any change at all); the paired tests speak.
        return row | {"trend": f"none: every {'question' if kind == 'questions' else 'sample'}'s slope is the same, "
                               "no spread to give an interval"}
    return row | {"trend": "paired linear", "measure": measure, "per": per, **trend}


def trends_table(axes: dict[str, list[Run]]) -> pd.DataFrame:
    """Every ablation axis's trend (ablation_trend), a row each, in ablations.vary's order."""
    df = pd.DataFrame([ablation_trend(runs, axis) for axis, runs in axes.items()], columns=TREND_COLUMNS)
    df["left_out"] = df["left_out"].astype(object)  # a list per row, also with no rows (no axis)
    df["items"] = df["items"].astype("Int64")
    return df


def _number(v: float, sign: str = "") -> str:
    """A trend's number in a sentence: three significant digits (13.9, -0.12, 0.0412), with `sign` "+" a plus
    sign on a rise; 0 without a sign."""
    text = f"{v:{sign}.3g}"
    return "0" if float(text) == 0 else text


def _bound(v: float) -> str:
    """A change an interval rules out, in a sentence: `v` (>= 0, an end of the interval) to three significant
    digits rounded up, so that what is said to be ruled out lies outside the interval (its end 4.7318 as 4.74: "a
    rise of more than 4.73" would claim to rule out 4.731, which the interval holds); 0 as 0."""
    text = _number(v)
    if float(text) < v:  # rounded down: one unit of the third digit up (9.99 + 0.01 = 10)
        shown = decimal.Decimal(text)
        text = _number(float(shown + decimal.Decimal(1).scaleb(shown.adjusted() - 2)))
    return text


def trend_slope_text(trend: pd.Series) -> str:
    """A paired linear trend's slope with its interval, in its unit: "+13.9 points per adapted layer, 95% [10.1,
    17.7]" (accuracy), "-0.1 per epoch, 95% [...]" (held-out loss)."""
    points = " points" if trend["measure"] == "accuracy" else ""
    return (f"{_number(trend['slope'], '+')}{points} per {trend['per']}, 95% [{_number(trend['ci95_low'])}, "
            f"{_number(trend['ci95_high'])}]")


def left_out_sentence(trend: pd.Series) -> str:
    """The points of an axis not paired with the others one by one, named: left out of its trend."""
    left_out = trend["left_out"]
    if not left_out:
        return ""
    return (f"Left out of the trend: {', '.join(point_label(trend['axis'], v) for v in left_out)}, not paired one "
            f"by one with the other {trend['points'] - len(left_out)} points {UNPAIRED_WHY}.")


def trend_sentence(trend: pd.Series, values: list) -> str:
    """The trend row of an ordered axis in words: a rise or fall beyond noise (its interval excludes 0), else no
    trend beyond noise and the largest change the interval leaves open; and a turn along the axis, which a line
    summarises only roughly; what an Alpaca trend's loss is; the points left out of it. Why there is no trend,
    where there is none."""
    axis = trend["axis"]
    if not ordered_axis(axis, values):  # categorical, or seeds: its paired tests are its verdict
        return ""
    if trend["trend"] != "paired linear":
        return " ".join(t for t in (f"No trend line: {trend['trend'].removeprefix('none: ')}.",
                                    left_out_sentence(trend)) if t)
    points = " points" if trend["measure"] == "accuracy" else ""
    name = "accuracy" if trend["measure"] == "accuracy" else "held-out loss"
    low, high, per = trend["ci95_low"], trend["ci95_high"], trend["per"]
    fitted = [v for v in values if v not in trend["left_out"]]
    over = (f"a paired linear trend over {trend['items']} {'questions' if points else 'samples'}, "
            f"{axis} {min(fitted)} to {max(fitted)}")
    if not points:  # a mean of per-sample losses, which the table's heldout_loss is not: say which it is
        over += ("; of each sample's loss (its token mean), the samples weighing alike (`sample_mean_loss`), not "
                 "every token alike (`heldout_loss`)")
    line = trend_slope_text(trend)
    if low > 0 or high < 0:
        text = f"{name.capitalize()} {'rises' if low > 0 else 'falls'} with {axis} beyond this noise: {line} ({over})."
    else:
        text = (f"No trend beyond noise: the interval holds 0 ({name} {line}, {over}); a rise of more than "
                f"{_bound(high)}{points} or a fall of more than {_bound(-low)}{points} per {per} is ruled out at "
                "95%.")
    if not trend["monotone"]:
        text += (f" Not monotone: the {name} turns along {axis}, which a line summarises only roughly (whether the "
                 "turn is beyond noise is not tested).")
    return " ".join(t for t in (text, left_out_sentence(trend)) if t)


def point_label(axis: str, value: Any) -> str:
    """A point of an axis in a sentence: its method's name, or AXIS = VALUE."""
    return METHOD_NAMES.get(value, str(value)) if axis == "method" else f"{axis} = {value}"  # as shown, or as set


def center_rows(table: pd.DataFrame, axis: str, center: Any) -> list[bool]:
    """Which rows of an ablation table are its axis's `center` point."""
    # ablation_table shows the method axis by the method's name (LoRA for lora), every other by its value; it
    # pairs with the point Run.sets finds, a number by value and anything else as its folder name writes it (a
    # center of "4" or true given to the CLI), so the verdict (and the figure) finds the same one.
    return [v == center or str(v) == str(center) or (axis == "method" and v == METHOD_NAMES.get(center))
            for v in table[axis]]


def paired_sentence(table: pd.DataFrame, axis: str, center: Any, label: Callable[[Any], str] | None = None,
                    role: str = "the center", noun: str = "point") -> str:
    """What the ablation table's paired tests show, in words: each point against the center, beyond chance
    (p_paired below SIGNIFICANCE) or not; a point not paired with the center by its 95% interval against the
    center's only, a rough reading (apart or overlapping, no verdict of chance: for two rows of the same questions
    apart intervals can go with a p above SIGNIFICANCE); a point without a score, or an axis without the center,
    said as such. Unpaired is all the table tells: other questions, or scores that keep no answers one by one.
    A per-method table's rows against the row they are paired with (method_verdict): `role` names that row,
    `label` each row and `noun` what a row is."""
    label = label or (lambda value: point_label(axis, value))
    is_center = center_rows(table, axis, center)
    if not any(is_center):
        return f"The center ({label(center)}) is not among this axis's points: no point is paired with it."
    ref = table[is_center].iloc[0]
    questions = "accuracy" in table.columns
    unpaired_point = f"not paired with {role} one by one {UNPAIRED_WHY}"
    paired, unpaired = [], []
    for (_, row), centered in zip(table.iterrows(), is_center):
        if centered:
            continue
        name, p = label(row[axis]), row.get("p_paired")
        if questions and pd.isna(row["accuracy"]):
            unpaired.append(f"{name} has no accuracy (no questions scored): no verdict")
        elif pd.notna(p):
            beyond = p < SIGNIFICANCE
            if questions:
                words = (("higher" if row["only_this_right"] > row["only_paired_right"] else "lower")
                         + " beyond chance") if beyond else "no difference this data shows"
                paired.append(f"{name}: {cell(row['accuracy'], True)}, p = {p_cell(p)}, {words}")
            else:
                words = (("lower" if row["lower_loss_here"] > row["lower_loss_paired"] else "higher")
                         + " loss beyond chance") if beyond else "no difference this data shows"
                paired.append(f"{name}: lower loss on {row['lower_loss_here']} samples, higher on "
                              f"{row['lower_loss_paired']}, p = {p_cell(p)}, {words}")
        elif questions and pd.notna(ref["ci95_low"]):
            place = interval_place(row, ref)
            words = (f"apart, {'higher' if place == 'above' else 'lower'}, which no paired test checks"
                     if place != "overlapping" else "overlapping: no difference shown, none ruled out")
            unpaired.append(f"{name} is {unpaired_point}, so its verdict rests on the intervals "
                            f"only: {interval_cell(row['accuracy'], row['ci95_low'], row['ci95_high'])} against "
                            f"{interval_cell(ref['accuracy'], ref['ci95_low'], ref['ci95_high'])}, {words}")
        else:
            unpaired.append(f"{name} is {unpaired_point}: no paired test and no interval to read, so no verdict")
    text = ""
    if paired:
        at = f"{label(center)}: {cell(ref['accuracy'], True)}" if questions else label(center)
        text = (f"Against {role} ({at}), {'question' if questions else 'sample'} by "
                f"{'question' if questions else 'sample'}: {'; '.join(paired)}.")
        if len(paired) > 1:
            text += f" Each p stands alone (no correction for the {len(paired)} comparisons)."
    return " ".join(t for t in (text, *(f"The {noun} {u}." for u in unpaired)) if t)


def interval_place(row: pd.Series, other: pd.Series) -> str:
    """Where a row's 95% interval lies against another's: "above", "below" or "overlapping" (a rough reading of two
    accuracies, not a test)."""
    if row["ci95_low"] > other["ci95_high"]:
        return "above"
    return "below" if row["ci95_high"] < other["ci95_low"] else "overlapping"


def method_verdict(table: pd.DataFrame) -> str:
    """What a per-method table (instruction_table, scienceqa_table) shows, in words, under its heading in report.md:
    each row against the LLaMA-Adapter row the table pairs it with (`paired_with`; paired_sentence, as an
    ablation's points against its center); on ScienceQA, then each row against the no-model floor of its split, by
    their intervals only (the floor keeps no answers one by one to pair). A table that pairs no row: said as such."""
    rows = table[table["method"] != "floor"] if "method" in table.columns else table
    reference = sorted(set(rows["paired_with"].dropna())) if "paired_with" in rows.columns else []
    if len(rows) < 2:
        text = ""
    elif not reference:
        text = ("No row is paired with another one by one (no LLaMA-Adapter row keeps its answers one by one, or "
                "the others were scored on other questions or samples): compare their intervals only.")
    else:
        methods = dict(zip(rows["experiment"], rows["method"]))
        text = paired_sentence(rows, "experiment", reference[0], label=lambda name: f"{methods[name]} ({name})",
                               role="the LLaMA-Adapter row", noun="row")
    return " ".join(t for t in (text, floor_sentence(table)) if t)


def floor_sentence(table: pd.DataFrame) -> str:
    """Each ScienceQA row against its no-model floor (always the answer position most often right in the training
    questions; the row's `floor_row`), by their 95% intervals: above it, overlapping it, or below it; one sentence
    a floor, where a split has several (rows scored on other questions). A rough reading, not a test (the floor
    keeps no answers one by one to pair with). Left to the table: a floor or row without an interval."""
    if not {"method", "split", "floor_row"} <= set(table.columns):
        return ""
    floors = table[(table["method"] == "floor") & table["ci95_low"].notna()]  # none on Alpaca
    sentences = []
    for _, floor in floors.iterrows():
        # a floor's name is unique within its split only (another split's floor may answer the same letter)
        rows = table[(table["floor_row"] == floor["experiment"]) & (table["split"] == floor["split"])
                     & table["ci95_low"].notna()]
        if rows.empty:
            continue
        places: dict[str, list[str]] = {"above": [], "overlapping": [], "below": []}
        for _, row in rows.iterrows():
            places[interval_place(row, floor)].append(f"{row['method']} ({row['experiment']}) "
                                 f"{interval_cell(row['accuracy'], row['ci95_low'], row['ci95_high'])}")
        said = "; ".join(f"{place} it: {', '.join(named)}" for place, named in places.items() if named)
        sentences.append(
            f"Against answering without a model ({floor['experiment'].removeprefix('no model: ')}: "
            f"{interval_cell(floor['accuracy'], floor['ci95_low'], floor['ci95_high'])} on the {floor['split']} "
            f"questions), by the intervals only (the floor keeps no answers one by one to pair): {said}."
            + (" An interval overlapping the floor's leaves a model not shown to answer better than that."
               if places["overlapping"] else ""))
    return " ".join(sentences)


def ablation_verdict(table: pd.DataFrame, trend: pd.Series, center: Any) -> str:
    """What one ablation shows, in words, under its heading in report.md: its trend (an axis of ordered numbers,
    trend_sentence), then each point against the center (paired_sentence)."""
    axis = trend["axis"]
    return " ".join(t for t in (trend_sentence(trend, list(table[axis])), paired_sentence(table, axis, center)) if t)


def with_integer_counts(df: pd.DataFrame) -> pd.DataFrame:
    """The counts that are n/a on some rows (`unparsed`, a category's `_n`: none on the floor's row, nor on a
    score without generated answers; the paired tests' `only_*` and `lower_loss_*`: none on the row paired with) as
    integers rather than the floats pandas makes of a column with gaps."""
    for column in df.columns:
        counts = column in ("unparsed", *IMAGE_COLUMNS) or column.endswith("_n")
        if counts or column.startswith(("only_", "lower_loss_")):
            df[column] = df[column].astype("Int64")
    return df


def generations_table(generations: dict[str, Path], runs: list[Run]) -> pd.DataFrame:
    rows = []
    for r in runs:
        if r.name not in generations:
            raise InputError(f"--generations: none for {r.name}, an instruction experiment; expected "
                             f"{r.name}=FILE, the JSONL generate wrote for it")
        path = Path(generations[r.name])
        if not path.is_file():
            raise InputError(f"{path}: missing; run generate first (or leave this experiment out of the report)")
        text = path.read_text(encoding="utf-8")
        # cut at "\n" alone, as generate ends its lines: str.splitlines also cut an answer holding U+2028, U+2029
        # or NEL (U+0085), which JSON leaves unescaped
        lines = text.removesuffix("\n").split("\n") if text else []
        if not lines:  # generate writes a line per prompt and refuses no prompts: a file cut short, not none asked
            raise InputError(f"{path}: holds no generations; expected the JSONL generate writes, a line per prompt "
                             "(run generate again)")
        read = []
        for n, line in enumerate(lines, 1):
            try:
                g = json.loads(line)
                if (not all(isinstance(g.get(k), str) for k in ("prompt", "output")) or "id" not in g
                        or not isinstance(g.get("adapter", ""), str)):
                    raise ValueError("keys")
            except (ValueError, AttributeError):  # (a line that is JSON but no object has no .get)
                raise InputError(f"{path}, line {n}: expected a JSON object with id, prompt and output (and the "
                                 "adapter's name, a string), as generate writes") from None
            read.append(g)
        # a file of several adapters (generate --adapter A=... --adapter B=...): each row keeps its own, named
        # EXPERIMENT/ADAPTER (all named after the experiment, it read as one adapter answering each id twice)
        several = len({g.get("adapter") for g in read}) > 1
        for g in read:
            instruction = g["prompt"].split("### Instruction:\n")[-1].split("\n\n### ")[0]
            name = f"{r.name}/{g['adapter']}" if several and "adapter" in g else r.name
            rows.append({"adapter": name, "id": g["id"], "instruction": instruction, "output": g["output"],
                         "decoding": g.get("decoding", "not recorded"), "mlflow_run": r.provenance["mlflow_run"]})
    return pd.DataFrame(rows, columns=["adapter", "id", "instruction", "output", "decoding", "mlflow_run"])


def jobs_table(benchmarks: Path | None) -> pd.DataFrame:
    """Wall time and peak memory of every job that left a Snakemake benchmark file in `benchmarks` (named
    RULE.tsv or RULE/JOB.tsv), longest first; no folder, no rows. An empty file is left out: the folder also
    holds the files of jobs outside the report's DAG (another invocation's in the same results folder), and
    Snakemake writes one in place, so a job that is ending as the report reads has an empty file, not a time yet."""
    rows = []
    for path in sorted(Path(benchmarks).rglob("*.tsv")) if benchmarks is not None else []:
        if path.stat().st_size == 0:
            warnings.warn(f"{path}: empty (a job still running?): not in the jobs table", stacklevel=2)
            continue
        bench = read_benchmark(path)
        rule, _, job = path.relative_to(benchmarks).with_suffix("").as_posix().partition("/")
        rss = float(bench["max_rss"])
        rows.append({"rule": rule, "job": job or None, "seconds": round(float(bench["s"]), 1),
                     "max_rss_mb": None if math.isnan(rss) else round(rss)})
    columns = ["rule", "job", "seconds", "max_rss_mb"]
    return (pd.DataFrame(rows, columns=columns).astype({"max_rss_mb": "Int64"})  # n/a where none: not 618.0 beside it
            .sort_values("seconds", ascending=False, ignore_index=True))


# The columns that hold accuracies (percentages, which scores.json and the intervals round to two decimals), by
# name in every table; ci95_low and ci95_high only beside an accuracy (accuracy_columns): the trends table's bound
# a slope.
ACCURACY_COLUMNS = {"accuracy", "accuracy_paper", "chance", "accuracy_any_format", "any_format_ci95_low",
                    "any_format_ci95_high",
                    *(f"{c}{suffix}" for c in CATEGORIES for suffix in ("", "_ci95_low", "_ci95_high", "_paper"))}


def accuracy_columns(df: pd.DataFrame) -> set[str]:
    """The columns of `df` whose cells are accuracies (cell's `accuracy`)."""
    return (ACCURACY_COLUMNS | ({"ci95_low", "ci95_high"} if "accuracy" in df.columns else set())) & set(df.columns)


def cell(v: Any, accuracy: bool = False) -> str:
    """A value as the Markdown and LaTeX tables and the verdicts show it: n/a for none; an accuracy with two decimals
    whatever its size (0.50 beside 39.84, not 0.5); another number with two decimals from 1 up and three
    significant digits below (a loss of 0.0412, a gate's 0.00123), which two decimals would round away."""
    if isinstance(v, list):  # values of one column listed (ablation_trends' left_out): no Python brackets
        return ", ".join(cell(x) for x in v) or "none"
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if accuracy and is_number(v):  # (an accuracy of 50 read as an int too)
        return f"{v:.2f}"
    if isinstance(v, float | np.floating):
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    accuracies = accuracy_columns(df)

    def esc(v: Any, column: str) -> str:
        return cell(v, column in accuracies).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(esc(v, c) for v, c in zip(row, df.columns)) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def readable_parts(df: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """A table as report.md shows it: its main columns, then its paired tests, its per-category accuracies (the
    paper's as rows of their own) and its provenance (runs, hashes, commit) each as a table of its own, keyed by
    the rows' names, so that none is wider than a page. The CSV keeps every column in one table."""
    keys = [df.columns[0], *(["model"] if "model" in df.columns[1:] else [])]
    categories = [c for c in CATEGORIES if c in df.columns]
    provenance = [c for c in PROVENANCE if c in df.columns]
    per_category = [f"{c}{suffix}" for c in categories for suffix in ("", "_n", "_ci95_low", "_ci95_high", "_paper")]
    paired = [c for c in PAIRED if c in df.columns]
    images = [c for c in IMAGE_COLUMNS if c in df.columns]
    how = ["mode"] if "mode" in df.columns else []  # how the answers were read: beside the runs that read them
    # floor_row (which floor row a ScienceQA row is read against) stays in the CSV: a floor row names its rows
    main = df.drop(columns=[*per_category, *provenance, *paired, *images, *how, "floor_row"], errors="ignore")
    if "any_format_ci95_low" in main:  # one cell, as the categories': the table stays a page wide
        main = main.assign(accuracy_any_format=[
            interval_cell(*values) for values in
            zip(main["accuracy_any_format"], main["any_format_ci95_low"], main["any_format_ci95_high"])
        ]).drop(columns=["any_format_ci95_low", "any_format_ci95_high"])
    parts = [(None, main)]
    if paired:
        part = df[keys + paired].assign(p_paired=[p_cell(p) for p in df["p_paired"]])
        unit = "sample by sample" if "lower_loss_here" in paired else "question by question"
        parts.append((f"Paired with another row, {unit}", part[part["paired_with"].notna()]))
    if categories:
        ours = df[df[categories].notna().any(axis=1)]
        ours = pd.DataFrame({**{k: ours[k] for k in keys},
                             **{c: [category_cell(row, c) for _, row in ours.iterrows()] for c in categories}})
        paper = {row["paper_model"]: {keys[0]: f"paper: {row['paper_model']}",
                                      **{c: row[f"{c}_paper"] for c in categories}}
                 for _, row in df.iterrows() if any(pd.notna(row.get(f"{c}_paper")) for c in categories)}
        parts.append(("By category", pd.concat([ours, pd.DataFrame(list(paper.values()))], ignore_index=True)))
    if images:
        part = df[keys + images]
        part = part[part[images].notna().any(axis=1)]  # a multimodal adapter's rows
        if len(part):
            parts.append(("Image questions", part))
    if len(provenance) > 1:
        part = df[keys + how + provenance]
        parts.append(("Provenance", part[part[provenance].notna().any(axis=1)]))  # rows with runs to name
    return parts



# The level report.md's legend reads each p against.
SIGNIFICANCE = 0.05


def p_cell(p: Any) -> str:
    """A p-value as report.md and the .tex tables show it: three significant digits, or as many more as keep it on
    its side of SIGNIFICANCE (0.04998 is not shown as 0.05); one beyond the float range (mcnemar_p gives the
    smallest float) as a bound."""
    if pd.isna(p):
        return cell(p)
    if p < 1e-300:
        return "< 1e-300"
    for digits in range(3, 18):
        shown = f"{p:.{digits}g}"
        if float(shown) != SIGNIFICANCE and (float(shown) < SIGNIFICANCE) == (p < SIGNIFICANCE):
            return shown
    return repr(p)


def interval_cell(accuracy: Any, low: Any, high: Any) -> str:
    """An accuracy with its 95% interval in one cell: "84.37 [80.10, 88.00]", n/a for none."""
    return "n/a" if pd.isna(accuracy) else f"{cell(accuracy, True)} [{cell(low, True)}, {cell(high, True)}]"


def category_cell(row: pd.Series, c: str) -> str:
    """A category's accuracy as report.md shows it: with its 95% interval and question count."""
    return f"{interval_cell(row[c], row[f'{c}_ci95_low'], row[f'{c}_ci95_high'])} (n={row[f'{c}_n']})"


def readable_markdown(df: pd.DataFrame) -> str:
    if not len(df):
        return "(no runs)\n"
    return "\n".join(to_markdown(part) if title is None else f"**{title}**\n\n{to_markdown(part)}"
                     for title, part in readable_parts(df))


LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                                                    "\\": r"\textbackslash{}"}


def to_latex(df: pd.DataFrame, caption: str) -> str:
    accuracies = accuracy_columns(df)

    def esc(v: Any, column: str = "") -> str:
        text = p_cell(v) if column.startswith("p_") else cell(v, column in accuracies)
        return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text).replace("\n", " ")

    body = [" & ".join(esc(c) for c in df.columns) + r" \\", r"\midrule"]
    body += [" & ".join(esc(v, c) for v, c in zip(row, df.columns)) + r" \\" for row in df.itertuples(index=False)]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(caption)}}}",
                      rf"\begin{{tabular}}{{{'l' * len(df.columns)}}}", r"\toprule", *body, r"\bottomrule",
                      r"\end{tabular}", r"\end{table}"]) + "\n"


def _figure(panels: int = 1):
    """A figure of one Axes, or of `panels` side by side (an array of them), each panel about half the width of
    the one-Axes figure so that two still fit a page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # constrained: the layout makes room for each panel's labels and for legends drawn outside the axes, which
    # tight_layout leaves to overlap the next panel.
    return plt, *plt.subplots(1, panels, figsize=(max(6, 3.2 * panels), 3.6), dpi=120, layout="constrained")


# Each figure is written in these formats, under one name: the PNG that report.md shows, and a PDF (vectors) to
# paste into a paper.
FIGURE_FORMATS = ("png", "pdf")


def _save(plt, fig, ax, path: Path, title: str) -> None:
    """Write the figure to `path` (a PNG) and as a PDF beside it, the same name with .pdf. `ax`: its Axes, or
    _figure's array of panels, which have titles of their own: `title` goes above them all."""
    if isinstance(ax, np.ndarray):
        fig.suptitle(title, fontsize=10)
    else:
        ax.set_title(title, fontsize=10)
    for fmt in FIGURE_FORMATS:
        # bbox_inches: a legend beside the axes stays in the picture. The PDF without its CreationDate (a PNG has
        # no date): the same runs give the same bytes on any day.
        fig.savefig(path.with_suffix(f".{fmt}"), bbox_inches="tight",
                    metadata={"CreationDate": None} if fmt == "pdf" else None)
    plt.close(fig)


def _legend(ax, **kwargs) -> None:
    """The legend of the series drawn; where none is (no run trained, or none of this kind), a line saying so
    instead of blank axes and matplotlib's warning of an empty legend."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)
    else:
        _no_data(ax, "no run of this report has this figure's data")


def _no_data(ax, why: str) -> None:
    """`why` an Axes shows nothing, written in it: the figure is still written, as the workflow declares it."""
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=8)


def loss_curves_figure(runs: list[Run], path: Path) -> None:
    """The paper's Fig. 5: training loss with zero-initialised vs randomly initialised gates."""
    plt, fig, ax = _figure()
    for r in runs:
        if not r.metrics:  # zero-shot: no training, no curve
            continue
        h = r.metrics["history"]
        ax.plot([x["epoch"] for x in h], [x["loss"] for x in h], label=f"gate init: {r.axis_value('gate_init')}")
    ax.set(xlabel="epoch", ylabel="training loss (nats per target token)")  # cross-entropy, natural log
    _legend(ax)
    _save(plt, fig, ax, path, "Training loss, zero vs random gate init (paper Fig. 5)")


def gate_figure(runs: list[Run], path: Path) -> None:
    """Mean |tanh(gate)| per adapted layer at the end of training: how much each layer reads its prompts."""
    plt, fig, ax = _figure()
    for r in runs:
        if gates := r.gates():
            ax.plot(list(gates), list(gates.values()), marker="o", label=r.name)
    from matplotlib.ticker import MaxNLocator

    ax.set(xlabel="layer of the model (0 = first; the adapted layers are the top ones)", ylabel="mean |tanh(gate)|")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    _legend(ax, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, off the lines
    _save(plt, fig, ax, path, "Learned gate magnitude per adapted layer")


def category_figure(runs: list[Run], path: Path) -> None:
    """Each row's accuracy, average and per category, with its 95% Wilson interval, beside the paper's numbers
    that the ScienceQA table sets beside it (published without intervals)."""
    plt, fig, ax = _figure()
    columns = ["accuracy", *CATEGORIES]
    bars = {}
    for r in runs:  # (accuracy, n, correct) per column; the whiskers are 95% Wilson intervals
        cats = r.scores["categories"]
        bars[r.name] = [(r.scores["accuracy"], r.scores["n"], r.scores.get("correct")),
                        *((cats[c]["accuracy"], cats[c]["n"], cats[c].get("correct")) for c in CATEGORIES)]
    bars["paper: LLaMA-Adapter"] = [(PAPER_SCIENCEQA["LLaMA-Adapter"][c], None, None) for c in columns]
    width = 0.8 / len(bars)
    for i, (name, values) in enumerate(bars.items()):
        heights = [np.nan if v is None else v for v, _, _ in values]
        intervals = [accuracy_interval(v, n, correct) for v, n, correct in values]
        errors = [[h - lo if lo is not None else 0 for h, (lo, _) in zip(heights, intervals)],
                  [hi - h if hi is not None else 0 for h, (_, hi) in zip(heights, intervals)]]
        published = all(lo is None for lo, _ in intervals)  # the paper's: no whisker, not one of zero length
        ax.bar(np.arange(len(columns)) + i * width, heights, width, label=name,
               yerr=None if published else np.nan_to_num(errors), capsize=1.5, error_kw={"elinewidth": 0.6})
    if any(paper_model(r) == "LLaMA-Adapter_T" for r in runs):  # the table's paper number of a text-only row
        ax.hlines(PAPER_SCIENCEQA["LLaMA-Adapter_T"]["accuracy"], -width / 2, 0.8 - width / 2, color="k",
                  linestyle="--", linewidth=0.8, label="paper: LLaMA-Adapter_T (average only)")
    chances = sorted({r.scores["chance"] for r in runs if r.scores.get("chance") is not None})
    if len(chances) == 1:
        ax.axhline(chances[0], color="k", linestyle=":", linewidth=0.8, label=f"chance ({chances[0]:.1f}%)")
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, ["Avg", *CATEGORIES], fontsize=8)
    ax.set(xlabel="question category", ylabel="accuracy (%), 95% interval", ylim=(0, 100))
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(plt, fig, ax, path, "ScienceQA accuracy by category")


def ablations_figure(tables: dict[str, pd.DataFrame], path: Path, center: dict) -> None:
    """A panel per ablation axis of ordered numbers (a categorical one, or seeds, has only its table): the
    ablation table's column its trend measures (TREND_MEASURES) at each value: the accuracy with its 95% interval,
    or an Alpaca ablation's mean of the samples' losses (no interval in the table) with the token-weighted
    heldout_loss beside it, under its own name; the center's point marked, the paper's accuracies where the table
    sets them beside ours (settings paired as paper_pairs says), and the ablation_trends line where there is one,
    through the mean of the points it is fitted on and straight over the values or, along LOG_AXES, over their
    logarithm (a log x axis), the points left out of it marked and named."""
    trends = [row for _, row in tables["ablation_trends"].iterrows()
              if ordered_axis(row["axis"], list(tables[row["table"]][row["axis"]]))]
    title = "Ablations along ordered axes: ours, the paper's, the paired trend"
    if not trends:
        plt, fig, ax = _figure()
        _no_data(ax, "no ablation of this report varies an axis of ordered numbers")
        _save(plt, fig, ax, path, title)
        return
    plt, fig, axes = _figure(len(trends))
    for ax, trend in zip(np.atleast_1d(axes), trends):
        axis, table = trend["axis"], tables[trend["table"]]
        x = table[axis].to_numpy(float)
        questions = "accuracy" in table.columns  # else an Alpaca ablation, scored by its held-out loss
        measure = TREND_MEASURES["questions" if questions else "samples"][0]
        y = shown = table[measure].to_numpy(float)
        if questions:
            ax.errorbar(x, y, yerr=[y - table["ci95_low"].to_numpy(float), table["ci95_high"].to_numpy(float) - y],
                        fmt="o", capsize=2, elinewidth=0.8, label="ours, 95% interval")
        else:
            ax.plot(x, y, "o", label="ours: mean of the samples' losses (sample_mean_loss)")
            token_weighted = table["heldout_loss"].to_numpy(float)
            ax.plot(x, token_weighted, "_", markersize=9, color="0.5",
                    label="ours: token-weighted (heldout_loss), not the trend's")
            # A point whose scores keep no per-sample losses has the token-weighted loss alone: marked (and, the
            # center, circled) there.
            shown = np.where(np.isnan(y), token_weighted, y)
        at = np.array(center_rows(table, axis, center[axis]))
        if at.any():
            ax.plot(x[at], shown[at], marker="o", markersize=11, fillstyle="none", linestyle="none", color="k",
                    label=f"center ({axis} = {center[axis]})")
        if "accuracy_paper" in table.columns and table["accuracy_paper"].notna().any():
            ax.plot(x, table["accuracy_paper"].to_numpy(float), marker="s", linestyle="--", linewidth=0.8,
                    label="paper (LLaMA-7B, paired as the table)")
        left_out = np.array([v in trend["left_out"] for v in table[axis]])
        if trend["trend"] == "paired linear":
            along, fitted = np.array(trend_x(axis, x[~left_out])), y[~left_out]
            ends = [int(np.argmin(along)), int(np.argmax(along))]
            ax.plot(x[~left_out][ends], fitted.mean() + trend["slope"] * (along[ends] - along.mean()), color="C3",
                    linewidth=1, label=f"trend {trend_slope_text(trend)}")
        if left_out.any():
            ax.plot(x[left_out], shown[left_out], "x", markersize=9, color="C3",
                    linestyle="none", label="left out of the trend (not paired): "
                    + ", ".join(point_label(axis, v) for v in trend["left_out"]))
        base = log_base(axis)
        log = base is not None and x.min() > 0  # a rank of 0 (no LoRA) has no place on a log axis
        if log:
            ax.set_xscale("log", base=base)
        ax.set_xticks(x, [str(v) for v in table[axis]], minor=False)  # the values as the config sets them
        ax.set_xticks([], minor=True)
        # Labels a size smaller than a one-Axes figure's: at half its width a panel's labels would run into the next.
        ax.set_xlabel((f"{axis}: number of {AXIS_UNITS[axis]}s" if axis in AXIS_UNITS else axis)
                      + (" (log scale)" if log else ""), fontsize=8)
        ax.set_ylabel("accuracy (%), 95% interval" if questions else "held-out loss (nats per target token)",
                      fontsize=8)
        ax.set_title(axis, fontsize=9)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.3))  # below the panel, off the points
    _save(plt, fig, axes, path, title)


def length_figure(tokens_dir: Path, path: Path) -> dict:
    from .inputs import token_split

    for s in ("train", "val"):
        token_split(tokens_dir / s, "Alpaca token split")
    lengths = np.concatenate([np.diff(np.load(tokens_dir / s / "offsets.npy")) for s in ("train", "val")])
    plt, fig, ax = _figure()
    ax.hist(lengths, bins=40)
    ax.axvline(float(np.mean(lengths)), color="k", linestyle="--", label=f"mean {np.mean(lengths):.1f}")
    ax.set(xlabel="tokens per sample (prompt + response)", ylabel="samples")
    ax.legend()
    _save(plt, fig, ax, path, "Alpaca sample lengths")
    return {"samples": int(len(lengths)), "mean": float(np.mean(lengths)), "max": int(np.max(lengths))}


# The report's tables, file name: caption. One ablation table per axis of ablations.vary, in its order, between
# the per-method tables and the generations.
METHOD_TABLES = {
    "efficiency": "Efficiency per method: tuned parameters, storage, training time and hardware",
    "instruction": "Instruction following per method: held-out Alpaca loss before and after training",
    "scienceqa": "ScienceQA accuracy (%) per method and category, with 95% intervals and the no-model floor",
}
# The ablations' trends, after their tables: one row per axis (ablation_trend), its verdict under each one's heading.
TRENDS_TABLE = {"ablation_trends": "Ablations: the paired linear trend of each axis of ordered values"}
# How an axis's settings stand beside the paper's rows (paper_pairs), in its table's caption.
PAPER_PAIRING = "the paper's beside ours: by rank at its 3 values, else by equal value, n/a elsewhere"
ABLATION_TABLES = {  # axis: (file name, caption); an axis not listed: ablation_<axis>
    "adapter_layers": ("insertion_layers", f"Ablation: number of adapted (top) layers ({PAPER_PAIRING})"),
    "gate_init": ("gate_init", "Ablation: zero-initialised vs randomly initialised gates"),
    "epochs": ("epochs", f"Ablation: training epochs ({PAPER_PAIRING})"),
    "method": ("ablation_method", "Ablation: what trains (adapter, LoRA, full fine-tuning, none) at the center"),
    "seed": ("ablation_seed", "Ablation: the training seed, how far training again moves a result"),
}
RUN_TABLES = {
    "generations": "Generations of the instruction adapters",
    "jobs": "Compute: wall time and peak memory of each job (Snakemake benchmark files)",
}


def ablation_table_name(axis: str) -> tuple[str, str]:
    """(file name, caption) of the table of one ablation axis."""
    return ABLATION_TABLES.get(axis, (f"ablation_{axis}", f"Ablation: {axis}, the other axes at the center"))


def report_tables(axes: list[str]) -> dict[str, str]:
    """Every table the report writes when the ablations vary `axes`: file name (without .csv): caption."""
    return {**METHOD_TABLES, **dict(ablation_table_name(a) for a in axes), **TRENDS_TABLE, **RUN_TABLES}


FIGURES = {
    "loss_curves_gate_init": "Training loss with zero vs random gate initialisation (the paper's Fig. 5)",
    "gate_magnitude": "Mean |tanh(gate)| per adapted layer after training",
    "scienceqa_categories": "ScienceQA accuracy by category, ours and the paper's",
    "alpaca_lengths": "Token lengths of the Alpaca samples (prompt + response)",
    "ablations": "Ablations along ordered axes: accuracy (or mean sample loss) per value, the paper's, the trend "
                 "line",
}


def check_report_options(inputs: ReportInputs, center: dict, vary: dict[str, list]) -> None:
    """What the report is given, by name alone, before any file is read (the command line runs it before the command
    starts: a usage error): every role names rows of the report (ReportInputs.check), every varied axis has a list
    of values and a center, every grid point's name holds its settings, the center's keys among them."""
    inputs.check()
    lists = [axis for axis, values in vary.items() if not isinstance(values, list) or not values]
    if lists:
        raise InputError(f"--vary: axis(es) {lists} do not map to a non-empty list of values; expected "
                         '{"AXIS": [VALUE, ...], ...} as ablations.vary')
    unset = sorted(set(vary) - set(center))
    if unset:
        raise InputError(f"--vary: axis(es) {unset} have no value in --center; expected the center to set every "
                         "varied axis (the value the other tables hold it at)")
    for e in inputs.ablations:
        point = point_settings(e)
        unknown = sorted(set(center) - set(point))
        if unknown:
            raise InputError(f"--center: key(s) {unknown} are not settings of grid point {e}; expected keys among "
                             f"{sorted(point)}")


def write_report(out_dir: Path, inputs: ReportInputs, center: dict, vary: dict[str, list]) -> dict:
    """Write every table (CSV, Markdown, LaTeX), figure (PNG and PDF) and report.md to out_dir; returns the tables.
    `vary` lists each ablation axis's values in the order its table shows them, and `center` the value every
    other axis holds."""
    from .inputs import existing_dir, writable_output

    check_report_options(inputs, center, vary)
    inputs.check_benchmark_files()
    if inputs.benchmarks is not None:
        existing_dir(inputs.benchmarks, "--benchmarks", "a folder of Snakemake benchmark files")
    writable_output(out_dir, "--out", folder=True)
    named = [load_run(e, inputs) for e in inputs.experiments]
    grid = [load_run(e, inputs) for e in inputs.ablations]  # each with its point's settings (with_point)
    instruction = [r for r in named if r.dataset == "alpaca"]
    scienceqa = [r for r in named if r.dataset == "scienceqa"]
    axes = {axis: ablation_axis(grid, axis, center, values) for axis, values in vary.items()}
    check_every_point_shown(grid, axes, center)
    tables = {"efficiency": efficiency_table(named), "instruction": instruction_table(instruction),
              "scienceqa": scienceqa_table(scienceqa),
              **{ablation_table_name(axis)[0]: ablation_table(runs, axis, center[axis]) for axis, runs in axes.items()},
              "ablation_trends": trends_table(axes),
              "generations": generations_table(inputs.generations, instruction), "jobs": jobs_table(inputs.benchmarks)}
    captions = report_tables(list(vary))
    if decodings := sorted(set(tables["generations"]["decoding"])):  # the caption says how they were decoded
        captions["generations"] += f" ({'; '.join(decodings)})"
    with atomic_dir(Path(out_dir)) as tmp:
        for name, df in tables.items():
            df.to_csv(tmp / f"{name}.csv", index=False)
            (tmp / f"{name}.md").write_text(readable_markdown(df), encoding="utf-8")
            (tmp / f"{name}.tex").write_text(to_latex(df, captions[name]), encoding="utf-8")
        loss_curves_figure(axes.get("gate_init", []), tmp / "loss_curves_gate_init.png")
        gate_figure(named, tmp / "gate_magnitude.png")
        category_figure(scienceqa, tmp / "scienceqa_categories.png")
        lengths = length_figure(Path(inputs.tokens["alpaca"]), tmp / "alpaca_lengths.png")
        ablations_figure(tables, tmp / "ablations.png", center)
        (tmp / REPORT_PAGE).write_text(report_markdown(tables, captions, named, center, lengths), encoding="utf-8")
    return tables


def report_markdown(tables: dict[str, pd.DataFrame], captions: dict[str, str], named: list[Run], center: dict,
                    lengths: dict) -> str:
    bases = sorted({r.config["base"] for r in named})
    # Of the trained rows: a zero-shot row has no training to name them (its provenance row says n/a).
    commits = sorted({c for r in named if (c := r.provenance["git_commit"])}) or ["unknown"]
    hashes = sorted({h for r in named if (h := r.provenance["config_hash"])}) or ["unknown"]
    seed_table = ablation_table_name("seed")[0]
    seeds = (f"by as much as the seed ablation (`{seed_table}`) shows for the center's: a difference between two "
             "settings within the seeds' own is not one to claim, even beyond chance here." if seed_table in tables
             else "by an amount this report does not measure, so a difference beyond chance here may still be within "
             "that.")
    parts = [
        "# LLaMA-Adapter: the paper's tables and figures, regenerated", "",
        f"Base model: {', '.join(bases)}. Git commit: {', '.join(commits)}. Config hash: {', '.join(hashes)}.", "",
        "Columns ending in `_paper` are the published numbers of Zhang et al. 2023 (LLaMA-7B, real Alpaca and "
        "ScienceQA). An ablation axis of as many values as the paper's (its 3 insertion-layer counts, its 3 epoch "
        "counts) is paired with the paper's settings by rank (ours are theirs scaled to another model: smallest "
        "beside smallest); an axis of another count only where a value equals one the paper measured, its `*_paper` "
        "columns n/a on the other rows (`adapter_layers_paper` and `epochs_paper` name the paper's setting each row "
        "stands beside); gate init is paired by value. The ablations hold "
        f"{json.dumps(center)} fixed except the axis they vary. `chance` is the accuracy of guessing uniformly; "
        "the `floor` row always answers the option position most often right in the training questions. "
        "`ci95_low`/`ci95_high` bound each accuracy with 95% confidence (Wilson interval over its questions; "
        "a category's in brackets, with its question count). Set side by side, two rows' intervals are a rough "
        "reading, not a test: overlapping intervals leave a difference neither shown nor ruled out (two "
        "proportions can differ significantly with slightly overlapping intervals), and intervals apart point to a "
        "difference of two independent sets of questions, but not of two rows of the same questions, which the "
        "intervals do not pair (with few questions, or rows that seldom get the same ones right, intervals apart "
        f"can come with a paired p above {SIGNIFICANCE:g}). Where two rows scored the same questions, `p_paired` is "
        "the test: the paired table compares them question by question, which can show a difference that "
        "overlapping intervals leave open, and decides where the intervals and it disagree: `only_this_right` and "
        "`only_paired_right` count the questions that only the row, or only the row it is paired with "
        "(`paired_with` names it: the text-only "
        "LLaMA-Adapter row, or the multimodal one where no text-only row holds its answers one by one; in an "
        "ablation, the center), answered right, and `p_paired` is McNemar's exact two-sided p of that split: below "
        f"{SIGNIFICANCE:g}, a difference beyond chance at the usual level; above it, a difference this data does not "
        "show (each p stands alone: of twenty pairs that do not differ, about one still falls below "
        f"{SIGNIFICANCE:g}; a p is shown with as many digits as keep it on its side of {SIGNIFICANCE:g}). The "
        "instruction table (and an ablation on Alpaca) pairs held-out samples the same way: `lower_loss_here` and "
        "`lower_loss_paired` count the samples on which the row's loss (its token mean over the sample), or its "
        "pair's, is the lower (equal losses count for neither), and `p_paired` is the sign test's exact p "
        "(McNemar's, over the samples whose losses differ). It counts samples, not by how much: `loss_after` is the "
        "mean over every target token of the same samples (token-weighted, so a long sample weighs more), and can "
        "be the higher on the row that is lower on most samples. "
        "Under the instruction and ScienceQA headings, a verdict says what the paired tests show of each method "
        "against the LLaMA-Adapter row, and on ScienceQA how each row's interval lies against the no-model "
        "floor's (above, overlapping or below: a rough reading, the floor keeps no answers one by one to pair). "
        "Under each ablation's heading, a verdict says what it shows: each point against the center by its "
        "`p_paired`, and for an axis of ordered numbers with at least three points scored on the same questions (or "
        "samples) a paired linear trend (the `ablation_trends` table): each question's least-squares slope of its "
        "correctness (0/1) over the axis values (blr's and lora_rank's logarithms: per 10× blr, per doubling of the "
        "rank; on Alpaca each sample's, of its loss, the token mean), whose mean "
        "is the slope of the accuracies (on Alpaca of `sample_mean_loss`, the mean of the samples' losses, each "
        "sample weighing alike: not of `heldout_loss`, which weighs each token alike, so the figure draws "
        "`sample_mean_loss`'s points under the line and `heldout_loss` beside them), with the 95% interval mean +/- "
        "t * sd / sqrt(n) of the n "
        "questions' slopes (Student's t, n - 1 degrees of freedom); an interval holding 0 is no trend beyond noise, "
        "and bounds the change it rules out. The line summarises the range measured, not a turn within it. It runs "
        "over the most points paired with each other one by one; a point that is not (other questions or samples, "
        "or scores kept without answers one by one, as an older evaluation's) is left out of it, named in the "
        "verdict, the table's `left_out` and the figure. "
        "Every interval, test and trend here measures the noise of the questions (samples) drawn, for one training "
        f"of each row: training again with another seed moves a result too, {seeds} "
        "`mode` says how a ScienceQA row was answered: `generate`, where `unparsed` counts the outputs naming no "
        "option in the paper's \"The answer is (X)\" (or naming two different ones), and `accuracy_any_format` also "
        "reads a single \"(X)\" in any wording in those outputs, so a model that knows the answers but not the "
        "format scores low on `accuracy` only; or `likelihood`, where `unparsed` counts the questions no option of "
        "which got a finite score. For a multimodal adapter, `images_missing` counts the image questions scored "
        "without their image (encode-images' skip policy) and `trained_with_image` the training samples that read "
        "one, of "
        "`trained_samples`. "
        "Units: `tuned_params_m` in millions of parameters, `storage_mb` in MB (10^6 bytes), `training_h` in hours, "
        "`seconds` of wall time and `max_rss_mb` (peak memory, MB; n/a for a job that ended before Snakemake first "
        "measured it) per job. Each section's provenance table names, "
        "for every row of ours, its training (`mlflow_run`) and evaluation (`eval_run`) MLflow runs, the config "
        "hash, the sha256 of the records it trained on (first 12 hex digits, from the stats.json beside its "
        "config.json's `train_data`; n/a for a row that trained nothing, or where that file is not there) and the "
        "git commit; the CSV files hold "
        "every column in one table.", "",
        f"Alpaca samples: {lengths['samples']}, mean length {lengths['mean']:.1f} tokens, longest {lengths['max']}.",
        "", *protocol_notes(named),
    ]
    verdicts = {**ablation_verdicts(tables, center), **method_verdicts(tables)}
    for name, caption in captions.items():
        parts += [f"## {caption}", "", *([f"**Verdict.** {verdicts[name]}", ""] if verdicts.get(name) else []),
                  readable_markdown(tables[name]), ""]
    parts += ["## Figures", "", "Each figure is shown as a PNG; a PDF of it (vectors, for a paper) stands beside it, "
              "the same name with `.pdf`.", ""]
    for name, caption in FIGURES.items():
        parts += [f"### {caption}", "", f"![{caption}]({name}.png)", ""]
    return "\n".join(parts)


def method_verdicts(tables: dict[str, pd.DataFrame]) -> dict[str, str]:
    """The per-method tables' verdicts (method_verdict), by table name."""
    verdicts = {name: method_verdict(tables[name]) for name in ("instruction", "scienceqa") if name in tables}
    return {name: v for name, v in verdicts.items() if v}


def ablation_verdicts(tables: dict[str, pd.DataFrame], center: dict) -> dict[str, str]:
    """Each ablation table's verdict (ablation_verdict), by table name, from its trend's row."""
    trends = tables.get("ablation_trends", pd.DataFrame(columns=TREND_COLUMNS))
    return {row["table"]: ablation_verdict(tables[row["table"]], row, center[row["axis"]])
            for _, row in trends.iterrows() if row["table"] in tables}


def protocol_notes(named: list[Run]) -> list[str]:
    """Plain words on ScienceQA data whose splits this pipeline assigned (a source without ScienceQA's own
    splits): its accuracies are on a held-out part of whatever questions the source had, not the paper's."""
    notes = []
    for source, assigned in {r.data.get("source"): r.data.get("assigned_splits") for r in named
                             if r.dataset == "scienceqa" and r.data.get("assigned_splits")}.items():
        counts = ", ".join(f"{name} {n:,}" for name, n in assigned["records"].items())
        total = sum(assigned["records"].values())
        notes += [f"**Miniature protocol.** The ScienceQA questions of `{source}` ({total:,}) "
                  f"came without the benchmark's train/val/test split. This pipeline split them itself: "
                  f"{assigned['rule']}, seed {assigned['seed']}, into {counts}. Adapters train on `train`. "
                  f"Accuracies are on the split named in each row. They are not the paper's ScienceQA test "
                  f"accuracy and are not comparable with it. A category whose metadata the source lacks shows "
                  f"n/a.", ""]
    return notes
