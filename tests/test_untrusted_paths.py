"""Paths inside a dataset are untrusted: an image name (or a pid that names a file) must not reach outside its
dataset, in any reader of the fetch stage, in validate, or in encode-images.

Each case builds a dataset beside a folder `outside/` holding a real PNG, names that PNG through `..`, an
absolute path or a symlink, and checks that the stage refuses it (policy fail: one error naming the pid and
the path, nothing written; policy skip: counted and listed) and that no file under `outside/` is ever opened:
an audit hook sees every `open` the interpreter makes.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llama_adapter.cli import main
from llama_adapter.data.fetch import FetchError, fetch
from llama_adapter.data.paths import file_name, inside
from llama_adapter.data.validate import validate
from llama_adapter.errors import UnsafePathError

WATCHED: list[str] = []  # the folder whose opening fails the test, while a test watches it
OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and WATCHED and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if any(path.startswith(w + os.sep) for w in WATCHED):
            OPENED.append(path)


sys.addaudithook(_audit)  # hooks cannot be removed: this one records only while WATCHED is set


@pytest.fixture
def outside(tmp_path):
    """A folder outside every dataset, holding a readable PNG; fails the test if anything under it is opened."""
    folder = tmp_path / "outside"
    folder.mkdir()
    png(folder / "secret.png")
    WATCHED.append(os.path.realpath(folder))
    OPENED.clear()
    yield folder
    WATCHED.clear()
    assert OPENED == [], f"opened outside the dataset: {OPENED}"


def png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def problem(image: str | None) -> dict:
    return {"question": "Which colour?", "choices": ["red", "blue"], "answer": 0, "hint": "", "image": image,
            "task": "closed choice", "grade": "grade3", "subject": "natural science", "topic": "t",
            "category": "c", "skill": "s", "lecture": "", "solution": "", "split": "train"}


# Each form of escape, as (the name a record holds, what to prepare in the dataset folder for it).
def escape_forms(outside: Path, root: Path, where: str) -> dict[str, str]:
    """where: the folder (relative to root) the name is joined to by the reader."""
    depth = len(Path(where).parts) + len(root.relative_to(outside.parent).parts)
    link_dir = root / where
    link_dir.mkdir(parents=True, exist_ok=True)
    (link_dir / "link.png").symlink_to(outside / "secret.png")
    return {"dotdot": "../" * depth + "outside/secret.png", "absolute": str(outside / "secret.png"),
            "symlink": "link.png"}


def original_layout(root: Path, pid: str, name: str) -> None:
    """ScienceQA's problems.json + pid_splits.json, the image named `name` under images/<pid>/."""
    (root / "problems.json").write_text(json.dumps({pid: problem(name), "2": problem(None)}))
    (root / "pid_splits.json").write_text(json.dumps({"train": [pid, "2"]}))


@pytest.mark.parametrize("form", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("reader", ["original", "parquet", "hub", "llava"])
def test_every_reader_refuses_every_escape(tmp_path, outside, reader, form, monkeypatch):
    root = tmp_path / "dataset"
    root.mkdir()
    if reader == "original":
        name = escape_forms(outside, root, "images/1")[form]
        original_layout(root, "1", name)
        source = root
    elif reader in ("parquet", "hub"):  # an HF export row with a path column and no embedded bytes
        name = escape_forms(outside, root, ".")[form]
        rows = [{"question": "Which colour?", "choices": ["red", "blue"], "answer": 0,
                 "image": {"bytes": None, "path": name}},
                {"question": "Which shape?", "choices": ["round", "square"], "answer": 1, "image": None}]
        (root / "data").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / "train-00000-of-00001.parquet")
        source = root
        if reader == "hub":  # the same folder through `datasets`, as hf:<local folder>
            import datasets

            monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
            source = f"hf:{root}"
    else:  # LLaVA's conversation file with an `image` field, read from beside the file
        name = escape_forms(outside, root, ".")[form]
        item = {"id": "1", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhich colour?\nA. red\nB. blue"}, {"from": "gpt", "value": "A"}]}
        other = {"id": "2", "conversations": [
            {"from": "human", "value": "Which shape?\nA. round\nB. square"}, {"from": "gpt", "value": "B"}]}
        (root / "llava.json").write_text(json.dumps([item, other]))
        source = root / "llava.json"

    with pytest.raises(FetchError) as e:
        fetch("scienceqa", str(source), tmp_path / "fetched")
    pid = "train-0" if reader in ("parquet", "hub") else "1"
    assert f"pid {pid}: image" in str(e.value) and "leaves the dataset folder" in str(e.value)
    assert name in str(e.value)
    assert not (tmp_path / "fetched").exists()

    meta = fetch("scienceqa", str(source), tmp_path / "fetched", policy="skip")
    assert meta["images_refused"]["count"] == 1 and meta["images_refused"]["records"][0]["pid"] == pid
    assert meta["images"] == 0 and os.listdir(tmp_path / "fetched" / "images") == []
    records = [json.loads(line) for line in (tmp_path / "fetched" / "records.jsonl").read_text().splitlines()]
    assert records[0]["has_image"] and records[0]["image"] is None

    # validate drops the refused record as invalid (skip) or stops naming it (fail)
    report = validate("scienceqa", tmp_path / "fetched", tmp_path / "validated", policy="skip")
    assert report.invalid.get("image refused by fetch") == 1
    kept = [json.loads(line) for line in (tmp_path / "validated" / "records.jsonl").read_text().splitlines()]
    assert pid not in [r["pid"] for r in kept]


def test_a_symlinked_folder_inside_the_dataset_is_refused_too(tmp_path, outside):
    root = tmp_path / "dataset"
    (root / "images").mkdir(parents=True)
    (root / "images" / "1").symlink_to(outside, target_is_directory=True)  # images/1/secret.png is outside
    original_layout(root, "1", "secret.png")
    with pytest.raises(FetchError, match="a symlink to"):
        fetch("scienceqa", str(root), tmp_path / "fetched")


def test_a_pid_that_would_write_outside_the_output_is_refused(tmp_path, outside):
    # original layout: images/<pid>/<name> itself resolves outside, so the read is refused before any write
    root = tmp_path / "dataset"
    (root / "images").mkdir(parents=True)
    original_layout(root, "../../../evil", "image.png")
    with pytest.raises(FetchError, match="evil"):
        fetch("scienceqa", str(root), tmp_path / "fetched")
    # LLaVA: a safe image beside the file, but the id would name images/../../evil.png as the stored copy
    png(root / "ok.png")
    item = {"id": "../../evil", "image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich colour?\nA. red\nB. blue"}, {"from": "gpt", "value": "A"}]}
    (root / "llava.json").write_text(json.dumps([item]))
    with pytest.raises(FetchError, match=r"pid \.\./\.\./evil: image cannot be stored"):
        fetch("scienceqa", str(root / "llava.json"), tmp_path / "fetched")
    meta = fetch("scienceqa", str(root / "llava.json"), tmp_path / "fetched", policy="skip")
    assert meta["images_refused"]["count"] == 1 and meta["images"] == 0
    assert not any(p.name in ("evil", "evil.png") for p in tmp_path.rglob("*"))
    assert file_name("train-0") == "train-0"
    for bad in ("a/b", "..", ".", "a\\b", "", "a\x00"):
        with pytest.raises(UnsafePathError):
            file_name(bad)


def test_safe_names_inside_the_dataset_are_still_read(tmp_path):
    root = tmp_path / "dataset"
    (root / "images" / "1").mkdir(parents=True)
    data = png(root / "images" / "1" / "image.png")
    (root / "images" / "1" / "alias.png").symlink_to(root / "images" / "1" / "image.png")  # a link inside is fine
    (root / "problems.json").write_text(json.dumps({"1": problem("image.png"), "2": problem("alias.png")}))
    (root / "images" / "2").mkdir()
    (root / "images" / "2" / "alias.png").symlink_to(root / "images" / "1" / "image.png")
    (root / "pid_splits.json").write_text(json.dumps({"train": ["1", "2"]}))
    meta = fetch("scienceqa", str(root), tmp_path / "fetched")
    assert meta["images"] == 2 and "images_refused" not in meta
    assert (tmp_path / "fetched" / "images" / "2.png").read_bytes() == data
    assert inside(root, "images/1/image.png") == root / "images" / "1" / "image.png"


def test_cli_fetch_names_the_pid_and_path_in_one_line(tmp_path, outside, capsys):
    root = tmp_path / "dataset"
    root.mkdir()
    original_layout(root, "7", "../../../outside/secret.png")
    assert main(["fetch", "--dataset", "scienceqa", "--source", str(root), "--out", str(tmp_path / "f")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pid 7" in err and "../../../outside/secret.png" in err
    assert not (tmp_path / "f").exists()


def test_split_file_pids_missing_from_the_problems_fail_or_are_counted(tmp_path):
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps({"1": problem(None), "2": problem(None)}))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["1", "2", "99", "100"], "val": ["1"]}))
    with pytest.raises(FetchError, match=r"pid_splits.json: 1 pids in two splits \(first: 1\)"):
        fetch("scienceqa", str(root), tmp_path / "fetched")
    (root / "pid_splits.json").write_text(json.dumps({"train": ["1", "2", "99", "100"]}))
    with pytest.raises(FetchError, match=r"pid_splits.json: 2 pids not in problems.json \(first: 99, 100\)"):
        fetch("scienceqa", str(root), tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()
    meta = fetch("scienceqa", str(root), tmp_path / "fetched", policy="skip")
    assert meta["split_pids_not_in_problemsjson"] == {"count": 2, "pids": ["99", "100"]}


def test_a_pid_listed_twice_in_one_split_is_not_called_in_two_splits(tmp_path):
    """A pid listed twice in train alone was refused as "in two splits"; the message now says where it is listed."""
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps({"1": problem(None), "2": problem(None)}))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["1", "2", "1"], "val": []}))
    with pytest.raises(FetchError, match=r"pid_splits.json: 1 pids listed twice in train \(first: 1\)"):
        fetch("scienceqa", str(root), tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()
    meta = fetch("scienceqa", str(root), tmp_path / "fetched", policy="skip")
    assert meta["split_pids_listed_twice_in_train"] == {"count": 1, "pids": ["1"]}
    assert "split_pids_in_two_splits" not in meta


def test_validate_refuses_an_image_path_leaving_a_hand_made_folder(tmp_path, outside):
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    (fetched / "images").mkdir()
    (fetched / "images" / "2.png").symlink_to(outside / "secret.png")
    records = [{**problem(None), "pid": "1", "image": "../outside/secret.png", "has_image": True},
               {**problem(None), "pid": "2", "image": "images/2.png", "has_image": True},
               {**problem(None), "pid": "3", "image": str(outside / "secret.png"), "has_image": True},
               {**problem(None), "pid": "4", "question": "Another?"}]
    (fetched / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = validate("scienceqa", fetched, tmp_path / "validated", policy="skip")
    assert report.invalid == {"bad image path": 3} and report.kept == 1


# --- encode-images reads a records file: it is data too ----------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from llama_adapter.multimodal import VisionEncoder, save_tiny_clip

    return VisionEncoder(save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip"), layers=(-1,))


def validated_records(tmp_path: Path, images: dict[str, str | None], has_image: bool = True) -> Path:
    """A fetched + validated pair as the pipeline writes them; `images` maps pid to the record's image path."""
    (tmp_path / "fetched" / "images").mkdir(parents=True, exist_ok=True)
    png(tmp_path / "fetched" / "images" / "ok.png")
    (tmp_path / "validated").mkdir()
    (tmp_path / "validated" / "validation.json").write_text(json.dumps({"source": str(tmp_path / "fetched")}))
    path = tmp_path / "validated" / "records.jsonl"
    question = {"question": "?", "choices": ["a", "b"], "answer": 0}  # otherwise valid: only the paths are at stake
    path.write_text("".join(json.dumps({"pid": pid, **question, "image": image, "has_image": has_image}) + "\n"
                            for pid, image in images.items()))
    return path


@pytest.mark.parametrize("form", ["dotdot", "absolute", "symlink"])
def test_encode_images_refuses_paths_leaving_the_dataset(tmp_path, outside, encoder, form):
    from llama_adapter.errors import ImageError
    from llama_adapter.multimodal import encode_images

    (tmp_path / "fetched" / "images").mkdir(parents=True)
    (tmp_path / "fetched" / "images" / "link.png").symlink_to(outside / "secret.png")
    bad = {"dotdot": "../fetched/../outside/secret.png", "absolute": str(outside / "secret.png"),
           "symlink": "../fetched/images/link.png"}[form]
    records = validated_records(tmp_path, {"1": "../fetched/images/ok.png", "2": bad})
    with pytest.raises(ImageError, match=r"records\.jsonl: pid 2: image .*leaves the dataset folder"):
        encode_images(encoder, records, tmp_path / "features")
    assert not (tmp_path / "features").exists()
    summary = encode_images(encoder, records, tmp_path / "features", policy="skip")
    assert (summary["rows"], summary["skipped"]) == (1, ["2"])


def test_encode_images_fails_on_a_record_with_an_image_but_no_file(tmp_path, encoder):
    from llama_adapter.errors import ImageError
    from llama_adapter.multimodal import encode_images

    records = validated_records(tmp_path, {"1": "../fetched/images/ok.png", "2": None})
    encode_images(encoder, records, tmp_path / "features", policy="skip")  # an earlier run's cache
    with pytest.raises(ImageError, match=r"pid 2: image None cannot be read \(the record has an image but no"):
        encode_images(encoder, records, tmp_path / "features")
    assert not (tmp_path / "features").exists()  # the failed run left no cache for training to take
    summary = encode_images(encoder, records, tmp_path / "features", policy="skip")
    assert (summary["rows"], summary["skipped"]) == (1, ["2"])
    # a record without an image at all is no problem under either policy
    records = validated_records(tmp_path / "b", {"1": "../fetched/images/ok.png", "3": None}, has_image=False)
    assert encode_images(encoder, records, tmp_path / "b" / "features")["skipped"] == []
