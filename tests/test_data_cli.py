"""The data stage end to end through the command line, as the Snakemake rules call it, on the demo data."""

import json
import subprocess
import sys

import pytest

from llama_adapter.data.tokens import TokenDataset
from llama_adapter.tokenizer import load_tokenizer


def cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "llama_adapter.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cli("demo-data", "--out", root / "demo", "--seed", 0)
    cli("train-tokenizer", "--corpus", root / "demo" / "corpus.jsonl", "--out", root / "tokenizer.model",
        "--vocab-size", 600)
    return root


def test_help_of_every_data_subcommand():
    for sub in ("demo-data", "train-tokenizer", "fetch", "validate", "tokenize", "make-vision-encoder",
                "encode-images"):
        assert "usage: llama-adapter" in cli(sub, "--help")


def test_tokenizer_training_is_deterministic(demo, tmp_path):
    cli("train-tokenizer", "--corpus", demo / "demo" / "corpus.jsonl", "--out", tmp_path / "again.model",
        "--vocab-size", 600)
    assert (tmp_path / "again.model").read_bytes() == (demo / "tokenizer.model").read_bytes()
    tok = load_tokenizer(demo / "tokenizer.model")
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 600)
    assert tok.decode(tok.encode("A zorb is blue.", bos=True, eos=True)) == "A zorb is blue."


def test_alpaca_chain(demo):
    root = demo
    cli("fetch", "--dataset", "alpaca", "--source", root / "demo" / "alpaca.json", "--out", root / "alpaca" / "fetched")
    out = json.loads(cli("validate", "--dataset", "alpaca", "--fetched", root / "alpaca" / "fetched",
                         "--out", root / "alpaca" / "validated"))
    assert out["kept"] == out["total"] == 2000 and out["invalid"] == {}
    splits = json.loads(cli("tokenize", "--dataset", "alpaca", "--validated", root / "alpaca" / "validated",
                            "--tokenizer", root / "tokenizer.model", "--out", root / "alpaca" / "tokens",
                            "--max-seq-len", 256, "--val-size", 200, "--seed", 0))
    assert splits["train"]["samples"] == 1800 and splits["val"]["samples"] == 200
    stats = json.loads((root / "alpaca" / "tokens" / "stats.json").read_text())
    assert stats["provenance"]["dataset"] == "alpaca" and stats["provenance"]["records"] == 2000
    assert len(TokenDataset(root / "alpaca" / "tokens" / "val")) == 200


def test_scienceqa_chain_keeps_its_splits_and_images(demo):
    root = demo
    # Fetched and validated by relative paths from the data's folder; every later stage runs from elsewhere
    # (validation.json names the fetched folder relative to the validated one, as the records' image paths).
    cli("fetch", "--dataset", "scienceqa", "--source", "demo/scienceqa", "--out", "sqa/fetched", cwd=root)
    cli("validate", "--dataset", "scienceqa", "--fetched", "sqa/fetched", "--out", "sqa/validated", cwd=root)
    records = [json.loads(line) for line in (root / "sqa" / "validated" / "records.jsonl").read_text().splitlines()]
    with_image = [r for r in records if r["image"]]
    assert with_image and all((root / "sqa" / "validated" / r["image"]).is_file() for r in with_image)
    splits = json.loads(cli("tokenize", "--dataset", "scienceqa", "--validated", root / "sqa" / "validated",
                            "--tokenizer", root / "tokenizer.model", "--out", root / "sqa" / "tokens",
                            "--split-by", "field", "--max-seq-len", 256))
    assert {k: v["samples"] for k, v in splits.items()} == {"train": 720, "val": 240, "test": 240}
    # ScienceQA's default is its own split too: no test question trains unless a seeded draw is asked for
    default = json.loads(cli("tokenize", "--dataset", "scienceqa", "--validated", root / "sqa" / "validated",
                             "--tokenizer", root / "tokenizer.model", "--out", root / "sqa" / "tokens-default",
                             "--max-seq-len", 256))
    assert default == splits
    stats = json.loads((root / "sqa" / "tokens" / "stats.json").read_text())
    assert stats["provenance"]["dataset"] == "scienceqa", stats.get("provenance")  # fetch.json, found from here
    keys = TokenDataset(root / "sqa" / "tokens" / "test").keys  # each sample's pid, for its image features
    assert len(keys) == 240 and set(keys) <= {r["pid"] for r in records if r["split"] == "test"}

    # The multimodal side: the demo's vision encoder, then every image encoded once into the cache.
    cli("make-vision-encoder", "--out", root / "clip", "--seed", 0)
    records_file = root / "sqa" / "validated" / "records.jsonl"
    first = json.loads(cli("encode-images", "--encoder", root / "clip", "--records", records_file,
                           "--out", root / "features"))
    assert first["rows"] == first["encoded"] == len(with_image) and first["n_skipped"] == 0
    again = json.loads(cli("encode-images", "--encoder", root / "clip", "--records", records_file,
                           "--out", root / "features"))
    assert again["encoded"] == 0 and again["reused"] == len(with_image)


def test_bad_source_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llama_adapter.cli", "fetch", "--dataset", "alpaca", "--source",
                           str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "missing.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_split_assigned_twice_is_refused(tmp_path):
    """--assign-splits train=0.3 val=0.2 train=0.8 once fetched with train 0.8, the first fraction silently lost
    (its fractions then summed to 1); a split named twice is an error naming it, and nothing is written."""
    source = tmp_path / "llava.json"
    source.write_text(json.dumps([{"id": str(i), "conversations": [
        {"from": "human", "value": f"Context: N/A\nQuestion {i}?\nA. yes\nB. no"}, {"from": "gpt", "value": "A"}]}
        for i in range(10)]))
    proc = subprocess.run([sys.executable, "-m", "llama_adapter.cli", "fetch", "--dataset", "scienceqa", "--source",
                           str(source), "--out", str(tmp_path / "out"), "--assign-splits", "train=0.3", "val=0.2",
                           "train=0.8"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--assign-splits" in proc.stderr and "'train'" in proc.stderr and "NAME=FRACTION" in proc.stderr
    assert not (tmp_path / "out").exists()
