"""CPU smoke runs of the `llama-adapter` command line, as a user (or a Snakemake rule) calls it."""

import argparse
import json
import os
import subprocess
import sys

import torch

from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.checkpoint import save_adapter, save_meta_checkpoint
from llama_adapter.config import AdapterArgs, ModelArgs


def run_cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "llama_adapter.cli", *args], capture_output=True, text=True, env=env)


def test_help_of_every_subcommand():
    for sub in ("inspect", "complete", "fetch-smollm2"):
        proc = run_cli(sub, "--help")
        assert proc.returncode == 0 and "usage: llama-adapter" in proc.stdout, sub
    from importlib.metadata import version

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"llama-adapter {version('llama-adapter-pipeline')}"
    assert "--template none" in run_cli("complete", "--help").stdout  # how to get a raw continuation


def test_every_command_tags_its_run_alike():
    """One tag syntax for every command: --tag KEY=VALUE, repeated; anything else is a usage error."""
    from llama_adapter.cli import build_parser

    parser = build_parser()
    for command in (["train", "--base", "b", "--train-data", "t", "--out-dir", "o"],
                    ["evaluate", "--base", "b", "--task", "alpaca", "--data", "d", "--out", "o"]):
        ns = parser.parse_args([*command, "--tag", "rule=x", "--tag", "experiment=a=b"])
        assert ns.tags == {"rule": "x", "experiment": "a=b"}
        assert parser.parse_args(command).tags == {}


def test_inspect_7b_preset_counts_the_paper_parameters():
    proc = run_cli("inspect", "7B", "--adapter-len", "10", "--adapter-layers", "30")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["trainable_parameters"] == 1_229_760
    assert report["base_parameters"] == 6_738_415_616


def test_complete_with_meta_checkpoint_and_adapter(tmp_path, llama_sp_model):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=32000, hidden_dim=64)
    model = AdaptedTransformer(args, AdapterArgs(adapter_len=2, adapter_layers=1))
    save_meta_checkpoint(model, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter.safetensors", base_model="random-tiny")
    proc = run_cli("complete", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter.safetensors"),
                   "--tokenizer", str(llama_sp_model), "--prompt", "Name a colour.", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # random weights: some text, not sense


def test_bad_checkpoint_is_a_one_line_error(tmp_path):
    proc = run_cli("complete", "--base", str(tmp_path), "--prompt", "x")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "not a recognised checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_refuses_a_job_without_the_gpus_it_asked_for(tmp_path):
    """A scheduler may hand a job fewer GPUs than requested: training stops before loading anything."""
    proc = run_cli("train", "--base", str(tmp_path), "--train-data", str(tmp_path), "--out-dir", str(tmp_path / "o"),
                   "--expect-gpus", "2", env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "requested 2 GPU(s) per node" in proc.stderr and "sees 0 (CUDA_VISIBLE_DEVICES=)" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_cli_starts_without_torch_for_the_data_stages():
    """Many short workflow jobs: the CLI itself must not pay torch's import."""
    code = "import sys, llama_adapter.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_each_commands_defaults_are_its_configs():
    """The options' defaults are the dataclasses' (generate: the paper's sampling; complete: greedy, in float32),
    and tokenize leaves an option it was not given out, for TokenizeConfig's default."""
    from llama_adapter.cli import build_parser, config_of
    from llama_adapter.config import COMPLETE_INFERENCE, PAPER_SAMPLING, InferenceConfig, Sampling, TokenizeConfig

    parse = build_parser().parse_args
    generate = parse(["generate", "--base", "b", "--prompts", "p", "--out", "o"])
    assert config_of(generate, Sampling) == PAPER_SAMPLING and PAPER_SAMPLING.temperature == 0.1
    assert config_of(generate, InferenceConfig) == InferenceConfig()
    complete = parse(["complete", "--base", "b", "--prompt", "x"])
    assert config_of(complete, Sampling) == Sampling() and Sampling().temperature == 0
    assert config_of(complete, InferenceConfig) == COMPLETE_INFERENCE and complete.dtype == "float32"
    tokenize = parse(["tokenize", "--dataset", "alpaca", "--validated", "v", "--tokenizer", "t", "--out", "o"])
    assert config_of(tokenize, TokenizeConfig) == TokenizeConfig() and not hasattr(tokenize, "seed")
    assert not parse(["tokenize", "--dataset", "alpaca", "--validated", "v", "--tokenizer", "t", "--out", "o",
                      "--no-mask-prompt"]).mask_prompt


def test_every_option_has_help():
    """Every option of every command says what it is; a dataclass's options also show their default."""
    from llama_adapter.cli import build_parser

    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    silent = [f"{name} {action.dest}" for name, p in commands.choices.items() for action in p._actions
              if not action.help]
    assert silent == []
    assert "(default: 0.1)" in commands.choices["generate"].format_help()
