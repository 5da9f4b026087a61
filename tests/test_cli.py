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


def test_a_tag_key_given_twice_is_refused():
    """--tag rule=a --tag rule=b once tagged the run rule=b, the first value silently lost; a key given twice is
    a usage error naming the option and the key, before anything runs."""
    proc = run_cli("evaluate", "--base", "b", "--task", "alpaca", "--data", "d", "--out", "o", "--tag", "rule=a",
                   "--tag", "experiment=x", "--tag", "rule=b")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("llama-adapter evaluate: error: argument --tag: ['rule'] given more than once; "
                                   "expected one KEY=VALUE per key (see llama-adapter evaluate --help)")


def test_inspect_7b_preset_counts_the_paper_parameters():
    proc = run_cli("inspect", "7B", "--adapter-len", "10", "--adapter-layers", "30")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["trainable_parameters"] == 1_229_760
    assert report["base_parameters"] == 6_738_415_616


def test_inspect_takes_the_adapter_defaults_capped_at_the_models_layers(tmp_path, capsys):
    """inspect's --adapter-layers defaulted to the paper's 30 whatever the model: `inspect demo` (3 layers), or a
    small checkpoint, failed unless given it. Left out, it is AdapterArgs' default, or every layer of a model with
    fewer (AdapterArgs.layers_for); one given beyond the model's layers is still refused. (In this process: the
    command line's own process is the other CLI tests'.)"""
    from llama_adapter.cli import main

    save_meta_checkpoint(AdaptedTransformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, hidden_dim=64),
                                            AdapterArgs(adapter_len=2, adapter_layers=1)), tmp_path / "base")
    for model, layers in (("demo", 3), ("7B", 30), (str(tmp_path / "base"), 2)):
        assert main(["inspect", model]) == 0
        adapter = json.loads(capsys.readouterr().out)["adapter"]
        assert (adapter["adapter_layers"], adapter["adapter_len"]) == (layers, AdapterArgs.adapter_len)
    assert main(["inspect", "demo", "--adapter-layers", "4"]) == 2
    assert "--adapter-layers 4: exceeds the 3 layers of preset demo" in capsys.readouterr().err


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


def test_the_papers_released_adapter_loads_in_the_inference_commands(tmp_path, llama_sp_model):
    """An original-release .pth records neither adapter_len nor adapter_layers: complete, generate and evaluate
    take them as options and answer as with the same adapter in our format; given for an adapter whose file
    records its shape, they are a one-line error rather than silently ignored."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=3, n_heads=2, vocab_size=32000, hidden_dim=64)
    adapter = AdapterArgs(adapter_len=3, adapter_layers=2)
    model = AdaptedTransformer(args, adapter)
    with torch.no_grad():  # the release is fp16: the same values in both files, so the same greedy answers
        model.adapter_gate.normal_()
        for p in (model.adapter_query, model.adapter_gate):
            p.copy_(p.half().float())
    save_meta_checkpoint(model, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter.safetensors", base_model="random-tiny")
    first = args.n_layers - adapter.adapter_layers
    release = {"adapter_query.weight": model.adapter_query.detach().reshape(-1, args.dim).half()}
    for i in range(args.n_layers):
        gate = model.adapter_gate[i - first] if i >= first else torch.zeros(args.n_heads)
        release[f"layers.{i}.attention.gate"] = gate.detach().reshape(1, -1, 1, 1).half()
    torch.save(release, tmp_path / "release.pth")
    shape = ["--adapter-len", "3", "--adapter-layers", "2"]
    common = ["--base", str(tmp_path / "base"), "--tokenizer", str(llama_sp_model), "--max-new-tokens", "6"]

    def complete(adapter: str, *extra: str) -> subprocess.CompletedProcess:
        return run_cli("complete", *common, "--adapter", str(tmp_path / adapter), "--prompt", "Name a colour.", *extra)

    ours, released = complete("adapter.safetensors"), complete("release.pth", *shape)
    assert ours.returncode == 0 and released.returncode == 0, ours.stderr + released.stderr
    assert released.stdout == ours.stdout
    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "instruction": "Name a colour."}\n')
    proc = run_cli("generate", *common, "--adapter", f"paper={tmp_path / 'release.pth'}", *shape, "--temperature", "0",
                   "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "answers.jsonl"))
    assert proc.returncode == 0, proc.stderr
    [row] = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert row["adapter"] == "paper" and row["output"].strip() == ours.stdout.strip()
    wrong = complete("adapter.safetensors", *shape)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "--adapter-len/--adapter-layers given, but no --adapter is an original-release .pth" in wrong.stderr
    too_deep = complete("release.pth", "--adapter-layers", "4")
    assert too_deep.returncode == 2 and "Traceback" not in too_deep.stderr, too_deep.stderr


def test_bad_checkpoint_is_a_one_line_error(tmp_path):
    proc = run_cli("complete", "--base", str(tmp_path), "--prompt", "x")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "not a recognised checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_refuses_a_job_without_the_gpus_it_asked_for(tmp_path):
    """A scheduler may hand a job fewer GPUs than requested: training stops before loading anything."""
    proc = run_cli("train", "--base", str(tmp_path / "b"), "--train-data", str(tmp_path / "d"), "--out-dir",
                   str(tmp_path / "o"), "--expect-gpus", "2", env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "requested 2 GPU(s) per node" in proc.stderr and "sees 0 (CUDA_VISIBLE_DEVICES=)" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_cli_starts_without_torch_for_the_data_stages():
    """Many short workflow jobs: the CLI itself must not pay torch's import, nor the report module, which every
    Snakefile parse imports (each cluster job's too), scipy's (0.6 s)."""
    code = "import sys, llama_adapter.cli, llama_adapter.report; print('torch' in sys.modules, 'scipy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False"] * 2


def test_each_commands_defaults_are_its_configs():
    """The options' defaults are the dataclasses' (generate: the paper's sampling; complete: greedy, in float32),
    and tokenize leaves an option it was not given out, for TokenizeConfig's default."""
    from llama_adapter.cli import build_parser, config_of
    from llama_adapter.config import COMPLETE_INFERENCE, PAPER_SAMPLING, InferenceConfig, Sampling, TokenizeConfig

    parse = build_parser().parse_args
    generate = parse(["generate", "--base", "b", "--prompts", "p", "--out", "o"])
    assert config_of(generate, Sampling) == PAPER_SAMPLING and PAPER_SAMPLING.temperature == 0.1
    from inspect import signature

    from llama_adapter.generate import generate_requests

    assert signature(generate_requests).parameters["sampling"].default == PAPER_SAMPLING  # called from Python alike
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
