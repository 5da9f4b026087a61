"""The inference commands at their edges (generate, evaluate, complete): a release .pth of more layers than the
base, an adapter named by a bare file name, a LoRA's path in its rows, an evaluation's stale predictions, a PEFT
run found by its folder or its file, and options the command would ignore refused by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.checkpoint import save_adapter, save_meta_checkpoint
from llama_adapter.config import AdapterArgs, LoRAArgs, ModelArgs
from llama_adapter.data.tokens import Encoded, write_split
from llama_adapter.lora import add_lora, is_lora_param, save_lora
from llama_adapter.tokenizer import load_tokenizer

ARGS = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=64, max_seq_len=256)
ADAPTER = AdapterArgs(adapter_len=3, adapter_layers=2)


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "llama_adapter.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd)


@pytest.fixture
def world(tmp_path, llama_sp_model):
    """A tiny Meta base (tokenizer beside it), our adapter, the same adapter as an original-release .pth, a LoRA
    folder (with a training's metrics.json beside it, as train --method lora writes), and prompts."""
    torch.manual_seed(0)
    model = AdaptedTransformer(ARGS, ADAPTER)
    with torch.no_grad():
        model.adapter_gate.normal_()
    save_meta_checkpoint(model, tmp_path / "base")
    (tmp_path / "base" / "tokenizer.model").write_bytes(llama_sp_model.read_bytes())
    save_adapter(model, tmp_path / "adapter.safetensors", base_model=str(tmp_path / "base"))
    first = ARGS.n_layers - ADAPTER.adapter_layers
    release = {"adapter_query.weight": model.adapter_query.detach().reshape(-1, ARGS.dim)}
    for i in range(ARGS.n_layers):
        gate = model.adapter_gate[i - first] if i >= first else torch.zeros(ARGS.n_heads)
        release[f"layers.{i}.attention.gate"] = gate.detach().reshape(1, -1, 1, 1)
    torch.save(release, tmp_path / "release.pth")  # adapter_query.weight: (6, 32)
    plain = AdaptedTransformer(ARGS)
    plain.load_state_dict(model.state_dict(), strict=False)
    lora = add_lora(plain, LoRAArgs(rank=2, targets=("wq", "wv"))).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if is_lora_param(name):
                p.normal_()
    save_lora(lora, tmp_path / "lora_run", str(tmp_path / "base"))
    (tmp_path / "lora_run" / "metrics.json").write_text(json.dumps({"method": "lora", "mlflow_run_id": "abc"}))
    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "instruction": "Name a colour."}\n'
                                            '{"id": "b", "instruction": "Say hi."}\n')
    return tmp_path


def one_line_error(proc, *names):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    for name in names:
        assert name in last, last


def test_release_pth_with_more_adapter_layers_than_the_base_is_a_one_line_error(world):
    """--adapter-layers 6 --adapter-len 1 on a 3-layer base: the file's (6, 32) prompts hold that many rows, but
    the base has 3 layers to adapt (a KeyError traceback before)."""
    proc = run_cli("complete", "--base", world / "base", "--adapter", world / "release.pth", "--prompt", "hi",
                   "--adapter-layers", "6", "--adapter-len", "1", "--max-new-tokens", "2")
    one_line_error(proc, "--adapter-layers")


def test_generate_names_an_adapter_given_by_a_bare_file_name(world):
    """--adapter adapter.safetensors given from its own folder is named after that folder (it was named '')."""
    proc = run_cli("generate", "--base", "base", "--adapter", "adapter.safetensors", "--prompts", "prompts.jsonl",
                   "--out", "out.jsonl", "--temperature", "0", "--max-new-tokens", "2", cwd=world)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (world / "out.jsonl").read_text().splitlines()]
    assert {r["adapter"] for r in rows} == {world.name}


def test_generate_with_a_lora_records_its_path(world):
    """A LoRA's rows name its path (they said null, as the base alone's do), though it was merged at load."""
    proc = run_cli("generate", "--base", world / "base", "--adapter", world / "lora_run", "--prompts",
                   world / "prompts.jsonl", "--out", world / "out.jsonl", "--temperature", "0", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (world / "out.jsonl").read_text().splitlines()]
    assert {r["adapter"] for r in rows} == {"lora_run"}
    assert all(r["adapter_path"] == str(world / "lora_run") for r in rows), rows


def heldout_split(folder: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    enc = Encoded([], [], [], [])
    for i in range(n):
        t = np.concatenate([[1], rng.integers(3, 500, rng.integers(4, 20)), [2]]).astype(np.int32)
        enc.tokens.append(t), enc.masks.append(np.arange(len(t)) >= 3), enc.source_index.append(i)
    write_split(folder, enc, np.arange(n))


def test_evaluate_alpaca_leaves_no_earlier_predictions_csv_beside_its_scores(world):
    """An earlier ScienceQA evaluation's predictions.csv in --out does not stay beside an Alpaca evaluation's
    scores.json, where it would pass for this run's."""
    heldout_split(world / "heldout")
    out = world / "eval"
    out.mkdir()
    (out / "predictions.csv").write_text("pid,split,answer,prediction,correct,categories,output\n1,test,0,0,True,,\n")
    proc = run_cli("evaluate", "--task", "alpaca", "--base", world / "base", "--data", world / "heldout",
                   "--out", out, "--row-len", "64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "scores.json").is_file()
    assert not (out / "predictions.csv").exists()


def recording(folder: Path, name: str, record: dict, tokenizer_file: Path) -> dict:
    """Write `record` as folder/name, with the identity of the tokenizer read from tokenizer_file as its "tokenizer"
    (as tokenize's stats.json and train's metrics.json record it); that identity."""
    from llama_adapter.tokenizer import load_tokenizer

    identity = load_tokenizer(tokenizer_file).identity()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({**record, "tokenizer": identity}))
    return identity


def test_evaluate_refuses_a_heldout_split_made_by_another_tokenizer(world, llama_sp_model, other_sp_model):
    """Held-out ids of another tokenizer that fit the base's vocabulary were scored as the base's tokens without a
    word. The tokenizer tokenize recorded in stats.json beside --data must be the one evaluate uses (here the base's
    own): refused naming --data, both files and both digests, before anything is written; a split of the same
    vocabulary is scored."""
    heldout_split(world / "tokens" / "heldout")
    theirs = recording(world / "tokens", "stats.json", {"dataset": "alpaca"}, other_sp_model)
    ours = recording(world / "tokens", "ours.json", {}, llama_sp_model)
    args = ("evaluate", "--task", "alpaca", "--base", world / "base", "--data", world / "tokens" / "heldout",
            "--out", world / "eval", "--row-len", "64")
    proc = run_cli(*args)
    one_line_error(proc, f"--data {world / 'tokens' / 'heldout'}: tokenized with {other_sp_model} (vocabulary sha256 "
                   f"{theirs['vocabulary_sha256'][:12]})", str(world / "base" / "tokenizer.model"),
                   ours["vocabulary_sha256"][:12])
    assert not (world / "eval").exists()
    recording(world / "tokens", "stats.json", {"dataset": "alpaca"}, llama_sp_model)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_adapter_trained_on_another_tokenizers_data_is_refused(world, llama_sp_model, other_sp_model):
    """An adapter trained on ids of another tokenizer was used with the base's own to encode prompts and decode
    answers without a word. Its training's metrics.json records the tokenizer of its training data: generate,
    evaluate and complete refuse one other than theirs naming the file, both digests and the --tokenizer to give,
    before anything is written; one of the same vocabulary (or a metrics.json of no tokenizer, written before train
    recorded it) is used as before."""
    theirs = recording(world, "metrics.json", {"method": "adapter", "mlflow_run_id": "abc"}, other_sp_model)
    ours = load_tokenizer(llama_sp_model).vocabulary_digest()
    (world / "validated").mkdir()
    (world / "validated" / "records.jsonl").write_text(json.dumps({"pid": "1", "question": "?", "choices": ["a", "b"],
                                                                   "answer": 0, "split": "test"}) + "\n")
    commands = {"generate": ("--prompts", world / "prompts.jsonl", "--out", world / "out.jsonl"),
                "evaluate": ("--task", "scienceqa", "--mode", "likelihood", "--data", world / "validated",
                             "--out", world / "eval"),
                "complete": ("--prompt", "hi")}
    for command, args in commands.items():
        proc = run_cli(command, "--base", world / "base", "--adapter", world / "adapter.safetensors",
                       "--max-new-tokens", "2", *args) if command != "evaluate" else \
            run_cli(command, "--base", world / "base", "--adapter", world / "adapter.safetensors", *args)
        one_line_error(proc, f"--adapter {world / 'adapter.safetensors'}: {world / 'metrics.json'} records",
                       f"{other_sp_model} (vocabulary sha256 {theirs['vocabulary_sha256'][:12]})", ours[:12],
                       f"--tokenizer {other_sp_model}")
    assert not (world / "out.jsonl").exists() and not (world / "eval").exists()
    recording(world, "metrics.json", {"method": "adapter", "mlflow_run_id": "abc"}, llama_sp_model)
    proc = run_cli("generate", "--base", world / "base", "--adapter", world / "adapter.safetensors", "--prompts",
                   world / "prompts.jsonl", "--out", world / "out.jsonl", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_full_fine_tune_trained_on_another_tokenizers_data_is_refused(tmp_path, llama_sp_model, other_sp_model):
    """A fully fine-tuned model is given as --base (adapters/<experiment>/model): its training's metrics.json, above
    it, records the tokenizer of its data, compared as an adapter's is; a run's metrics.json that merely lies beside
    a base (an adapter's) says nothing of the base."""
    from llama_adapter.errors import InputError
    from llama_adapter.evaluate import check_trained_tokenizer

    tokenizer = load_tokenizer(llama_sp_model)
    theirs = recording(tmp_path / "full", "metrics.json", {"method": "full"}, other_sp_model)
    with pytest.raises(InputError) as e:
        check_trained_tokenizer(tokenizer, tmp_path / "full" / "model", [], "generate")
    assert str(e.value).startswith(f"--base {tmp_path / 'full' / 'model'}: {tmp_path / 'full' / 'metrics.json'} "
                                   f"records it was trained on data tokenized with {other_sp_model} (vocabulary "
                                   f"sha256 {theirs['vocabulary_sha256'][:12]})"), e.value
    recording(tmp_path / "beside", "metrics.json", {"method": "adapter"}, other_sp_model)
    check_trained_tokenizer(tokenizer, tmp_path / "beside" / "base", [], "generate")


def test_training_of_a_lora_is_found_whether_its_folder_or_its_file_is_given(world):
    """--adapter takes a PEFT folder or its adapter_model.safetensors alike: either finds the run's metrics.json
    (its training run and method)."""
    from llama_adapter.evaluate import training_of

    by_file = training_of(world / "base", world / "lora_run" / "adapter_model.safetensors")
    by_folder = training_of(world / "base", world / "lora_run")
    assert by_file == {"method": "lora", "mlflow_run_id": "abc"}
    assert by_folder == by_file


def test_generate_refuses_name_that_an_adapter_makes_it_ignore(world):
    """--name names the base answering alone; with --adapter the rows take the adapters' names: refused."""
    proc = run_cli("generate", "--base", world / "base", "--adapter", f"a={world / 'adapter.safetensors'}",
                   "--name", "mine", "--prompts", world / "prompts.jsonl", "--out", world / "out.jsonl",
                   "--temperature", "0", "--max-new-tokens", "2")
    one_line_error(proc, "--name")
    assert not (world / "out.jsonl").exists()


@pytest.mark.parametrize("name", [None, "mine"])
def test_generate_without_adapter_takes_requests_naming_the_rows_name(world, name):
    """Without --adapter the base answers alone, its rows named --name (default "base"): a request naming that name
    was refused as an adapter not given ("given: []"); it is taken. Another name is still refused, naming the one
    the rows take."""
    named = name or "base"
    (world / "named.jsonl").write_text(json.dumps({"id": "a", "instruction": "Say hi.", "adapter": named}) + "\n"
                                       + json.dumps({"id": "b", "instruction": "Name a colour."}) + "\n")
    proc = run_cli("generate", "--base", world / "base", *(["--name", name] if name else []), "--prompts",
                   world / "named.jsonl", "--out", world / "out.jsonl", "--temperature", "0", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (world / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["adapter"]) for r in rows] == [("a", named), ("b", named)]
    (world / "other.jsonl").write_text(json.dumps({"id": "a", "instruction": "Say hi.", "adapter": "else"}) + "\n")
    proc = run_cli("generate", "--base", world / "base", *(["--name", name] if name else []), "--prompts",
                   world / "other.jsonl", "--out", world / "other_out.jsonl", "--max-new-tokens", "2")
    one_line_error(proc, "['else']", f"given: ['{named}']")
    assert not (world / "other_out.jsonl").exists()


def test_complete_refuses_sampling_options_that_greedy_decoding_ignores(world):
    """complete decodes greedily (--temperature 0 by default), so --top-p and --seed would change nothing; with a
    temperature they are taken."""
    proc = run_cli("complete", "--base", world / "base", "--prompt", "hi", "--max-new-tokens", "2",
                   "--top-p", "0.1", "--seed", "5")
    one_line_error(proc, "--top-p, --seed given with --temperature 0")
    proc = run_cli("complete", "--base", world / "base", "--prompt", "hi", "--max-new-tokens", "2",
                   "--top-p", "0.1", "--seed", "5", "--temperature", "0.7")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_release_shape_mismatch_names_the_options_to_fix(world):
    """A .pth given without --adapter-len/--adapter-layers takes the paper's 10/30: a release of another shape is
    refused naming both options."""
    proc = run_cli("complete", "--base", world / "base", "--adapter", world / "release.pth", "--prompt", "hi",
                   "--max-new-tokens", "2")
    one_line_error(proc, "--adapter-len", "--adapter-layers")


def test_generate_takes_a_release_and_an_adapter_of_another_shape_together(world):
    """--adapter-len/--adapter-layers are the .pth's shape alone: an adapter whose file records another shape
    answers beside it with its own."""
    save_adapter(AdaptedTransformer(ARGS, AdapterArgs(adapter_len=2, adapter_layers=1)), world / "other.safetensors",
                 base_model=str(world / "base"))
    proc = run_cli("generate", "--base", world / "base", "--adapter", f"paper={world / 'release.pth'}",
                   "--adapter", f"other={world / 'other.safetensors'}", "--adapter-len", "3", "--adapter-layers", "2",
                   "--prompts", world / "prompts.jsonl", "--out", world / "out.jsonl", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (world / "out.jsonl").read_text().splitlines()]
    assert sorted(r["adapter"] for r in rows) == ["other", "other", "paper", "paper"]


def test_generate_names_the_prompts_file_line_and_id_of_a_prompt_too_long(world):
    """A prompt that leaves the base no position for a new token is a one-line error naming --prompts, the line and
    the id (it named the prompt's text alone), and nothing is written."""
    (world / "long.jsonl").write_text('{"id": "a", "instruction": "Say hi."}\n'
                                      + json.dumps({"id": "long", "prompt": "word " * 300}) + "\n")
    proc = run_cli("generate", "--base", world / "base", "--prompts", world / "long.jsonl",
                   "--out", world / "out.jsonl", "--max-new-tokens", "2")
    one_line_error(proc, f"--prompts {world / 'long.jsonl'}, line 2 (id 'long'): prompt 'word word", "max_seq_len 256")
    assert not (world / "out.jsonl").exists()


def test_int8_group_refusal_names_the_option(tmp_path, llama_sp_model):
    """--quantize int8-g32 on a base of width 48 (not a multiple of 32) names the option and the one to use."""
    pytest.importorskip("torchao")
    from llama_adapter.model import Transformer

    save_meta_checkpoint(Transformer(ModelArgs(dim=48, n_layers=2, n_heads=4, vocab_size=32000, hidden_dim=96)),
                         tmp_path / "base")
    proc = run_cli("complete", "--base", tmp_path / "base", "--tokenizer", llama_sp_model, "--prompt", "hi",
                   "--quantize", "int8-g32", "--max-new-tokens", "2")
    one_line_error(proc, "--quantize int8-g32", "expected --quantize int8")


def test_image_features_without_a_multimodal_adapter_are_refused_before_loading(world):
    """Only a multimodal adapter reads image features: with a text-only one, or none, they are refused by name
    before the base loads (the error came after, naming neither option)."""
    records = world / "validated"
    records.mkdir()
    (records / "records.jsonl").write_text(json.dumps({"pid": "1", "question": "?", "choices": ["a", "b"],
                                                       "answer": 0, "split": "test"}) + "\n")
    features = world / "features"  # (an --out inside it would be refused as inside an input)
    features.mkdir(exist_ok=True)
    for adapter, named in ((["--adapter", world / "adapter.safetensors"], "--adapter"), ([], "no --adapter")):
        proc = run_cli("evaluate", "--task", "scienceqa", "--base", world / "base", *adapter, "--data", records,
                       "--image-features", features, "--out", world / "eval", "--mode", "likelihood")
        one_line_error(proc, f"--image-features {features} given with {named}", "reads no image")
    assert not (world / "eval").exists()
