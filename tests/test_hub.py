"""Bases from the Hugging Face hub (llama_adapter.hub), offline: each test lays out a hub cache of its own, as
huggingface_hub writes it, and reads it with HF_HUB_OFFLINE=1."""

import hashlib
import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from dag import REPO, SNAKEMAKE, snakemake
from hf_reference import random_hf_llama, tokens

from llama_adapter import cli
from llama_adapter.checkpoint import load_base
from llama_adapter.config import ModelArgs
from llama_adapter.errors import PretrainedFetchError
from llama_adapter.hub import fetch_base, fetched_source, hub_model
from llama_adapter.io import sha256_file
from llama_adapter.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
# What fetch takes of the tiny model's repository, and what it leaves: the same weights as .bin, a file in a
# subfolder (like the original/ .pth copies of meta-llama's repositories).
FETCHED = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
LEFT = {"pytorch_model.bin", "original/consolidated.00.pth", "README.md"}


def add_to_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)):
    """One commit of a model repository in huggingface_hub's cache layout: models--ORG--NAME/ with each file's
    bytes in blobs/, snapshots/<commit>/ holding symlinks to them, and refs/<branch> naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def tokenizer_files(vocab_size: int) -> dict[str, bytes]:
    """A word-level tokenizer.json within the model's vocabulary, and the config naming its BOS and EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(vocab_size - 3))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return {"tokenizer.json": backend.to_str().encode(),
            "tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}).encode()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, read offline. huggingface_hub reads its environment once, when imported (which
    transformers has done), so its constants are set too; the environment is for the CLI and Snakemake's
    subprocesses."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def tiny_repo(hub_cache, tmp_path):
    """A random tiny HF Llama (GQA, random norms) saved by save_pretrained as safetensors with a tokenizer, in the
    cache as REPO_ID at COMMIT (main), beside files fetch must leave; returns the HF model and the files."""
    args, saved = ModelArgs.from_name("tiny-gqa"), tmp_path / "saved"
    hf = random_hf_llama(args, saved, random_norms=True)
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert set(files) == {"config.json", "generation_config.json", "model.safetensors"}
    files |= tokenizer_files(args.vocab_size)
    files |= {name: f"not for loading: {name}".encode() for name in LEFT}
    add_to_cache(hub_cache, REPO_ID, COMMIT, files)
    return hf, files


def test_fetch_writes_a_folder_the_loader_loads_with_the_hf_logits(tiny_repo, tmp_path):
    out = tmp_path / "models" / "hf" / "tiny-org--tiny-llama"
    meta = fetch_base(f"hf:{REPO_ID}", out)
    assert {p.name for p in out.iterdir()} == FETCHED | {"fetch.json"}  # no .bin, nothing from a subfolder
    assert json.loads((out / "fetch.json").read_text()) == meta
    assert (meta["source"], meta["repo_id"], meta["revision"], meta["commit"]) == (f"hf:{REPO_ID}", REPO_ID, "main",
                                                                                  COMMIT)
    assert {f["name"] for f in meta["files"]} == FETCHED
    for f in meta["files"]:
        assert (f["size"], f["sha256"]) == ((out / f["name"]).stat().st_size, sha256_file(out / f["name"]))
        assert not (out / f["name"]).is_symlink()  # a plain folder, not links into the cache
    ours = load_base(out).eval()
    x = tokens(ours.args)
    with torch.no_grad():
        assert (ours(x) - tiny_repo[0](x).logits).abs().max().item() < 1e-4
    tokenizer = load_tokenizer(out)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.encode("w0 w5", bos=True)) == (1, 2, [1, 3, 8])
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no partial left beside it


def test_a_revision_resolves_to_its_commit(tiny_repo, hub_cache, tmp_path):
    """A tag is fetched at the commit it names, and fetch.json pins that commit; a commit sha is its own pin."""
    add_to_cache(hub_cache, REPO_ID, OTHER_COMMIT, tiny_repo[1], ("v1",))
    assert fetch_base(f"hf:{REPO_ID}@v1", tmp_path / "tag")["commit"] == OTHER_COMMIT
    meta = fetch_base(f"hf:{REPO_ID}@{COMMIT}", tmp_path / "sha")
    assert (meta["revision"], meta["commit"]) == (COMMIT, COMMIT)
    # The folder tells which source it was fetched for (the workflow's plan reads a base's layers only from its own)
    assert fetched_source(tmp_path / "tag") == f"hf:{REPO_ID}@v1"
    (tmp_path / "sha" / "fetch.json").write_text("[1, 2")  # damaged: no source, rather than an error
    assert fetched_source(tmp_path / "sha") is None
    assert fetched_source(tmp_path / "nothing") is None


def model_files(config: dict, weights: dict[str, bytes]) -> dict[str, bytes]:
    return {"config.json": json.dumps(config).encode(), **weights}


LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": 4, "intermediate_size": 8}


@pytest.mark.parametrize(("source", "files", "expect"), [
    ("hf:tiny-org/bin-only", model_files(LLAMA_CONFIG, {"pytorch_model.bin": b"weights"}),
     "hf:tiny-org/bin-only@main (commit 0123456789abcdef0123456789abcdef01234567): no safetensors weights"),
    ("hf:tiny-org/gpt", model_files({**LLAMA_CONFIG, "model_type": "gpt2"}, {"model.safetensors": b"weights"}),
     "hf:tiny-org/gpt@main (commit 0123456789abcdef0123456789abcdef01234567) config.json: model_type 'gpt2' is not "
     "a LLaMA architecture; expected a LLaMA-family model"),
    ("hf:tiny-org/no-config", {"model.safetensors": b"weights"}, "no config.json; expected a LLaMA-family model"),
    ("hf:tiny-org/escaping-index", model_files(LLAMA_CONFIG, {"model.safetensors.index.json": json.dumps(
        {"weight_map": {"w": "../../../secret.safetensors"}}).encode()}), "which are no files of the repository's"),
    ("hf:tiny-org/absent", {}, "hf:tiny-org/absent@main: revision main of tiny-org/absent is not in the local hub "
     "cache"),
    ("hf:tiny-org/tiny-llama@v9", {}, "revision v9 of tiny-org/tiny-llama is not in the local hub cache"),
    ("hf:no-slash", {}, "hf:no-slash: not a hub model"),
    ("tiny-org/tiny-llama", {}, "tiny-org/tiny-llama: expected hf:ORG/NAME[@REVISION]"),
])
def test_what_cannot_be_fetched_is_one_error_and_leaves_nothing(tiny_repo, hub_cache, tmp_path, source, files,
                                                                 expect):
    if files:
        add_to_cache(hub_cache, source.removeprefix("hf:"), COMMIT, files)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.safetensors").write_bytes(b"an earlier fetch")
    with pytest.raises(PretrainedFetchError) as e:
        fetch_base(source, out)
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub-cache", "saved"]  # no output, no partial


@pytest.mark.parametrize(("text", "model"), [
    ("hf:org/name", ("org/name", "main")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("hf:org/name@0123456789abcdef0123456789abcdef01234567", ("org/name", "0123456789abcdef0123456789abcdef01234567")),
    ("./results/base", None),  # a path, not a repo id: the caller's path error stands
    ("7B", None),
    ("/abs/olute", None),
    ("org/na--me", None),
    ("org/name@", None),
])
def test_hub_model_ids(text, model):
    got = hub_model(text)
    assert (got and (got.repo_id, got.revision)) == model


# ---------------------------------------------------------------- CLI


def test_inspect_and_complete_take_a_hub_model_from_the_cache(tiny_repo, capsys):
    for name in (REPO_ID, f"hf:{REPO_ID}@{COMMIT}"):
        assert cli.main(["inspect", name, "--adapter-layers", "2"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["model"], report["args"]["n_layers"], report["args"]["n_kv_heads"]) == (name, 4, 2)
    # the tokenizer is the one in the model's folder
    assert cli.main(["complete", "--base", REPO_ID, "--prompt", "w1 w2", "--template", "none",
                     "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()


def test_an_output_inside_a_hub_bases_cache_folder_is_refused(tiny_repo, hub_cache, tmp_path, capsys):
    """A --base naming a hub model is read from the hub cache's folder, which no option names: generate --out
    SNAPSHOT/tokenizer.json (a link into the cache's blobs) replaced the tokenizer the run had read (train --out-dir
    SNAPSHOT, the model's config.json, goes through the same check). Refused by name before the command runs, for
    both forms of the name, the cache left as it was."""
    snapshot = hub_cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    before = {p: p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    (tmp_path / "p.jsonl").write_text('{"id": 1, "instruction": "Say hi."}\n')
    for base, out in ((REPO_ID, snapshot / "tokenizer.json"), (f"hf:{REPO_ID}@{COMMIT}", snapshot / "g.jsonl")):
        assert cli.main(["generate", "--base", base, "--prompts", str(tmp_path / "p.jsonl"), "--out", str(out),
                         "--max-new-tokens", "2", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"the hub model's folder {snapshot} (the hub cache's copy of --base {base}" in err, err
    assert {p: p.read_bytes() for p in snapshot.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(("argv", "expect"), [
    (["inspect", "no-such-thing"], "no-such-thing: neither a preset"),  # neither a path nor a repo id: as before
    (["inspect", "tiny-org/absent"], "tiny-org/absent: no such file or folder, nor a hub model: hf:tiny-org/absent"
                                     "@main: revision main of tiny-org/absent is not in the local hub cache"),
    (["complete", "--base", "tiny-org/absent", "--prompt", "x"], "--base tiny-org/absent: no such file or folder, "
                                                                 "nor a hub model"),
])
def test_a_base_neither_on_disk_nor_in_the_cache_is_one_line(hub_cache, capsys, argv, expect):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1


def test_fetch_base_cli_prints_the_record_and_a_failed_run_leaves_nothing(tiny_repo, tmp_path, capsys):
    out = tmp_path / "base"
    assert cli.main(["fetch-base", "--source", f"hf:{REPO_ID}", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["commit"] == COMMIT
    assert cli.main(["fetch-base", "--source", f"hf:{REPO_ID}@v9", "--out", str(out)]) == 2
    assert "llama-adapter fetch-base: error: hf:tiny-org/tiny-llama@v9: revision v9" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- workflow


@pytest.fixture
def needs_snakemake():
    if not Path(SNAKEMAKE).exists():
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")


def hub_config(tmp_path: Path, source: str) -> list[str]:
    import yaml

    (tmp_path / "hub.yaml").write_text(yaml.safe_dump({"base": {"source": source, "tokenizer": None}}))
    return ["--configfile", str(REPO / "config.yaml"), str(tmp_path / "hub.yaml")]


def test_workflow_fetches_a_hub_base_before_it_tokenizes_and_trains(needs_snakemake, tmp_path):
    source = f"hf:{REPO_ID}@{COMMIT}"
    proc = snakemake("-n", "-p", "--cores", "1", *hub_config(tmp_path, source), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = [shlex.split(line.removeprefix("Shell command: ")) for line in proc.stdout.splitlines()
                if line.startswith("Shell command: llama-adapter ") or line.startswith("Shell command: exec ")]
    folder = "results/models/hf/tiny-org--tiny-llama"
    [fetch] = [c for c in commands if c[:2] == ["llama-adapter", "fetch-base"]]
    assert fetch[fetch.index("--source") + 1] == source and fetch[fetch.index("--out") + 1] == folder
    assert fetch[-3:] == [">", "results/logs/fetch_base.log", "2>&1"]
    position = commands.index(fetch)
    tokenizes = [i for i, c in enumerate(commands) if c[:2] == ["llama-adapter", "tokenize"]]
    trains = [i for i, c in enumerate(commands) if c[:3] == ["exec", "llama-adapter", "train"]]
    assert tokenizes and trains and position < min(tokenizes + trains)
    for i in tokenizes:  # the tokenizer defaults to the fetched folder's
        assert commands[i][commands[i].index("--tokenizer") + 1] == folder
    for i in trains:
        assert commands[i][commands[i].index("--base") + 1] == folder
    assert "pretrain_base" not in proc.stdout and "fetch_smollm2" not in proc.stdout


def test_workflow_fetch_base_rule_runs_offline_from_the_cache(needs_snakemake, tiny_repo, tmp_path):
    folder = "results/models/hf/tiny-org--tiny-llama"
    proc = snakemake("--cores", "1", folder, *hub_config(tmp_path, f"hf:{REPO_ID}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "localrule fetch_base:" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / folder / "fetch.json").read_text())["commit"] == COMMIT
    assert "tiny-org/tiny-llama" in (tmp_path / "results" / "logs" / "fetch_base.log").read_text()


def test_workflow_refuses_a_malformed_hub_source_by_name(needs_snakemake, tmp_path):
    proc = snakemake("-n", "--cores", "1", *hub_config(tmp_path, "hf:just-a-name"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "config base.source: hf:just-a-name: not a hub model" in proc.stdout + proc.stderr
