"""Tokenization into flat arrays on disk, and the train/validation split.

Each sample is BOS + prompt + response + EOS, encoded as one string exactly as the paper's code does
(`tokenizer.encode(prompt + output, bos=True, eos=True)`), with the loss masked over the first
len(encode(prompt, bos=True)) positions when `mask_prompt` is set. A split is a folder of numpy arrays
read back memory-mapped:
  tokens.npy (int32, all samples concatenated), offsets.npy (int64, n+1), loss_mask.npy (bool, like
  tokens: True where the token is a training target), source_index.npy (int64: record index in the
  validated file, so every sample traces back to its record).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import atomic_dir, write_json
from ..prompts import alpaca_prompt
from ..tokenizer import Tokenizer
from .scienceqa import qcm_prompt, qcm_target
from .validate import read_jsonl

TRUNCATION = ("truncate", "drop")

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


def encode_samples(
    samples: list[tuple[str, str]], tokenizer: Tokenizer, max_seq_len: int, mask_prompt: bool, truncation: str
) -> Encoded:
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    enc = Encoded([], [], [], [])
    for index, (prompt, response) in enumerate(samples):
        ids = np.asarray(tokenizer.encode(prompt + response, bos=True, eos=True), dtype=np.int32)
        n_prompt = len(tokenizer.encode(prompt, bos=True)) if mask_prompt else 1  # BOS is never a target
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
        enc.source_index.append(index)
    return enc


def split_indices(n: int, rule: dict, split_field: list | None = None) -> dict[str, np.ndarray]:
    """Record indices per split. rule {"by": "seed", "val_size": k or fraction, "seed": s}: a seeded
    permutation; the first k are validation, the rest training, so the two never overlap (the paper's
    code used its first 200 training records as validation). rule {"by": "field"}: the records' own split."""
    if rule["by"] == "seed":
        size = rule["val_size"]
        k = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
        if not 0 < k < n:
            raise ValueError(f"val_size {size} leaves no training or no validation records out of {n}")
        perm = np.random.default_rng(rule["seed"]).permutation(n)
        return {"train": np.sort(perm[k:]), "val": np.sort(perm[:k])}
    if rule["by"] == "field":
        names = sorted({s for s in split_field if s is not None})
        missing = sum(s is None for s in split_field)
        if missing:
            raise ValueError(f"{missing} records have no split; use a seeded split rule instead")
        return {name: np.array([i for i, s in enumerate(split_field) if s == name]) for name in names}
    raise ValueError(f"split rule 'by' must be 'seed' or 'field', got {rule['by']!r}")


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
    max_seq_len: int = 512,
    mask_prompt: bool = True,
    truncation: str = "truncate",
    split: dict | None = None,
) -> dict:
    """Tokenize validated records into out_dir/<split>/ arrays, plus stats.json and lengths.png."""
    records = read_jsonl(Path(validated_dir) / "records.jsonl")
    split = split or ({"by": "field"} if dataset == "scienceqa" else {"by": "seed", "val_size": 200, "seed": 0})
    parts = split_indices(len(records), split, [r.get("split") for r in records])
    to_sample = SAMPLE_FORMATS[dataset]
    stats = {"dataset": dataset, "max_seq_len": max_seq_len, "mask_prompt": mask_prompt, "truncation": truncation,
             "split_rule": split, "records": len(records), "provenance": provenance(Path(validated_dir)),
             "splits": {}}
    if split["by"] == "seed":
        stats["split_note"] = ("validation records are drawn by a seeded permutation and never appear in training "
                               "(the paper's code reused its first 200 training records as validation)")
    lengths = []
    with atomic_dir(Path(out_dir)) as tmp:
        for name, idx in parts.items():
            enc = encode_samples([to_sample(records[i]) for i in idx], tokenizer, max_seq_len, mask_prompt, truncation)
            keys = [str(records[i]["pid"]) for i in idx] if dataset == "scienceqa" else None
            write_split(tmp / name, enc, idx, keys)
            kept = [len(t) for t in enc.tokens]
            stats["splits"][name] = {
                "records": int(len(idx)), "samples": len(enc.tokens), "truncated": enc.truncated,
                "dropped_too_long": enc.dropped_too_long, "dropped_no_response": enc.dropped_no_response,
                "target_tokens": int(sum(m.sum() for m in enc.masks)),
                "length_before_truncation": length_stats(enc.full_lengths, max_seq_len),
                "length": length_stats(kept, max_seq_len),
            }
            lengths += enc.full_lengths
        stats["length_before_truncation"] = length_stats(lengths, max_seq_len)
        write_json(tmp / "stats.json", stats)
        plot_lengths(lengths, max_seq_len, f"{dataset}: tokens per sample (n={len(lengths)})", tmp / "lengths.png")
    return stats


def provenance(validated_dir: Path) -> dict:
    """The fetch.json of the data behind a validated folder (validation.json names the fetched folder)."""
    report = validated_dir / "validation.json"
    if not report.exists():
        return {}
    fetch_json = Path(json.loads(report.read_text())["source"]) / "fetch.json"
    return json.loads(fetch_json.read_text()) if fetch_json.exists() else {}


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


class TokenDataset:
    """One split on disk, memory-mapped: sample i is (tokens int32, loss_mask bool), and with an image feature
    cache (multimodal.ImageFeatures) also its image's features or None, found through keys.json (pids)."""

    def __init__(self, path: Path, images=None):
        path = Path(path)
        self.tokens = np.load(path / "tokens.npy", mmap_mode="r")
        self.loss_mask = np.load(path / "loss_mask.npy", mmap_mode="r")
        self.offsets = np.load(path / "offsets.npy")
        self.source_index = np.load(path / "source_index.npy")
        self.lengths = np.diff(self.offsets)
        keys = path / "keys.json"
        self.keys: list[str] | None = json.loads(keys.read_text()) if keys.exists() else None
        if images is not None and self.keys is None:
            raise ValueError(f"{path}: image features were given but the split has no keys.json (the samples' "
                             "pids); tokenize it again")
        self.images = images

    def __len__(self) -> int:
        return len(self.lengths)

    def sample_loss_mask(self, i: int) -> np.ndarray:
        """Sample i's loss mask (True where the token is a training target)."""
        return np.asarray(self.loss_mask[self.offsets[i]: self.offsets[i + 1]])

    def __getitem__(self, i: int) -> tuple:
        sample = np.asarray(self.tokens[self.offsets[i]: self.offsets[i + 1]]), self.sample_loss_mask(i)
        if self.images is None:
            return sample
        vectors, has = self.images.vectors([self.keys[i]])
        return *sample, vectors[0] if has[0] else None
