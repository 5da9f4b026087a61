"""Checks of a model-side command's inputs and outputs, made before any work is done and before anything is
written: each failure is one InputError naming the option, the path and what was expected.

Kept free of torch at import (the device check imports it when called); numpy is imported by the token-split
check only.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .errors import InputError
from .io import read_npy

# ---------------------------------------------------------------- argparse types (one-line usage errors)


def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None


def positive_int(text: str) -> int:
    n = _number(int, text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def non_negative_int(text: str) -> int:
    n = _number(int, text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return n


def random_seed(text: str) -> int:
    """A seed torch and numpy both take (a 64-bit signed integer >= 0): a larger one would fail deep inside them."""
    n = _number(int, text)
    if not 0 <= n < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
    return n


MAX_TOKENS = 2**20  # a length in tokens (a sequence, a generation) beyond any model's context


def token_count(text: str) -> int:
    """A length in tokens: >= 1 and at most MAX_TOKENS (a larger one would only fail later, as an allocation)."""
    n = _number(int, text)
    if not 1 <= n <= MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"expected a number of tokens in [1, {MAX_TOKENS}], got {text!r}")
    return n


def positive_float(text: str) -> float:
    x = _number(float, text)
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return x


def non_negative_float(text: str) -> float:
    x = _number(float, text)
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return x


def top_p(text: str) -> float:
    x = _number(float, text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability mass in (0, 1], got {text!r}")
    return x


def beta(text: str) -> float:
    x = _number(float, text)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return x


def non_blank(text: str) -> str:
    """Text with something in it: an empty or whitespace-only prompt asks nothing (complete's --prompt)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"got {text!r}, which is blank; expected non-blank text")
    return text


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"key\": \"value\"}}', got {text!r} "
                                         f"({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"key\": \"value\"}}', got {text!r}")
    return value


# ---------------------------------------------------------------- paths


def _kind(path: Path) -> str:
    return "a folder" if path.is_dir() else "a file" if path.exists() else "nothing"


def existing_file(path: str | os.PathLike, flag: str, expected: str) -> Path:
    """`path` must be a readable file: '--prompts X: no such file; expected a JSONL file ...'."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{flag} {path}: no such file; expected {expected}")
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a folder; expected {expected}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{flag} {path}: cannot be read (permission denied); expected {expected}")
    return path


def existing_dir(path: str | os.PathLike, flag: str, expected: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{flag} {path}: no such folder; expected {expected}")
    if not path.is_dir():
        raise InputError(f"{flag} {path}: is a file, not a folder; expected {expected}")
    return path


def existing_path(path: str | os.PathLike, flag: str, expected: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{flag} {path}: no such file or folder; expected {expected}")
    return path


def writable_output(path: str | os.PathLike, flag: str, folder: bool) -> Path:
    """The output `path` (a folder, or a file when not `folder`) can be created or replaced: whatever exists
    there is of the right kind, and its nearest existing ancestor is a writable folder. Nothing is created."""
    path = Path(path)
    what = "folder" if folder else "file"
    if path.exists():
        if folder and not path.is_dir():
            raise InputError(f"{flag} {path}: is a file; expected an output folder (or a path where one can be made)")
        if not folder and path.is_dir():
            raise InputError(f"{flag} {path}: is a folder; expected an output file path")
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():  # a dangling link: mkdir would fail on it
            raise InputError(f"{flag} {path}: {ancestor} is a broken symbolic link; cannot make the output {what}")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, not a folder; cannot make the output {what} "
                         "inside it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: folder {ancestor} is not writable (permission denied or a read-only "
                         f"file system); cannot write the output {what}")
    if path.exists() and folder and not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: folder is not writable (permission denied or a read-only file system)")
    return path


def check_earlier_output(path: str | os.PathLike, mark: str, flag: str, command: str) -> None:
    """An existing --out folder of a command that writes its folder whole is empty, or an earlier output of the
    command (holds its `mark`, config's list of them): writing the folder replaces everything in it, and a failed
    run removes it, so a folder of anything else (a mistyped --out naming one's data) is refused, left as it is."""
    path = Path(path)
    if path.is_dir() and not (path / mark).exists() and any(path.iterdir()):
        raise InputError(f"{flag} {path}: an existing folder that holds no {mark}, so no earlier output of "
                         f"{command}; writing it would replace all it holds: expected a new or empty folder, or one "
                         f"{command} wrote")


# ---------------------------------------------------------------- token splits

SPLIT_FILES = ("tokens.npy", "offsets.npy", "loss_mask.npy", "source_index.npy")
SPLIT_EXPECTED = ("a token split folder written by `llama-adapter tokenize` (such as tokens/alpaca/train, holding "
                  + ", ".join(SPLIT_FILES) + ")")


def token_split(path: str | os.PathLike, flag: str) -> dict:
    """Check a split folder written by `tokenize` without loading it into memory: its arrays exist, load, and
    agree with each other. Returns {"samples", "longest", "max_id"}."""
    import numpy as np

    path = existing_dir(path, flag, SPLIT_EXPECTED)
    missing = [f for f in SPLIT_FILES if not (path / f).is_file()]
    if missing:
        inside = [p.name for p in sorted(path.iterdir()) if p.is_dir() and (p / "tokens.npy").is_file()]
        hint = f"; it holds the splits {inside}: pass one of them, e.g. {path / inside[0]}" if inside else ""
        raise InputError(f"{flag} {path}: not a token split (missing {', '.join(missing)}); expected "
                         f"{SPLIT_EXPECTED}{hint}")
    tokens, offsets, mask, source = (read_npy(path / name, f"{flag} {path}", "tokenize the data again", InputError)
                                     for name in SPLIT_FILES)
    problem = None
    if tokens.ndim != 1 or offsets.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) \
            or not np.issubdtype(offsets.dtype, np.integer):
        problem = "tokens.npy and offsets.npy must be 1-D integer arrays"
    elif len(offsets) < 2:
        problem = "it holds no samples (offsets.npy has fewer than 2 entries)"
    elif offsets[0] != 0 or offsets[-1] != len(tokens) or bool((np.diff(offsets) <= 0).any()):
        problem = (f"offsets.npy does not cut tokens.npy ({len(tokens)} tokens) into non-empty samples (expected "
                   "0 = offsets[0] < offsets[1] < ... = len(tokens))")
    elif mask.shape != tokens.shape:
        problem = f"loss_mask.npy has shape {mask.shape}, tokens.npy {tokens.shape}"
    elif len(source) != len(offsets) - 1:
        problem = f"source_index.npy has {len(source)} entries for {len(offsets) - 1} samples"
    elif int(tokens.min()) < 0:
        problem = f"tokens.npy holds a negative token id {int(tokens.min())}"
    if problem:
        raise InputError(f"{flag} {path}: {problem}; tokenize the data again")
    return {"samples": len(offsets) - 1, "longest": int(np.diff(offsets).max()), "max_id": int(tokens.max())}


def check_token_ids(max_id: int, vocab_size: int, split: str | os.PathLike, flag: str, base: str | os.PathLike) -> None:
    """Every token id of a split must index the base's embedding."""
    if max_id >= vocab_size:
        raise InputError(f"{flag} {split}: holds token id {max_id}, but the base {base} has vocab_size {vocab_size} "
                         f"(ids 0..{vocab_size - 1}); expected data tokenized with the base's own tokenizer")


def check_tokenizer_fits(tokenizer, vocab_size: int, tokenizer_path: str | os.PathLike,
                         base: str | os.PathLike) -> None:
    """The tokenizer's ids (its vocabulary and its special ids) must index the base's embedding."""
    ids = {"vocabulary size": tokenizer.vocab_size - 1, "BOS id": tokenizer.bos_id, "EOS id": tokenizer.eos_id,
           "pad id": tokenizer.pad_id}
    over = {k: v for k, v in ids.items() if v is not None and v >= vocab_size}
    if over:
        found = f"{tokenizer.vocab_size} tokens" if "vocabulary size" in over else \
            ", ".join(f"{k} {v}" for k, v in over.items())
        raise InputError(f"--tokenizer {tokenizer_path}: {found}, but the base {base} has vocab_size {vocab_size} "
                         f"(ids 0..{vocab_size - 1}); expected the tokenizer the base was trained with")


# ---------------------------------------------------------------- devices


def check_device(name: str | None, flag: str = "--device") -> None:
    """A --device that this machine can use: cpu, cuda or cuda:N with CUDA present (mps where it exists)."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"{flag} {name!r}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise InputError(f"{flag} {name}: CUDA is not available on this machine ({why}); use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{flag} {name}: there is no GPU {device.index}; this machine sees "
                             f"{torch.cuda.device_count()} (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{flag} {name}: MPS is not available on this machine; use {flag} cpu")
    elif device.type != "cpu":
        raise InputError(f"{flag} {name}: device type {device.type!r} is not supported; expected cpu, cuda or cuda:N")
