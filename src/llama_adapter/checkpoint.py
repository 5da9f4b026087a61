"""Base checkpoints in, adapters in and out.

Base weights come in three layouts, all mapped onto Meta's parameter names:
- Meta: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank, merged here;
- Hugging Face: `config.json` + `model*.safetensors`, with q/k rows permuted back to Meta's RoPE layout;
- GGUF (architecture llama), dequantized to float through the `gguf` package.

The model is built on the meta device and the loaded tensors are assigned into it, so a checkpoint is
never held twice in memory. Adapters are safetensors files with only the trainable tensors and a JSON
header naming the base model and the adapter configuration; the paper's original-release `.pth` and PEFT's
AdaptionPrompt (its prompts and per-layer gates) are read into the same tensors, and a PEFT LoRA is merged.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from .adapter import AdaptedTransformer
from .config import (
    FULL_WEIGHTS,
    PEFT_CONFIG,
    WEIGHTS,
    AdapterArgs,
    ModelArgs,
    is_original_release,
    is_positive_finite,
    is_positive_int,
)
from .data.paths import is_file_name
from .errors import CheckpointError, NonFiniteValues
from .io import DuplicateKey, atomic_path, no_duplicate_keys, read_json_object, save_safetensors
from .model import Transformer
from .quantize import int8_format

ADAPTER_FORMAT = "llama-adapter/1"
FULL_FORMAT = "llama-adapter/full/1"
# Buffers some checkpoints carry that our model recomputes (LLaMA-1's rope.freqs, old HF inv_freq).
RECOMPUTED_BUFFERS = re.compile(r"^rope\.freqs$|.*\.rotary_emb\.inv_freq$")
# A PEFT adapter folder: its settings (PEFT_CONFIG), whose peft_type says what it is (LORA, ADAPTION_PROMPT, ...),
# and weights.
# PEFT writes safetensors, or a torch pickle with save_pretrained(safe_serialization=False).
PEFT_WEIGHTS = (WEIGHTS["lora"], "adapter_model.bin")
# PEFT's AdaptionPrompt on Hugging Face's LLaMA (or Mistral), in each adapted layer: the prompts
# (1, adapter_len, hidden) and the gate (1,).
PEFT_PROMPT = "base_model.model.model.layers.{i}.self_attn.adaption_prompt"
PEFT_GATE = "base_model.model.model.layers.{i}.self_attn.adaption_gate"


# ---------------------------------------------------------------- file readers and writers


def must_be_file(path: Path, expected: str) -> None:
    """A missing path or a folder where a file is expected is named as such (not as a corrupted file)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; expected {expected}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; expected {expected}")


def read_torch_file(path: Path) -> dict[str, Tensor]:
    must_be_file(path, "a PyTorch checkpoint (.pth)")
    try:
        # mmap (no copy in memory) needs torch's zip format; its pre-1.6 format is read whole.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError... for damaged files
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e}); "
                              "the file may be truncated or corrupted") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors, got {type(state).__name__}")
    return state


def read_safetensors_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    must_be_file(path, "a .safetensors file")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e}); "
                              "the file may be truncated or corrupted") from e


def read_peft_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header) of a PEFT adapter's weights file: safetensors, or the torch pickle save_pretrained writes
    with safe_serialization=False (adapter_model.bin, no header)."""
    return (read_torch_file(path), {}) if path.suffix == ".bin" else read_safetensors_file(path)


def read_config(path: Path) -> dict:
    """A checkpoint's JSON config (params.json, config.json, an index); any fault is a CheckpointError."""
    return read_json_object(path, "a checkpoint's JSON config", CheckpointError)


# ---------------------------------------------------------------- checks


def listed(items: list[str], limit: int = 20) -> str:
    """The first `limit` items, comma-separated, and ' ...' where there are more: an error stays readable."""
    return ", ".join(items[:limit]) + (" ..." if len(items) > limit else "")


def value_range(t: Tensor) -> tuple[Tensor, Tensor]:
    """The least and greatest values of the floating-point `t`: NaN for both where any value is NaN, and an infinity is
    the one or the other. That reduction copies nothing, where torch.isfinite(t).all() builds |t| and three boolean
    tensors (2.5 times a bf16 tensor's bytes) and runs 25 to 45 times slower on a CPU."""
    if t.dtype.itemsize == 1:  # aminmax has no kernel for 8-bit floats: widened, one tensor at a time
        t = t.float()
    return torch.aminmax(t)


def fits(least: Tensor, greatest: Tensor, dtype: torch.dtype) -> bool:
    """Whether a tensor of these extremes (value_range's) casts into `dtype` without an infinity: casting is
    monotonic, so the extremes overflow where any value does."""
    return bool(least.to(dtype).isfinite() and greatest.to(dtype).isfinite())


def non_finite_counts(t: Tensor) -> str:
    """How many NaN and infinite values `t` holds: counted only for a tensor value_range found to hold some."""
    return f"{int(t.isnan().sum())} NaN and {int(t.isinf().sum())} infinite of {t.numel()} values"


def check_state(expected: dict[str, torch.Size], state: dict[str, Tensor], source: str,
                origin: dict[str, str] | None = None, dtypes: dict[str, torch.dtype] | None = None,
                cast_to: torch.dtype | None = None) -> None:
    """Raise one error listing every missing, unexpected, mis-shaped and not floating-point tensor; for a state that
    has none, one listing every tensor holding a NaN or an infinity (NonFiniteValues), then one listing every tensor
    holding a value beyond the range of `cast_to`, the dtype the caller casts the tensors into.

    `origin` maps a tensor's name in `state` to where it was read ('file: its name there', the file alone where the
    name is the same): a checkpoint of another layout (Hugging Face, GGUF) is checked under Meta's names, which the
    user finds in none of its files. `dtypes`: the one dtype a tensor must have, where it is loaded as it is (the
    others need only be floating point, cast to the model's)."""
    origin = origin or {}
    dtypes = dtypes or {}

    def where(k: str) -> str:
        return f" ({origin[k]})" if k in origin else ""

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: {tuple(state[k].shape)} (expected {tuple(expected[k])}){where(k)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k]
    )
    # Weights are floating point: an integer or boolean tensor (a damaged or foreign file) would be cast silently.
    not_float = sorted(f"{k}: {state[k].dtype}{where(k)}"
                       for k in set(expected) & set(state) - set(dtypes) if not state[k].is_floating_point())
    other_dtype = sorted(f"{k}: {state[k].dtype} (expected {dtypes[k]}){where(k)}"
                         for k in set(dtypes) & set(state) if state[k].dtype != dtypes[k])
    problems = [f"{label} ({len(items)}): {listed(items)}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                                     ("not floating point", not_float), ("of another dtype", other_dtype))
                if items]
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    # A NaN or an infinity (a damaged download, a broken conversion) loads as any value does and shows only later, as
    # NaN losses or garbage generations; so does a finite value beyond the range of the dtype it is cast into (an fp32
    # weight above 65504 loaded as fp16 becomes an infinity). Every base, adapter and LoRA passes here (a GGUF
    # dequantized), checked one tensor at a time with no copy (but an 8-bit one's): one aminmax tells both, the
    # extremes cast as the tensor will be (casting is monotonic: they overflow where any value does).
    non_finite, beyond = [], []
    for k in sorted(state):
        least, greatest = value_range(state[k])
        if not (least.isfinite() and greatest.isfinite()):
            non_finite.append(f"{k}: {non_finite_counts(state[k])}{where(k)}")
        elif cast_to is not None and not fits(least, greatest, cast_to):
            beyond.append(f"{k}: values from {least.item():g} to {greatest.item():g}{where(k)}")
    if non_finite:
        raise NonFiniteValues(f"{source}: tensors holding NaN or infinity ({len(non_finite)}): {listed(non_finite)}; "
                              "expected finite values (a damaged download or a broken conversion?)", non_finite)
    if beyond:
        raise CheckpointError(f"{source}: tensors holding values beyond the range of {cast_to} "
                              f"(±{torch.finfo(cast_to).max:g}), which would load as infinity ({len(beyond)}): "
                              f"{listed(beyond)}; expected a dtype that holds them (bfloat16 or float32)")


# ---------------------------------------------------------------- Meta layout


def meta_model_args(params: dict, source: str, vocab_size: int) -> ModelArgs:
    if not isinstance(params, dict):
        raise CheckpointError(f"{source}: expected a JSON object of model settings (dim, n_layers, n_heads, ...), "
                              f"got {type(params).__name__}")
    params = dict(params)
    if params.pop("use_scaled_rope", False):
        raise CheckpointError(f"{source}: Llama 3.1 scaled RoPE (use_scaled_rope) is not supported")
    if params.get("vocab_size", -1) == -1:  # LLaMA-1 leaves it to the tokenizer
        params["vocab_size"] = vocab_size
    try:
        return ModelArgs.from_dict(params, source)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: {e}" if source not in str(e) else str(e)) from None


def same_values(a: Tensor, b: Tensor) -> bool:
    """torch.equal, but with a NaN equal to a NaN in the same place: copies of a tensor damaged alike are no different
    copies, and check_state names their NaN. The slower comparison runs only where torch.equal finds a difference."""
    return torch.equal(a, b) or (a.shape == b.shape and a.dtype == b.dtype  # allclose broadcasts, refuses mixed dtypes
                                 and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def merge_shards(name: str, shards: list[Tensor], shape: torch.Size) -> Tensor:
    """Merge one tensor's model-parallel shards by their shapes: the one dimension on which a shard is
    1/n of the full tensor is the dimension it was split on (rows for wq/wk/wv/w1/w3/output, columns for
    wo/w2 and LLaMA-1/2's tok_embeddings); a tensor whose shards all have the full shape is replicated."""
    first = shards[0]
    if first.shape == shape:
        if any(not same_values(first, s) for s in shards[1:]):
            raise CheckpointError(f"{name}: replicated tensor differs between model-parallel shards")
        return first
    n = len(shards)
    for d in range(len(shape)):
        split = list(shape)
        split[d] //= n
        if split[d] * n == shape[d] and all(list(s.shape) == split for s in shards):
            return torch.cat(shards, dim=d)
    raise CheckpointError(f"{name}: shards of shape {[tuple(s.shape) for s in shards]} do not form {tuple(shape)}")


# Meta's model-parallel shard: consolidated.<rank>.pth, the rank written with two digits (more past 99). The one
# definition of a shard for reading, writing and recognising the layout: a glob on consolidated.*.pth also takes a
# stray consolidated.01.pth.bak.pth or consolidated.final.pth, which are no shards.
META_SHARD = re.compile(r"consolidated\.(\d{2,})\.pth")


def meta_shards(path: Path) -> list[tuple[int, Path]]:
    """(rank, file) of each Meta shard in the folder `path`, by rank; other files are left out."""
    return sorted((int(m[1]), p) for p in path.iterdir() if (m := META_SHARD.fullmatch(p.name)))


def read_meta_checkpoint(path: Path) -> tuple[ModelArgs, list[dict[str, Tensor]], dict[str, str]]:
    """params.json, the per-rank shards, still unmerged (merging needs the model's shapes), and the file each tensor
    was read from, for check_state: none where there are several shards (a merged tensor comes from them all, and
    check_state's source names their folder)."""
    shards = meta_shards(path)
    ranks = [r for r, _ in shards]
    shard_paths = [p for _, p in shards]
    # Shards are merged in rank order, so a lost or doubled rank would misplace the others: ranks 00 to N-1, each once.
    if ranks != list(range(len(ranks))):
        # Only the ranks shown are made: a stray consolidated.20240101.pth (a backup named by its date) lacks 20
        # million, whose strings took 1.4 GB and 6 s to show 20.
        n_missing = ranks[-1] + 1 - len(set(ranks))
        missing = [f"{r:02d}" for r in itertools.islice((r for r in range(ranks[-1]) if r not in ranks), 21)]
        repeated = [f"{r:02d}" for r in sorted({r for r in ranks if ranks.count(r) > 1})]
        problems = [f"{label} ({n}): {listed(items)}"
                    for label, n, items in (("missing ranks", n_missing, missing),
                                            ("ranks in more than one file", len(repeated), repeated))
                    if items]
        raise CheckpointError(f"{path}: expected one consolidated.NN.pth for each model-parallel rank 00 to "
                              f"{ranks[-1]:02d}: {'; '.join(problems)}")
    if not shard_paths and (path / FULL_WEIGHTS).is_file():  # a full fine-tune of a Meta-layout base (save_full)
        shard_paths = [path / FULL_WEIGHTS]
    if not shard_paths:
        raise CheckpointError(f"{path}: no consolidated.NN.pth files (or {FULL_WEIGHTS}) beside params.json")
    shards = [read_safetensors_file(p)[0] if p.suffix == ".safetensors" else read_torch_file(p) for p in shard_paths]
    for p, s in zip(shard_paths, shards):
        for k in [k for k in s if RECOMPUTED_BUFFERS.match(k)]:
            del s[k]
        if set(s) != set(shards[0]):
            diff = sorted(set(s) ^ set(shards[0]))
            raise CheckpointError(f"{p}: holds other tensor names than {shard_paths[0].name} ({len(diff)}): "
                                  f"{listed(diff)}")
    # params.json's vocab_size -1 (LLaMA-1/2) leaves it to the weights: the output's rows over the shards, or the
    # embedding's rows (those releases split it by columns) where the output is missing (check_state names it)
    vocab = (sum(s["output.weight"].shape[0] for s in shards) if "output.weight" in shards[0]
             else shards[0]["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in shards[0] else -1)
    origin = {k: shard_paths[0].name for k in shards[0]} if len(shards) == 1 else {}
    return meta_model_args(read_config(path / "params.json"), str(path / "params.json"), vocab), shards, origin


def merge_meta_shards(shards: list[dict[str, Tensor]], expected: dict[str, torch.Size]) -> dict[str, Tensor]:
    if len(shards) == 1:
        return shards[0]
    return {k: merge_shards(k, [s[k] for s in shards], expected.get(k, shards[0][k].shape)) for k in shards[0]}


# Meta's model-parallel split dimension per parameter (fairscale Column/RowParallelLinear, ParallelEmbedding).
META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def save_meta_checkpoint(model: Transformer, path: Path, n_shards: int = 1) -> None:
    """Write the base weights as Meta's `params.json` + `consolidated.NN.pth` (n_shards model-parallel ranks),
    removing the shards of other ranks an earlier save left in `path` (a reader takes every one it finds)."""
    path = Path(path)
    state = {k: v for k, v in model.state_dict().items() if k in model.base_state_keys()}
    for r in range(n_shards):
        shard = {}
        for k, v in state.items():
            d = META_SPLIT_DIM.get(k.split(".")[-2])
            shard[k] = v.chunk(n_shards, dim=d)[r].clone() if d is not None else v.clone()
        # Through a file object: given a path, torch.save names the zip's records after the file, here the random
        # partial name, and the same weights would differ in their bytes from one save to the next.
        with atomic_path(path / f"consolidated.{r:02d}.pth") as tmp, open(tmp, "wb") as f:
            torch.save(shard, f)
    written = {f"consolidated.{r:02d}.pth" for r in range(n_shards)}
    for _, stale in meta_shards(path):  # an earlier save's other ranks
        if stale.name not in written:
            stale.unlink()
    with atomic_path(path / "params.json") as tmp:
        tmp.write_text(json.dumps(model.args.to_dict(), indent=2) + "\n")


# ---------------------------------------------------------------- Hugging Face layout


# Each tensor's name in Meta's layout, Hugging Face's and GGUF's ({i}: the layer index).
TENSOR_NAMES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "output_norm.weight"),
    ("output.weight", "lm_head.weight", "output.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
]


def layer_pattern(template: str) -> str:
    """The regex of a tensor name template, its layer index ({i}) captured as group 1."""
    return re.escape(template).replace(r"\{i\}", r"(\d+)")


def name_patterns(column: int) -> list[tuple[str, str]]:
    """(regex of a foreign name, Meta name template) for one column of TENSOR_NAMES."""
    return [(layer_pattern(row[column]), row[0].replace("{i}", r"\1")) for row in TENSOR_NAMES]


HF_NAMES, GGUF_NAMES = name_patterns(1), name_patterns(2)
# Each projection of a block (wq ... w3), read off TENSOR_NAMES: (its part of a Meta block, its module in a Hugging
# Face layer), e.g. wq: (attention, self_attn.q_proj).
PROJECTIONS = {
    meta[2]: (meta[1], hf[1])
    for meta_name, hf_name, _ in TENSOR_NAMES
    if (meta := re.fullmatch(r"layers\.\{i\}\.(\w+)\.(\w+)\.weight", meta_name))
    and (hf := re.fullmatch(r"model\.layers\.\{i\}\.(\w+\.\w+)\.weight", hf_name))
}


def to_meta_name(name: str, table: list[tuple[str, str]], fmt: str) -> str:
    """Meta's name for a foreign tensor name. An unknown name is kept, marked with its format, so the
    shape check reports it as unexpected rather than it being dropped."""
    for pattern, repl in table:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return f"({fmt}) {name}"




def hf_model_args(config: dict, source: str) -> ModelArgs:
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: expected a JSON object (a Hugging Face model config), "
                              f"got {type(config).__name__}")
    if config.get("model_type") not in ("llama", "mistral"):
        raise CheckpointError(f"{source}: model_type {config.get('model_type')!r} is not a LLaMA architecture")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"{source}: {key}=true is not supported (LLaMA has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r} is not LLaMA's silu")
    # transformers >= 5 keeps RoPE settings in rope_parameters, older versions in rope_theta/rope_scaling.
    rope_source = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope = config.get(rope_source) or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: {rope_source} {rope!r}; expected a JSON object (its rope_type, rope_theta, "
                              "...)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: RoPE type {rope_type!r} ({rope}) is not supported, only plain RoPE")
    rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_key = "rope_theta" if "rope_theta" in config or "rope_theta" not in rope else f"{rope_source}.rope_theta"
    head_dim = config.get("head_dim")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if k not in config]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {', '.join(missing)}; expected a LLaMA model config")
    try:
        args = hf_args(config, rope_theta)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        field, _, rest = str(e).partition(" ")  # ModelArgs names its own field: the key of config.json instead
        typed = field in HF_KEYS and ": expected" in rest  # sliding_window names itself already
        key = rope_key if field == "rope_theta" else HF_KEYS.get(field)
        raise CheckpointError(f"{source}: {key} {rest}" if typed else f"{source}: {e}") from None
    if head_dim is not None and head_dim != args.head_dim:
        raise CheckpointError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads")
    return args


# The config.json key of each ModelArgs field hf_args fills from one.
HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
           "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "max_seq_len": "max_position_embeddings",
           "tie_embeddings": "tie_word_embeddings"}


def hf_args(config: dict, rope_theta) -> ModelArgs:
    # Mistral's sliding window (Mistral-7B-v0.1: 4096 of 32,768 positions) lets a token see the last W tokens only.
    # Up to W tokens that is full causal attention, which this model computes: its positions stop there, and
    # generation and training refuse to go past them.
    positions = config.get("max_position_embeddings", 2048)
    if (window := config.get("sliding_window")) is not None:
        if type(window) is not int or window < 1:
            raise ValueError(f"sliding_window {window!r}: expected a positive integer (or null: none)")
        positions = min(positions, window) if type(positions) is int else positions  # ModelArgs names a bad one
    return ModelArgs(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"), vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta, max_seq_len=positions,
        # null is transformers' default too: not tied, as an absent key
        tie_embeddings=False if config.get("tie_word_embeddings") is None else config["tie_word_embeddings"],
    )


def permute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """HF's conversion permutation, the inverse of unpermute_rope_rows: [h, hd/2, 2] -> [h, 2, hd/2]."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: ModelArgs) -> dict:
    """A Hugging Face LlamaConfig of `args` (what hf_model_args reads back)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
            "intermediate_size": args.hidden_dim, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


def unpermute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """Undo HF's conversion permutation: HF stores each head's rotary pairs as two halves
    (rotate_half), Meta interleaves them. (n_heads*hd, dim) rows: [h, 2, hd/2] -> [h, hd/2, 2]."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_weight_files(path: Path) -> list[str]:
    """The names of the safetensors files an HF folder's weights are in: those its index maps tensors to, else the
    model*.safetensors it holds (hub.py fetches exactly these)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_config(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' of tensor name -> file")
        if odd := [name for name in weight_map.values() if not isinstance(name, str)]:
            raise CheckpointError(f"{index}: weight_map names {odd[:5]}; expected file names (strings)")
        return sorted(set(weight_map.values()))
    return [p.name for p in sorted(path.glob("model*.safetensors"))]


def read_hf_checkpoint(path: Path) -> tuple[ModelArgs, dict[str, Tensor], dict[str, str]]:
    """(args, tensors under Meta's names, each Meta name's origin 'file: its Hugging Face name' for check_state)."""
    args = hf_model_args(read_config(path / "config.json"), str(path / "config.json"))
    files = hf_weight_files(path)
    if not files:
        raise CheckpointError(f"{path}: no model*.safetensors files beside config.json")
    # The index is the checkpoint's word, as untrusted as its tensors: a name leaving the folder is refused (hub.py
    # refuses the same names before it downloads).
    if odd := [name for name in files if not is_file_name(name)]:
        raise CheckpointError(f"{path / 'model.safetensors.index.json'}: weight_map names {odd[:5]}, which are no "
                              f"files of {path} (a path leaving the folder is refused); expected the names of "
                              "safetensors files beside it")
    state: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    found_in: dict[str, str] = {}  # each tensor's file: one checkpoint holds a tensor once
    for f in files:
        tensors, _ = read_safetensors_file(path / f)
        for name, t in tensors.items():
            if RECOMPUTED_BUFFERS.match(name):
                continue
            if name in found_in:
                raise CheckpointError(f"{path / f}: holds {name}, which {found_in[name]} holds too; expected each "
                                      "tensor in one file (a stale file of another save beside these?)")
            found_in[name] = f
            meta = to_meta_name(name, HF_NAMES, "hf")
            origin[meta] = f"{f}: {name}"
            # q/k rows back to Meta's order; one of another shape is left as it is, for check_state to list
            heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}.get(
                meta.split(".", 2)[-1])
            if heads is not None and t.shape == (heads * args.head_dim, args.dim):
                t = unpermute_rope_rows(t, heads)
            state[meta] = t
    return args, state, origin


# ---------------------------------------------------------------- GGUF



def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as GGUF ({type(e).__name__}: {e}); "
                              "the file may be truncated or corrupted") from e


def open_llama_gguf(path: Path):
    """(reader, field) of a LLaMA GGUF file: field(key, default) is a metadata value, the default where it is
    absent, and an error naming the file and key where it is absent without one. Another architecture is refused."""
    reader = open_gguf(path)

    def field(key: str, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
            return default
        return f.contents()

    if (arch := field("general.architecture")) != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not 'llama'")
    return reader, field


def read_gguf_checkpoint(path: Path) -> tuple[ModelArgs, dict[str, Tensor], dict[str, str]]:
    """(args, tensors under Meta's names, each Meta name's origin 'file: its GGUF name' for check_state).
    llama.cpp's converter already permutes q/k rows into Meta's interleaved RoPE layout."""
    with readable_gguf(path):
        return _gguf_checkpoint(path, *open_llama_gguf(path))


@contextmanager
def readable_gguf(path: Path):
    """Any fault reading the GGUF file at `path` as a CheckpointError naming it: a damaged file may open but hold
    metadata of the wrong type or tensors of the wrong size."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable LLaMA GGUF ({type(e).__name__}: {e}); "
                              "the file may be truncated or corrupted") from e


def _gguf_checkpoint(path: Path, reader, field) -> tuple[ModelArgs, dict[str, Tensor], dict[str, str]]:
    import gguf

    state: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for t in reader.tensors:
        name = to_meta_name(t.name, GGUF_NAMES, "gguf")
        origin[name] = f"{path.name}: {t.name}"
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dimensions innermost first
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be dequantized: {e}") from e
        state[name] = torch.from_numpy(values.astype("float32").reshape(shape))  # a copy: the file is mmapped read-only
    n_heads = field("llama.attention.head_count")
    dim = field("llama.embedding_length")
    if field("llama.rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise CheckpointError(f"{path}: partial RoPE (rope.dimension_count != head dim) is not supported")
    # llama.cpp's RoPE scaling (linear, YaRN, ...): this model rotates by plain RoPE only, as hf_model_args refuses.
    scaling = field("llama.rope.scaling.type", "none")
    factor = field("llama.rope.scaling.factor", 1.0)
    if scaling != "none" or factor not in (0.0, 1.0):  # llama.cpp reads a factor of 0 as none
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} (llama.rope.scaling.type, factor {factor}) is not "
                              "supported, only plain RoPE")
    args = ModelArgs(
        dim=dim, n_layers=field("llama.block_count"), n_heads=n_heads,
        n_kv_heads=field("llama.attention.head_count_kv", n_heads),
        # without token_embd (check_state names it missing), the output's rows, else any size
        vocab_size=next((state[k].shape[0] for k in ("tok_embeddings.weight", "output.weight") if k in state), 1),
        hidden_dim=field("llama.feed_forward_length"),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        max_seq_len=field("llama.context_length", 2048),
        tie_embeddings="output.weight" not in state,
    )
    return args, state, origin


# ---------------------------------------------------------------- building a model


def checkpoint_format(path: Path) -> str:
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file or folder; expected a base checkpoint (a folder with params.json + "
            "consolidated.NN.pth, a folder with config.json + model*.safetensors, or a .gguf file)")
    # Mistral's repositories hold Hugging Face's layout beside a params.json of their own (and weights not ours to
    # read): params.json means Meta's layout where consolidated.NN.pth lie beside it, or no config.json does.
    if path.is_dir() and (path / "params.json").exists() and (
            any(meta_shards(path)) or not (path / "config.json").exists()):
        return "meta"
    if path.is_dir() and (path / "config.json").exists():
        return "hf"
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    raise CheckpointError(
        f"{path}: not a recognised checkpoint (expected a directory with params.json + consolidated.NN.pth, "
        "a directory with config.json + model*.safetensors, or a .gguf file)"
    )


def base_layers(path: Path) -> int:
    """How many blocks the base checkpoint at `path` has, read from its settings alone (params.json, config.json,
    the GGUF header), not its weights: what a plan checks an adapter's layers against before anything trains."""
    fmt = checkpoint_format(path)
    if fmt == "meta":
        return meta_model_args(read_config(path / "params.json"), str(path / "params.json"), vocab_size=1).n_layers
    if fmt == "hf":
        return hf_model_args(read_config(path / "config.json"), str(path / "config.json")).n_layers
    with readable_gguf(path):
        layers = open_llama_gguf(path)[1]("llama.block_count")
    if not isinstance(layers, int) or layers < 1:
        raise CheckpointError(f"{path}: GGUF llama.block_count {layers!r}; expected a positive integer")
    return layers


SMALL_MODEL = 50_000_000  # parameters


def load_base(
    path: str | os.PathLike,
    adapter: AdapterArgs | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AdaptedTransformer:
    """Build the model from a base checkpoint; a fresh adapter (if `adapter` is given) is initialised in fp32."""
    path = Path(path)
    fmt = checkpoint_format(path)
    if fmt == "meta":
        args, shards, origin = read_meta_checkpoint(path)
    else:
        args, state, origin = (read_hf_checkpoint if fmt == "hf" else read_gguf_checkpoint)(path)
    # Big models are built on the meta device so that no weight is held twice; but the meta device's first
    # random init costs seconds of one-time setup, more than building a small model for real.
    if adapter is not None and adapter.adapter_layers > args.n_layers:
        raise CheckpointError(f"adapter_layers {adapter.adapter_layers} exceeds the {args.n_layers} layers of the base "
                              f"{path}; expected --adapter-layers between 1 and {args.n_layers}")
    with torch.device("meta" if args.parameter_count() > SMALL_MODEL else "cpu"):
        model = AdaptedTransformer(args, adapter)
    expected = model.base_state_keys()
    if fmt == "meta":
        try:
            state = merge_meta_shards(shards, expected)
        except CheckpointError as e:
            raise CheckpointError(f"{path}, {len(shards)} model-parallel shards (consolidated.NN.pth): {e}") from None
    if args.tie_embeddings and "output.weight" in state:
        if not same_values(state["output.weight"], state.get("tok_embeddings.weight", torch.empty(0))):
            raise CheckpointError(f"{path}: tie_embeddings is set but output.weight differs from tok_embeddings")
        state = {k: v for k, v in state.items() if k != "output.weight"}
    check_state(expected, state, f"{fmt} checkpoint {path}", origin, cast_to=dtype)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.set_adapter(adapter, device)
    return model


# ---------------------------------------------------------------- adapters


def save_adapter(model: AdaptedTransformer, path: str | os.PathLike, base_model: str) -> None:
    """Write only the trainable tensors (fp32) and a header: format, base model name and shape, adapter config."""
    if model.adapter is None:
        raise ValueError("the model has no adapter to save")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.adapter_state_dict().items()}
    metadata = {
        "format": ADAPTER_FORMAT,
        "base_model": base_model,
        "base_args": json.dumps(model.args.to_dict(), separators=(",", ":")),
        "adapter_args": json.dumps(model.adapter.to_dict(), separators=(",", ":")),
    }
    with atomic_path(Path(path)) as tmp:
        save_safetensors(tensors, tmp, metadata=metadata)


def save_full(model: Transformer, folder: str | os.PathLike, base_model: str, state: dict | None = None) -> None:
    """Write every base weight (fp32) as a checkpoint folder in the layout of the base it was tuned from: Meta's
    names beside params.json for a Meta base, else Hugging Face's (config.json + model.safetensors, q/k rows
    permuted), which transformers also loads. `load_base` reads either back. `state`: the weights by name, whole,
    where the model holds only shards of them (FSDP)."""
    folder = Path(folder)
    source = model.state_dict() if state is None else state
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in source.items()
             if k in model.base_state_keys()}
    base = Path(base_model)
    meta = base.is_dir() and checkpoint_format(base) == "meta"
    if not meta:
        hf = {}
        for k, v in state.items():
            if k.endswith("attention.wq.weight"):
                v = permute_rope_rows(v, model.args.n_heads).contiguous()
            elif k.endswith("attention.wk.weight"):
                v = permute_rope_rows(v, model.args.n_kv_heads).contiguous()
            hf[to_foreign_name(k, 1)] = v
        state = hf
    metadata = {"format": FULL_FORMAT, "base_model": base_model}
    config = (model.args.to_dict() if meta else
              {**(read_config(base / "config.json") if base.is_dir() else {}), **hf_config(model.args)})
    with atomic_path(folder / FULL_WEIGHTS) as tmp:
        save_safetensors(state, tmp, metadata=metadata)
    with atomic_path(folder / ("params.json" if meta else "config.json")) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")


def to_foreign_name(meta_name: str, column: int) -> str:
    """A Meta tensor name in another column of TENSOR_NAMES (1: Hugging Face, 2: GGUF)."""
    for row in TENSOR_NAMES:
        if m := re.fullmatch(layer_pattern(row[0]), meta_name):
            return row[column].replace("{i}", m.group(1)) if m.groups() else row[column]
    raise KeyError(meta_name)


# What must agree between the base an adapter was trained on and the base it is loaded onto: its shapes, and the
# numbers of its computation that shapes do not show (LLaMA-1-7B and Llama-2-7B have the same shapes, not the same
# norm_eps), these to round-off (a GGUF holds them as float32).
STRUCTURAL_ARGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim")
NUMERIC_ARGS = ("norm_eps", "rope_theta")


def check_trained_on(path: Path, header: dict[str, str], args: ModelArgs, kind: str) -> None:
    """A file whose header names the base it was trained on (`base_args`, a JSON object: header_settings) fits a model
    of `args`."""
    trained_on = header_settings(path, header, "base_args", kind)
    # A numeric arg the header leaves out is not compared (only the shapes are). An arg it holds is the base's, of
    # the type ModelArgs holds it in (the same checks): another value is a damaged header, not a base to skip the
    # comparison for ("abc", null), nor another base ("64"), nor this one (2.0 and true compare equal to 2 and 1).
    # A shape it leaves out is damaged too (training writes every one): not another base to name as (None, 4096).
    for k in STRUCTURAL_ARGS:
        if k not in trained_on:
            raise CheckpointError(f"{path}: damaged {kind} header: base_args has no {k}; expected every shape of the "
                                  f"base it was trained on ({', '.join(STRUCTURAL_ARGS)}), as training writes them")
    for keys, is_valid, expected in ((STRUCTURAL_ARGS, is_positive_int, "a positive integer"),
                                     (NUMERIC_ARGS, is_positive_finite, "a positive finite number")):
        for k in keys:
            if k in trained_on and not is_valid(trained_on[k]):
                raise CheckpointError(f"{path}: damaged {kind} header: base_args {k} {trained_on[k]!r}; expected "
                                      f"{expected} (the {k} of the base it was trained on)")
    diff = {k: (trained_on[k], getattr(args, k)) for k in STRUCTURAL_ARGS if trained_on[k] != getattr(args, k)}
    diff |= {k: (trained_on[k], getattr(args, k)) for k in NUMERIC_ARGS
             if k in trained_on and not math.isclose(trained_on[k], getattr(args, k), rel_tol=1e-4)}
    if diff:
        raise CheckpointError(f"{path}: trained on base {header.get('base_model')!r}, which differs from this base "
                              f"in {{arg: ({kind}'s base, this base)}}: {diff}")


def copy_parameters(model: torch.nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy each tensor into the model's parameter of that name, in place (its dtype and device kept)."""
    with torch.no_grad():
        for k, v in tensors.items():
            model.get_parameter(k).copy_(v)


def read_adapter(path: str | os.PathLike) -> tuple[AdapterArgs, dict[str, str], dict[str, Tensor]]:
    """(adapter config, header, tensors) of an adapter written by `save_adapter`; the header's base_args is read by
    check_trained_on."""
    path = Path(path)
    if path.suffix == ".bin":  # none of ours: PEFT's pickled weights, whose settings lie beside them, not inside
        must_be_file(path, f"PEFT's weights with the {PEFT_CONFIG} PEFT saved with them")  # a typo is no PEFT file
        raise CheckpointError(f"{path}: a .bin adapter is PEFT's weights, but no {PEFT_CONFIG} is beside it; expected "
                              f"the {PEFT_CONFIG} PEFT saved with them in {path.parent}")
    tensors, header = read_safetensors_file(path)
    expected = (f"expected an adapter .safetensors written by `llama-adapter train` (header format "
                f"{ADAPTER_FORMAT!r}), a PEFT LoRA or AdaptionPrompt ({PEFT_WEIGHTS[0]} with {PEFT_CONFIG} "
                "beside it), or the paper's original-release adapter .pth")
    if header.get("format") != ADAPTER_FORMAT:
        found = ("a safetensors file without this project's metadata" if not header else
                 f"a safetensors file whose header format is {header.get('format')!r}")
        names = sorted(tensors)
        raise CheckpointError(f"{path}: not an adapter of this project: {found}, holding {len(names)} tensor(s) "
                              f"({listed(names, 4)}); {expected}")
    adapter = header_settings(path, header, "adapter_args", "adapter", AdapterArgs)
    return adapter, header, tensors


def header_settings(path: Path, header: dict[str, str], key: str, kind: str, cls: type | None = None):
    """The settings this project's header holds as JSON under `key` (base_args, adapter_args, lora_args): a JSON
    object, read into `cls` (AdapterArgs, LoRAArgs) where given. One that is missing, no JSON, no object, holding a
    key twice or no valid `cls` is a damaged header, named with the file and the key: read_adapter and
    lora.check_lora_header check theirs alike."""
    damaged = f"{path}: damaged {kind} header: {key}"
    if key not in header:
        raise CheckpointError(f"{damaged} is missing; expected a JSON object of settings, as training writes it")
    try:
        settings = json.loads(header[key], object_pairs_hook=no_duplicate_keys)
    except ValueError as e:  # a JSONDecodeError, or a number too long for Python to read
        raise CheckpointError(f"{damaged} is not JSON ({e}); expected a JSON object of settings") from None
    except DuplicateKey as e:  # json keeps the last value: {"dim": 64, "dim": 128} checked as 128 alone
        raise CheckpointError(f"{damaged} holds key {e.args[0]!r} twice; expected a JSON object of settings, each "
                              "key once") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{damaged} holds a JSON {type(settings).__name__}; expected a JSON object of settings")
    if cls is None:
        return settings
    try:
        return cls.from_dict(settings, damaged)
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e) if damaged in str(e) else f"{damaged} {e}") from None


def layer_tensors(state: dict[str, Tensor], template: str) -> dict[int, Tensor]:
    """The tensors named by `template` ({i}: the layer index), by layer."""
    pattern = layer_pattern(template)
    return {int(m.group(1)): t for k, t in state.items() if (m := re.fullmatch(pattern, k))}


def adapted_layers(n_layers: int, adapter: AdapterArgs) -> range:
    """The layers an adapter adapts: the top `adapter_layers` (the paper's choice, and PEFT's)."""
    return range(n_layers - adapter.adapter_layers, n_layers)


def read_original_release(path: Path, n_layers: int, adapter: AdapterArgs
                          ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors of an adapter `.pth` as the paper's code released it: `adapter_query.weight`
    (layers*len, dim) and `layers.N.attention.gate` (1, n_heads, 1, 1) for every layer (zero below the
    adapted ones). The file records neither adapter_len nor adapter_layers, so `adapter` says them. Returned
    under our names, with each one's names in the file for check_state (which finds neither adapter_query nor
    adapter_gate in the release)."""
    if adapter.adapter_layers > n_layers:
        raise CheckpointError(f"{path}: --adapter-layers {adapter.adapter_layers} exceeds the base's {n_layers} "
                              "layers; expected the release's --adapter-len and --adapter-layers (the paper's 10 and "
                              "30 when not given), its adapted layers at most the base's")
    state = read_torch_file(path)
    top = adapted_layers(n_layers, adapter)
    gates = layer_tensors(state, "layers.{i}.attention.gate")
    if "adapter_query.weight" not in state:
        raise CheckpointError(f"{path}: no adapter_query.weight; expected the released adapter's prompts")
    if sorted(gates) != list(range(n_layers)):  # the release writes every layer's gate: the file's depth
        found = f"layers {min(gates)}..{max(gates)} ({len(gates)} of them)" if gates else "none"
        raise CheckpointError(f"{path}: gates of {found}; expected one for each of the base's {n_layers} layers "
                              "(an adapter released for a model of another depth?)")
    # Nothing else is in a release (its extraction kept the adapter_query and the gates): another tensor would be
    # dropped unread, and an integer one cast silently.
    unexpected = sorted(set(state) - {"adapter_query.weight"} - {f"layers.{i}.attention.gate" for i in gates})
    not_float = sorted(f"{k}: {t.dtype}" for k, t in state.items() if not t.is_floating_point())
    problems = [f"{label} ({len(items)}): {listed(items)}"
                for label, items in (("unexpected tensors", unexpected), ("not floating point", not_float)) if items]
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}; expected only the release's adapter_query.weight and "
                              "layers.N.attention.gate, floats")
    shapes = {tuple(g.shape) for g in gates.values()}
    if len(shapes) > 1:
        raise CheckpointError(f"{path}: layers.N.attention.gate of shapes {sorted(shapes)}; expected one shape, "
                              "(1, n_heads, 1, 1), for every layer")
    unused = [i for i, g in gates.items() if i < top.start and g.abs().max() > 0]
    if unused:
        raise CheckpointError(f"{path}: non-zero gates in layers {unused}, below the top {adapter.adapter_layers}")
    query = state["adapter_query.weight"].float()
    if query.numel() != adapter.adapter_layers * adapter.adapter_len * query.shape[-1]:
        raise CheckpointError(f"{path}: adapter_query.weight {tuple(query.shape)} does not hold --adapter-len "
                              f"{adapter.adapter_len} x --adapter-layers {adapter.adapter_layers} prompts of width "
                              f"{query.shape[-1]}; expected its rows to be adapter_len x adapter_layers: give the "
                              "release's --adapter-len and --adapter-layers (the paper's 10 and 30 when not given)")
    tensors = {
        "adapter_query": query.reshape(adapter.adapter_layers, adapter.adapter_len, -1),
        "adapter_gate": torch.stack([gates[i].float().flatten() for i in top]),
    }
    gate_names = f"layers.{top.start}.attention.gate" if len(top) == 1 else \
        f"layers.N.attention.gate, N = {top.start}..{top.stop - 1}"
    return tensors, {"adapter_query": "adapter_query.weight", "adapter_gate": gate_names}


def peft_files(path: Path) -> tuple[Path, Path] | None:
    """(adapter_config.json, weights file) of a PEFT adapter given as its folder, or as its weights file with
    adapter_config.json beside it; None for any other path."""
    if not path.is_dir():
        beside = path.suffix in (".safetensors", ".bin") and (path.parent / PEFT_CONFIG).is_file()
        return (path.parent / PEFT_CONFIG, path) if beside else None
    if not (path / PEFT_CONFIG).is_file():
        return None
    weights = [path / name for name in PEFT_WEIGHTS if (path / name).is_file()]
    if not weights:
        raise CheckpointError(f"{path}: a PEFT adapter folder ({PEFT_CONFIG}) without {' or '.join(PEFT_WEIGHTS)}")
    return path / PEFT_CONFIG, weights[0]


def peft_type(config_path: Path) -> object:
    """The kind of PEFT adapter an adapter_config.json describes: LORA, ADAPTION_PROMPT, ... (as written)."""
    return read_config(config_path).get("peft_type")


def read_peft_adaption_prompt(config_path: Path, weights: Path, args: ModelArgs
                              ) -> tuple[AdapterArgs, dict[str, Tensor]]:
    """(adapter config, tensors) of a PEFT AdaptionPrompt trained on the Hugging Face LLaMA of a base of `args`.

    PEFT computes our branch (adapter.py): each adapted layer's queries, RoPE applied, attend to its prompts
    through the layer's frozen k/v projections (no norm, no RoPE, GQA heads shared alike), with a softmax of
    their own and the usual 1/sqrt(head_dim); the gated result goes through o_proj and is added to the
    attention's output (ours adds it before wo: the same, wo being linear without bias). The prompts are
    residual-stream vectors, which HF's permutation of the q/k rows leaves alone, so they are taken as they
    are. Only the gate differs: PEFT's is one number g per layer, used as it is; ours is one per head, used
    through tanh. Every head gets atanh(g), so |g| >= 1, which no tanh reaches, is refused. PEFT records no base
    shapes: the prompts' width and the indices of the adapted layers (the top ones) are checked against the base.
    """
    config = read_config(config_path)
    kind = config.get("peft_type")
    if kind == "LORA":
        raise CheckpointError(f"{config_path}: a PEFT LoRA (peft_type 'LORA'), not an AdaptionPrompt adapter; "
                              "load_model and --adapter load it as a LoRA")
    if kind != "ADAPTION_PROMPT":
        raise CheckpointError(f"{config_path}: peft_type {kind!r} is not supported; expected ADAPTION_PROMPT "
                              "(PEFT's LLaMA-Adapter) or LORA")
    target = config.get("target_modules")
    if target not in (None, "self_attn"):  # None: PEFT fills in the model type's own when it loads
        raise CheckpointError(f"{config_path}: target_modules {target!r} is not a LLaMA-family model's attention "
                              "(GPT-2's is 'attn'); expected 'self_attn', an AdaptionPrompt of LLaMA or Mistral")
    sizes = {k: config.get(k) for k in ("adapter_len", "adapter_layers")}
    if not all(type(v) is int and v >= 1 for v in sizes.values()):
        raise CheckpointError(f"{config_path}: {sizes}; expected adapter_len and adapter_layers, positive integers")
    adapter = AdapterArgs(**sizes)
    if adapter.adapter_layers > args.n_layers:
        raise CheckpointError(f"{config_path}: adapter_layers {adapter.adapter_layers} exceeds the {args.n_layers} "
                              f"layers of the base; expected at most {args.n_layers} (trained on a deeper model?)")
    state = read_peft_weights(weights)[0]
    top = adapted_layers(args.n_layers, adapter)
    outside = sorted({i for name in (PEFT_PROMPT, PEFT_GATE) for i in layer_tensors(state, name)} - set(top))
    if outside:
        raise CheckpointError(f"{weights}: adapts layers {outside}, but PEFT adapts the top {adapter.adapter_layers} "
                              f"of the base's {args.n_layers} layers, {top.start}..{top.stop - 1}: the adapter was "
                              "trained on a model of another depth")
    expected = {**{PEFT_PROMPT.format(i=i): torch.Size([1, adapter.adapter_len, args.dim]) for i in top},
                **{PEFT_GATE.format(i=i): torch.Size([1]) for i in top}}
    check_state(expected, state, f"PEFT AdaptionPrompt {weights}")
    gates = torch.cat([state[PEFT_GATE.format(i=i)] for i in top]).double()  # (adapter_layers,)
    unrepresentable = [f"layer {i}: {g}" for i, g in zip(top, gates.tolist()) if abs(g) >= 1]  # NaN: check_state's
    if unrepresentable:
        raise CheckpointError(f"{weights}: adaption_gate of {', '.join(unrepresentable)}; our gate g' scales by "
                              "tanh(g'), so only PEFT gates in (-1, 1) can be represented (atanh is infinite at ±1)")
    return adapter, {
        "adapter_query": torch.cat([state[PEFT_PROMPT.format(i=i)] for i in top]).float(),  # (layers, len, dim)
        "adapter_gate": gates.atanh().float()[:, None].expand(-1, args.n_heads).contiguous(),  # (layers, n_heads)
    }


def load_model(
    base: str | os.PathLike,
    adapter_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    adapter: AdapterArgs | None = None,
) -> AdaptedTransformer:
    """The base model with a trained adapter from `adapter_path`, or a fresh one from `adapter`. With a path,
    `adapter` is the shape of an original-release .pth; a file that records its own refuses one that differs
    (apply_adapter)."""
    if adapter_path is None:
        return load_base(base, adapter, device, dtype)
    model = load_base(base, None, device, dtype)
    apply_adapter(model, adapter_path, adapter)
    return model


def apply_adapter(model: AdaptedTransformer, adapter_path: str | os.PathLike,
                  adapter: AdapterArgs | None = None) -> None:
    """Put a trained adapter into a loaded model, replacing the one it has: the base stays in memory, so
    several adapters can serve requests in turn ("plug with knowledge").

    `adapter_path` is one of our `.safetensors` adapters (its header gives the configuration), an
    original-release `.pth`, for which `adapter` must give adapter_len and adapter_layers, or a PEFT adapter
    (its folder, or its weights file with adapter_config.json beside it): a LoRA, merged into the weights, or an
    AdaptionPrompt, as its peft_type says. An `adapter` given with a file that records its own shape must be that
    shape (gate_init aside): one that differs is refused, naming the file and both.
    """
    adapter_path = Path(adapter_path)
    from .lora import is_lora_file

    if is_lora_file(adapter_path):
        apply_lora(model, peft_files(adapter_path)[1])
        return
    put_adapter(model, *read_fitting_adapter(model, adapter_path, adapter))


def read_fitting_adapter(model: AdaptedTransformer, adapter_path: Path, adapter: AdapterArgs | None = None
                         ) -> tuple[AdapterArgs, dict[str, Tensor]]:
    """(configuration, tensors) of a trained adapter that is not a LoRA (the files apply_adapter takes), checked
    to fit `model`, which is left as it is (a file that does not fit changes nothing): read once, the adapter can
    then be put into the model again and again (put_adapter) without reading its file."""
    if not isinstance(model, AdaptedTransformer):
        raise TypeError(f"{adapter_path}: a plain {type(model).__name__} cannot hold an adapter; build the model as "
                        "adapter.AdaptedTransformer (load_base does)")
    if getattr(model, "merged_lora", None):
        raise CheckpointError(f"{adapter_path}: the model's weights hold the merged LoRA {model.merged_lora}; load "
                              "the adapter onto a plain base")
    origin: dict[str, str] = {}  # where the file names a tensor otherwise: its name there
    if (peft := peft_files(adapter_path)) is not None:  # any peft_type but LORA and ADAPTION_PROMPT is refused there
        recorded, tensors = read_peft_adaption_prompt(*peft, model.args)
    elif is_original_release(adapter_path):
        if adapter is None:
            raise CheckpointError(f"{adapter_path}: an original-release .pth needs adapter_len/adapter_layers given")
        recorded, (tensors, origin) = adapter, read_original_release(adapter_path, model.args.n_layers, adapter)
    else:
        recorded, header, tensors = read_adapter(adapter_path)
        check_trained_on(adapter_path, header, model.args, "adapter")
    check_same_shape(adapter_path, adapter, recorded)
    try:
        shapes = model.adapter_shapes(recorded)
    except ValueError as e:  # more adapted layers than the base has
        raise CheckpointError(f"{adapter_path}: {e}") from None
    check_state(shapes, tensors, f"adapter {adapter_path}", origin)
    return recorded, tensors


def check_same_shape(adapter_path: Path, given: AdapterArgs | None, recorded: AdapterArgs) -> None:
    """An adapter shape given for a file that records its own must be the file's: one that differs is refused
    rather than silently dropped for the file's. gate_init only says how a training started the gates, and
    visual_hidden is the image projection's width where there is one (visual_dim), so neither is otherwise part
    of the shape."""
    if given is None:
        return
    left_out = {"gate_init"} | ({"visual_hidden"} if not recorded.visual_dim else set())
    given_shape, recorded_shape = ({k: v for k, v in a.to_dict().items() if k not in left_out}
                                   for a in (given, recorded))
    differ = [k for k in given_shape if given_shape[k] != recorded_shape[k]]
    if differ:
        raise CheckpointError(
            f"{adapter_path}: {', '.join(f'{k} {given_shape[k]}' for k in differ)} given, but the file records its "
            f"own shape, {', '.join(f'{k} {recorded_shape[k]}' for k in differ)}; expected no adapter shape (or the "
            "file's): only an original-release .pth needs one given")


def put_adapter(model: AdaptedTransformer, adapter: AdapterArgs | None, tensors: dict[str, Tensor]) -> None:
    """Replace the model's adapter with one read by read_fitting_adapter (None, {}: with none)."""
    model.set_adapter(adapter)
    copy_parameters(model, tensors)


def apply_lora(model: AdaptedTransformer, path: Path, merge: bool = True) -> None:
    """Put a PEFT LoRA (lora.py) into a loaded model without an adapter or LoRA; merged into the frozen weights
    unless `merge` is False (its A and B then stay separate tensors, as in training)."""
    from .lora import add_lora, lora_shapes, merge_lora, read_lora, remove_lora

    args, tensors, origin = read_lora(path, model.args)
    if model.adapter is not None or getattr(model, "lora", None) or getattr(model, "merged_lora", None):
        raise CheckpointError(f"{path}: the model holds an adapter or LoRA already; load the LoRA onto a plain base")
    if (int8 := int8_format(model)) is not None:
        raise CheckpointError(f"{path}: the model's weights are int8 ({int8}); a LoRA merges into "
                              "full-precision weights: apply it before quantize_int8 (as generate --quantize does)")
    fused = any(layer.attention.wqkv is not None for layer in model.layers)
    if fused and not merge:
        raise CheckpointError(f"{path}: the model's projections are fused (fuse_projections), which an unmerged "
                              "LoRA's separate A and B would not enter; merge it, or apply it before fusing")
    # Checked before the LoRA is added, as read_fitting_adapter checks an adapter: a file that does not fit leaves the
    # model as it was (not holding an empty LoRA that refuses the next one), and a rank from adapter_config.json is
    # allocated only once the file's tensors have shown it (10**400 was a TypeError in torch.empty).
    check_state(lora_shapes(model, args), tensors, f"LoRA {path}", origin)
    trainable = {p: p.requires_grad for p in model.parameters()}  # add_lora freezes all but the LoRA
    add_lora(model, args)
    copy_parameters(model, tensors)
    model.requires_grad_(False)
    if merge:
        try:
            merge_lora(model)
        except ValueError as e:  # nothing merged: the model is left as it was, as a file that does not fit leaves it
            remove_lora(model)
            for p, requires_grad in trainable.items():
                p.requires_grad_(requires_grad)
            raise CheckpointError(f"{path}: {e}") from None
        model.merged_lora = str(path)  # the weights are changed for good: no other adapter may go on top
        if fused:  # the forward reads the fused weights, laid out before the merge: lay them out again
            model.fuse_projections()
