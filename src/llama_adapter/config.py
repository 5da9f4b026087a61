"""Configuration, one dataclass per concern (the model, the adapter, each stage's settings), with the named LLaMA
presets. Every default lives here once; the CLI generates its options from these dataclasses, which is why this
module imports neither torch nor anything that does."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Literal, get_args


def is_number(value: Any) -> bool:
    """Whether `value` is a real number as a file means one: not a boolean, which Python counts among the integers
    (JSON's true would be 1)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def is_positive_finite(value: Any) -> bool:
    """Whether `value` is a positive finite number: not a boolean (JSON's true is no number), and not an integer
    beyond the floats (10**400), which float() cannot hold."""
    try:
        return is_number(value) and 0 < float(value) < float("inf")
    except OverflowError:
        return False


def is_positive_int(value: Any) -> bool:
    """Whether `value` is a positive integer: not a boolean (JSON's true is no number) and not a float (2.0, which
    compares equal to 2 but is no count of layers or heads)."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1


def _check_types(obj: Any, ints: tuple[str, ...], reals: tuple[str, ...] = (), bools: tuple[str, ...] = (),
                 optional: tuple[str, ...] = ()) -> None:
    """Each named field of a frozen dataclass, read from a file (params.json, config.json, a GGUF, a header), of its
    type: positive integers (not booleans, not 2.0), positive finite numbers, true/false; a field in `optional` may be
    None. A JSON "10000" or 4096.0 would otherwise be taken as it is and fail far from its file, or worse (the
    string "false" is true). Numbers are stored as Python's int and float (a JSON 10000 as rope_theta 10000.0, a
    GGUF's numpy integers as ints), so that equal configs are equal in their JSON too."""
    for name in ints + reals + bools:
        value = getattr(obj, name)
        if value is None and name in optional:
            continue
        if name in ints:
            ok, expected = is_positive_int(value), "a positive integer"
        elif name in reals:
            ok, expected = is_positive_finite(value), "a positive finite number"
        else:
            ok, expected = value is True or value is False, "true or false"
        if not ok:
            raise ValueError(f"{name} {value!r}: expected {expected}")
        if name not in bools:
            object.__setattr__(obj, name, int(value) if name in ints else float(value))


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def _checked_fields(cls: type, d: dict[str, Any], source: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    return d


@dataclass(frozen=True)
class ModelArgs:
    """A LLaMA-family architecture, in the vocabulary of Meta's `params.json`."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # None: Meta's rule from dim, multiple_of, ffn_dim_multiplier
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        _check_types(self, ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "hidden_dim",
                            "max_seq_len"), ("ffn_dim_multiplier", "norm_eps", "rope_theta"), ("tie_embeddings",),
                     optional=("n_kv_heads", "ffn_dim_multiplier", "hidden_dim"))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.hidden_dim is None:
            # Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices instead of two), optionally scaled,
            # rounded up to a multiple of `multiple_of`.
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            object.__setattr__(self, "hidden_dim", find_multiple(hidden, self.multiple_of))
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"dim {self.dim} must divide into n_heads {self.n_heads}, "
                f"and n_heads into n_kv_heads {self.n_kv_heads}"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def parameter_count(self) -> int:
        """Parameters of the base model (embeddings, output unless tied, blocks, norms)."""
        kv = self.n_kv_heads or self.n_heads
        attention = self.dim * self.head_dim * (2 * self.n_heads + 2 * kv)
        block = attention + 3 * self.dim * self.hidden_dim + 2 * self.dim
        return self.vocab_size * self.dim * (1 if self.tie_embeddings else 2) + self.n_layers * block + self.dim

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model config") -> ModelArgs:
        return cls(**_checked_fields(cls, d, source))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA-1 (Touvron et al. 2023), as in Meta's params.json.
    "7B": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6),
    "33B": dict(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6),
    "65B": dict(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5),
    # Llama 2
    "Llama-2-7B": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5, max_seq_len=4096),
    "Llama-2-13B": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-5, max_seq_len=4096),
    "Llama-2-70B": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
        norm_eps=1e-5, max_seq_len=4096,
    ),
    # Llama 3
    "Llama-3-8B": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.3,
        multiple_of=1024, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
    ),
    # SmolLM2-135M (HuggingFaceTB): LLaMA architecture with GQA and tied embeddings.
    "SmolLM2-135M": dict(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536, norm_eps=1e-5,
        rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
    ),
    # The demo's base, pre-trained from scratch on the generated corpus (vocab_size: its tokenizer's).
    "demo": dict(dim=96, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=1000, hidden_dim=256, max_seq_len=256),
    # Tiny sizes for tests.
    "tiny": dict(dim=64, n_layers=4, n_heads=4, vocab_size=256, multiple_of=16, max_seq_len=256),
    "tiny-gqa": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16, max_seq_len=256),
    "tiny-tied": dict(
        dim=64, n_layers=4, n_heads=4, n_kv_heads=1, vocab_size=256, multiple_of=16, max_seq_len=256,
        tie_embeddings=True,
    ),
}


GateInit = Literal["zero", "random"]
GATE_INITS: tuple[str, ...] = get_args(GateInit)  # the choices, for the CLI and the checks


@dataclass(frozen=True)
class AdapterArgs:
    """The paper's adapter: `adapter_len` prompt vectors in each of the top `adapter_layers` layers."""

    adapter_len: int = 10
    adapter_layers: int = 30
    # "zero" is the paper's zero-init attention; "random" is its ablation (gates drawn from N(0, 1), so
    # tanh(gate) lets the untrained prompts into the frozen model from the first step).
    gate_init: GateInit = "zero"
    # Multimodal (the paper's ScienceQA model): the width of the cached image features (0: text only) and of
    # the hidden layer of the MLP that projects them to the model dim, added to every adapted layer's prompts.
    visual_dim: int = 0
    visual_hidden: int = 128

    def __post_init__(self) -> None:
        _check_types(self, ("adapter_len", "adapter_layers", "visual_hidden"))
        if type(self.visual_dim) is not int:
            raise ValueError(f"visual_dim {self.visual_dim!r}: expected an integer, 0 for none")
        if self.adapter_len < 1 or self.adapter_layers < 1:
            raise ValueError(f"adapter_len and adapter_layers must be >= 1, got {self}")
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {', '.join(GATE_INITS)}, got {self.gate_init!r}")
        if self.visual_dim < 0 or self.visual_hidden < 1:
            raise ValueError(f"visual_dim must be >= 0 and visual_hidden >= 1, got {self}")

    def validate_for(self, args: ModelArgs) -> None:
        if self.adapter_layers > args.n_layers:
            raise ValueError(f"adapter_layers {self.adapter_layers} exceeds the model's {args.n_layers} layers")

    @classmethod
    def layers_for(cls, n_layers: int) -> int:
        """adapter_layers where none is given for a model of `n_layers` blocks: the default (the paper's top 30),
        or every block of a model with fewer (the demo's 3)."""
        return min(cls.adapter_layers, n_layers)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "adapter config") -> AdapterArgs:
        return cls(**_checked_fields(cls, d, source))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# What a training tunes (methods.py holds each method's predicate): the paper's adapter, LoRA (Hu et al. 2021,
# as Alpaca-LoRA applies it), every weight (Alpaca's full fine-tuning), or nothing (the base answers as it is).
METHODS = ("adapter", "lora", "full", "zero-shot")
# TrainConfig's settings that only the adapter reads (TrainConfig.adapter): LoRA, full fine-tuning and zero-shot
# ignore them, so two trainings of those methods that differ only here are the same training.
ADAPTER_SETTINGS = ("adapter_len", "adapter_layers", "gate_init")
# Where each trained method's weights are written, relative to the training's output folder: the adapter in this
# project's format, LoRA in PEFT's (adapter_config.json beside it), a full fine-tune as a base folder of its own.
FULL_WEIGHTS = "model.safetensors"  # a full fine-tune's weights in its base folder (checkpoint.save_full)
PEFT_CONFIG = "adapter_config.json"  # a PEFT adapter's settings, beside its weights
TRAINING_CONFIG = "config.json"  # a training's settings (TrainConfig), written as it starts
TRAINING_METRICS = "metrics.json"  # a finished training's summary, written after its weights
# Files that mark a folder a command writes whole as that command's (with data's FETCH_INFO, VALIDATION_REPORT and
# TOKEN_STATS): an existing --out that holds none is no earlier output of it (inputs.check_earlier_output).
DEMO_CORPUS = "corpus.jsonl"  # the demo's pre-training corpus (data.demo.generate_demo)
PRETRAIN_SUMMARY = "pretrain.json"  # a pre-trained demo base's settings and losses (pretrain.pretrain_base)
VISION_CONFIG = "config.json"  # a vision encoder's settings: a Hugging Face CLIP folder's (multimodal)
FEATURES_INFO = "encoder.json"  # an image feature cache's encoder and counts (multimodal.encode_images)
REPORT_PAGE = "report.md"  # the report's page (report.write_report)
WEIGHTS = {"adapter": "adapter.safetensors", "lora": "adapter_model.safetensors", "full": f"model/{FULL_WEIGHTS}"}


def training_outputs(out_dir: str | Path) -> list[Path]:
    """What a training writes in `out_dir` for the next stage, whatever its method: the weights (a full
    fine-tune's whole folder), LoRA's adapter_config.json, metrics.json. None of an earlier run's may pass for
    this run's: train removes them as it starts, the command line when it fails. checkpoint.pt is not among them
    (--resume reads it), nor config.json and metrics.jsonl, which describe the run in the folder."""
    return [Path(out_dir) / name for name in (*sorted({w.split("/")[0] for w in WEIGHTS.values()}), PEFT_CONFIG,
                                              TRAINING_METRICS)]


def training_file(base: str | Path, adapter: str | Path | None) -> Path:
    """Where the metrics.json of the training that produced a model lies: beside its adapter, or above a fully
    fine-tuned model's folder (adapters/<experiment>/model). What evaluate, generate and complete read of it (the
    method, the tokenizer): an input of theirs, though no option names it."""
    if adapter is not None:  # a PEFT adapter given as its folder is its run's folder, as its weights file's is
        return (Path(adapter) if Path(adapter).is_dir() else Path(adapter).parent) / TRAINING_METRICS
    return Path(base).parent / TRAINING_METRICS


def is_original_release(adapter_path: str | Path) -> bool:
    """Whether an adapter file is the paper's original-release .pth, the only kind that does not record its own
    shape (adapter_len, adapter_layers), which must then be given with it."""
    return Path(adapter_path).suffix == ".pth"


EVALUATION_OUTPUTS = ("scores.json", "predictions.csv")  # an evaluation's files (predictions: ScienceQA's)
RUN_LOG = "metrics.jsonl"  # every run's own log, appended to as it runs (tracking.Tracker)
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoRAArgs:
    """LoRA on the named projections of every block; the defaults are Alpaca-LoRA's (4,194,304 parameters on
    LLaMA-7B: 32 layers x 2 targets x rank 8 x (4096 + 4096))."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.05  # on the LoRA branch's input only, while training
    targets: tuple[str, ...] = ("wq", "wv")

    def __post_init__(self) -> None:
        # Read from files too (adapter_config.json, a LoRA's header): a "2" or 2.5 for the rank, true or NaN for alpha
        # was taken as it came (int("2"), a rank of True is 1) or failed far from its file, in torch.
        _check_types(self, ("rank",), ("alpha",))
        if not (is_number(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout {self.dropout!r}: expected a number from 0 to below 1")
        object.__setattr__(self, "dropout", float(self.dropout))
        targets = self.targets
        if (not targets or not all(isinstance(t, str) and t in LORA_TARGETS for t in targets)
                or len(set(targets)) != len(targets)):
            raise ValueError(f"targets {list(targets)!r}: expected distinct names among {', '.join(LORA_TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "LoRA config") -> LoRAArgs:
        d = dict(_checked_fields(cls, d, source))
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def setting(default: Any = MISSING, help: str = "", if_none: str = "", **kw: Any) -> Any:
    """A dataclass field that is also a command-line option: `help` is the option's help text, kept beside the
    default so that the two cannot drift apart (the CLI adds the default; `if_none` says what a None means)."""
    return field(default=default, metadata={"help": help, "if_none": if_none}, **kw)


def setting_of(cls: type, name: str) -> Any:
    """The option `cls` declares as its field `name` (default, help), for another dataclass that takes it too."""
    f = cls.__dataclass_fields__[name]
    return setting(f.default, f.metadata["help"], f.metadata["if_none"])


# What tokenize does with a sample longer than max_seq_len: cut the response's end (the paper's), or drop it.
TRUNCATION = ("truncate", "drop")
# How tokenize tells validation from training records: a seeded draw, or the records' own split; and each
# dataset's default (ScienceQA's records carry their split; Alpaca's do not).
SPLIT_BY = ("seed", "field")
DATASET_SPLIT_BY = {"alpaca": "seed", "scienceqa": "field"}


@dataclass(frozen=True)
class TokenizeConfig:
    """How validated records become samples (data/tokens.py), one field per `tokenize` option; the defaults are the
    paper's, but for the validation records, which its code took from among the training ones."""

    max_seq_len: int = setting(512, "tokens per sample at most, BOS and EOS included: the paper's padded length")
    mask_prompt: bool = setting(True, "train on the response's tokens only, as the paper does; --no-mask-prompt: on "
                                      "the prompt's too")
    truncation: str = setting("truncate", "a sample over --max-seq-len: cut the response's end (the paper's) or "
                                          "drop the sample; counted either way")
    split_by: str | None = setting(None, "seed: a seeded validation draw over every record (their own val/test "
                                         "too), disjoint from training; field: the records' own split",
                                   if_none="the dataset's: field for ScienceQA (its train/val/test, so that test "
                                           "questions never train), seed for Alpaca (refused over records that carry "
                                           "a val or test split: give field, or seed to draw all the same)")
    # A number, or its text as the command line gives it (tokenize parses it, naming val_size in its errors).
    val_size: int | float | str = setting(200, "--split-by seed: validation records (an integer) or the fraction of "
                                               "the records (a float)")
    seed: int = setting(0, "--split-by seed: the draw's seed")

    def split_rule(self, dataset: str) -> dict:
        """The rule tokenize splits `dataset`'s records by (and records in stats.json)."""
        if (self.split_by or DATASET_SPLIT_BY[dataset]) == "seed":
            return {"by": "seed", "val_size": self.val_size, "seed": self.seed}
        return {"by": "field"}


@dataclass(frozen=True)
class CompileConfig:
    """Whether generate and evaluate compile their decode step, and where compiled code is kept between jobs
    (compile_cache.py); train's own --compile compiles its blocks, and takes the same --compile-cache."""

    compile: bool = setting(False, "torch.compile the decode step: a one-off compilation, then faster tokens "
                                   "(large jobs)")
    compile_cache: str | None = setting(None, "with --compile: a folder, which jobs on other nodes may share, that "
                                              "keeps what was compiled, so that the next job of the same shapes "
                                              "skips most of its compilation", if_none="none: this node's own "
                                                                                    "PyTorch caches only")


@dataclass
class TrainConfig:
    """A fine-tuning run, one field per `train` option; the defaults are the paper's recipe (train.py)."""

    base: str = setting(help="the base: a Meta or HF checkpoint folder, a .gguf file, or a hub model "
                             "ORG/NAME[@REVISION]")
    train_data: str = setting(help="a split folder written by tokenize")
    out_dir: str = setting(help="the folder for the trained weights, metrics.json and the resumable checkpoint")
    val_data: str | None = setting(None, "a split folder written by tokenize: the held-out loss before training and "
                                         "after each epoch", if_none="none")
    method: str = setting("adapter", "what trains: the paper's adapter, LoRA, or full (every weight)")
    adapter_len: int = setting(AdapterArgs.adapter_len, "prompt vectors per adapted layer")
    adapter_layers: int = setting(AdapterArgs.adapter_layers, "the top layers that get prompts")
    gate_init: str = setting(AdapterArgs.gate_init, "zero: the paper's zero-init attention; random: its ablation "
                                                    "(the untrained prompts reach the model from the first step)")
    lora_rank: int = setting(LoRAArgs.rank, "--method lora: the rank of each update")
    lora_alpha: float = setting(LoRAArgs.alpha, "--method lora: the update is scaled by alpha / rank")
    lora_dropout: float = setting(LoRAArgs.dropout, "--method lora: dropout on the update's input, while training")
    lora_targets: str = setting(",".join(LoRAArgs.targets), "--method lora: the projections it adapts, "
                                                            f"comma-separated, of {', '.join(LORA_TARGETS)}")
    epochs: int = setting(5, "passes over the training data: the learning-rate schedule's length")
    warmup_epochs: float = setting(2.0, "epochs of linear warm-up, before the half-cosine decay to --min-lr")
    blr: float = setting(9e-3, "base learning rate: the peak is blr * global_batch / 256, unless --lr")
    lr: float | None = setting(None, "the peak learning rate, absolute", if_none="blr * global_batch / 256")
    min_lr: float = setting(0.0, "the learning rate at the schedule's end")
    weight_decay: float = setting(0.02, "AdamW's weight decay")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW's betas")
    global_batch: int = setting(64, "samples per optimizer step, over all processes")
    rows_per_micro_batch: int = setting(4, "packed rows per forward/backward: a memory knob, no effect on the math "
                                           "(but on which dropout masks a LoRA's samples draw)")
    row_len: int = setting(TokenizeConfig.max_seq_len, "tokens per packed row; at least the longest sample")
    pad_id: int = setting(0, "the token id that fills packed rows (never a target)")
    seed: int = setting(0, "seed of the initialisation and of the data order")
    checkpoint_every: int = setting(100, "optimizer steps between checkpoints; one is always written at the end")
    max_steps: int | None = setting(None, "stop after this many optimizer steps, the schedule still spanning every "
                                          "epoch (tests, benchmarks)", if_none="no limit")
    device: str | None = setting(None, "cpu, cuda or cuda:N", if_none="cuda:LOCAL_RANK when a GPU is visible, else cpu")
    compile: bool = setting(False, "torch.compile the blocks")
    compile_cache: str | None = setting_of(CompileConfig, "compile_cache")
    precision: str = setting("auto", "the frozen base's block matmuls: auto, in the model's dtype (bf16 on a GPU, fp32 "
                                     "on the CPU); fp8, in float8 with dynamic tensorwise scales (torchao; a GPU of "
                                     "compute capability 8.9 or newer; adapter and LoRA, not full)")
    fsdp: bool = setting(False, "shard the layers over the processes (FSDP2): models too big for one GPU")
    image_features: str | None = setting(None, "a feature cache written by encode-images: train the multimodal "
                                               "adapter", if_none="text only")
    run_name: str | None = setting(None, "the MLflow run's name", if_none="the output folder's")
    tags: dict[str, str] = setting(help="the MLflow run's tags", default_factory=dict)

    @property
    def adapter(self) -> AdapterArgs:
        return AdapterArgs(self.adapter_len, self.adapter_layers, self.gate_init)  # type: ignore[arg-type]

    @property
    def lora(self) -> LoRAArgs:
        return LoRAArgs(self.lora_rank, self.lora_alpha, self.lora_dropout,
                        tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.global_batch / 256

    def check_settings(self) -> None:
        """Settings that cannot go together, refused by the options alone (no input read): train checks them, and
        the command line before the command starts (a usage error)."""
        if self.image_features and self.method != "adapter":
            raise ValueError(f"--image-features: images are read by the multimodal adapter; method {self.method} is "
                             "text-only (leave --image-features out, or use --method adapter)")
        if self.min_lr > self.peak_lr():  # the cosine would climb from the peak towards it
            raise ValueError(f"--min-lr {self.min_lr} is above the peak learning rate {self.peak_lr():g} (--lr, else "
                             "--blr x --global-batch / 256); expected the schedule's end at or below its peak")
        if self.precision == "fp8" and self.method not in ("adapter", "lora"):
            raise ValueError(f"--precision fp8 computes a frozen base's matmuls in float8; method {self.method} trains "
                             "every weight (use --method adapter or lora, or --precision auto)")


@dataclass
class PretrainConfig:
    """The demo base's pre-training: AdamW on random windows of the corpus, 5% warm-up then cosine decay; the
    defaults train the demo preset in about a CPU minute."""

    preset: str = setting("demo", "the architecture, a ModelArgs preset (vocab_size comes from the tokenizer)")
    steps: int = setting(600, "optimizer steps")
    batch_size: int = setting(16, "windows per step")
    seq_len: int = setting(128, "tokens per window")
    lr: float = setting(3e-3, "the peak learning rate")
    seed: int = setting(0, "seed of the initialisation and of the windows drawn")
    device: str = setting("cpu", "where it trains: the demo base is small enough for the CPU (cuda works too)")


# Where a command's model runs (devices.py picks what is left open), and the weights' precisions it takes.
DTYPES = ("float32", "bfloat16", "float16")
# How the frozen base's block weights may be stored for inference (quantize.py).
QUANTIZATIONS = ("int8", "int8-g32")
# What the frozen base's block matmuls compute in while training (quantize.py): the model's dtype, or float8.
PRECISIONS = ("auto", "fp8")


@dataclass(frozen=True)
class InferenceConfig:
    """How a loaded model is run to answer or to score (generate, evaluate; complete and encode-images take the
    device, and complete the dtype and quantize)."""

    batch_size: int = setting(16, "prompts decoded, or samples scored, together")
    device: str | None = setting(None, "cpu, cuda or cuda:N", if_none="cuda if available, else cpu")
    dtype: str | None = setting(None, "the weights' precision", if_none="bfloat16 on CUDA, float32 on CPU")
    quantize: str | None = setting(None, "int8: the blocks' linear weights as weight-only int8 (torchao), a scale "
                                         "per row, half the bytes each decoded token reads; int8-g32: a scale per 32 "
                                         "inputs, closer to --dtype; embeddings, output layer and adapter stay in "
                                         "--dtype", if_none="none, every weight in --dtype")


# complete is a quick check of weights: in their full precision on any device.
COMPLETE_INFERENCE = InferenceConfig(dtype="float32")


# Sampling's settings that only a draw reads: greedy decoding (temperature 0) ignores them (the CLI refuses them
# there, and the workflow leaves them out).
DRAW_SETTINGS = ("top_p", "seed")


@dataclass(frozen=True)
class Sampling:
    """How generate.py draws each next token; the default is greedy decoding (deterministic)."""

    max_new_tokens: int = setting(128, "tokens generated per prompt at most (fewer when it ends with EOS)")
    temperature: float = setting(0.0, "0: greedy; the paper's samples: 0.1")
    top_p: float = setting(0.75, "nucleus sampling: draw among the likeliest tokens holding this much of the "
                                 "probability, in (0, 1]; the paper's: 0.75")
    seed: int = setting(0, "seed of the draws; each prompt draws from a seed of its own, so that its answer is "
                           "the same at any --batch-size")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs max_new_tokens >= 1, temperature >= 0 and top_p in (0, 1], got {self}")

    def describe(self) -> str:
        """How the answers were decoded, in words (each generation records it; the report's caption says it)."""
        if self.temperature == 0:
            return f"greedy, at most {self.max_new_tokens} new tokens"
        return (f"sampled at temperature {self.temperature:g}, top-p {self.top_p:g}, seed {self.seed}, at most "
                f"{self.max_new_tokens} new tokens")


# The paper's samples (its released generation code): nucleus sampling at temperature 0.1.
PAPER_SAMPLING = Sampling(temperature=0.1)

TASKS = ("scienceqa", "alpaca")
# How evaluate reads a ScienceQA answer (evaluate.py): decoded, or the most likely option.
MODES = ("generate", "likelihood")


@dataclass
class Evaluation:
    """What is scored and where its results go: the model (base, and the adapter or LoRA file on it, if any), the
    data, the output folder and the MLflow run's name and tags; the settings are `evaluate` options."""

    task: str = setting(help="scienceqa: accuracy per category; alpaca: held-out loss and perplexity")
    base: Path
    adapter: Path | None
    data: Path
    out_dir: Path
    split: str | None = setting(None, "scienceqa: which split's questions", if_none="all")
    mode: str = setting("generate", "scienceqa: decode and parse 'The answer is (X)' (the paper's), or pick the "
                                    "most likely option (deterministic, one forward pass per option)")
    row_len: int = setting(TokenizeConfig.max_seq_len, "alpaca: tokens per packed row; at least the longest sample")
    run_name: str | None = setting(None, "the MLflow run's name", if_none="'evaluate TASK'")
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoConfig:
    """The embedded demo data (data/demo.py): its size and seed, one field per `demo-data` option."""

    seed: int = setting(0, "seed of the generated facts, texts, images and splits")
    instructions: int = setting(2000, "Alpaca-format records")
    questions: int = setting(1200, "ScienceQA-format problems (at least 72: every split gets every kind)")


@dataclass(frozen=True)
class SentencePieceConfig:
    """The demo's tokenizer (tokenizer.train_sentencepiece), one field per `train-tokenizer` option."""

    vocab_size: int = setting(PRESETS["demo"]["vocab_size"], "the vocabulary's size: the demo preset's")


# What a stage does with an input it cannot use: fail the run, or leave it out and list it.
POLICIES = ("fail", "skip")


@dataclass(frozen=True)
class FetchConfig:
    """How fetch normalises a source (data/fetch.py), one field per `fetch` setting (the source's own pins and
    split fractions are inputs, without defaults)."""

    split_seed: int = setting(0, "seed of --assign-splits")
    policy: str = setting("fail", "an image path leaving the source, or split-file pids the problems lack: fail the "
                                  "run, or count and list them in fetch.json")


@dataclass(frozen=True)
class ValidateConfig:
    """What validate (data/validate.py) does with invalid records."""

    policy: str = setting("fail", "invalid records: fail the run, or leave them out (counted in validation.json)")


@dataclass(frozen=True)
class TinyClipConfig:
    """The demo's stand-in for a real CLIP vision tower (multimodal.save_tiny_clip)."""

    seed: int = setting(0, "seed of its random weights (the same seed writes the same bytes)")


@dataclass(frozen=True)
class PromptFormat:
    """How complete turns its prompt into tokens (prompts.TEMPLATES)."""

    template: str = setting("alpaca", "the prompt format the model was tuned with (none: the prompt as it is)")
    bos: bool = setting(True, "prepend BOS (--no-bos: chat-tuned models often lack it)")


@dataclass(frozen=True)
class EncodeImagesConfig:
    """How encode-images runs the frozen vision tower over the images (multimodal.encode_images)."""

    policy: str = setting("fail", "a missing or unreadable image: fail the run, or leave it out and list it")
    batch_size: int = setting(64, "images per forward pass")
