"""Tokenization into flat arrays on disk, and the train/validation split.

Each sample is BOS + prompt + response + EOS, encoded as one string exactly as the paper's code does
(`tokenizer.encode(prompt + output, bos=True, eos=True)`), with the loss masked over the first
len(encode(prompt, bos=True)) positions when `mask_prompt` is set. Encoded as one string, a response that starts
with punctuation can merge with the prompt's last piece (Alpaca's "### Response:" then "- item" gives ":-"): its
first characters then fall among the masked positions and are not learned, as in the paper's code; stats.json
counts those samples per split (`response_start_masked`; about 3% of Alpaca's records with LLaMA's tokenizer).
stats.json also records the tokenizer that made the ids (`tokenizer`: Tokenizer.identity, its vocabulary's digest and
file), which train compares with the base's own tokenizer and evaluate with the one it uses (split_tokenizer).
A split is a folder of numpy arrays read back memory-mapped:
  tokens.npy (int32, all samples concatenated), offsets.npy (int64, n+1), loss_mask.npy (bool, like
  tokens: True where the token is a training target), source_index.npy (int64: record index in the
  validated file, so every sample traces back to its record).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import SPLIT_BY, TRUNCATION, TokenizeConfig
from ..errors import DataError, TokenizeError
from ..io import atomic_dir, read_json_object, read_jsonl_lines, read_string_list, write_json
from ..prompts import alpaca_prompt
from ..tokenizer import Tokenizer, recorded_tokenizer
from . import FETCH_INFO, RECORDS, TOKEN_STATS, VALIDATION_REPORT
from .scienceqa import qcm_prompt, qcm_target
from .validate import check_separate, check_validated_records, fetched_folder

# (prompt, response) of a validated record, per dataset.
SAMPLE_FORMATS: dict[str, Callable[[dict], tuple[str, str]]] = {
    "alpaca": lambda r: (alpaca_prompt(r["instruction"], r["input"]), r["output"]),
    "scienceqa": lambda r: (qcm_prompt(r), qcm_target(r)),
}


@dataclass
class Encoded:
    tokens: list[np.ndarray]
    masks: list[np.ndarray]
    source_index: list[int]
    full_lengths: list[int]  # before truncation
    truncated: int = 0
    dropped_too_long: int = 0  # policy "drop"
    dropped_no_response: int = 0  # the prompt alone fills max_seq_len: nothing left to learn from
    response_start_masked: int = 0  # the response's first piece merged into the prompt's last (masked with it)


def encode_samples(
    samples: list[tuple[str, str]], tokenizer: Tokenizer, max_seq_len: int, mask_prompt: bool, truncation: str,
    where: Callable[[int], str] = lambda i: f"sample {i}", tokenizer_name: str = "the tokenizer",
) -> Encoded:
    """Encode (prompt, response) pairs; `where(i)` names sample i's record in errors (an id outside the
    tokenizer's vocabulary is refused: it would index past the model's embedding)."""
    if truncation not in TRUNCATION:
        raise TokenizeError(f"truncation {truncation!r} is unknown; expected one of {', '.join(TRUNCATION)}")
    enc = Encoded([], [], [], [])
    for index, (prompt, response) in enumerate(samples):
        ids = np.asarray(tokenizer.encode(prompt + response, bos=True, eos=True), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= tokenizer.vocab_size)][0])
            raise TokenizeError(f"{tokenizer_name}: encoding {where(index)} gives id {bad}, outside its vocabulary "
                                f"of {tokenizer.vocab_size} (expected ids 0..{tokenizer.vocab_size - 1})")
        ids = ids.astype(np.int32)
        prompt_ids = tokenizer.encode(prompt, bos=True)
        n_prompt = len(prompt_ids) if mask_prompt else 1  # BOS is never a target
        enc.full_lengths.append(len(ids))
        if len(ids) > max_seq_len:
            if truncation == "drop":
                enc.dropped_too_long += 1
                continue
            if n_prompt >= max_seq_len:
                enc.dropped_no_response += 1
                continue
            ids = ids[:max_seq_len]  # the paper's policy: keep the prompt, cut the response's end
            enc.truncated += 1
        enc.tokens.append(ids)
        enc.masks.append(np.arange(len(ids)) >= n_prompt)
        enc.response_start_masked += mask_prompt and ids[:n_prompt].tolist() != prompt_ids  # merged (see above)
        enc.source_index.append(index)
    return enc


def parse_val_size(text: str) -> int | float:
    """A val_size as text: a number of records ("200") or a fraction ("0.1"); checked by check_split_rule."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise TokenizeError(f"val_size {text!r}: expected a number of validation records (an integer >= 1) or a "
                            "fraction between 0 and 1") from None


def check_split_rule(rule: dict) -> None:
    """Refuse a split rule tokenize cannot follow, naming the key and what it takes."""
    if not isinstance(rule, dict) or rule.get("by") not in SPLIT_BY:
        by = rule.get("by") if isinstance(rule, dict) else rule
        raise TokenizeError(f"split rule 'by' {by!r} is unknown; expected 'seed' (a seeded validation draw) or "
                            "'field' (the records' own split)")
    if rule["by"] == "seed":
        size, seed = rule.get("val_size"), rule.get("seed", TokenizeConfig.seed)
        if isinstance(size, bool) or not (isinstance(size, int) and size >= 1
                                          or isinstance(size, float) and 0 < size < 1):
            raise TokenizeError(f"val_size {size!r}: expected a number of validation records (an integer >= 1) or a "
                                "fraction between 0 and 1")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TokenizeError(f"split seed {seed!r}: expected an integer >= 0")


def split_indices(n: int, rule: dict, split_field: list | None = None, where: str = "the records",
                  draw_held_out: bool = False) -> dict[str, np.ndarray]:
    """Record indices per split. rule {"by": "seed", "val_size": k or fraction, "seed": s}: a seeded
    permutation; the first k are validation, the rest training, so the two never overlap (the paper's
    code used its first 200 training records as validation). rule {"by": "field"}: the records' own split,
    which must include "train". `where` names the records in errors (their file). draw_held_out: a seeded draw
    over records that carry a held-out split of their own takes them in, as asked (--split-by seed); else refused."""
    check_split_rule(rule)
    if rule["by"] == "seed":
        # A seeded draw takes every record as a candidate for training: records that carry a held-out split of their
        # own (a source's validation or test rows, which fetch keeps) would be drawn into it without a word, unless
        # the draw was asked for by name (Alpaca's default rule is a draw; ScienceQA's, the records' own split).
        held_out = [s for s in split_field or [] if s not in (None, "train")]
        if held_out and not draw_held_out:
            raise TokenizeError(f"{where}: {len(held_out)} of {n} records carry a held-out split of their own "
                                f"({', '.join(sorted({str(s) for s in held_out}))}), which a seeded validation draw "
                                "would mix into training; expected --split-by field (the records' own splits), "
                                "--split-by seed to draw over them all the same, or records of no such split (a "
                                "source of its train split alone)")
        size = rule["val_size"]
        k = int(round(size * n)) if isinstance(size, float) else size
        if not 0 < k < n:
            got = f"val_size {size}" + (f" ({k} records)" if isinstance(size, float) else "")
            raise TokenizeError(f"{where}: {got} leaves no {'training' if k >= n else 'validation'} records out of "
                                f"{n}; expected a val_size of 1..{n - 1} records or a fraction giving that many")
        perm = np.random.default_rng(rule.get("seed", TokenizeConfig.seed)).permutation(n)
        return {"train": np.sort(perm[k:]), "val": np.sort(perm[:k])}
    assert split_field is not None
    missing = [i for i, s in enumerate(split_field) if s is None]
    if missing:
        raise TokenizeError(f"{where}: {len(missing)} of {n} records have no split (first: record {missing[0]}); "
                            "expected every record to have one, or use a seeded split (--split-by seed)")
    names = sorted(set(split_field))
    if "train" not in names:
        raise TokenizeError(f"{where}: no record has split 'train' (splits: {', '.join(map(str, names))}); "
                            "expected training records")
    return {name: np.array([i for i, s in enumerate(split_field) if s == name]) for name in names}


def length_stats(lengths: list[int], max_seq_len: int) -> dict:
    a = np.asarray(lengths)
    return {
        "count": int(a.size),
        "mean": round(float(a.mean()), 2) if a.size else None,
        "median": float(np.median(a)) if a.size else None,
        "p95": float(np.percentile(a, 95)) if a.size else None,
        "max": int(a.max()) if a.size else None,
        "over_max_seq_len": int((a > max_seq_len).sum()),
        # What padding every sample to max_seq_len (the paper's code) would spend on real tokens.
        "real_fraction_if_padded": round(float(np.minimum(a, max_seq_len).sum() / (max_seq_len * a.size)), 4)
        if a.size else None,
    }


def tokenize(
    dataset: str,
    validated_dir: Path,
    tokenizer: Tokenizer,
    out_dir: Path,
    max_seq_len: int = TokenizeConfig.max_seq_len,
    mask_prompt: bool = TokenizeConfig.mask_prompt,
    truncation: str = TokenizeConfig.truncation,
    split: dict | None = None,
    tokenizer_name: str | None = None,
    draw_held_out: bool = False,
) -> dict:
    """Tokenize validated records into out_dir/<split>/ arrays, plus stats.json and lengths.png. `split` is a
    split rule (TokenizeConfig.split_rule); without one, ScienceQA keeps its own splits and Alpaca gets
    TokenizeConfig's seeded draw. draw_held_out: the seeded draw was asked for by name, and takes records of a
    held-out split of their own too (split_indices).

    Every fault is a TokenizeError (or DataError) naming the file, record or setting: an empty or malformed
    records.jsonl, a record validate would not have kept, a split rule that leaves a split empty, an id
    outside the tokenizer's vocabulary, a split whose every sample is dropped for length. The folder is
    written whole, and a failed run removes the folder an earlier run left (io.atomic_dir)."""
    validated_dir, out_dir = Path(validated_dir), Path(out_dir)
    check_separate(validated_dir, out_dir, "--validated")
    source = validated_dir / RECORDS
    tokenizer_name = tokenizer_name or f"the tokenizer ({type(tokenizer).__name__})"
    # Any failure from here on removes out_dir: an earlier run's arrays must not outlive a failed run.
    with atomic_dir(out_dir, remove_on_failure=True) as tmp:
        if dataset not in SAMPLE_FORMATS:
            raise TokenizeError(f"unknown dataset {dataset!r}; expected one of {', '.join(SAMPLE_FORMATS)}")
        if truncation not in TRUNCATION:
            raise TokenizeError(f"truncation {truncation!r} is unknown; expected one of {', '.join(TRUNCATION)}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise TokenizeError(f"max_seq_len {max_seq_len!r}: expected an integer >= 2 (BOS and at least one token "
                                "to learn)")
        split = split or TokenizeConfig().split_rule(dataset)
        if split.get("by") == "seed" and isinstance(split.get("val_size"), str):  # as the command line gives it
            split = {**split, "val_size": parse_val_size(split["val_size"])}
        check_split_rule(split)
        lines = read_jsonl_lines(source, expected="the records.jsonl that the validate stage writes")
        if not lines:
            raise TokenizeError(f"{source}: no records (the file is empty); expected the validated {dataset} "
                                "records, one JSON object per line")
        check_validated_records(dataset, source, lines)
        records = [r for _, r in lines]

        def where(i: int) -> str:
            pid = f", pid {records[i]['pid']!r}" if dataset == "scienceqa" else ""
            return f"{source} line {lines[i][0]} (record {i}{pid})"

        parts = split_indices(len(records), split, [r.get("split") for r in records], where=str(source),
                              draw_held_out=draw_held_out)
        to_sample = SAMPLE_FORMATS[dataset]
        stats = {"dataset": dataset, "max_seq_len": max_seq_len, "mask_prompt": mask_prompt,
                 "truncation": truncation, "split_rule": split, "records": len(records),
                 "provenance": provenance(validated_dir),
                 # Which tokenizer made the ids (its vocabulary's digest): train refuses them for a base of another.
                 "tokenizer": tokenizer.identity(), "splits": {}}
        if split["by"] == "seed":
            stats["split_note"] = ("validation records are drawn by a seeded permutation and never appear in "
                                   "training (the paper's code reused its first 200 training records as validation)")
        lengths = []
        for name, idx in parts.items():
            enc = encode_samples([to_sample(records[i]) for i in idx], tokenizer, max_seq_len, mask_prompt,
                                 truncation, where=lambda j, idx=idx: where(int(idx[j])), tokenizer_name=tokenizer_name)
            if not enc.tokens:
                why = [f"{n} {reason}" for n, reason in (
                    (enc.dropped_too_long, f"dropped for length under truncation {truncation!r}"),
                    (enc.dropped_no_response, "whose prompt alone fills max_seq_len")) if n]
                raise TokenizeError(
                    f"{source}: all {len(idx)} records of split {name!r} are longer than max_seq_len {max_seq_len} "
                    f"({', '.join(why)}); expected some to fit: raise --max-seq-len (longest: "
                    f"{max(enc.full_lengths)} tokens)")
            keys = [str(records[i]["pid"]) for i in idx] if dataset == "scienceqa" else None
            write_split(tmp / name, enc, idx, keys)
            kept = [len(t) for t in enc.tokens]
            stats["splits"][name] = {
                "records": int(len(idx)), "samples": len(enc.tokens), "truncated": enc.truncated,
                "dropped_too_long": enc.dropped_too_long, "dropped_no_response": enc.dropped_no_response,
                "response_start_masked": enc.response_start_masked,
                "target_tokens": int(sum(m.sum() for m in enc.masks)),
                "length_before_truncation": length_stats(enc.full_lengths, max_seq_len),
                "length": length_stats(kept, max_seq_len),
            }
            lengths += enc.full_lengths
        stats["length_before_truncation"] = length_stats(lengths, max_seq_len)
        write_json(tmp / TOKEN_STATS, stats)
        plot_lengths(lengths, max_seq_len, f"{dataset}: tokens per sample (n={len(lengths)})", tmp / "lengths.png")
    return stats


def provenance(validated_dir: Path) -> dict:
    """The fetch.json of the data behind a validated folder (validation.json names the fetched folder); {} when
    the folder has no validation.json, or the fetched folder no fetch.json (records made by hand). A
    validation.json that records a failed run, or names a fetched folder that is gone, is refused."""
    report = validated_dir / VALIDATION_REPORT
    if not report.exists():
        return {}
    meta = read_json_object(report)
    if meta.get("status") == "failed":
        raise TokenizeError(f"{report}: records a failed validation; expected a successful validate run (run it "
                            "again)")
    fetched = fetched_folder(validated_dir)
    if fetched is None:
        raise TokenizeError(f"{report}: names the fetched folder {meta.get('fetched') or meta.get('source')!r} "
                            f"(from {validated_dir}), which is not there; expected the folder validate read, for "
                            "the data's provenance (run fetch and validate again if it was moved or removed)")
    return read_json_object(fetched / FETCH_INFO) if (fetched / FETCH_INFO).is_file() else {}


def split_tokenizer(split: str | Path, shown: str) -> dict | None:
    """The tokenizer that made the token split `split` (given by option `shown`), as tokenize recorded it in the
    stats.json beside it (recorded_tokenizer): None where there is no stats.json (a split not written by tokenize),
    or one written before tokenize recorded its tokenizer (used as before, unchecked)."""
    stats = Path(split).parent / TOKEN_STATS
    if not stats.is_file():
        return None
    return recorded_tokenizer(read_json_object(stats, "tokenize's stats.json"), stats, f"{shown} {split}",
                              "tokenize the data again")


def write_split(path: Path, enc: Encoded, record_index: np.ndarray, keys: list[str] | None = None) -> None:
    """The split's arrays; keys (one per record of record_index, e.g. ScienceQA pids) go to keys.json per
    sample, so later stages can find each sample's image features."""
    path.mkdir(parents=True)
    lengths = np.array([len(t) for t in enc.tokens], dtype=np.int64)
    np.save(path / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(path / "tokens.npy", np.concatenate(enc.tokens) if enc.tokens else np.zeros(0, np.int32))
    np.save(path / "loss_mask.npy", np.concatenate(enc.masks) if enc.masks else np.zeros(0, bool))
    np.save(path / "source_index.npy", record_index[np.asarray(enc.source_index, dtype=np.int64)])
    if keys is not None:
        write_json(path / "keys.json", [keys[j] for j in enc.source_index])


def plot_lengths(lengths: list[int], max_seq_len: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist(lengths, bins=60, color="#4c72b0")
    ax.axvline(max_seq_len, color="#c44e52", linestyle="--", label=f"max_seq_len {max_seq_len}")
    ax.set(xlabel="tokens (BOS + prompt + response + EOS)", ylabel="samples", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def read_keys(path: Path, samples: int) -> list[str]:
    """A split's keys.json (write_split): one string per sample, its record's key (a ScienceQA pid), else DataError
    naming the file: a sample given another's key would read another's image features."""
    expected = (f"the samples' keys that tokenize writes: a JSON list of {samples} strings, one per sample (tokenize "
                "the data again)")
    keys = read_string_list(path, expected, DataError, "key")
    if len(keys) != samples:
        raise DataError(f"{path}: {len(keys)} key(s) for {samples} samples; expected {expected}")
    return keys


class TokenDataset:
    """One split on disk, memory-mapped: sample i is (tokens int32, loss_mask bool), and with an image feature
    cache (multimodal.ImageFeatures) also its image's features or None, found through keys.json (pids)."""

    def __init__(self, path: Path, images=None):
        self.path = path = Path(path)
        self.tokens = np.load(path / "tokens.npy", mmap_mode="r")
        self.loss_mask = np.load(path / "loss_mask.npy", mmap_mode="r")
        self.offsets = np.load(path / "offsets.npy")
        self.source_index = np.load(path / "source_index.npy")
        self.lengths = np.diff(self.offsets)
        keys = path / "keys.json"
        self.keys: list[str] | None = read_keys(keys, len(self.lengths)) if keys.exists() else None
        if images is not None and self.keys is None:
            raise ValueError(f"{path}: image features were given but the split has no keys.json (the samples' "
                             "pids); tokenize it again")
        self.images = images

    def __len__(self) -> int:
        return len(self.lengths)

    def digest(self) -> str:
        """sha256 of the split's samples (tokens, boundaries, loss masks): equal for the same samples, wherever
        they lie (evaluate pairs two evaluations by it; a resumed training checks its data by it)."""
        digest = hashlib.sha256()
        for array, dtype in ((self.offsets, np.int64), (self.tokens, np.int64), (self.loss_mask, np.bool_)):
            digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
        return digest.hexdigest()

    def target_counts(self) -> np.ndarray:
        """Each sample's target tokens: its loss-masked tokens after its first (the loss predicts each from the
        tokens before it)."""
        ends = np.cumsum(self.loss_mask, dtype=np.int64)  # the targets up to each token, inclusive
        return ends[self.offsets[1:] - 1] - ends[self.offsets[:-1]]

    def require_targets(self, what: str) -> None:
        """A split whose samples have no target token at all (a loss over it would be 0/0) is refused by name."""
        if not self.target_counts().sum():
            raise DataError(f"{what} {self.path}: none of its {len(self)} samples has a target token (loss_mask.npy "
                            "is all false); expected a split of tokenized instructions with their answers")

    def sample_loss_mask(self, i: int) -> np.ndarray:
        """Sample i's loss mask (True where the token is a training target)."""
        return np.asarray(self.loss_mask[self.offsets[i]: self.offsets[i + 1]])

    def samples_with_images(self) -> int:
        """How many samples the image feature cache holds features for (a text-only question has none)."""
        return sum(self.images.row(key) is not None for key in self.keys)

    def __getitem__(self, i: int) -> tuple:
        sample = np.asarray(self.tokens[self.offsets[i]: self.offsets[i + 1]]), self.sample_loss_mask(i)
        if self.images is None:
            return sample
        vectors, has = self.images.vectors([self.keys[i]])
        return *sample, vectors[0] if has[0] else None
