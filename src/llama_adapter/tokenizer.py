"""One tokenizer interface over the three vocabulary files this pipeline meets.

LLaMA-1/2 ship a SentencePiece ``.model``, Llama-3 and SmolLM2 a Hugging Face ``tokenizer.json``, and a
GGUF carries its vocabulary inside the model file itself. Training, evaluation and generation only need
ids in and text out, so every format is adapted to :class:`Tokenizer` here and nowhere else.

Two rules keep the backends interchangeable: BOS/EOS are added by :meth:`Tokenizer.encode` itself, never
by a backend's post-processor (a Llama-3 ``tokenizer.json`` would otherwise prepend BOS on its own), and
:meth:`Tokenizer.decode` drops control tokens (BOS, EOS, chat markers) for every backend.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from .errors import InputError, TokenizerError
from .io import read_json_object


class Tokenizer(ABC):
    """Text <-> ids. ``pad_id`` is the file's declared pad id, else ``eos_id``: padded positions are
    always masked out of attention and loss downstream, so the pad id only has to be a valid id.
    ``source``: the file :func:`load_tokenizer` read it from (None for one built otherwise)."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    source: str | None = None

    def __init__(self, bos_id: int, eos_id: int, pad_id: int | None, vocab_size: int) -> None:
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, vocab_size
        self.pad_id = eos_id if pad_id is None else pad_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])  # int() so tensors and numpy scalars work too

    def vocabulary_digest(self) -> str:
        """sha256 of what the ids mean to a model: every id's piece, in id order, and the BOS and EOS ids. The same
        vocabulary gives the same digest from a .model, a tokenizer.json or a GGUF (not the files' bytes); token ids
        made by tokenizers of different digests are not interchangeable. The pad id is no part of it: tokenize
        writes none, and padded positions are masked out wherever they are used."""
        meaning = {"pieces": self.pieces(), "bos_id": self.bos_id, "eos_id": self.eos_id}
        return hashlib.sha256(json.dumps(meaning, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()

    def identity(self) -> dict:
        """What tokenize records of the tokenizer that made a split (stats.json's "tokenizer"), for train to compare
        with the base's own: the vocabulary's digest, and for people the file it came from, its size and special
        ids."""
        return {"source": self.source, "vocabulary_sha256": self.vocabulary_digest(), "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}

    @abstractmethod
    def pieces(self) -> list[str | None]:
        """Each id's piece (its vocabulary entry, as the file spells it), in id order; None for an id with none."""

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...


def recorded_tokenizer(record: dict, path: Path, shown: str, again: str) -> dict | None:
    """The tokenizer a JSON object read from `path` records under "tokenizer" (Tokenizer.identity: tokenize's
    stats.json, of the tokenizer that made a split; train's metrics.json, of the one that made its training split), for
    check_made_with. None where it records none: a file written before that field existed is used as before, unchecked.
    Anything else is refused, naming `shown` (the option that gave it) and the file, with `again` (how to write it
    anew)."""
    recorded = record.get("tokenizer")
    if recorded is None or isinstance(recorded, dict) and isinstance(recorded.get("vocabulary_sha256"), str):
        return recorded
    raise InputError(f"{shown}: {path} records the tokenizer {recorded!r}; expected the object tokenize writes (its "
                     f"source and vocabulary_sha256): {again}")


def check_made_with(recorded: dict, tokenizer: Tokenizer, shown: str, made: str, using: str, then: str) -> None:
    """Token ids made by the tokenizer `recorded` (recorded_tokenizer) mean to a model what they mean to `tokenizer`
    only where the two vocabularies are one (their digests, not their files). Else refused, by the callers before
    anything is written, as "`shown`: `made` <its file> (vocabulary sha256 <12>), not with `using`, <tokenizer's
    file> (vocabulary sha256 <12>): `then`" (then: what that breaks, and what to do instead)."""
    digest = tokenizer.vocabulary_digest()
    if recorded["vocabulary_sha256"] != digest:
        raise InputError(f"{shown}: {made} {recorded.get('source') or 'a tokenizer of no recorded file'} (vocabulary "
                         f"sha256 {recorded['vocabulary_sha256'][:12]}), not with {using}, {tokenizer.source} "
                         f"(vocabulary sha256 {digest[:12]}): {then}")


TOKENIZER_PARAM = "tokenizer"  # the MLflow param naming a run's tokenizer


def tokenizer_param(identity: dict | None) -> dict[str, str]:
    """A run's MLflow params naming the tokenizer of its token ids (an `identity` as Tokenizer.identity gives it): one
    key, TOKENIZER_PARAM, holding its vocabulary's sha256 and its file as a JSON object; none where it is not known
    (data tokenized before tokenize recorded its tokenizer)."""
    if identity is None:
        return {}
    return {TOKENIZER_PARAM: json.dumps({"vocabulary_sha256": identity["vocabulary_sha256"],
                                         "source": identity.get("source")})}


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, backend: sentencepiece.SentencePieceProcessor, bos_id: int, eos_id: int,
                 pad_id: int | None) -> None:
        super().__init__(bos_id, eos_id, pad_id, backend.get_piece_size())
        self.backend = backend

    def pieces(self) -> list[str | None]:
        return [self.backend.id_to_piece(i) for i in range(self.vocab_size)]

    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)  # SentencePiece itself skips CONTROL pieces


class HFTokenizer(Tokenizer):
    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int, eos_id: int, pad_id: int | None) -> None:
        super().__init__(bos_id, eos_id, pad_id, backend.get_vocab_size(with_added_tokens=True))
        self.backend = backend

    def pieces(self) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in range(self.vocab_size)]

    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``.model`` (SentencePiece), a ``tokenizer.json`` (Hugging Face, with ``tokenizer_config.json``
    beside it), a directory holding either, or a ``.gguf`` (its embedded vocabulary). Its ``source`` is the file
    read."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"{path}: no such file or directory")
    if path.is_dir():
        for name, loader in (("tokenizer.json", _load_hf), ("tokenizer.model", _load_sentencepiece)):
            if (path / name).is_file():
                return _guarded(loader, path / name)
        raise TokenizerError(f"{path}: directory holds neither tokenizer.json nor tokenizer.model")
    loader = {".model": _load_sentencepiece, ".json": _load_hf, ".gguf": _load_gguf}.get(path.suffix)
    if loader is None:
        raise TokenizerError(f"{path}: expected a SentencePiece .model, a tokenizer.json, a .gguf, or a "
                             "directory holding tokenizer.json or tokenizer.model")
    return _guarded(loader, path)


def base_tokenizer_path(base: str | os.PathLike) -> Path | None:
    """The tokenizer that comes with a base checkpoint, None where none does: a GGUF carries its vocabulary; a Meta
    or HF folder holds tokenizer.model / tokenizer.json (Meta's LLaMA-1 release keeps tokenizer.model one level up,
    beside the size folders)."""
    base = Path(base)
    if base.suffix == ".gguf" or (base / "tokenizer.json").exists() or (base / "tokenizer.model").exists():
        return base
    if (base.parent / "tokenizer.model").exists():
        return base.parent / "tokenizer.model"
    return None


def _guarded(loader: Callable[[Path], Tokenizer], path: Path) -> Tokenizer:
    # Libraries fail on corrupt files with anything from OSError to IndexError; name the file instead.
    try:
        tokenizer = loader(path)
    except (TokenizerError, ImportError):  # ImportError: a missing package is no fault of the file
        raise
    except Exception as e:
        kind = {".model": "SentencePiece model", ".gguf": "GGUF file"}.get(path.suffix, "tokenizer.json")
        raise TokenizerError(f"{path}: not a readable {kind} ({type(e).__name__}: {e})") from e
    tokenizer.source = str(path)
    return tokenizer


def _load_sentencepiece(path: Path) -> Tokenizer:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise TokenizerError(f"{path}: SentencePiece model declares no BOS/EOS piece")
    return SentencePieceTokenizer(sp, sp.bos_id(), sp.eos_id(), sp.pad_id() if sp.pad_id() >= 0 else None)


def hf_settings(path: str | os.PathLike) -> Path:
    """The tokenizer_config.json beside an HF tokenizer.json, which its BOS and EOS come from (read where it
    exists)."""
    return Path(path).with_name("tokenizer_config.json")


def _load_hf(path: Path) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_file(str(path))
    config_path = hf_settings(path)
    config = read_json_object(config_path, "a tokenizer_config.json (a JSON object naming bos_token and eos_token)",
                              TokenizerError) if config_path.is_file() else {}

    def special_id(key: str) -> int | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is None:
            return None
        if (token_id := backend.token_to_id(token)) is None:
            raise TokenizerError(f"{path}: {key} {token!r} from {config_path.name} is not in the vocabulary")
        return token_id

    bos, eos = special_id("bos_token"), special_id("eos_token")
    if bos is None or eos is None:
        raise TokenizerError(f"{path}: cannot determine BOS/EOS; expected bos_token and eos_token in "
                             f"{config_path}")
    return HFTokenizer(backend, bos, eos, special_id("pad_token"))


def _gguf_vocab(path: Path) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` fields, keyed without that prefix."""
    vocab = {}
    for key, field in gguf.GGUFReader(path).fields.items():
        if key.startswith("tokenizer.ggml."):
            # Decoded from parts/data rather than ReaderField.contents(), which older gguf releases lack.
            values = [field.parts[i] for i in field.data]
            if field.types[-1] == gguf.GGUFValueType.STRING:
                values = [bytes(v).decode("utf-8") for v in values]
            else:
                values = np.concatenate(values).tolist()
            vocab[key.removeprefix("tokenizer.ggml.")] = (
                values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0])
    return vocab


def _load_gguf(path: Path) -> Tokenizer:
    vocab = _gguf_vocab(path)

    def need(key: str) -> Any:
        if key not in vocab:
            raise TokenizerError(f"{path}: GGUF has no tokenizer.ggml.{key}; expected an embedded vocabulary")
        return vocab[key]

    model, tokens, types = need("model"), need("tokens"), need("token_type")
    ids = need("bos_token_id"), need("eos_token_id"), vocab.get("padding_token_id")
    if model == "gpt2":
        backend = _gguf_bpe(path, tokens, types, need("merges"), vocab.get("pre", "default"))
        return HFTokenizer(backend, *ids)
    if model == "llama":
        sp = _gguf_sentencepiece(tokens, types, need("scores"), vocab.get("add_space_prefix", True))
        return SentencePieceTokenizer(sp, *ids)
    raise TokenizerError(f"{path}: GGUF tokenizer model {model!r} is unsupported; expected 'gpt2' or 'llama'")


# Llama-3's split regex, as in its tokenizer.json and llama.cpp's "llama-bpe" pre-tokenizer.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _digits_then_bytes() -> pre_tokenizers.PreTokenizer:
    # What SmolLM2's (StarCoder-derived) tokenizer.json uses: every digit is its own word.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


# Keyed by llama.cpp's tokenizer.ggml.pre names.
_BPE_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "smollm": _digits_then_bytes,
    "starcoder": _digits_then_bytes,
    "refact": _digits_then_bytes,
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "llama-bpe": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def _gguf_bpe(path: Path, tokens: list[str], types: list[int], merges: list[str],
              pre: str) -> tokenizers.Tokenizer:
    if pre not in _BPE_PRE_TOKENIZERS:
        raise TokenizerError(f"{path}: GGUF pre-tokenizer {pre!r} is unsupported; supported: "
                             f"{', '.join(sorted(_BPE_PRE_TOKENIZERS))}")
    # Llama-3 matches whole vocabulary words before merging, as llama.cpp does for "llama-bpe".
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges],
                     ignore_merges=pre == "llama-bpe")
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _BPE_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) must encode atomically and vanish on decode, as HF's special
    # added tokens do; user-defined ones encode atomically but are ordinary text.
    backend.add_special_tokens([t for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL])
    backend.add_tokens([t for t, k in zip(tokens, types) if k == gguf.TokenType.USER_DEFINED])
    return backend


def _gguf_sentencepiece(tokens: list[str], types: list[int], scores: list[float],
                        add_space_prefix: bool) -> sentencepiece.SentencePieceProcessor:
    try:  # imported here: it needs protobuf, which only this path uses
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise ImportError(f"reading a GGUF 'llama' vocabulary needs protobuf ({e})") from e

    piece_type = {gguf.TokenType.NORMAL: pb.ModelProto.SentencePiece.NORMAL,
                  gguf.TokenType.UNKNOWN: pb.ModelProto.SentencePiece.UNKNOWN,
                  gguf.TokenType.CONTROL: pb.ModelProto.SentencePiece.CONTROL,
                  gguf.TokenType.USER_DEFINED: pb.ModelProto.SentencePiece.USER_DEFINED,
                  gguf.TokenType.UNUSED: pb.ModelProto.SentencePiece.UNUSED,
                  gguf.TokenType.BYTE: pb.ModelProto.SentencePiece.BYTE}
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = True
    # LLaMA's normalizer: no rewriting beyond the leading space and the ▁ escape.
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = add_space_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, kind, score in zip(tokens, types, scores, strict=True):
        proto.pieces.add(piece=token, score=score, type=piece_type[kind])
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


def train_sentencepiece(corpus: Path, out: Path, vocab_size: int) -> Path:
    """Train a LLaMA-style SentencePiece BPE model (unk 0, BOS 1, EOS 2, byte fallback) on a JSONL corpus
    ({"text": document} per line; the trainer sees each line of each document).

    Single-threaded and fed from memory (the trainer records input paths in the model otherwise), so the
    same corpus always gives the same bytes. Used for the demo base model, which has no tokenizer of its own.
    """
    import io as _io

    from .data.demo import read_corpus
    from .io import atomic_path

    lines = [ln for doc in read_corpus(corpus) for ln in doc.splitlines() if ln.strip()]
    model = _io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        )
    except RuntimeError as e:  # SentencePiece's checks: "INTERNAL: file.cc(line) [condition] what went wrong"
        reason = " ".join(str(e).split("] ", 1)[-1].split())
        raise TokenizerError(f"--vocab-size {vocab_size} with corpus {corpus}: SentencePiece cannot train ({reason})"
                             ) from None
    with atomic_path(Path(out)) as tmp:
        tmp.write_bytes(model.getvalue())
    return Path(out)
