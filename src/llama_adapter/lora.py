"""LoRA (Hu et al. 2021) on a frozen LLaMA, the baseline the paper's efficiency table sets beside the adapter.

Each targeted projection W (out, in) gains a low-rank update: y = W x + (alpha / r) · B A dropout(x), with A
(r, in) drawn as nn.Linear draws its weights (Kaiming-uniform, as PEFT does) and B (out, r) zero, so a fresh
LoRA leaves the model unchanged, like the adapter's zero gates. Only A and B train (`is_lora_param`); they stay
fp32 when the base is cast to bf16. For inference the update is merged into W, after which the model is plain
LLaMA again (and its projections can be fused for decoding).

Files are PEFT's: `adapter_model.safetensors` with PEFT's tensor names for Hugging Face's LLaMA, and
`adapter_config.json`, so `PeftModel.from_pretrained` loads them onto the Hugging Face model of the same base.
Hugging Face stores wq and wk with each head's rotary pairs as two halves where Meta interleaves them; B's rows
of those two are permuted on the way out and back on the way in (A reads the input, which is not permuted).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import (
    PEFT_CONFIG,
    PROJECTIONS,
    check_trained_on,
    fits,
    header_settings,
    listed,
    peft_files,
    peft_type,
    permute_rope_rows,
    read_config,
    read_peft_weights,
    unpermute_rope_rows,
    value_range,
)
from .config import LORA_TARGETS, WEIGHTS, LoRAArgs, ModelArgs
from .errors import CheckpointError
from .io import atomic_path, save_safetensors

LORA_WEIGHTS = WEIGHTS["lora"]  # PEFT's names: PeftModel.from_pretrained looks for these two
LORA_FORMAT = "llama-adapter/lora/1"
OUR_FORMATS = "llama-adapter/"  # how each format of this project's files begins (an adapter's, a full fine-tune's)
# Meta's projection names -> the part of the block holding them, and Hugging Face's module names, which PEFT's
# target_modules and tensor names use.
BLOCK_PART = {t: part for t, (part, _) in PROJECTIONS.items()}
HF_MODULES = {t: module for t, (_, module) in PROJECTIONS.items()}
# The adapter_config.json key of each LoRAArgs field read from one.
PEFT_KEYS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules"}
# PEFT's LoRA variants with weights or routing of their own, each turned on by a config of its own ({} included).
PEFT_VARIANT_CONFIGS = ("kasa_config", "use_bdlora", "arrow_config", "monteclora_config")
# PEFT's LoraConfig options that change what the weights mean or which modules they apply to, none of which the merge
# (W + alpha / r · B A on the targeted projections of every layer) implements: merged as plain LoRA, each would give
# silently wrong weights (or tensors check_state calls unexpected, naming no setting). Options of the training alone
# (init_lora_weights but those of PEFT_BASE_REWRITING_INITS, its loftq/eva/corda/lora_ga configs, velora_config's
# backward pass), or of an option refused here (qalora_group_size, megatron_core) are not listed.
PEFT_UNSUPPORTED = (
    "fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "use_qalora",  # another update than (alpha / r) B A
    "rank_pattern", "alpha_pattern",  # per-module ranks and alphas: one LoRAArgs holds one of each
    # the projections of some layers only, or of other modules, or of a stack of layers other than the base's
    "layers_to_transform", "layers_pattern", "layer_replication", "exclude_modules", "target_parameters",
    "modules_to_save", "trainable_token_indices",  # whole modules or embedding rows trained beside the LoRA
    "megatron_config",  # Megatron's parallel layers, not Hugging Face's LLaMA
    "alora_invocation_tokens",  # applied from an invocation token on: no merge can hold that
    *PEFT_VARIANT_CONFIGS,
)
# The rest of PEFT's LoraConfig (0.21): checked by read_lora (peft_type, bias, init_lora_weights), its metadata,
# or options of the training alone or of its initialisation. A key in none of these lists, at a value other than
# PEFT's default (is_peft_default), is an option of a newer PEFT whose meaning the merge cannot know: refused.
PEFT_OTHER_KEYS = (
    "peft_type", "bias", "init_lora_weights", "task_type", "inference_mode", "base_model_name_or_path", "revision",
    "auto_mapping", "peft_version", "runtime_config", "ensure_weight_tying", "megatron_core", "qalora_group_size",
    "eva_config", "corda_config", "loftq_config", "lora_ga_config", "velora_config",
)
# init_lora_weights that make PEFT rewrite the base's weights as it loads the LoRA (W - B A of the initial A and B, or
# LoftQ's quantised base), unless the LoRA was converted at saving (path_initial_model_for_weight_conversion, which
# writes init_lora_weights true): merged onto the unchanged base, such a LoRA gives other weights than PEFT's.
PEFT_BASE_REWRITING_INITS = re.compile(r"(pissa|corda).*|olora|mica|loftq|lora_ga", re.IGNORECASE)
PEFT_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def is_peft_default(key: str, value) -> bool:
    """An adapter_config.json option that PEFT takes as unused: null, false or empty. 0 is set (layers_to_transform 0
    is the first layer), though Python holds it equal to false; so is a variant's config of {} (PEFT turns the variant
    on for any config, {} giving it its default settings)."""
    if key in PEFT_VARIANT_CONFIGS:
        return value is None
    return value is None or value is False or (isinstance(value, list | dict) and not value)


def is_lora_param(name: str) -> bool:
    """What a LoRA trains and what its file holds: the A and B of each targeted projection."""
    return name.endswith((".lora_a", ".lora_b"))


class LoRALinear(nn.Linear):
    """A frozen projection with a trainable low-rank update; the frozen weight keeps its name (`wq.weight`), so
    base checkpoints still load into it."""

    def __init__(self, base: nn.Linear, args: LoRAArgs, device=None, generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, None
        device = device if device is not None else base.weight.device
        a = torch.empty(args.rank, self.in_features, device=device)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)), nn.Linear's and PEFT's draw
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a)  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, args.rank, device=device))  # (out, r)
        self.scaling = args.scaling
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return F.linear(x, self.weight) + update * self.scaling

    def merged_weight(self) -> Tensor:
        """W + (alpha / r) B A, in float32."""
        delta = (self.lora_b.detach().float() @ self.lora_a.detach().float()) * self.scaling
        return self.weight.detach().float() + delta

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding merged_weight(), in W's dtype."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(self.merged_weight().to(self.weight.dtype), requires_grad=False)
        return linear


def targeted(model: nn.Module, targets: tuple[str, ...]):
    """(block part, projection name) of every targeted projection, block by block."""
    for layer in model.layers:
        for t in targets:
            yield getattr(layer, BLOCK_PART[t]), t


def lora_shapes(model: nn.Module, args: LoRAArgs) -> dict[str, tuple[int, int]]:
    """The shape of each A and B that add_lora(model, args) would add, by parameter name, without making them."""
    shapes = {}
    for i, layer in enumerate(model.layers):
        for t in args.targets:
            linear, name = getattr(getattr(layer, BLOCK_PART[t]), t), f"layers.{i}.{BLOCK_PART[t]}.{t}"
            shapes[f"{name}.lora_a"] = (args.rank, linear.in_features)
            shapes[f"{name}.lora_b"] = (linear.out_features, args.rank)
    return shapes


def add_lora(model: nn.Module, args: LoRAArgs, device=None, generator: torch.Generator | None = None) -> nn.Module:
    """Give every targeted projection a fresh LoRA and freeze everything else."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model has a LoRA already")
    for part, t in targeted(model, args.targets):
        setattr(part, t, LoRALinear(getattr(part, t), args, device, generator))
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name))
    model.lora = args
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its frozen weight; the model is plain LLaMA afterwards. A merged weight its dtype
    cannot hold (W + BA beyond fp16's ±65504 would be an infinity: the base and the LoRA were each range-checked as
    loaded, their sum was not) is refused before any weight changes: ValueError naming each projection."""
    if getattr(model, "lora", None) is not None:
        # Each merged weight is computed here for its range, then again to be kept: holding them all until every one
        # is known to fit would cost the targeted weights' memory a second time (2 GB for a 7B's wq and wv).
        beyond = []
        for name, linear in model.named_modules():
            if isinstance(linear, LoRALinear):
                least, greatest = value_range(linear.merged_weight())
                if not fits(least, greatest, linear.weight.dtype):
                    beyond.append(f"{name}: values from {least.item():g} to {greatest.item():g} "
                                  f"({linear.weight.dtype}, ±{torch.finfo(linear.weight.dtype).max:g})")
        if beyond:
            raise ValueError(f"the merged weights W + (alpha / r) B A of {len(beyond)} projection(s) exceed the range "
                             f"of their dtype: {listed(beyond)}; expected a dtype that holds them (bfloat16 or "
                             "float32)")
        for part, t in targeted(model, model.lora.targets):
            setattr(part, t, getattr(part, t).merged())
        model.lora = None
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Take every LoRA off unmerged: each targeted projection a plain nn.Linear of its frozen weight again."""
    if getattr(model, "lora", None) is not None:
        for part, t in targeted(model, model.lora.targets):
            lora = getattr(part, t)
            linear = nn.Linear(lora.in_features, lora.out_features, bias=False, device="meta")
            linear.weight = lora.weight
            setattr(part, t, linear)
        model.lora = None
    return model


# ---------------------------------------------------------------- PEFT's file layout


def rope_heads(target: str, args: ModelArgs) -> int | None:
    """The heads of a projection whose rows HF stores permuted (checkpoint.permute_rope_rows): wq, wk; else None."""
    return {"wq": args.n_heads, "wk": args.n_kv_heads}.get(target)


def peft_tensors(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The LoRA's A and B under PEFT's names, in HF's row order, fp32; from `state` (by our names) where given,
    else from the model."""
    state = dict(model.named_parameters()) if state is None else state
    out = {}
    for i in range(len(model.layers)):
        for t in model.lora.targets:
            ours = f"layers.{i}.{BLOCK_PART[t]}.{t}"
            b = state[f"{ours}.lora_b"].detach().float().cpu()
            if (heads := rope_heads(t, model.args)) is not None:
                b = permute_rope_rows(b, heads)
            prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[t]}"
            out[f"{prefix}.lora_A.weight"] = state[f"{ours}.lora_a"].detach().float().cpu().contiguous()
            out[f"{prefix}.lora_B.weight"] = b.contiguous()
    return out


def save_lora(model: nn.Module, out_dir: str | os.PathLike, base_model: str, state: dict[str, Tensor] | None = None
              ) -> Path:
    """Write adapter_model.safetensors (PEFT's names; this project's header beside them) and adapter_config.json.
    `state`: the LoRA's tensors by name, whole, where the model holds only shards of them (FSDP)."""
    out_dir = Path(out_dir)
    args: LoRAArgs = model.lora
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": args.rank, "lora_alpha": args.alpha, "lora_dropout": args.dropout,
              "target_modules": sorted(HF_MODULES[t].split(".")[1] for t in args.targets), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "layers_to_transform": None}
    metadata = {"format": LORA_FORMAT, "base_model": base_model,
                "base_args": json.dumps(model.args.to_dict(), separators=(",", ":")),
                "lora_args": json.dumps(args.to_dict(), separators=(",", ":"))}
    with atomic_path(out_dir / PEFT_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    with atomic_path(out_dir / LORA_WEIGHTS) as tmp:
        save_safetensors(peft_tensors(model, state), tmp, metadata=metadata)
    return out_dir / LORA_WEIGHTS


def is_lora_file(path: Path) -> bool:
    """A PEFT adapter (its folder, or its weights file) whose adapter_config.json says peft_type LORA."""
    files = peft_files(path)
    return files is not None and peft_type(files[0]) == "LORA"


def read_lora(path: Path, model_args: ModelArgs) -> tuple[LoRAArgs, dict[str, Tensor], dict[str, str]]:
    """(LoRA settings, tensors under this model's names and row order, each one's name in the file for check_state)
    of a PEFT LoRA: ours, whose header must name a base of `model_args`, or one trained with PEFT on the Hugging Face
    LLaMA of the same base."""
    config_path = path.parent / PEFT_CONFIG
    config = read_config(config_path)
    expected = ("a PEFT LoRA (peft_type LORA, bias none, one rank and alpha for every module, target_modules among "
                "q/k/v/o/gate/up/down, and every option that changes what the weights mean or where they apply, "
                "as DoRA, rsLoRA, layers_to_transform or modules_to_save, at PEFT's default: null, false or empty)")
    problems = [f"{k}={config.get(k)!r}" for k, want in (("peft_type", "LORA"), ("bias", "none"))
                if config.get(k, want) != want]
    problems += [f"{k}={config[k]!r}" for k in PEFT_UNSUPPORTED if not is_peft_default(k, config.get(k))]
    known = {*PEFT_KEYS.values(), *PEFT_UNSUPPORTED, *PEFT_OTHER_KEYS}
    problems += [f"{k}={v!r} (an option this loader does not know: a newer PEFT's?)" for k, v in config.items()
                 if k not in known and not is_peft_default(k, v)]
    if isinstance(init := config.get("init_lora_weights"), str) and PEFT_BASE_REWRITING_INITS.fullmatch(init):
        problems.append(f"init_lora_weights={init!r} (PEFT rewrites the base's weights for it as it loads the LoRA; "
                        "convert it at saving, path_initial_model_for_weight_conversion)")
    if problems:
        raise CheckpointError(f"{config_path}: {', '.join(problems)} is not supported; expected {expected}")
    to_meta = {v.split(".")[1]: k for k, v in HF_MODULES.items()}
    modules = config.get("target_modules")
    if not isinstance(modules, list) or not modules or any(not isinstance(m, str) or m not in to_meta for m in modules):
        raise CheckpointError(f"{config_path}: target_modules {modules!r}; expected a list among {sorted(to_meta)}")
    if missing := [k for k in ("r", "lora_alpha") if k not in config]:
        raise CheckpointError(f"{config_path}: {', '.join(missing)} missing; expected {expected}")
    try:  # the values as written, which LoRAArgs checks: int() and float() took "2", 2.5 and true as numbers
        args = LoRAArgs(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                        # a set, as PEFT reads target_modules: a name written twice targets its module once
                        tuple(sorted({to_meta[m] for m in modules}, key=LORA_TARGETS.index)))
    except ValueError as e:  # LoRAArgs names its own field: the key of adapter_config.json instead
        field, _, rest = str(e).partition(" ")
        raise CheckpointError(f"{config_path}: {PEFT_KEYS.get(field, field)} {rest}; expected {expected}") from None
    tensors, header = read_peft_weights(path)
    # Ours records its settings twice, in the header and in adapter_config.json (which PEFT reads), from one LoRAArgs:
    # where they differ, one of the two files was edited or comes from another save, and which is right is unknown.
    if (recorded := check_lora_header(path, header, model_args)) is not None:
        header_args, config_args = ({**a.to_dict(), "targets": sorted(a.targets, key=LORA_TARGETS.index)}
                                    for a in (recorded, args))
        if diff := {k: (v, config_args[k]) for k, v in header_args.items() if v != config_args[k]}:
            raise CheckpointError(f"{path}: its header's lora_args and {config_path} differ in {{setting: (header's, "
                                  f"{PEFT_CONFIG}'s)}}: {diff}; expected the settings of one save in both (weights "
                                  f"beside another LoRA's {PEFT_CONFIG}?)")
    ours: dict[str, Tensor] = {}
    origin: dict[str, str] = {}  # each of our names: its name in the file
    for name, t in tensors.items():
        m = PEFT_NAME.fullmatch(name.replace(".default.", "."))
        if m is None or m.group(3) not in to_meta:
            raise CheckpointError(f"{path}: tensor {name!r} is not a LoRA A/B of a LLaMA projection; "
                                  f"expected {expected}")
        # The layer index as written, as a base's tensor names keep it: layers.00 is no layer, listed as unexpected.
        layer, target, which = m.group(1), to_meta[m.group(3)], m.group(4)
        our_name = f"layers.{layer}.{BLOCK_PART[target]}.{target}.lora_{which.lower()}"
        if our_name in origin:  # PEFT's in-memory name (.default.) beside the saved one: one would be dropped unread
            raise CheckpointError(f"{path}: tensors {origin[our_name]!r} and {name!r} are both {our_name}; expected "
                                  "each LoRA tensor once")
        origin[our_name] = name
        # B's rows back to Meta's q/k order; a B of another shape is left as it is, for check_state to list
        if (which == "B" and (heads := rope_heads(target, model_args)) is not None and t.ndim == 2
                and t.shape[0] == heads * model_args.head_dim):
            t = unpermute_rope_rows(t, heads)
        ours[our_name] = t
    return args, ours, origin


def check_lora_header(path: Path, header: dict[str, str], model_args: ModelArgs) -> LoRAArgs | None:
    """The settings a LoRA weights file's header records (None: none), checked as read_adapter checks an adapter's.
    Ours (format LORA_FORMAT) holds its settings and its base's, which must be whole JSON and that base must be this
    one. PEFT writes a header of its own ({'format': 'pt'}, or none in a .bin) naming no base: only the tensors'
    shapes are checked. Another of this project's formats on a LoRA's file is a mix-up, not PEFT's: taken as
    PEFT's, it would skip the base check."""
    fmt = header.get("format", "")
    if fmt == LORA_FORMAT:
        recorded = header_settings(path, header, "lora_args", "LoRA", LoRAArgs)
        check_trained_on(path, header, model_args, "LoRA")
        return recorded
    if fmt.startswith(OUR_FORMATS):
        raise CheckpointError(f"{path}: header format {fmt!r} is not a LoRA's; expected {LORA_FORMAT!r} (a LoRA "
                              "`llama-adapter train --method lora` writes) or a PEFT LoRA's header")
    return None
