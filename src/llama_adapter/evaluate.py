"""Evaluation: ScienceQA accuracy (overall and per category, as the official script defines them) and
Alpaca held-out loss and perplexity; `evaluate` writes an evaluation's every output and its MLflow run.

ScienceQA answers are read one of two ways, and the scores say which:
- "generate": greedy decoding of the QCM prompt, the letter taken from "The answer is (X)" (the paper's);
- "likelihood": the option whose full target "Answer: The answer is (X)." is most likely; deterministic and
  needs one forward pass per option instead of a decode loop.
"""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from .batching import collate, hidden_states, sample_losses
from .config import (
    EVALUATION_OUTPUTS,
    MODES,
    RUN_LOG,
    CompileConfig,
    Evaluation,
    InferenceConfig,
    Sampling,
    training_file,
)
from .data import RECORDS
from .data.scienceqa import ANY_LETTER_RE, CATEGORIES, LETTERS, categories, parse_answer, qcm_prompt, qcm_target
from .data.tokens import TokenDataset
from .data.validate import check_validated_records
from .errors import STOPS, DataError, stop_signals_raise
from .generate import batches_by_length, complete_texts, decoding_cache
from .io import atomic_path, read_json_object, read_jsonl_lines, remove_output, removed_on_failure_if_new, write_json
from .model import Transformer
from .multimodal import ImageFeatures
from .tokenizer import Tokenizer, check_made_with, recorded_tokenizer, tokenizer_param

PROVENANCE_TAGS = ("config_hash", "git_commit")  # the run tags scores.json keeps for the report's provenance
# New tokens a generated ScienceQA answer may take ("The answer is (A)." and a little more); the benchmarks read it.
ANSWER_TOKENS = 16


@torch.no_grad()
def sequence_logprobs(model: Transformer, samples: list[tuple], batch_size: int) -> list[float]:
    """log p(target tokens | the tokens before them) of each (tokens, loss_mask[, image features]) sample, one
    row each."""
    device = model.tok_embeddings.weight.device
    out: list[float | None] = [None] * len(samples)
    for rows in batches_by_length([len(s[0]) for s in samples], batch_size, "scored"):
        batch = collate([[samples[k]] for k in rows], pad_id=0).to(device)
        h = hidden_states(model, batch)
        logp = torch.log_softmax(model.output(h).float(), dim=-1).gather(-1, batch.targets[..., None])[..., 0]
        for k, score in zip(rows, (logp * batch.target_mask).sum(dim=1).tolist()):
            out[k] = score
    return out


def question_name(record: dict, source: str) -> str:
    """A ScienceQA question as an error names it: where the records came from, and its pid."""
    return f"{source}, question {record['pid']}"


def answer_by_likelihood(model: Transformer, tokenizer: Tokenizer, records: list[dict], batch_size: int,
                         images: list[np.ndarray | None] | None = None, source: str = "ScienceQA") -> list[int | None]:
    """Each question's most likely option, None where no option's score is finite (a NaN is no answer, not the
    first option). A question whose prompt and answer take more positions than the base has (max_seq_len) is
    refused, named with `source` (where the records came from), as generation refuses a prompt that leaves no
    position for a new token: positions the base never saw would be scored silently."""
    samples, owners = [], []
    limit = model.args.max_seq_len
    for q, r in enumerate(records):
        prompt = qcm_prompt(r)
        n_prompt = len(tokenizer.encode(prompt, bos=True))
        for k in range(len(r["choices"])):
            ids = np.asarray(tokenizer.encode(prompt + qcm_target({**r, "answer": k}), bos=True), dtype=np.int64)
            if len(ids) > limit:
                raise ValueError(f"{question_name(r, source)}: its prompt and option ({LETTERS[k]}) are {len(ids)} "
                                 f"tokens (BOS included), more than the model's max_seq_len {limit}; expected at "
                                 f"most {limit}")
            samples.append((ids, np.arange(len(ids)) >= n_prompt, None if images is None else images[q]))
            owners.append((q, k))
    scores = sequence_logprobs(model, samples, batch_size)
    best: dict[int, tuple[float, int]] = {}
    for (q, k), s in zip(owners, scores):
        if math.isfinite(s) and (q not in best or s > best[q][0]):
            best[q] = (s, k)
    return [best[q][1] if q in best else None for q in range(len(records))]


def answer_by_generation(model: Transformer, tokenizer: Tokenizer, records: list[dict], batch_size: int,
                         max_new_tokens: int = ANSWER_TOKENS, images: list[np.ndarray | None] | None = None,
                         compile: bool = CompileConfig.compile, source: str = "ScienceQA"
                         ) -> tuple[list[int | None], list[str]]:
    """Each question's option as its greedy answer names it, and the answers; a question too long for the base is
    refused, named with `source` (where the records came from)."""
    texts = complete_texts(model, tokenizer, [qcm_prompt(r) for r in records], Sampling(max_new_tokens),
                           batch_size, compile=compile, images=images,
                           names=[question_name(r, source) for r in records])
    return [parse_answer(t, len(r["choices"])) for t, r in zip(texts, records)], texts


def scienceqa_scores(predictions: list[dict]) -> dict:
    """Accuracy (%) overall and per category column (a column with no questions is None: not available), and
    which questions were scored and answered right: two evaluations of the same questions are compared question
    by question (the report's paired test), which their accuracies and intervals alone cannot do."""
    def acc(rows):
        return round(100.0 * sum(r["correct"] for r in rows) / len(rows), 2) if rows else None

    per = {c: [p for p in predictions if c in p["categories"]] for c in CATEGORIES}
    return {"n": len(predictions), "correct": sum(bool(p["correct"]) for p in predictions),
            "accuracy": acc(predictions),
            "categories": {c: {"accuracy": acc(rows), "n": len(rows), "correct": sum(bool(r["correct"]) for r in rows)}
                           for c, rows in per.items()},
            "unparsed": sum(p["prediction"] is None for p in predictions),
            "questions_sha256": questions_digest(str(p["pid"]) for p in predictions),
            "correct_pids": sorted(str(p["pid"]) for p in predictions if p["correct"])}


def questions_digest(pids) -> str:
    """sha256 of a set of question ids (sorted, one per line): equal for two evaluations of the same questions."""
    return hashlib.sha256("\n".join(sorted(pids)).encode()).hexdigest()


def answer_position_floor(train_records: list[dict], records: list[dict]) -> dict | None:
    """The no-model floor: always answering the option position most often right in the training questions
    (the first such position, on a tie). None without training questions."""
    if not train_records:
        return None
    counts = np.bincount([r["answer"] for r in train_records])
    position = int(counts.argmax())
    correct = sum(r["answer"] == position for r in records)
    return {"position": position, "letter": LETTERS[position], "correct": int(correct), "n": len(records),
            "accuracy": round(100.0 * correct / len(records), 2) if records else None}


def score_scienceqa(model: Transformer, tokenizer: Tokenizer, records: list[dict], mode: str = Evaluation.mode,
                    batch_size: int = InferenceConfig.batch_size, images: ImageFeatures | None = None,
                    train_records: list[dict] | None = None, compile: bool = CompileConfig.compile,
                    source: str = "ScienceQA") -> tuple[dict, list[dict]]:
    """(scores, one prediction row per question) of `records`. images: the feature cache a multimodal adapter
    reads (questions without an image keep the prompts unchanged); train_records: the training questions, for the
    no-model floor (`floor`); compile: the decode step compiled (mode generate); source: where the records came
    from, which an error about a question names."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    seen: set[str] = set()
    for r in records:
        if str(r["pid"]) in seen:
            raise DataError(f"{source}, question {r['pid']!r}: given twice; expected each question once (it would "
                            "count twice in every accuracy)")
        seen.add(str(r["pid"]))
    model.eval()
    with_image = [str(r["pid"]) for r in records if r.get("has_image") or r.get("image")]
    if images is None and with_image and getattr(getattr(model, "adapter", None), "visual_dim", 0):
        raise DataError(f"{source}: a multimodal adapter scored without image features: its {len(with_image)} image "
                        f"questions (first: {with_image[0]}) would be scored from their text alone; expected the "
                        "feature cache encode-images made of these records")
    per_question, images_missing = None, None
    if images is not None:  # image questions only: a row of a pid without an image here is not this record's
        image_pids = set(with_image)
        vectors, has = images.vectors([str(r["pid"]) for r in records])
        has = [h and str(r["pid"]) in image_pids for r, h in zip(records, has)]
        per_question = [v if h else None for v, h in zip(vectors, has)]
        images_missing = sorted(image_pids - {str(r["pid"]) for r, h in zip(records, has) if h})
        if with_image and len(images_missing) == len(with_image):
            raise DataError(f"{source}: the image features hold none of the {len(with_image)} image questions' images "
                            f"(first: {with_image[0]}); expected the cache encode-images made of these records")
    if mode == "likelihood":
        preds = answer_by_likelihood(model, tokenizer, records, batch_size, per_question, source)
        texts = [""] * len(records)
    else:
        preds, texts = answer_by_generation(model, tokenizer, records, batch_size, images=per_question,
                                            compile=compile, source=source)
    predictions = [{"pid": r["pid"], "split": r.get("split"), "answer": r["answer"], "prediction": p,
                    "correct": p == r["answer"], "categories": categories(r), "output": t}
                   for r, p, t in zip(records, preds, texts)]
    chance = 100.0 * sum(1 / len(r["choices"]) for r in records) / len(records) if records else None
    scores = {"mode": mode, **scienceqa_scores(predictions), "chance": chance and round(chance, 2),
              "floor": answer_position_floor(train_records or [], records)}
    if images_missing:
        # image questions the cache has no features for (encode-images' skip policy): scored from their text
        scores["images_missing"] = images_missing
    if mode == "generate" and records:
        # The same outputs read in any wording where the paper's format gives no answer (no option, or two; "(X)"
        # anywhere): tells a model that knows the answer but not the paper's answer format from one that knows
        # neither; never below `accuracy`. An output that names its option in the paper's format answered that
        # option: an "(X)" elsewhere in it is not a second reading that may be right instead.
        any_format = sum(r["answer"] == (p if p is not None else parse_answer(t, len(r["choices"]), ANY_LETTER_RE))
                         for r, t, p in zip(records, texts, preds))
        scores["any_format"] = {"correct": any_format, "accuracy": round(100.0 * any_format / len(records), 2)}
    return scores, predictions


def score_alpaca(model: Transformer, tokenizer: Tokenizer, heldout: TokenDataset, row_len: int = Evaluation.row_len,
                 batch_size: int = InferenceConfig.batch_size) -> dict:
    """Held-out loss per target token and perplexity (the instruction answers are the generate stage's), and each
    sample's own token-mean loss (null for a sample without targets) with a digest of the samples: the report
    pairs two evaluations of the same samples sample by sample."""
    model.eval()
    device = model.tok_embeddings.weight.device
    heldout.require_targets("the held-out split")  # a mean over no tokens: NaN, which scores.json cannot hold
    sums, counts = sample_losses(model, heldout, row_len, batch_size, tokenizer.pad_id, device)
    loss = float(sums.sum() / counts.sum())
    return {"heldout_loss": loss, "perplexity": float(np.exp(loss)), "heldout_samples": len(heldout),
            "samples_sha256": heldout.digest(),
            "sample_losses": [float(total / n) if n else None for total, n in zip(sums, counts)]}


def training_of(base: Path, adapter: Path | None) -> dict:
    """The metrics.json of the training that produced what is evaluated (training_file); {} for a base that no
    training of ours wrote."""
    try:
        metrics = read_json_object(training_file(base, adapter), "the metrics.json train writes")
    except DataError:
        return {}
    return metrics if "method" in metrics else {}


def scored_training(base: Path, adapter: Path | None) -> str | None:
    """The folder of the training that produced what is evaluated, as scores.json records it (`training`), so the
    report can check a row's --training is that one; None where no training of ours wrote it (zero-shot)."""
    return str(training_file(base, adapter).parent) if training_of(base, adapter) else None


def check_trained_tokenizer(tokenizer: Tokenizer, base: Path, adapters: list[Path], command: str) -> None:
    """Before the model loads: a fully fine-tuned --base, and each --adapter, learned the ids of the tokenizer its
    training data was made with, which its training's metrics.json records (train keeps it); one of another vocabulary
    than `tokenizer`, which `command` encodes and decodes with, is refused naming the option, the file, both
    tokenizers' files and digests and the --tokenizer to give. A metrics.json of no tokenizer (written before train
    recorded it), or none (a base no training of ours tuned, an adapter made elsewhere), is used as before,
    unchecked."""
    for shown, adapter in ((f"--base {base}", None), *((f"--adapter {a}", a) for a in adapters)):
        trained = training_of(base, adapter)
        if adapter is None and trained.get("method") != "full":  # not a full fine-tune's: a run's that merely lies
            continue  # beside the base (an adapter's, in the same folder), or none
        path = training_file(base, adapter)
        recorded = recorded_tokenizer(trained, path, shown, "train it again, or remove the field to use it unchecked")
        if recorded is None:
            continue
        made_with = f"--tokenizer {recorded['source']}" if recorded.get("source") else "--tokenizer of that vocabulary"
        check_made_with(recorded, tokenizer, shown, f"{path} records it was trained on data tokenized with",
                        f"the tokenizer {command} encodes and decodes with",
                        f"the ids it learned mean other tokens to that one; expected {made_with} (the tokenizer of "
                        f"its training data), or {'a model' if adapter is None else 'an adapter'} trained on data "
                        f"tokenized with {tokenizer.source}")


def read_questions(validated_dir: Path) -> list[dict]:
    """The ScienceQA records of a folder written by validate, every split's, each checked as validate keeps them
    (an edited or unvalidated file is refused by line, not scored: a repeated pid would count twice)."""
    source = Path(validated_dir) / RECORDS
    lines = read_jsonl_lines(source, expected="the records.jsonl that the validate stage writes")
    check_validated_records("scienceqa", source, lines)
    return [record for _, record in lines]


def split_questions(records: list[dict], split: str | None, source: Path) -> tuple[list[dict], list[dict]]:
    """(the questions of `split`, every split's if None; the training split's, for the no-model floor) of the
    validated `records` read from `source`; no question to score is an error naming the splits there are."""
    questions = [r for r in records if split is None or r.get("split") == split]
    if not questions:
        present = sorted({str(r.get("split")) for r in records})
        raise DataError(f"{source}: no questions" + (f" in split {split!r}; splits present: {present}"
                                                     if records else ""))
    return questions, [r for r in records if r.get("split") == "train"]


def evaluate(model: Transformer, tokenizer: Tokenizer, ev: Evaluation, *, records: list[dict] | None = None,
             images: ImageFeatures | None = None, heldout: TokenDataset | None = None,
             batch_size: int = InferenceConfig.batch_size, compile: bool = CompileConfig.compile,
             compile_cache: str | None = CompileConfig.compile_cache) -> dict:
    """Score the model (ScienceQA: the `records` of ev.split among a validated folder's records, every split's,
    with the train split's for the no-model floor; Alpaca: the `heldout` split) and write every output of an
    evaluation: scores.json, once and whole (the scores, what was scored, the method and the MLflow run), and for
    ScienceQA predictions.csv. The MLflow run opens before scoring, so a crash ends it FAILED; it holds the
    scores as metrics and both files as artifacts, and names the training run of what it scored. Compiled, the
    decode step's compiled code is kept in `compile_cache` (generate.decoding_cache)."""
    from .lora import is_lora_file
    from .tracking import Tracker, flatten

    if ev.task == "scienceqa":
        records, train_records = split_questions(records or [], ev.split, Path(ev.data) / RECORDS)
        if images is not None:
            images.check_images(records, Path(ev.data) / RECORDS)
    training = training_of(ev.base, ev.adapter)
    method = training.get("method") or ("zero-shot" if ev.adapter is None else
                                        "lora" if is_lora_file(Path(ev.adapter)) else "adapter")
    out = Path(ev.out_dir)
    if ev.task != "scienceqa":  # an earlier ScienceQA evaluation's answers must not sit beside these scores
        remove_output(out / EVALUATION_OUTPUTS[1])
    # Its tracker makes the folder: a failure from there on leaves nothing of it (its files go below, the folder here)
    with removed_on_failure_if_new(out):
        # keep_through -1: the run's log holds this evaluation's lines, not an earlier one's too
        tracker = Tracker(out, ev.run_name or f"evaluate {ev.task}", "llama_adapter.evaluate", tags=ev.tags,
                          keep_through=-1)
        scores_path, predictions_path = (out / name for name in EVALUATION_OUTPUTS)
        written = [scores_path, *([predictions_path] if ev.task == "scienceqa" else [])]
        try:
            with stop_signals_raise():  # scancel, a time limit: the run ends KILLED, not RUNNING forever
                # Inside: the run is open, and hashing the data may take a while. The questions scored: the split
                # of the validated records (all of them: None).
                if ev.task == "scienceqa":
                    tracker.log_dataset(Path(ev.data) / RECORDS, f"scienceqa/{ev.split or 'all'}", "evaluation",
                                        questions=len(records), split=ev.split)
                else:
                    tracker.log_dataset(Path(ev.data), f"{ev.task}/{Path(ev.data).name}", "evaluation",
                                        samples=len(heldout) if heldout is not None else None)
                tracker.log_params({"task": ev.task, "method": method, "base": str(ev.base), "adapter": str(ev.adapter),
                                    "data": str(ev.data), "split": ev.split, "mode": ev.mode,
                                    "training_run_id": training.get("mlflow_run_id"),
                                    **tokenizer_param(tokenizer.identity())})  # the one it encodes and decodes with
                if ev.task == "scienceqa":
                    with decoding_cache(compile_cache if compile else None, model, min(batch_size, len(records))):
                        scores, predictions = score_scienceqa(model, tokenizer, records, ev.mode, batch_size, images,
                                                              train_records, compile, str(Path(ev.data) / RECORDS))
                    scores["split"] = ev.split
                    write_predictions(predictions, predictions_path)
                else:
                    scores = score_alpaca(model, tokenizer, heldout, ev.row_len, batch_size)
                # The invocation's config hash and the commit, as a training's metrics.json keeps them: a zero-shot row,
                # which has no training, names them from here in the report.
                scores |= {"task": ev.task, "base": str(ev.base), "method": method,
                           "training": scored_training(ev.base, ev.adapter), "mlflow_run_id": tracker.run_id,
                           "tags": {k: tracker.tags[k] for k in PROVENANCE_TAGS if k in tracker.tags}}
                write_json(scores_path, scores)
                # Inside too: logging them (artifacts uploaded to a server) takes a while, and a stop here removes
                # the files, which the run must then not claim as a finished run's.
                tracker.log_metrics({k.replace(".accuracy", ""): v for k, v in flatten(scores).items()
                                     if isinstance(v, int | float) and not k.endswith(".n")}, step=0)
                for path in written:
                    tracker.log_artifact(path)
                # Inside as well: a stop while the run ends (a server's calls, the system-metrics thread's join) ends it
                # KILLED (Tracker.close), and the files go with it; the handler's close is then a no-op.
                tracker.close()
        except BaseException as e:
            for path in (*written, out / RUN_LOG):  # no partial output: predictions without their scores
                path.unlink(missing_ok=True)  # would pass for a finished run
            if isinstance(e, STOPS):  # Ctrl-C stops a run as a signal does (as train's)
                tracker.set_tags({"stopped_by": getattr(e, "signal_name", "SIGINT")})
                tracker.close(status="KILLED")
            else:
                tracker.close(status="FAILED")
            raise
        return scores


def write_predictions(predictions: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(predictions[0]) if predictions else ["pid"])
        w.writeheader()
        w.writerows({**p, "categories": " ".join(p["categories"])} for p in predictions)
