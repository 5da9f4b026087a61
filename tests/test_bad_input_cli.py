"""Bad input to the model-side commands (issue 16): every failure is one line on stderr naming the path, option,
key or line and what was expected, with a non-zero exit, no traceback, and nothing written.

The commands are driven through `cli.main` in this process (torch is imported once), and a few through the
installed `llama-adapter` as a user runs it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_adapter import cli
from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.checkpoint import save_adapter, save_meta_checkpoint
from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.data.tokens import Encoded, write_split
from llama_adapter.model import Transformer
from llama_adapter.tokenizer import load_tokenizer, train_sentencepiece

SMALL = ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=256)  # prompts: 129 tokens


def split(path: Path, n: int, seed: int, high: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    enc = Encoded([], [], [], [])
    for i in range(n):
        prompt = rng.integers(10, high, size=rng.integers(3, 12))
        tokens = np.concatenate([[1], prompt, [5, 6], [2]]).astype(np.int32)
        enc.tokens.append(tokens), enc.masks.append(np.arange(len(tokens)) > len(prompt)), enc.source_index.append(i)
    write_split(path, enc, np.arange(n))
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """A tiny base (vocab 64) with its adapter, a tokenizer of 300 pieces (too many for that base) and a base that
    fits it, token splits (one with ids beyond 64), a prompts file and a corpus."""
    root = tmp_path_factory.mktemp("bad_input")
    words = "the cat sat on a mat and then it ran far away from every dog in town".split()
    rng = np.random.default_rng(0)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(words, 12))}) + "\n" for _ in range(200)))
    train_sentencepiece(root / "corpus.jsonl", root / "tok.model", 300)
    torch.manual_seed(0)
    model = AdaptedTransformer(SMALL, AdapterArgs(adapter_len=2, adapter_layers=1))
    save_meta_checkpoint(model, root / "base")
    save_adapter(model, root / "adapter.safetensors", base_model="small")
    fits = Transformer(ModelArgs(**{**SMALL.to_dict(), "vocab_size": load_tokenizer(root / "tok.model").vocab_size}))
    save_meta_checkpoint(fits, root / "base300")
    shutil.copy(root / "tok.model", root / "base300" / "tokenizer.model")
    split(root / "train", 16, 0), split(root / "val", 4, 1), split(root / "wide", 16, 0, high=200)
    (root / "prompts.jsonl").write_text('{"id": 1, "instruction": "Say hi."}\n')
    return root


@pytest.fixture(autouse=True)
def mlflow_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


def run(capsys, *args) -> tuple[int, str]:
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def one_line_error(capsys, *args, names: list[str]) -> str:
    rc, err = run(capsys, *args)
    assert rc not in (0, None), err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llama-adapter {args[0]}: error: "), err
    for name in names:
        assert str(name) in lines[0], (name, err)
    return lines[0]


def train_args(w, out, *extra):
    return ("train", "--base", w / "base", "--train-data", w / "train", "--out-dir", out, "--adapter-len", "2",
            "--adapter-layers", "1", "--epochs", "1", "--global-batch", "8", "--row-len", "64", "--device", "cpu",
            *extra)


def generate_args(w, out, *extra, prompts=None, adapter=None, base=None):
    return ("generate", "--base", base or w / "base300", "--adapter", adapter or w / "adapter.safetensors",
            "--prompts", prompts or w / "prompts.jsonl", "--out", out, "--max-new-tokens", "2", "--device", "cpu",
            *extra)


# ---------------------------------------------------------------- vocabulary sizes


def test_train_data_with_ids_beyond_the_base_vocabulary_writes_nothing(w, tmp_path, capsys):
    out = tmp_path / "out"
    msg = one_line_error(capsys, *train_args(w, out)[:4], w / "wide", *train_args(w, out)[5:],
                         names=["--train-data", w / "wide", "vocab_size 64"])
    assert "token id" in msg
    assert not out.exists()


def test_tokenizer_larger_than_the_embedding_in_generate_writes_nothing(w, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    one_line_error(capsys, *generate_args(w, out, "--tokenizer", w / "tok.model", base=w / "base"),
                   names=["--tokenizer", w / "tok.model", "300", "vocab_size 64"])
    assert not out.exists()


def test_tokenizer_larger_than_the_embedding_in_evaluate_writes_nothing(w, tmp_path, capsys):
    out = tmp_path / "eval"
    one_line_error(capsys, "evaluate", "--task", "alpaca", "--base", w / "base", "--tokenizer", w / "tok.model",
                   "--adapter", w / "adapter.safetensors", "--data", w / "val", "--out", out, "--device", "cpu",
                   names=["--tokenizer", "vocab_size 64"])
    assert not out.exists()


def test_tokenizer_larger_than_the_embedding_in_complete(w, capsys):
    one_line_error(capsys, "complete", "--base", w / "base", "--tokenizer", w / "tok.model", "--prompt", "hi",
                   "--max-new-tokens", "2", names=["--tokenizer", "vocab_size 64"])


# ---------------------------------------------------------------- missing or wrong-kind inputs


@pytest.mark.parametrize("flag, value, expect", [
    ("--train-data", "missing", "no such folder"),
    ("--train-data", "corpus.jsonl", "is a file"),
    ("--train-data", ".", "not a token split"),
    ("--val-data", "missing", "no such folder"),
    ("--base", "missing", "no such file or folder"),
    ("--base", "corpus.jsonl", "not a recognised checkpoint"),
    ("--image-features", "missing", "no such folder"),
])
def test_train_input_paths(w, tmp_path, capsys, flag, value, expect):
    out = tmp_path / "out"
    args = list(train_args(w, out))
    if flag in args:
        args[args.index(flag) + 1] = w / value
    else:
        args += [flag, w / value]
    one_line_error(capsys, *args, names=[flag, w / value if value != "." else w, expect])
    assert not out.exists()


@pytest.mark.parametrize("output", ["train", "generate", "evaluate", "report", "train-tokenizer", "pretrain-base"])
def test_output_inside_a_file(w, capsys, output):
    """An output path whose parent is a file: one line naming the path, nothing made."""
    bad = w / "corpus.jsonl" / "sub" / "out"
    args = {
        "train": train_args(w, bad),
        "generate": generate_args(w, bad),
        "evaluate": ("evaluate", "--task", "alpaca", "--base", w / "base300", "--adapter", w / "adapter.safetensors",
                     "--data", w / "val", "--out", bad, "--device", "cpu"),
        "report": ("report", "--tokens", f"alpaca={w / 'val'}", "--out", bad),
        "train-tokenizer": ("train-tokenizer", "--corpus", w / "corpus.jsonl", "--out", bad),
        "pretrain-base": ("pretrain-base", "--corpus", w / "corpus.jsonl", "--tokenizer", w / "tok.model", "--out", bad,
                          "--steps", "1"),
    }[output]
    one_line_error(capsys, *args, names=[bad, "is a file"])


@pytest.mark.parametrize("command", ["generate", "train-tokenizer", "report", "fetch"])
def test_an_output_of_the_other_kind_is_refused_and_kept(w, tmp_path, capsys, command):
    """An --out that is a folder where the command writes a file (generate --out results/generations), or a file where
    it writes a folder (report --out report.md), is no earlier output of the command: it was refused, then removed
    as one, a folder with everything in it. Now refused before the command runs, whatever else is wrong (fetch's
    source is missing), and left as it was."""
    folder, file = tmp_path / "results", tmp_path / "report.md"
    (folder / "keep").mkdir(parents=True)
    (folder / "keep" / "answers.jsonl").write_text("{}\n")
    file.write_text("kept")
    out, kind = {"generate": (folder, "is a folder"), "train-tokenizer": (folder, "is a folder"),
                 "report": (file, "is a file"), "fetch": (file, "is a file")}[command]
    args = {"generate": generate_args(w, out, prompts=w / "missing.jsonl"),
            "train-tokenizer": ("train-tokenizer", "--corpus", w / "corpus.jsonl", "--out", out),
            "report": ("report", "--tokens", f"alpaca={w}", "--out", out),
            "fetch": ("fetch", "--dataset", "alpaca", "--source", w / "missing.json", "--out", out)}[command]
    one_line_error(capsys, *args, names=[f"--out {out}: {kind}"])
    assert (folder / "keep" / "answers.jsonl").read_text() == "{}\n" and file.read_text() == "kept"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(w, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_error(capsys, *train_args(w, ro / "out"), names=[ro, "not writable"])
        assert not (ro / "out").exists()
    finally:
        ro.chmod(0o755)


def test_os_error_naming_a_path_is_one_line(w, tmp_path, capsys, monkeypatch):
    """What no early check foresees (a disk full, a folder made read-only meanwhile) is still one line naming the
    path and the system's reason."""
    import llama_adapter.report

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied", str(tmp_path / "report" / "report.md"))

    monkeypatch.setattr(llama_adapter.report, "write_report", denied)
    one_line_error(capsys, "report", "--tokens", f"alpaca={w}", "--out", tmp_path / "report",
                   names=[tmp_path / "report" / "report.md", "Permission denied"])


@pytest.mark.parametrize("what", ["prompts-missing", "adapter-missing", "adapter-folder"])
def test_generate_input_paths(w, tmp_path, capsys, what):
    out = tmp_path / "g.jsonl"
    if what == "prompts-missing":
        args, names = generate_args(w, out, prompts=w / "missing.jsonl"), [w / "missing.jsonl", "no such file"]
    elif what == "adapter-missing":
        args, names = generate_args(w, out, adapter=w / "missing.safetensors"), ["--adapter", "no such file"]
    else:
        args, names = generate_args(w, out, adapter=w / "base"), ["--adapter", w / "base", "is a folder"]
    one_line_error(capsys, *args, names=names)
    assert not out.exists()


@pytest.mark.parametrize("content, line, expect", [
    ('{"instruction": "a"}\n\n{"instruction": "b"\n', 3, "not valid JSON"),
    ('{"instruction": "a"}\n["b"]\n', 2, "not an object"),
    ('{"instruction": 3}\n', 1, "must be a string"),
    ('{"instruction": "a", "inptu": "b"}\n', 1, "unknown key(s) ['inptu']"),  # the input would be lost
    ('{"instruction": "a", "prompt": "b"}\n', 1, "both of 'instruction' and 'prompt'"),
    # a raw prompt is used as it is: an input beside it was left out of what the model was asked, unsaid
    ('{"prompt": "a", "input": "b"}\n', 1, "'input' goes with 'instruction'"),
    ('{"id": "x", "instruction": "a"}\n{"id": "x", "instruction": "b"}\n', 2, "id 'x' is also line 1's"),
    ('{"instruction": "a"}\n{"id": 1, "instruction": "b"}\n', 2, "id 1 is also line 1's"),  # (1: line 1's own)
    ('{"id": NaN, "instruction": "a"}\n', 1, "line 1, at ['id']: not valid JSON (NaN: JSON has no NaN"),
    # a blank instruction or prompt: nothing asked (an input is the task's context, not the task), as validate
    # refuses an Alpaca record with a blank instruction
    ('{"instruction": "a"}\n{"id": "e", "instruction": ""}\n', 2, "(id 'e'): 'instruction' is blank"),
    ('{"instruction": " \\n\\t"}\n', 1, "'instruction' is blank"),
    ('{"instruction": "", "input": "The cat sat."}\n', 1, "'instruction' is blank"),
    ('{"prompt": "a"}\n{"prompt": "  "}\n', 2, "'prompt' is blank"),
])
def test_generate_bad_prompt_line_names_file_and_line(w, tmp_path, capsys, content, line, expect):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    out = tmp_path / "g.jsonl"
    # (a bad value within the line names its key after the line: "line 1, at ['id']: ...")
    one_line_error(capsys, *generate_args(w, out, prompts=prompts), names=[f"{prompts}, line {line}", expect])
    assert not out.exists()


@pytest.mark.parametrize("prompt", ["", " \n "])
def test_complete_blank_prompt_is_refused_before_loading(w, capsys, monkeypatch, prompt):
    """An empty or blank --prompt asks nothing: refused naming the option as it is parsed, before the base is loaded
    (it was put into the template and answered)."""
    monkeypatch.setattr(cli, "load_for_inference", lambda *a, **k: pytest.fail("the base was loaded"))
    one_line_error(capsys, "complete", "--base", w / "base300", "--prompt", prompt, "--max-new-tokens", "2",
                   names=["--prompt", "blank; expected non-blank text"])


def test_generate_empty_prompts_file(w, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text("\n")
    one_line_error(capsys, *generate_args(w, tmp_path / "g.jsonl", prompts=tmp_path / "p.jsonl"),
                   names=[tmp_path / "p.jsonl", "no prompts"])


def test_generate_request_naming_an_adapter_not_given(w, tmp_path, capsys):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "g.jsonl"
    prompts.write_text('{"prompt": "x", "adapter": "other"}\n')
    one_line_error(capsys, *generate_args(w, out, prompts=prompts), names=[prompts, "['other']", "not given"])
    assert not out.exists()


# ---------------------------------------------------------------- adapters and bases


def test_adapter_without_metadata_says_what_it_is_and_what_was_expected(w, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(2)}, tmp_path / "a.safetensors")
    out = tmp_path / "g.jsonl"
    msg = one_line_error(capsys, *generate_args(w, out, adapter=tmp_path / "a.safetensors"),
                         names=[tmp_path / "a.safetensors", "without this project's metadata", "some.weight", ".pth"])
    assert "None" not in msg
    assert not out.exists()


def test_adapter_layers_beyond_the_base(w, tmp_path, capsys):
    one_line_error(capsys, *train_args(w, tmp_path / "out", "--adapter-layers", "5"),
                   names=["--adapter-layers", "5", "2 layers", w / "base"])
    assert not (tmp_path / "out").exists()


def test_base_missing_a_tensor_is_one_line(w, tmp_path, capsys):
    shutil.copytree(w / "base300", tmp_path / "base")
    state = torch.load(tmp_path / "base" / "consolidated.00.pth", weights_only=True)
    del state["layers.1.attention.wq.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "base" / "consolidated.00.pth")
    one_line_error(capsys, "inspect", tmp_path / "base", "--adapter-layers", "1",
                   names=["missing (1): layers.1.attention.wq.weight", "unexpected (1): extra.weight"])


def test_hf_config_missing_a_key(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    one_line_error(capsys, "inspect", tmp_path / "hf", names=[tmp_path / "hf" / "config.json", "num_hidden_layers"])


def test_inspect_neither_preset_nor_path(capsys):
    one_line_error(capsys, "inspect", "7b", names=["7b", "preset", "7B"])


# ---------------------------------------------------------------- option values


@pytest.mark.parametrize("option, value", [("--epochs", "0"), ("--global-batch", "0"), ("--row-len", "-1"),
                                           ("--rows-per-micro-batch", "0"), ("--blr", "-1"), ("--tag", "rule"),
                                           ("--max-steps", "0")])
def test_train_option_ranges(w, tmp_path, capsys, option, value):
    one_line_error(capsys, *train_args(w, tmp_path / "out", option, value), names=[option, value])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [("--max-new-tokens", "0"), ("--batch-size", "0"), ("--temperature", "-1"),
                                           ("--top-p", "0"), ("--top-p", "1.5")])
def test_generate_option_ranges(w, tmp_path, capsys, option, value):
    one_line_error(capsys, *generate_args(w, tmp_path / "g.jsonl", option, value), names=[option, value])
    assert not (tmp_path / "g.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "generate"])
def test_cuda_device_without_cuda(w, tmp_path, capsys, command):
    out = tmp_path / "out"
    args = train_args(w, out) if command == "train" else generate_args(w, out)
    args = [*args[: args.index("--device")], "--device", "cuda"]
    one_line_error(capsys, *args, names=["--device cuda", "CUDA is not available"])
    assert not out.exists()


def test_unknown_device(w, tmp_path, capsys):
    one_line_error(capsys, *generate_args(w, tmp_path / "g.jsonl")[:-2], "--device", "gpu0",
                   names=["--device", "gpu0", "cpu"])


# ---------------------------------------------------------------- report, tokenizer, pretraining


def test_report_names_each_missing_piece(w, tmp_path, capsys):
    """The report is told every file by role: a row without its scores, a score without its row, a trained row
    without its training, a training's missing file: one line naming the role or the file, no report."""
    out = tmp_path / "report"
    tokens = ("--tokens", f"alpaca={w}")
    one_line_error(capsys, "report", "--experiment", "instruction", *tokens, "--out", out,
                   names=["--scores", "instruction", "scores.json"])
    one_line_error(capsys, "report", "--experiment", "instruction", "--scores", f"typo={w / 's.json'}", *tokens,
                   "--out", out, names=["--scores", "typo", "no --experiment or --ablation"])
    one_line_error(capsys, "report", "--experiment", "instruction", "--scores", f"instruction={w / 's.json'}",
                   "--out", out, names=["--tokens", "alpaca=DIR"])
    one_line_error(capsys, "report", "--experiment", "a", "--scores", f"a={w / 's.json'}", "--scores",
                   f"a={w / 't.json'}", *tokens, "--out", out, names=["--scores", "'a'", "more than once"])
    one_line_error(capsys, "report", "--experiment", "a", "--scores", "a", *tokens, "--out", out,
                   names=["--scores", "NAME=PATH"])
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"task": "alpaca", "heldout_loss": 1.0, "perplexity": 2.7, "heldout_samples": 4,
                                  "method": "adapter"}))
    stats = tmp_path / "tokens"
    stats.mkdir()
    (stats / "stats.json").write_text(json.dumps({"dataset": "alpaca"}))
    rows = ("--experiment", "instruction", "--scores", f"instruction={scores}", "--tokens", f"alpaca={stats}")
    one_line_error(capsys, "report", *rows, "--out", out, names=["--training", "instruction", "trained model"])
    # A benchmark file the user names must be there (it was ignored: a training's wall time silently n/a); the
    # workflow's, passed before the trainings ran, are optional, a missing one no error (the next one shows)
    missing = tmp_path / "bench" / "train.tsv"
    one_line_error(capsys, "report", *rows, "--train-benchmark", f"instruction={missing}", "--out", out,
                   names=["--train-benchmark", f"instruction={missing}", "missing", "--optional-train-benchmark"])
    one_line_error(capsys, "report", *rows, "--optional-train-benchmark", f"instruction={missing}", "--out", out,
                   names=["--training", "instruction", "trained model"])
    one_line_error(capsys, "report", *rows, "--training", f"instruction={w / 'adapters' / 'instruction'}",
                   "--out", out, names=[w / "adapters" / "instruction" / "config.json", "missing", "train"])
    (stats / "stats.json").write_text(json.dumps({"dataset": "scienceqa"}))
    one_line_error(capsys, "report", *rows, "--out", out, names=["--tokens", "holds the scienceqa dataset"])
    assert not out.exists()


def test_report_center_not_json(w, tmp_path, capsys):
    one_line_error(capsys, "report", "--tokens", f"alpaca={w}", "--center", "{epochs: 3}", "--out", tmp_path / "r",
                   names=["--center", "JSON object"])


def test_report_failure_leaves_its_given_inputs(w, tmp_path, capsys):
    """An --out mistyped as a folder holding a given input (a NAME=PATH one): refused, the input left."""
    held = tmp_path / "held"
    (held / "tokens").mkdir(parents=True)
    (held / "tokens" / "stats.json").write_text("{}")
    one_line_error(capsys, "report", "--experiment", "a", "--tokens", f"alpaca={held / 'tokens'}", "--out", held,
                   names=["--out", "--tokens", "would replace the input"])
    assert (held / "tokens" / "stats.json").exists()


def test_train_tokenizer_bad_inputs(w, tmp_path, capsys):
    one_line_error(capsys, "train-tokenizer", "--corpus", w / "missing.jsonl", "--out", tmp_path / "t.model",
                   names=["--corpus", w / "missing.jsonl", "no such file"])
    one_line_error(capsys, "train-tokenizer", "--corpus", w / "corpus.jsonl", "--out", tmp_path / "t.model",
                   "--vocab-size", "5", names=["--vocab-size 5", w / "corpus.jsonl"])
    assert not (tmp_path / "t.model").exists()


def test_pretrain_base_bad_inputs(w, tmp_path, capsys):
    out = tmp_path / "base"
    common = ("--tokenizer", w / "tok.model", "--out", out)
    one_line_error(capsys, "pretrain-base", "--corpus", w / "corpus.jsonl", *common, "--preset", "huge",
                   names=["--preset", "huge"])
    one_line_error(capsys, "pretrain-base", "--corpus", w / "corpus.jsonl", *common, "--steps", "0",
                   names=["--steps", "0"])
    (tmp_path / "c.jsonl").write_text('{"text": "a b c"}\n{"txt": "d"}\n')
    one_line_error(capsys, "pretrain-base", "--corpus", tmp_path / "c.jsonl", *common, "--steps", "1",
                   names=[f"{tmp_path / 'c.jsonl'}, line 2", "'text'"])
    # a learning rate that diverges: the base was written with NaN weights, and the command succeeded
    one_line_error(capsys, "pretrain-base", "--corpus", w / "corpus.jsonl", *common, "--steps", "4", "--lr", "1e30",
                   "--batch-size", "2", "--seq-len", "16", names=["pretrain step", "loss nan", "--lr 1e+30"])
    assert not out.exists()


# ---------------------------------------------------------------- as a user runs it


def test_installed_command_reports_one_line(w, tmp_path):
    exe = Path(sys.executable).with_name("llama-adapter")
    args = [str(a) for a in train_args(w, tmp_path / "out")]
    args[args.index("--train-data") + 1] = str(w / "wide")
    proc = subprocess.run([str(exe) if exe.exists() else "llama-adapter", *args], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "--train-data" in proc.stderr and "vocab_size 64" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_run_leaves_no_earlier_output_for_the_next_stage(w, tmp_path, capsys):
    """An earlier run's adapter, generations and scores (with the evaluation's log of them) are removed when the
    rerun fails, whatever the failure: the next stage must not take them for this run's. A training's checkpoint
    stays for --resume."""
    train_out, gen_out, eval_out = tmp_path / "train", tmp_path / "g.jsonl", tmp_path / "eval"
    train_out.mkdir(), eval_out.mkdir()
    for stale in (train_out / "adapter.safetensors", train_out / "metrics.json", train_out / "checkpoint.pt", gen_out,
                  eval_out / "scores.json", eval_out / "predictions.csv", eval_out / "metrics.jsonl"):
        stale.write_text("from an earlier run")
    one_line_error(capsys, *train_args(w, train_out)[:4], w / "wide", *train_args(w, train_out)[5:],
                   names=["--train-data"])
    assert sorted(p.name for p in train_out.iterdir()) == ["checkpoint.pt"]
    one_line_error(capsys, *generate_args(w, gen_out, "--tokenizer", w / "tok.model", base=w / "base"),
                   names=["--tokenizer"])
    assert not gen_out.exists()
    one_line_error(capsys, "evaluate", "--task", "alpaca", "--base", w / "base", "--tokenizer", w / "tok.model",
                   "--adapter", w / "adapter.safetensors", "--data", w / "val", "--out", eval_out, "--device", "cpu",
                   names=["--tokenizer"])
    assert list(eval_out.iterdir()) == []


# ---------------------------------------------------------------- outputs over inputs


def test_an_output_over_an_input_is_refused_before_anything_runs(w, tmp_path, capsys):
    """An output that is an input, or holds one, would replace it when written (fetch --out the source's
    folder, generate --out its prompts, train --out-dir the base's folder, over its config.json): refused by name
    before the command runs, every input left as it was."""
    shutil.copytree(w / "base", tmp_path / "base")
    shutil.copy(w / "corpus.jsonl", tmp_path / "corpus.jsonl")
    (tmp_path / "src" / "sq").mkdir(parents=True)
    (tmp_path / "src" / "sq" / "problems.json").write_text("{}")
    shutil.copy(w / "prompts.jsonl", tmp_path / "p.jsonl")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [
        (["fetch", "--dataset", "scienceqa", "--source", tmp_path / "src" / "sq", "--out", tmp_path / "src"],
         ["--out", "--source", "sq"]),
        (["train-tokenizer", "--corpus", tmp_path / "corpus.jsonl", "--out", tmp_path / "corpus.jsonl"],
         ["--out", "--corpus"]),
        (list(generate_args(w, tmp_path / "p.jsonl", prompts=tmp_path / "p.jsonl")), ["--out", "--prompts"]),
        (list(generate_args(w, tmp_path / "p.jsonl", adapter=f"a={tmp_path / 'p.jsonl'}")), ["--out", "--adapter"]),
        ([*train_args(w, tmp_path / "base")[:2], tmp_path / "base", *train_args(w, tmp_path / "base")[3:]],
         ["--out-dir", "--base"]),
        (["report", "--scores", f"x={tmp_path / 'base' / 'params.json'}", "--out", tmp_path / "base"],
         ["--out", "--scores"]),
    ]
    for args, names in cases:
        msg = one_line_error(capsys, *args, names=names)
        assert "would replace the input" in msg
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_output_inside_an_input_folder_is_refused_before_anything_runs(w, tmp_path, capsys):
    """generate --out BASE/tokenizer.model replaced the tokenizer the run loads, and any output written inside a
    folder a command reads (the base's: one more *.safetensors is loaded with it; a token split, a validated or a
    training folder) changed that input; so did one over the tokenizer beside --base that no option names (Meta's
    LLaMA-1 layout: one level up), or over the adapter_config.json beside a PEFT adapter named by its weights
    file, or the tokenizer_config.json beside an HF tokenizer named by its tokenizer.json. Refused by name, through
    a symlink too (and an output that is a link in the folder, which writing replaces there), before the command
    runs; nothing written."""
    shutil.copytree(w / "base300", tmp_path / "base")
    shutil.copytree(w / "val", tmp_path / "val")
    shutil.copytree(w / "base300", tmp_path / "meta" / "7B")
    (tmp_path / "meta" / "7B" / "tokenizer.model").rename(tmp_path / "meta" / "tokenizer.model")
    (tmp_path / "link").symlink_to(tmp_path / "base")
    (tmp_path / "shared").mkdir()  # a base whose files are links to shared storage (as a hub cache's are)
    shutil.copytree(w / "base300", tmp_path / "linked", copy_function=lambda src, dst: (
        shutil.copy(src, tmp_path / "shared" / Path(src).name), os.symlink(tmp_path / "shared" / Path(src).name, dst)))
    (tmp_path / "run").mkdir()  # a training's folder: its adapter and the summary generate reads beside it
    shutil.copy(w / "adapter.safetensors", tmp_path / "run")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"method": "adapter"}))
    (tmp_path / "peft").mkdir()  # a PEFT adapter named by its weights file: the command reads the settings beside it
    shutil.copy(w / "adapter.safetensors", tmp_path / "peft" / "adapter_model.safetensors")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "hf").mkdir()  # an HF tokenizer named by its tokenizer.json: its BOS and EOS come from beside it
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    gen = list(generate_args(w, tmp_path / "x", base=tmp_path / "base"))
    cases = [
        (generate_args(w, tmp_path / "base" / "tokenizer.model", base=tmp_path / "base"),
         [f"--out {tmp_path / 'base' / 'tokenizer.model'} lies inside --base {tmp_path / 'base'}"]),
        (generate_args(w, tmp_path / "base" / "g.jsonl", base=tmp_path / "base"), ["lies inside --base"]),
        (generate_args(w, tmp_path / "linked" / "tokenizer.model", base=tmp_path / "linked"),
         [f"--out {tmp_path / 'linked' / 'tokenizer.model'} lies inside --base {tmp_path / 'linked'}"]),
        (generate_args(w, tmp_path / "link" / "g.jsonl", base=tmp_path / "base"), ["lies inside --base"]),
        ([*gen[:gen.index("--out") + 1], tmp_path / "base" / "g.jsonl", *gen[gen.index("--out") + 2:],
          "--tokenizer", w / "tok.model"], ["lies inside --base"]),
        (generate_args(w, tmp_path / "meta" / "tokenizer.model", base=tmp_path / "meta" / "7B"),
         ["is, or holds, the tokenizer", "beside --base", "without --tokenizer"]),
        (generate_args(w, tmp_path / "run" / "metrics.json", adapter=tmp_path / "run" / "adapter.safetensors"),
         ["is, or holds, the training summary", str(tmp_path / "run" / "metrics.json"), "of --adapter"]),
        (generate_args(w, tmp_path / "peft" / "adapter_config.json",
                       adapter=f"a={tmp_path / 'peft' / 'adapter_model.safetensors'}"),
         ["is, or holds, the PEFT settings", str(tmp_path / "peft" / "adapter_config.json"), "beside --adapter"]),
        (generate_args(w, tmp_path / "hf" / "tokenizer_config.json", "--tokenizer", tmp_path / "hf" / "tokenizer.json"),
         ["is, or holds, the tokenizer's settings", "beside --tokenizer"]),
        (["evaluate", "--task", "alpaca", "--base", w / "base", "--tokenizer", w / "tok.model", "--data",
          tmp_path / "val", "--out", tmp_path / "val" / "eval", "--device", "cpu"], ["lies inside --data"]),
        (train_args(w, tmp_path / "val" / "run", "--val-data", tmp_path / "val"),
         ["--out-dir", "lies inside --val-data"]),
        (["report", "--tokens", f"alpaca={tmp_path / 'val'}", "--out", tmp_path / "val" / "report"],
         ["lies inside --tokens"]),
    ]
    for args, names in cases:
        msg = one_line_error(capsys, *args, names=names)
        assert "expected an output outside the inputs" in msg or "would replace the input" in msg, msg
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "val" / "eval").exists() and not (tmp_path / "val" / "run").exists()


def test_a_folder_that_no_run_of_the_command_wrote_is_not_replaced(w, tmp_path, capsys):
    """`validate --out ~/data` replaced the folder and all it held with its records (a command writes its --out
    folder whole, and a failed run removes it): an existing folder is now written only where it is empty or holds
    the file that the command's own output holds (ns.mark); anything else is refused by name and left as it was.
    Every command that writes its --out folder whole has that file."""
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 3))
    assert cli.main(["fetch", "--dataset", "alpaca", "--source", str(tmp_path / "alpaca.json"),
                     "--out", str(tmp_path / "fetched")]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not the command's")
    cases = [
        (["demo-data", "--out", mine], "corpus.jsonl"),
        (["make-vision-encoder", "--out", mine], "config.json"),
        (["pretrain-base", "--corpus", w / "corpus.jsonl", "--tokenizer", w / "tok.model", "--out", mine],
         "pretrain.json"),
        (["fetch", "--dataset", "alpaca", "--source", tmp_path / "alpaca.json", "--out", mine], "fetch.json"),
        (["validate", "--dataset", "alpaca", "--fetched", tmp_path / "fetched", "--out", mine], "validation.json"),
    ]
    for args, mark in cases:
        msg = one_line_error(capsys, *args, names=[f"--out {mine}: an existing folder that holds no {mark}",
                                                   f"no earlier output of {args[0]}"])
        assert "expected a new or empty folder" in msg
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    capsys.readouterr()
    (mine / "notes.txt").unlink()  # empty, then the command's own earlier output: written
    for _ in range(2):
        assert cli.main(["validate", "--dataset", "alpaca", "--fetched", str(tmp_path / "fetched"),
                         "--out", str(mine)]) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["records.jsonl", "validation.json"]
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():  # --out a folder it writes whole (evaluate writes its files into one)
        if any(a.dest == "out" for a in sub._actions) and not sub.get_default("out_is_file") and name != "evaluate":
            assert sub.get_default("mark") is not None, name


def test_an_option_that_names_no_path_is_no_input(tmp_path):
    """Every option's value that named an existing path counted as an input: validate --dataset alpaca --out alpaca,
    run again where its first run wrote the folder alpaca, was refused as an output over the input --dataset alpaca
    (and an --out inside a folder so named would be). A value that is a name, not a path, is no input."""
    (tmp_path / "fetched").mkdir()
    (tmp_path / "fetched" / "records.jsonl").write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": str(i)}) + "\n" for i in range(4)))
    for out in ("alpaca", "alpaca", "alpaca/validated"):
        proc = subprocess.run([sys.executable, "-m", "llama_adapter.cli", "validate", "--dataset", "alpaca",
                               "--fetched", "fetched", "--out", out], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / out / "records.jsonl").is_file()


def test_evaluate_refuses_scienceqa_records_validate_would_not_keep(w, tmp_path, capsys):
    """evaluate reads a validated folder's records.jsonl: a record edited since (a question with no choices, a pid
    given twice, which would count twice in the accuracy) is refused by line before the model loads."""
    good = {"pid": "1", "split": "test", "question": "Is it big?", "choices": ["yes", "no"], "answer": 0, "hint": "",
            "image": None, "has_image": False, "subject": "natural science", "grade": "grade1", "lecture": "",
            "solution": "", "task": "closed choice", "topic": "x", "category": "y", "skill": "z"}
    for name, records, needles in [
        ("twice", [good, {**good, "question": "Is it small?"}], ["line 2", "repeated pid", "'1'"]),
        ("no_choices", [good, {k: v for k, v in {**good, "pid": "2"}.items() if k != "choices"}], ["line 2"]),
    ]:
        data = tmp_path / name
        data.mkdir()
        (data / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        one_line_error(capsys, "evaluate", "--task", "scienceqa", "--base", w / "base300", "--data", data,
                       "--out", tmp_path / f"eval_{name}", "--device", "cpu",
                       names=[data / "records.jsonl", "not valid scienceqa records", *needles])
        assert not (tmp_path / f"eval_{name}").exists()


@pytest.mark.parametrize(("stop", "code", "said"), [("SIGTERM", 128 + 15, "stopped by SIGTERM"),
                                                     ("Ctrl-C", 130, "stopped by SIGINT")])
def test_a_signal_stops_any_command_as_an_error_does(w, tmp_path, capsys, monkeypatch, stop, code, said):
    """scancel or a time limit (SIGTERM), or Ctrl-C, in the middle of any command, not only train and evaluate:
    one line, the shell's code for the signal, and no output left, an earlier run's included."""
    import signal
    import time

    import llama_adapter.tokenizer

    def stopped(*args, **kwargs):
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        raise KeyboardInterrupt

    (tmp_path / "t.model").write_text("an earlier run's")
    monkeypatch.setattr(llama_adapter.tokenizer, "train_sentencepiece", stopped)
    before = signal.getsignal(signal.SIGTERM)
    rc, err = run(capsys, "train-tokenizer", "--corpus", w / "corpus.jsonl", "--out", tmp_path / "t.model")
    lines = err.splitlines()
    assert rc == code and len(lines) == 1 and lines[0].startswith(f"llama-adapter train-tokenizer: {said}"), err
    assert not (tmp_path / "t.model").exists() and signal.getsignal(signal.SIGTERM) is before


def test_an_adapter_path_may_hold_an_equals_sign(w, tmp_path, capsys):
    """--adapter takes NAME=PATH or PATH: a path that exists is a PATH whatever it holds, and NAME ends at the first
    '=' (a run folder named after its settings, runs/lr=0.1/, was read as NAME 'runs/lr', PATH '0.1/...')."""
    run_dir = tmp_path / "runs" / "lr=0.1"
    run_dir.mkdir(parents=True)
    fits = AdaptedTransformer(ModelArgs(**{**SMALL.to_dict(), "vocab_size": 300}), AdapterArgs(2, 1))
    save_adapter(fits, run_dir / "adapter.safetensors", base_model="base300")
    weights = run_dir / "adapter.safetensors"
    for spec, name in [(weights, "lr=0.1"), (f"mine={weights}", "mine")]:
        out = tmp_path / f"{name}.jsonl"
        rc, err = run(capsys, *generate_args(w, out, adapter=spec))
        assert rc == 0, err
        assert [json.loads(line)["adapter"] for line in out.read_text().splitlines()] == [name]


@pytest.mark.parametrize("option", ["--name", "--adapter"])
@pytest.mark.parametrize("blank", ["", " "])
def test_a_blank_name_for_the_rows_is_refused(w, tmp_path, capsys, option, blank):
    """An empty --name became "base" without a word, and --adapter " =PATH" (or "=PATH") named the rows " " (or
    after the path); each is refused naming the option and the value, and nothing written."""
    out = tmp_path / "g.jsonl"
    if option == "--name":  # the base alone answers: no --adapter
        value, args = blank, (*generate_args(w, out)[:3], *generate_args(w, out)[5:], "--name", blank)
    else:
        value = f"{blank}={w / 'adapter.safetensors'}"
        args = generate_args(w, out, adapter=value)
    one_line_error(capsys, *args, names=[f"{option} {value!r}", "no name"])
    assert not out.exists()


def test_adapter_files_of_one_folder_given_by_path_are_named_apart(w, tmp_path, capsys):
    """Two files of one run folder given as PATHs were both named after the folder, and refused as one name given
    twice: each takes folder/stem; one alone keeps the folder's name; a NAME given is kept. The same file given
    twice, or two files of one name in folders of one name, are still refused, naming both paths."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fits = AdaptedTransformer(ModelArgs(**{**SMALL.to_dict(), "vocab_size": 300}), AdapterArgs(2, 1))
    for name in ("adapter", "step100"):
        save_adapter(fits, run_dir / f"{name}.safetensors", base_model="base300")
    first, second = run_dir / "adapter.safetensors", run_dir / "step100.safetensors"
    for specs, names in [((first, second), ["run/adapter", "run/step100"]), ((first,), ["run"]),
                         ((f"mine={first}", second), ["mine", "run"]),
                         ((f"run={first}", second), ["run", "run/step100"])]:
        out = tmp_path / "g.jsonl"
        rc, err = run(capsys, *generate_args(w, out, *[a for s in specs[1:] for a in ("--adapter", s)],
                                             adapter=specs[0]))
        assert rc == 0, err
        assert sorted(json.loads(line)["adapter"] for line in out.read_text().splitlines()) == names
    (tmp_path / "other" / "run").mkdir(parents=True)
    shutil.copy(first, tmp_path / "other" / "run" / "adapter.safetensors")
    for again in (first, tmp_path / "other" / "run" / "adapter.safetensors"):
        one_line_error(capsys, *generate_args(w, tmp_path / "x.jsonl", "--adapter", again, adapter=first),
                       names=[f"--adapter {again}", "'run/adapter'", f"(after {first})", "NAME=PATH"])
    assert not (tmp_path / "x.jsonl").exists()


def test_an_unknown_option_is_the_commands_one_line_error(capsys):
    one_line_error(capsys, "tokenize", "--dataset", "alpaca", "--validated", "v", "--tokenizer", "t", "--out", "o",
                   "--bogus", "1", names=["unrecognized arguments: --bogus 1", "llama-adapter tokenize --help"])


def test_out_of_range_numbers_are_one_line_errors_naming_the_option(w, tmp_path, capsys):
    """Numbers that would only fail deep inside torch or numpy (a seed past 64 bits, a length no model has, a
    padding id outside the base's vocabulary, more new tokens than the model's context) name their option."""
    one_line_error(capsys, *generate_args(w, tmp_path / "g.jsonl", "--seed", str(2**64)), names=["--seed", "2**63"])
    one_line_error(capsys, "tokenize", "--dataset", "alpaca", "--validated", w, "--tokenizer", w / "tok.model",
                   "--out", tmp_path / "t", "--max-seq-len", str(10**20), names=["--max-seq-len", "number of tokens"])
    one_line_error(capsys, "generate", "--base", w / "base300", "--prompts", w / "prompts.jsonl", "--out",
                   tmp_path / "g.jsonl", "--max-new-tokens", "257", "--device", "cpu",
                   names=["max_new_tokens", "256", "max_seq_len"])
    one_line_error(capsys, *train_args(w, tmp_path / "o", "--pad-id", "64"), names=["--pad-id 64", "vocab_size 64"])
    assert not any(tmp_path.iterdir())


def test_options_that_would_be_ignored_or_nonsense_are_refused(w, tmp_path, capsys):
    """An option the command would not read with the others given (evaluate's ScienceQA options with --task
    alpaca, its row length with --task scienceqa), or a schedule that would climb to its end (--min-lr above the
    peak), or a LoRA's settings where no LoRA trains, is an error rather than silently ignored."""
    alpaca = ("evaluate", "--task", "alpaca", "--base", w / "base", "--data", w / "val", "--out", tmp_path / "e",
              "--device", "cpu")
    one_line_error(capsys, *alpaca, "--split", "test", "--mode", "likelihood",
                   names=["--split, --mode given with --task alpaca", "only with --task scienceqa"])
    one_line_error(capsys, *alpaca, "--image-features", w, names=["--image-features given with --task alpaca"])
    one_line_error(capsys, "evaluate", "--task", "scienceqa", "--base", w / "base", "--data", w, "--out",
                   tmp_path / "e", "--row-len", "64", names=["--row-len given with --task scienceqa"])
    one_line_error(capsys, *train_args(w, tmp_path / "o", "--lr", "0.001", "--min-lr", "0.01"),
                   names=["--min-lr 0.01 is above the peak learning rate 0.001"])
    one_line_error(capsys, *train_args(w, tmp_path / "o", "--lora-rank", "4", "--lora-targets", "wq"),
                   names=["--lora-rank 4, --lora-targets wq given with --method adapter, which trains no LoRA"])
    assert not any(tmp_path.iterdir())


def test_a_path_that_is_not_utf8_is_named(w, tmp_path, capsys):
    """A path with a byte that is not UTF-8 (Python holds it as a lone surrogate) failed only when written into a
    JSON file, naming neither the option nor the path."""
    odd = f"{tmp_path}/odd\udcffdir/f"
    one_line_error(capsys, "fetch", "--dataset", "alpaca", "--source", w / "corpus.jsonl", "--out", odd,
                   names=["--out", "odd\\udcffdir", "not UTF-8"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["evaluate", "train"])
@pytest.mark.parametrize("blank", ["", " "])
def test_a_blank_run_name_is_refused(w, tmp_path, capsys, command, blank):
    """An empty --run-name gave way to the default run name without a word (evaluate's 'evaluate TASK', train's
    the output folder's name), as generate's --name did; refused naming the option and the value, nothing written."""
    out = tmp_path / "out"
    if command == "train":
        args = train_args(w, out, "--run-name", blank)
    else:
        args = ("evaluate", "--task", "alpaca", "--base", w / "base", "--tokenizer", w / "tok.model", "--adapter",
                w / "adapter.safetensors", "--data", w / "val", "--out", out, "--device", "cpu", "--run-name", blank)
    one_line_error(capsys, *args, names=[f"--run-name {blank!r}", "no name"])
    assert not out.exists()


# ---------------------------------------------------------------- usage errors touch nothing


def earlier_output(path: Path, files: tuple[str, ...] = ()) -> Path:
    """An earlier run's output: a file (no `files`), or a folder holding `files`, each with a marker."""
    if not files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("an earlier run's\n")
        return path
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("an earlier run's\n")
    return path


def snapshot(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: path.read_text()}
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def validated_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "records.jsonl").write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    return root


ADAPTER_OUT = ("adapter.safetensors", "metrics.json", "config.json")
LORA_OUT = ("adapter_model.safetensors", "adapter_config.json", "metrics.json")
TOKENS_OUT = ("stats.json", "lengths.png")
EVAL_OUT = ("scores.json", "metrics.jsonl")


def tokenize_args(w, out, *extra):
    return ("tokenize", "--dataset", "alpaca", "--validated", validated_folder(out.parent / "validated"),
            "--tokenizer", w / "tok.model", "--out", out, *extra)


def evaluate_args(w, out, *extra, task="alpaca"):
    return ("evaluate", "--task", task, "--base", w / "base", "--tokenizer", w / "tok.model", "--adapter",
            w / "adapter.safetensors", "--data", w / "val", "--out", out, "--device", "cpu", *extra)


def fetch_args(w, out, *extra):
    return ("fetch", "--dataset", "scienceqa", "--source", w / "corpus.jsonl", "--out", out, *extra)


USAGE_ERRORS = {  # id: (args(w, out), the earlier output's files (none: a file), what the message names)
    "train-lora-target": (lambda w, o: train_args(w, o, "--method", "lora", "--lora-targets", "wq,bogus"), LORA_OUT,
                          ["--lora-targets", "bogus"]),
    "train-lora-dropout": (lambda w, o: train_args(w, o, "--method", "lora", "--lora-dropout", "1"), LORA_OUT,
                           ["--lora-dropout", "dropout 1"]),
    "train-lora-option-without-lora": (lambda w, o: train_args(w, o, "--lora-rank", "4"), ADAPTER_OUT,
                                       ["--lora-rank 4 given with --method adapter"]),
    "train-compile-cache": (lambda w, o: train_args(w, o, "--compile-cache", o.parent / "cc"), ADAPTER_OUT,
                            ["--compile-cache", "without --compile"]),
    "train-run-name": (lambda w, o: train_args(w, o, "--run-name", " "), ADAPTER_OUT, ["--run-name ' '", "no name"]),
    "train-min-lr": (lambda w, o: train_args(w, o, "--lr", "0.001", "--min-lr", "0.01"), ADAPTER_OUT,
                     ["--min-lr 0.01 is above the peak learning rate 0.001"]),
    "train-fp8-full": (lambda w, o: train_args(w, o, "--method", "full", "--precision", "fp8"), ("model.safetensors",),
                       ["--precision fp8", "method full"]),
    "train-images-lora": (lambda w, o: train_args(w, o, "--method", "lora", "--image-features", o.parent / "f"),
                          LORA_OUT, ["--image-features", "method lora"]),
    "tokenize-val-size-abc": (lambda w, o: tokenize_args(w, o, "--val-size", "abc"), TOKENS_OUT,
                              ["--val-size", "abc"]),
    "tokenize-val-size-0": (lambda w, o: tokenize_args(w, o, "--val-size", "0"), TOKENS_OUT, ["--val-size", "0"]),
    "tokenize-seed-with-field": (lambda w, o: tokenize_args(w, o, "--split-by", "field", "--seed", "1"), TOKENS_OUT,
                                 ["--seed given with --split-by field"]),
    "validate-drop-flag": (lambda w, o: ("validate", "--dataset", "alpaca", "--fetched",
                                         validated_folder(o.parent / "fetched"), "--out", o, "--drop-flag", "bogus"),
                           ("records.jsonl", "validation.json"), ["--drop-flag", "bogus"]),
    "generate-top-p-greedy": (lambda w, o: generate_args(w, o, "--temperature", "0", "--top-p", "0.5"), (),
                              ["--top-p given with --temperature 0"]),
    "generate-compile-cache": (lambda w, o: generate_args(w, o, "--compile-cache", o.parent / "cc"), (),
                               ["--compile-cache", "without --compile"]),
    "generate-name-with-adapter": (lambda w, o: generate_args(w, o, "--name", "mine"), (),
                                   ["--name mine given with --adapter"]),
    "generate-blank-adapter-name": (lambda w, o: generate_args(w, o, adapter=f" ={w / 'adapter.safetensors'}"), (),
                                    ["--adapter ' =", "no name"]),
    "generate-release-shape-without-pth": (lambda w, o: generate_args(w, o, "--adapter-len", "2"), (),
                                           ["--adapter-len given", "original-release"]),
    "evaluate-task-options": (lambda w, o: evaluate_args(w, o, "--split", "test"), EVAL_OUT,
                              ["--split given with --task alpaca"]),
    "evaluate-compile": (lambda w, o: evaluate_args(w, o, "--compile"), EVAL_OUT,
                         ["--compile compiles the decode step", "--task alpaca"]),
    "evaluate-compile-cache": (lambda w, o: evaluate_args(w, o, "--compile-cache", o.parent / "cc"), EVAL_OUT,
                               ["--compile-cache", "without --compile"]),
    "evaluate-run-name": (lambda w, o: evaluate_args(w, o, "--run-name", ""), EVAL_OUT, ["--run-name ''", "no name"]),
    "fetch-split-twice": (lambda w, o: fetch_args(w, o, "--assign-splits", "train=0.5", "train=0.5"),
                          ("fetch.json", "records.jsonl"), ["--assign-splits", "['train'] given more than once"]),
    "fetch-fractions": (lambda w, o: fetch_args(w, o, "--assign-splits", "train=0.5", "test=0.2"),
                        ("fetch.json", "records.jsonl"), ["sum to 1"]),
    "fetch-blank-revision": (lambda w, o: fetch_args(w, o, "--revision", " "), ("fetch.json", "records.jsonl"),
                             ["--revision ' '", "no name"]),
    "report-name-twice": (lambda w, o: ("report", "--experiment", "a", "--scores", f"a={w / 's.json'}", "--scores",
                                        f"a={w / 't.json'}", "--tokens", f"alpaca={w}", "--out", o),
                          ("report.md",), ["--scores", "['a'] given more than once"]),
    "report-stray-name": (lambda w, o: ("report", "--experiment", "a", "--scores", f"b={w / 's.json'}", "--tokens",
                                        f"alpaca={w}", "--out", o), ("report.md",),
                          ["--scores", "['b'] name(s) no --experiment"]),
    "report-vary-without-center": (lambda w, o: ("report", "--experiment", "a", "--scores", f"a={w / 's.json'}",
                                                 "--tokens", f"alpaca={w}", "--vary", '{"lr": [1, 2]}', "--out", o),
                                   ("report.md",), ["--vary", "no value in --center"]),
    "demo-data-questions": (lambda w, o: ("demo-data", "--out", o, "--questions", "10"),
                            ("corpus.jsonl", "alpaca.json"), ["questions 10", "expected at least"]),
    "pretrain-seq-len": (lambda w, o: ("pretrain-base", "--corpus", w / "corpus.jsonl", "--tokenizer", w / "tok.model",
                                       "--out", o, "--seq-len", "512"),
                         ("params.json", "consolidated.00.pth", "pretrain.json"), ["--seq-len 512", "max_seq_len 256"]),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_a_usage_error_inside_a_command_touches_nothing(w, tmp_path, capsys, case):
    """A check of an option's value or of options together, which needs no data read, is a usage error: refused
    before the command starts, its one line ending with the --help hint, and an earlier run's outputs left as they
    are (the commands made it, and their failure's clean-up removed them: a LoRA's finished folder, a token split's,
    a validated folder, a generations file)."""
    args, files, names = USAGE_ERRORS[case]
    kind = "g.jsonl" if not files else "out"
    out = tmp_path / "runs" / kind
    argv = args(w, out)
    earlier_output(out, files)
    before = snapshot(out)
    line = one_line_error(capsys, *argv, names=names)
    assert line.endswith(f"(see llama-adapter {argv[0]} --help)"), line
    assert snapshot(out) == before
