"""fetch: every source layout normalises to the same records, atomically, with honest provenance."""

import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llama_adapter.data import FORMAT_VERSION, SCIENCEQA_FIELDS
from llama_adapter.data import fetch as fetch_module
from llama_adapter.data.fetch import FetchError, assign_split_names, fetch
from llama_adapter.io import sha256_file

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep."},
    {"instruction": "Translate to French.", "input": "Où est la gare ? ☃", "output": "Where is the station?"},
    {"instruction": "Say nothing.", "input": "", "output": "<nooutput>"},
]
SQA_COLUMNS = ("question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category", "skill",
               "lecture", "solution")


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (5, 3), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def read_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()]


def sqa_problem(i: int, image: str | None) -> dict:
    return {"question": f"Question {i}?", "choices": ["yes", "no", "maybe"], "answer": i % 3, "hint": f"hint {i}",
            "image": image, "task": "closed choice", "grade": "grade3", "subject": "natural science",
            "topic": "biology", "category": "Plants", "skill": "Identify plants", "lecture": "L", "solution": "S",
            "split": "train"}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """Keep `datasets`' arrow cache inside the test's folder instead of the user's home."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on a free local port serving a folder; yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_alpaca_sources_give_identical_records(tmp_path, http_root, hf_cache):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text(json.dumps(ALPACA, ensure_ascii=False), encoding="utf-8")
    (src / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ALPACA), src / "a.parquet")
    # The hub's layout, with tatsu-lab/alpaca's extra `text` column, which fetch leaves out.
    hub = src / "hub"
    hub.mkdir()
    with_text = pa.Table.from_pylist([{**r, "text": "prompt"} for r in ALPACA])
    pq.write_table(with_text, hub / "train-00000-of-00001.parquet")
    served, base = http_root
    shutil.copy(src / "a.json", served / "alpaca_data.json")

    sources = {"json": str(src / "a.json"), "jsonl": str(src / "a.jsonl"), "parquet": str(src / "a.parquet"),
               "url": f"{base}/alpaca_data.json", "hf": f"hf:{hub}", "folder": str(hub)}
    metas = {name: fetch("alpaca", s, tmp_path / "out" / name) for name, s in sources.items()}

    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ALPACA).encode()
    for name, meta in metas.items():
        out = tmp_path / "out" / name
        assert (out / "records.jsonl").read_bytes() == expected, name
        assert json.loads((out / "fetch.json").read_text()) == meta
        assert sorted(p.name for p in out.iterdir()) == ["fetch.json", "records.jsonl"]
        assert meta["format"] == FORMAT_VERSION and meta["dataset"] == "alpaca" and meta["source"] == sources[name]
        assert (meta["records"], meta["images"], meta["images_missing"]) == (3, 0, 0)
        assert meta["records_sha256"] == sha256_file(out / "records.jsonl")
        assert meta["fetched_at"].endswith("+00:00")
    assert [metas[n]["source_kind"] for n in sources] == ["path", "path", "path", "url", "hf", "path"]
    assert metas["url"]["source_sha256"] == metas["json"]["source_sha256"] == sha256_file(src / "a.json")
    assert metas["hf"]["source_sha256"] is None and metas["hf"]["revision"]  # the builder's hash of the folder
    assert metas["json"]["revision"] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(sources)  # no scratch left


def test_sha256_is_checked_and_a_mismatch_leaves_nothing(tmp_path, http_root):
    src = tmp_path / "a.json"
    src.write_text(json.dumps(ALPACA))
    digest = sha256_file(src)
    assert fetch("alpaca", str(src), tmp_path / "ok", sha256=digest.upper())["source_sha256"] == digest

    served, base = http_root
    shutil.copy(src, served / "a.json")
    for source in (str(src), f"{base}/a.json"):
        with pytest.raises(FetchError) as e:
            fetch("alpaca", source, tmp_path / "out", sha256="0" * 64)
        assert source in str(e.value) and "0" * 64 in str(e.value) and digest in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "ok", "served"]
    # A revision cannot pin a file or a URL: fetch.json would record it as provenance nothing checked.
    for source in (str(src), f"{base}/a.json"):
        with pytest.raises(FetchError, match=r"a revision pins a hub dataset \(hf:\.\.\.\); a URL or local"):
            fetch("alpaca", source, tmp_path / "out", revision="v9.9")
    assert not (tmp_path / "out").exists()


def test_an_empty_source_is_refused_and_nothing_written(tmp_path):
    """A source of no records ([]) once fetched exit 0 with records: 0, for validate to refuse; fetch refuses it
    itself, naming the source, and leaves no output (an earlier fetch's included)."""
    (tmp_path / "ok.json").write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}]))
    assert fetch("alpaca", str(tmp_path / "ok.json"), tmp_path / "out")["records"] == 1
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(FetchError, match=rf"^{re.escape(str(tmp_path / 'empty.json'))}: holds no alpaca records; "
                                         "expected at least one$"):
        fetch("alpaca", str(tmp_path / "empty.json"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_real_alpaca_sample(shared_data, tmp_path):
    meta = fetch("alpaca", str(shared_data / "alpaca" / "alpaca_sample_5000.json"), tmp_path / "out")
    assert meta["records"] == 5000
    assert meta["source_sha256"] == "fc1add24c93c9fbbe585a64a6c9bf6165eb110225f4470efbff382a913558ec0"
    records = read_records(tmp_path / "out")
    assert sum(r["input"] != "" for r in records) == 1943


def test_real_scienceqa_original_layout(shared_data, tmp_path):
    src = tmp_path / "sqa"
    src.mkdir()
    shutil.copy(shared_data / "scienceqa" / "problems_150.json", src / "problems.json")
    shutil.copy(shared_data / "scienceqa" / "pid_splits_150.json", src / "pid_splits.json")
    meta = fetch("scienceqa", str(src), tmp_path / "out")
    records = read_records(tmp_path / "out")
    assert meta["records"] == len(records) == 150
    assert all(tuple(r) == SCIENCEQA_FIELDS for r in records)
    assert Counter(r["split"] for r in records) == {"train": 50, "val": 50, "test": 50}
    assert sum(r["has_image"] for r in records) == meta["images_missing"] == 67  # no image files shipped
    assert meta["images"] == 0 and all(r["image"] is None for r in records)
    assert list((tmp_path / "out" / "images").iterdir()) == []
    problems = json.loads((src / "problems.json").read_text())
    assert [r["pid"] for r in records] == list(problems)
    first = records[0]
    assert first["choices"] == problems[first["pid"]]["choices"] and first["answer"] == problems[first["pid"]]["answer"]


def test_real_scienceqa_llava(shared_data, tmp_path):
    meta = fetch("scienceqa", str(shared_data / "scienceqa" / "test_4241_llava_cqm.json"), tmp_path / "out")
    records = {r["pid"]: r for r in read_records(tmp_path / "out")}
    assert meta["records"] == len(records) == 4241
    assert sum(r["has_image"] for r in records.values()) == meta["images_missing"] == 2017
    assert all(0 <= r["answer"] < len(r["choices"]) and 2 <= len(r["choices"]) <= 5 for r in records.values())
    assert all(r["split"] is None and r["image"] is None for r in records.values())
    # LLaVA folds a non-empty hint in as "Context: …"; it comes back out as the hint (the TXT column).
    assert sum(r["hint"] is not None for r in records.values()) == 2046
    assert records["4"] == {
        **dict.fromkeys(SCIENCEQA_FIELDS),
        "pid": "4", "has_image": False, "answer": 1, "choices": ["chiasmus", "apostrophe"],
        "question": "Which figure of speech is used in this text?\nSing, O goddess, the anger of Achilles son of "
                    "Peleus, that brought countless ills upon the Achaeans.\n—Homer, The Iliad",
    }
    assert (records["11"]["question"], records["11"]["has_image"]) == ("What is the name of the colony shown?", True)
    # Options spanning several lines (a letter's closing and signature) stay whole.
    assert records["5"]["hint"].startswith("People can use the engineering-design process")
    assert records["5"]["hint"].endswith("\nFigure: a spacecraft's parachute in a wind tunnel.")
    assert records["5"]["question"] == "Which of the following could Gordon's test show?"
    assert (records["512"]["question"], records["512"]["choices"]) == (
        "Which closing is correct for a letter?", ["See you soon,\nJanet", "See You Soon,\nJanet"])
    # The parse agrees with the original problems for the test ids both files hold.
    problems = json.loads((shared_data / "scienceqa" / "problems_150.json").read_text())
    shared = [pid for pid in problems if pid in records]
    assert len(shared) == 50
    for pid in shared:
        assert records[pid]["choices"] == problems[pid]["choices"] and records[pid]["answer"] == problems[pid]["answer"]
        assert records[pid]["has_image"] == bool(problems[pid]["image"])
        ours, theirs = records[pid], problems[pid]
        assert (ours["hint"] or "", ours["question"]) == (theirs["hint"], theirs["question"])


def test_assigned_splits_are_seeded_exact_and_independent_of_order(shared_data, tmp_path):
    source = shared_data / "scienceqa" / "test_4241_llava_cqm.json"
    fractions = {"train": 0.45, "val": 0.05, "test": 0.5}
    meta = fetch("scienceqa", str(source), tmp_path / "a", assign_splits=fractions, split_seed=0)
    split = {r["pid"]: r["split"] for r in read_records(tmp_path / "a")}
    counts = {name: list(split.values()).count(name) for name in fractions}
    assert counts == meta["assigned_splits"]["records"] == {"train": 1908, "val": 212, "test": 2121}
    assert meta["assigned_splits"]["source_splits"] == {"None": 4241}
    # The same records in another order get the same splits; another seed gives other splits.
    items = json.loads(source.read_text())
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps(items[::-1]))
    fetch("scienceqa", str(shuffled), tmp_path / "b", assign_splits=fractions, split_seed=0)
    assert {r["pid"]: r["split"] for r in read_records(tmp_path / "b")} == split
    fetch("scienceqa", str(source), tmp_path / "c", assign_splits=fractions, split_seed=1)
    other = {r["pid"]: r["split"] for r in read_records(tmp_path / "c")}
    assert 0.4 < sum(other[p] == split[p] for p in split) / len(split) < 0.6


def test_llava_text_with_windows_line_endings_splits_as_with_unix_ones(tmp_path):
    """LLaVA's text is cut at "\n": with "\r\n" every line kept a "\r", so no line ended in "?" and the question
    was taken to be the last line alone (the rest of it went into the hint), the "<image>" line stayed in the
    text, and the options ended in "\r". "\r\n" now reads as "\n", the record as its "\n" twin's."""
    text = ("<image>\nContext: Read the text.\nIt is about a bird.\nWhich word rhymes with cat?\nThe cat sat.\n"
            "A. hat\nB. dog")
    items = [{"id": pid, "image": "x.png", "conversations": [{"from": "human", "value": value},
                                                             {"from": "gpt", "value": "A"}]}
             for pid, value in (("1", text), ("2", text.replace("\n", "\r\n")))]
    (tmp_path / "llava.json").write_text(json.dumps(items))
    fetch("scienceqa", str(tmp_path / "llava.json"), tmp_path / "out")
    unix, windows = read_records(tmp_path / "out")
    assert (unix["hint"], unix["question"], unix["choices"]) == (
        "Read the text.\nIt is about a bird.", "Which word rhymes with cat?\nThe cat sat.", ["hat", "dog"])
    assert windows == {**unix, "pid": "2"}


def test_assign_split_names_cuts_by_fraction():
    names = assign_split_names([str(i) for i in range(10)], {"train": 0.3, "test": 0.7}, seed=0)
    assert sorted(names) == ["test"] * 7 + ["train"] * 3


def test_assigned_splits_do_not_depend_on_the_order_of_the_fractions(tmp_path):
    """A config's fractions in another key order assign every pid the same split, and fetch.json records them
    in one order; the runs are cut train, val, test (the order every shipped config writes)."""
    from itertools import permutations

    keys = [str(i) for i in range(101)]
    written = {"train": 0.45, "val": 0.05, "test": 0.5}
    names = assign_split_names(keys, written, seed=0)
    assert Counter(names) == {"train": 45, "val": 5, "test": 51}  # cut at round(0.45 x 101), round(0.5 x 101)
    for order in permutations(written):
        assert assign_split_names(keys, {k: written[k] for k in order}, seed=0) == names, order
    src = tmp_path / "sqa"
    src.mkdir()
    (src / "problems.json").write_text(json.dumps({str(i): sqa_problem(i, None) for i in range(40)}))
    (src / "pid_splits.json").write_text(json.dumps({"train": [str(i) for i in range(40)]}))
    metas, splits = [], []
    for i, fractions in enumerate((written, dict(reversed(written.items())))):
        metas.append(fetch("scienceqa", str(src), tmp_path / f"out{i}", assign_splits=fractions, split_seed=3))
        splits.append({r["pid"]: r["split"] for r in read_records(tmp_path / f"out{i}")})
    assert splits[0] == splits[1]
    assert list(metas[0]["assigned_splits"]["fractions"]) == list(metas[1]["assigned_splits"]["fractions"]) == \
        ["train", "val", "test"]


@pytest.mark.parametrize("fractions, message", [
    ({"train": 0.5, "test": 0.4}, "sum to 1"), ({"train": 1.2, "test": -0.2}, "positive"),
    ({"train": 0.5, "dev": 0.5}, "must name train, val and/or test"), ({"train": float("nan")}, "sum to 1"),
])
def test_bad_split_fractions_are_refused(tmp_path, fractions, message):
    src = tmp_path / "s.json"
    src.write_text("[]")
    with pytest.raises(FetchError, match=message):
        fetch("scienceqa", str(src), tmp_path / "out", assign_splits=fractions)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FetchError, match="applies to scienceqa"):
        fetch("alpaca", str(src), tmp_path / "out", assign_splits={"train": 1.0})


def test_scienceqa_original_layout_copies_images(tmp_path):
    src = tmp_path / "sqa"
    problems = {"1": sqa_problem(1, "image.png"), "2": sqa_problem(2, "image.png"), "3": sqa_problem(3, None),
                "4": sqa_problem(4, "image.png"), "5": sqa_problem(5, "photo.jpg")}
    pngs = {"1": png_bytes((255, 0, 0)), "2": png_bytes((0, 255, 0))}
    for pid, where in (("1", "images/1"), ("2", "images/train/2")):  # flat, and as ScienceQA's zips unpack
        (src / where).mkdir(parents=True)
        (src / where / "image.png").write_bytes(pngs[pid])
    (src / "images" / "5").mkdir()
    (src / "images" / "5" / "photo.jpg").write_bytes(png_bytes((0, 0, 255), fmt="JPEG"))
    (src / "problems.json").write_text(json.dumps(problems))
    (src / "pid_splits.json").write_text(json.dumps({"train": ["1", "2", "3"], "val": ["4"], "trainval": ["1", "4"]}))

    meta = fetch("scienceqa", str(src), tmp_path / "out")
    records = read_records(tmp_path / "out")
    assert [(r["pid"], r["split"], r["has_image"], r["image"]) for r in records] == [
        ("1", "train", True, "images/1.png"), ("2", "train", True, "images/2.png"), ("3", "train", False, None),
        ("4", "val", True, None), ("5", None, True, "images/5.png"),
    ]
    assert (meta["images"], meta["images_missing"]) == (3, 1)
    for pid, data in pngs.items():
        assert (tmp_path / "out" / "images" / f"{pid}.png").read_bytes() == data
    with Image.open(tmp_path / "out" / "images" / "5.png") as im:  # a JPEG is converted, not renamed
        assert (im.format, im.size) == ("PNG", (5, 3))
    assert records[0] == {**{k: problems["1"].get(k) for k in SCIENCEQA_FIELDS}, "pid": "1", "split": "train",
                          "image": "images/1.png", "has_image": True}


def test_scienceqa_hf_parquet_layout_and_hub_loader_agree(tmp_path, hf_cache):
    import datasets

    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("int8"),
        **{c: datasets.Value("string") for c in SQA_COLUMNS if c not in ("question", "choices", "answer")},
    })
    images = [png_bytes((10, 20, 30)), None, png_bytes((200, 100, 0), size=(2, 7))]
    src = tmp_path / "hub"
    for split, n in (("train", 3), ("validation", 2), ("test", 1)):
        rows = [{**{c: v for c, v in sqa_problem(i, None).items() if c in SQA_COLUMNS},
                 "image": {"bytes": images[i], "path": None} if images[i] else None} for i in range(n)]
        ds = datasets.Dataset.from_list(rows, features=features)
        ds.to_parquet(str(src / "data" / f"{split}-00000-of-00001.parquet"))

    path_meta = fetch("scienceqa", str(src), tmp_path / "from-path")
    hub_meta = fetch("scienceqa", f"hf:{src}", tmp_path / "from-hub")
    for out in ("from-path", "from-hub"):
        records = read_records(tmp_path / out)
        assert [r["pid"] for r in records] == ["train-0", "train-1", "train-2", "val-0", "val-1", "test-0"]
        assert all(tuple(r) == SCIENCEQA_FIELDS for r in records)
        assert [r["has_image"] for r in records] == [True, False, True, True, False, True]
        assert records[2]["image"] == "images/train-2.png" and records[1]["image"] is None
        assert records[0]["choices"] == ["yes", "no", "maybe"] and records[0]["answer"] == 0
        assert (tmp_path / out / "images" / "train-2.png").read_bytes() == images[2]  # byte-identical
        assert (tmp_path / out / "images" / "val-0.png").read_bytes() == images[0]
    assert path_meta["records_sha256"] == hub_meta["records_sha256"]  # byte-identical records.jsonl
    for meta in (path_meta, hub_meta):
        assert (meta["records"], meta["images"], meta["images_missing"]) == (6, 4, 0)


def test_offline_hub_names_the_source_and_the_way_out(tmp_path):
    # `datasets` reads HF_HUB_OFFLINE when imported, so the check runs in a fresh interpreter with an empty cache.
    code = (
        "import sys\nfrom llama_adapter.data.fetch import fetch, FetchError\n"
        "try:\n    fetch('alpaca', 'hf:tatsu-lab/alpaca', sys.argv[1])\n"
        "except FetchError as e:\n    print(e)\nelse:\n    sys.exit('no FetchError')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_DATASETS_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "hf:tatsu-lab/alpaca" in done.stdout and "set the source to a local path" in done.stdout
    assert "JSON list file" in done.stdout and not (tmp_path / "out").exists()


def test_unreachable_url_suggests_a_local_path(tmp_path, http_root):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, base = http_root
    for url in (f"http://127.0.0.1:{port}/alpaca.json", f"{base}/missing.json"):
        with pytest.raises(FetchError, match="local path") as e:
            fetch("alpaca", url, tmp_path / "out")
        assert url in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


@pytest.mark.parametrize("name, content, match", [
    ("a.json", '[{"instruction": ', "not valid JSON"),  # a download cut short
    ("a.json", '{"instruction": "x"}', "holds a JSON dict, expected a list"),
    ("a.jsonl", '{"a": 1}\n[', "line 2: not valid JSON"),
    ("data", "[]", "is not a known alpaca layout"),  # no suffix to read it by
])
def test_a_downloaded_file_that_cannot_be_read_is_named_by_its_url(tmp_path, http_root, name, content, match):
    """A download's errors named the copy in the fetch's scratch folder (out/.x.abcd1234.partial/a.json), which is
    removed as the fetch fails: a path nobody can open, in place of the URL that served the file."""
    root, base = http_root
    (root / name).write_text(content)
    with pytest.raises(FetchError, match=re.escape(match)) as e:
        fetch("alpaca", f"{base}/{name}", tmp_path / "out")
    assert str(e.value).startswith(f"{base}/{name}") and ".partial" not in str(e.value), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


def test_a_url_whose_file_name_decodes_to_a_nul_byte_is_refused_naming_it(tmp_path, monkeypatch):
    """A URL whose last segment holds %00 downloaded, then stopped at open() with Python's bare "embedded null
    byte", naming no URL. It is refused before anything is downloaded, naming the URL; nothing is written."""
    downloads = []

    def urlopen(url, **kwargs):  # the server's answer, without a server
        downloads.append(url)
        return io.BytesIO(json.dumps(ALPACA).encode())

    monkeypatch.setattr(fetch_module.urllib.request, "urlopen", urlopen)
    url = "http://127.0.0.1:9/alpaca%00.json"
    with pytest.raises(FetchError) as e:
        fetch("alpaca", url, tmp_path / "out")
    assert str(e.value).startswith(f"{url}: its file name 'alpaca\\x00.json' decodes to a NUL byte"), str(e.value)
    assert downloads == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dataset,name,content,match", [
    ("alpaca", "a.json", '{"instruction": "x"}', "holds a JSON dict, expected a list"),
    ("alpaca", "a.json", "[{", "a.json: not valid JSON"),
    ("alpaca", "a.jsonl", '{"a": 1}\n[', r"a\.jsonl, line 2: not valid JSON"),
    ("alpaca", "a.json", "[1]", "record 0 is a int, not an object"),
    ("alpaca", "a.parquet", "not parquet", "is not a parquet file"),
    ("alpaca", "a.txt", "hello", "not a known alpaca layout; accepted: a JSON list file"),
    ("scienceqa", "s.json", "{}", "holds a JSON dict, expected a list"),
    ("scienceqa", "s.json", '[{"id": "1"}]', "item 0 is not a LLaVA conversation"),
    # an id that is no string (nor integer) was written as the pid "None", "[1]", "True", which validate kept
    *[("scienceqa", "s.json", json.dumps([{"id": bad, "conversations": [{"value": "Q?\nA. x\nB. y"}, {"value": "A"}]}]),
       re.escape(f"item 0: id {bad!r} is a {type(bad).__name__}; expected a string"))
      for bad in (None, [1], True, 1.0)],
    ("scienceqa", "s.csv", "a,b", "not a known scienceqa layout; accepted: a folder with problems.json"),
])
def test_unreadable_sources_are_named(tmp_path, dataset, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(FetchError, match=match) as e:
        fetch(dataset, str(tmp_path / name), tmp_path / "out")
    assert str(tmp_path / name) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_parquet_file_with_damaged_pages_is_named(tmp_path):
    """A parquet file whose footer reads but whose pages do not fails only as its rows are read (pyarrow raises a
    bare OSError naming no file): named like one that is no parquet at all, and nothing written."""
    pq.write_table(pa.table({k: [r[k] for r in ALPACA] for k in ALPACA[0]}), tmp_path / "a.parquet",
                   compression="NONE")
    data = bytearray((tmp_path / "a.parquet").read_bytes())
    data[4:40] = b"\xff" * 36  # the first page's header, just after the leading magic bytes
    (tmp_path / "a.parquet").write_bytes(bytes(data))
    with pytest.raises(FetchError, match="cannot be read as a parquet file") as e:
        fetch("alpaca", str(tmp_path / "a.parquet"), tmp_path / "out")
    assert str(tmp_path / "a.parquet") in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]


@pytest.mark.parametrize("dataset", ["alpaca", "scienceqa"])
def test_parquet_files_of_no_split_beside_the_shards_are_refused_not_left_out(tmp_path, dataset):
    """A folder of HF shards (train-00000-of-00001.parquet) also holding test.parquet or dev-00000-of-00001.parquet
    was fetched from its shards alone: the other files' records were left out without a word (fetch.json counted
    the shards' records only). Refused, naming the folder and the files, with nothing written."""
    (tmp_path / "src").mkdir()
    rows = ALPACA if dataset == "alpaca" else [{"question": "Q?", "choices": ["a", "b"], "answer": 0}]
    table = pa.Table.from_pylist(rows)
    for name in ("train-00000-of-00001.parquet", "test.parquet", "dev-00000-of-00001.parquet"):
        pq.write_table(table, tmp_path / "src" / name)
    with pytest.raises(FetchError, match=re.escape(f"{tmp_path / 'src'}: 2 parquet file(s) name no split of train, "
                                                   "validation, test (dev-00000-of-00001.parquet, test.parquet)")):
        fetch(dataset, str(tmp_path / "src"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_alpaca_from_several_splits_keeps_each_records_split(tmp_path, hf_cache):
    """An Alpaca folder of HF shards (or the hub) holding train, validation and test pooled every split's records
    into one records.jsonl with no split: a test row could be drawn into training. Each record now keeps its split
    (validation as val), as ScienceQA's do, for `tokenize --split-by field`; a row whose own `split` says otherwise
    is refused by record."""
    src = tmp_path / "src"
    src.mkdir()
    for split in ("train", "validation", "test"):
        pq.write_table(pa.Table.from_pylist([{**r, "text": "prompt"} for r in ALPACA[:2]]),
                       src / f"{split}-00000-of-00001.parquet")
    for name, source in (("folder", str(src)), ("hf", f"hf:{src}")):
        fetch("alpaca", source, tmp_path / name)
        expected = [{**r, "split": split} for split in ("train", "val", "test") for r in ALPACA[:2]]
        assert read_records(tmp_path / name) == expected, name
    pq.write_table(pa.Table.from_pylist([{**ALPACA[0], "split": "train"}]), src / "test-00000-of-00001.parquet")
    with pytest.raises(FetchError, match=re.escape(f"{src}: record 4 (split test) holds split 'train'")):
        fetch("alpaca", str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["", "hf:"])
def test_an_empty_source_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, source):
    """--source "" (or "hf:" alone) was read as Path(""), the current folder: a folder of Alpaca shards there was
    fetched as the source. Refused, naming the option, with nothing written."""
    (tmp_path / "cwd").mkdir()
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "cwd" / "train-00000-of-00001.parquet")
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(FetchError, match=re.escape(f"--source {source!r} names no path")):
        fetch("alpaca", source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]


def test_unknown_folder_layout_and_missing_path(tmp_path):
    (tmp_path / "sqa").mkdir()
    (tmp_path / "sqa" / "problems.json").write_text("{}")  # without pid_splits.json it is no known layout
    with pytest.raises(FetchError, match=re.escape(f"{tmp_path / 'sqa'} is not a known scienceqa layout")):
        fetch("scienceqa", str(tmp_path / "sqa"), tmp_path / "out")
    with pytest.raises(FetchError, match=re.escape(f"{tmp_path / 'nowhere.json'} does not exist")):
        fetch("alpaca", str(tmp_path / "nowhere.json"), tmp_path / "out")
    with pytest.raises(FetchError, match="unknown dataset"):
        fetch("mmlu", str(tmp_path / "sqa"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sqa"]


def test_rerun_is_deterministic_and_replaces_the_output(tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps(ALPACA))
    first = fetch("alpaca", str(src), tmp_path / "out")
    (tmp_path / "out" / "stale").write_text("from an older run")
    second = fetch("alpaca", str(src), tmp_path / "out")
    assert first["records_sha256"] == second["records_sha256"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fetch.json", "records.jsonl"]


def test_failure_while_writing_leaves_no_output_and_no_temporaries(tmp_path, monkeypatch):
    src = tmp_path / "a.json"
    src.write_text(json.dumps(ALPACA))
    fetch("alpaca", str(src), tmp_path / "kept")
    before = (tmp_path / "kept" / "records.jsonl").read_bytes()

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(fetch_module, "write_json", broken)
    src.write_text(json.dumps(ALPACA[:1]))
    for out in ("new", "kept"):
        with pytest.raises(OSError, match="disk full"):
            fetch("alpaca", str(src), tmp_path / out)
    # a failed fetch leaves no earlier output for validate to take as this run's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert before


def test_a_killed_download_leaves_nothing_that_the_next_fetch_keeps(tmp_path):
    """SIGKILL mid-download (a job's hard limit): the scratch folder stays, and the next fetch removes it."""
    started = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"[" + b" " * 1000)
            self.wfile.flush()
            started.set()
            threading.Event().wait(30)  # never finishes

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/alpaca.json"
    proc = subprocess.Popen([sys.executable, "-m", "llama_adapter.cli", "fetch", "--dataset", "alpaca",
                             "--source", url, "--out", str(tmp_path / "out")])
    try:
        assert started.wait(30)
        for _ in range(100):  # the first bytes reach the scratch file
            scratch = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
            if scratch and any(scratch[0].iterdir()):
                break
            threading.Event().wait(0.1)
        proc.kill()
        proc.wait(30)
    finally:
        server.shutdown()
        server.server_close()
    assert scratch and not (tmp_path / "out").exists()
    src = tmp_path / "a.json"
    src.write_text(json.dumps(ALPACA))
    fetch("alpaca", str(src), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "out"]


def test_full_pid_splits_counts(shared_data):
    from collections import Counter

    from llama_adapter.data.fetch import read_pid_splits

    counts = Counter(read_pid_splits(shared_data / "scienceqa" / "pid_splits_full.json").values())
    assert counts == {"train": 12726, "val": 4241, "test": 4241}


@pytest.mark.parametrize("name,data", [
    ("image.jpg", png_bytes((0, 0, 255), (64, 48), "JPEG")[:300]),  # a JPEG cut short: "Truncated File Read"
    ("image.png", png_bytes((0, 0, 255), (64, 48))[:60]),  # a PNG cut short is decoded too, not stored as is
    ("image.png", b"not an image at all"),
])
def test_an_unreadable_image_names_its_pid_or_is_refused_under_skip(tmp_path, name, data):
    src = tmp_path / "sqa"
    for pid, image in (("1", png_bytes((255, 0, 0))), ("2", data)):
        (src / "images" / pid).mkdir(parents=True)
        (src / "images" / pid / name).write_bytes(image)
    (src / "problems.json").write_text(json.dumps({"1": sqa_problem(1, name), "2": sqa_problem(2, name)}))
    (src / "pid_splits.json").write_text(json.dumps({"train": ["1", "2"]}))
    bad = src / "images" / "2" / name

    with pytest.raises(FetchError, match=re.escape(f"{src}: pid 2: image {bad} ")) as e:
        fetch("scienceqa", str(src), tmp_path / "out")
    assert "\n" not in str(e.value) and "policy to skip" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sqa"]

    meta = fetch("scienceqa", str(src), tmp_path / "out", policy="skip")
    assert meta["images"] == 1 and meta["images_refused"]["count"] == 1
    assert meta["images_refused"]["records"][0]["pid"] == "2"
    assert str(bad) in meta["images_refused"]["records"][0]["why"]
    assert [(r["pid"], r["has_image"], r["image"]) for r in read_records(tmp_path / "out")] == [
        ("1", True, "images/1.png"), ("2", True, None)]
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["1.png"]


def original_layout(folder: Path, problems: dict[str, dict], images: dict[str, bytes] | None = None) -> Path:
    """ScienceQA's own layout: problems.json, pid_splits.json (every pid in train), images/<pid>/image.png."""
    folder.mkdir(parents=True)
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"train": list(problems)}))
    for pid, data in (images or {}).items():
        (folder / "images" / pid).mkdir(parents=True)
        (folder / "images" / pid / "image.png").write_bytes(data)
    return folder


def test_problems_that_differ_by_their_picture_alone_are_not_duplicates(tmp_path):
    """Many ScienceQA problems share their wording ("Which animal's feet are adapted for digging?") and differ by
    their picture: the duplicate flag compares the images' content (149 of the LLaVA test file's 4,241 were
    flagged "an exact copy" when it did not), and a true copy, picture included, is still flagged."""
    from llama_adapter.data.validate import validate

    same = sqa_problem(1, "image.png")
    src = original_layout(tmp_path / "src", {"1": same, "2": same, "3": same},
                          {"1": png_bytes((255, 0, 0)), "2": png_bytes((0, 0, 255)), "3": png_bytes((0, 0, 255))})
    fetch("scienceqa", str(src), tmp_path / "fetched")
    report = validate("scienceqa", tmp_path / "fetched", tmp_path / "validated", drop_flags=["duplicate"])
    assert report.kept == 2 and report.flagged == {"duplicate": 1}
    assert [d["pid"] for d in report.dropped] == ["3"]


def test_assigned_splits_are_refused_for_repeated_pids_and_for_a_split_left_empty(tmp_path):
    src = original_layout(tmp_path / "src", {str(i): sqa_problem(i, None) for i in range(150)})
    with pytest.raises(FetchError, match=re.escape(f"{src}: split(s) ['test'] get no record of 150")):
        fetch("scienceqa", str(src), tmp_path / "f", assign_splits={"train": 0.996, "val": 0.002, "test": 0.002})
    item = {"id": "4242", "conversations": [{"from": "human", "value": "Q?\nA. 1\nB. 2"},
                                            {"from": "gpt", "value": "A"}]}
    (tmp_path / "llava.json").write_text(json.dumps([item, item]))
    with pytest.raises(FetchError, match=re.escape(f"{tmp_path / 'llava.json'}: pid '4242' is given twice "
                                                   "(records 0 and 1)")):
        fetch("scienceqa", str(tmp_path / "llava.json"), tmp_path / "f", assign_splits={"train": 1.0})
    assert not (tmp_path / "f").exists()


def test_an_output_inside_the_source_folder_is_refused(tmp_path):
    """Its digest would include the fetch's own output and change at every run (a --sha256 pin would fail)."""
    src = original_layout(tmp_path / "src", {"1": sqa_problem(1, None)})
    with pytest.raises(FetchError, match=f"--out {src / 'fetched'} lies inside the source folder"):
        fetch("scienceqa", str(src), src / "fetched")
    assert not (src / "fetched").exists()


def test_an_output_that_is_or_holds_the_source_is_refused_and_the_source_kept(tmp_path):
    """fetch() writes its folder whole over --out, and a failed fetch removes it: an --out that is the source's
    folder, or one above it, replaced the source with the fetched records, or on a failure (an image refused)
    deleted the user's dataset. The command refuses it before anything runs; fetch() itself now does too."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "alpaca.json").write_text(json.dumps(ALPACA))
    with pytest.raises(FetchError, match=f"--out {tmp_path / 'a'} is, or holds, the source"):
        fetch("alpaca", str(tmp_path / "a" / "alpaca.json"), tmp_path / "a")
    assert json.loads((tmp_path / "a" / "alpaca.json").read_text()) == ALPACA
    src = original_layout(tmp_path / "top" / "src", {"1": sqa_problem(1, "../../x.png")})
    for out in (src, tmp_path / "top"):
        with pytest.raises(FetchError, match="is, or holds, the source"):
            fetch("scienceqa", str(src), out)
        assert sorted(p.name for p in src.iterdir()) == ["pid_splits.json", "problems.json"]
    # a hub id that names a local folder is that folder (datasets loads it in place of the hub)
    with pytest.raises(FetchError, match=re.escape(f"the source hf:{src}, which the fetch reads (the local folder "
                                                   f"{src}, which `datasets` loads")):
        fetch("scienceqa", f"hf:{src}", tmp_path / "top")
    with pytest.raises(FetchError, match=re.escape(f"inside the source folder hf:{src}, whose files `datasets` reads")):
        fetch("scienceqa", f"hf:{src}", src / "out")
    assert sorted(p.name for p in src.iterdir()) == ["pid_splits.json", "problems.json"]


def test_a_json_source_reads_as_a_json_lines_one_does(tmp_path):
    """A byte-order mark is read past, and a lone surrogate escape is refused naming the file, in a JSON file as
    in a JSON Lines file (it crashed the fetch's write with an error naming nothing)."""
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode())
    assert fetch("alpaca", str(tmp_path / "bom.json"), tmp_path / "f")["records"] == 3
    (tmp_path / "lone.json").write_text('[{"instruction": "a\\ud800", "input": "", "output": "x"}]')
    with pytest.raises(FetchError, match=re.escape(f"{tmp_path / 'lone.json'}: a string holds a lone UTF-16")):
        fetch("alpaca", str(tmp_path / "lone.json"), tmp_path / "g")


def test_flags_count_only_records_not_dropped_as_invalid(tmp_path):
    """A record refused as invalid is counted as that alone: `flagged` counts what validate could have kept."""
    from llama_adapter.data.validate import validate

    outside = {"id": "a", "image": "../outside.png",
               "conversations": [{"from": "human", "value": "<image>\nQ?\nA. 1\nB. 2"}, {"from": "gpt", "value": "A"}]}
    fine = {"id": "b", "conversations": [{"from": "human", "value": "Q?\nA. 1\nB. 2"}, {"from": "gpt", "value": "B"}]}
    (tmp_path / "llava.json").write_text(json.dumps([outside, fine]))
    fetch("scienceqa", str(tmp_path / "llava.json"), tmp_path / "fetched", policy="skip")
    report = validate("scienceqa", tmp_path / "fetched", tmp_path / "validated", policy="skip")
    assert (report.invalid_records, report.kept, report.flagged) == (1, 1, {})


def test_a_pid_given_twice_never_stores_one_records_image_for_the_other(tmp_path):
    """LLaVA's file may give a pid twice, each with its own picture: both were stored as images/<pid>.png, the second
    over the first, and validate (policy skip) kept the first record with the second's picture, without a word.
    The second image is refused instead (policy fail: the fetch stops naming the pid; skip: listed in fetch.json,
    and validate drops the pid's records as invalid, counted)."""
    from llama_adapter.data.validate import validate
    from llama_adapter.errors import ValidationFailed

    (tmp_path / "images" / "7").mkdir(parents=True)
    (tmp_path / "images" / "8").mkdir(parents=True)
    (tmp_path / "images" / "7" / "image.png").write_bytes(png_bytes((255, 0, 0)))
    (tmp_path / "images" / "8" / "image.png").write_bytes(png_bytes((0, 0, 255)))

    def item(question, image):
        return {"id": "7", "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{question}\nA. x\nB. y"}, {"from": "gpt", "value": "A"}]}

    (tmp_path / "llava.json").write_text(json.dumps([item("Which is red?", "7/image.png"),
                                                     item("Which is blue?", "8/image.png")]))
    with pytest.raises(FetchError, match="pid 7: image .*images/7.png.* record 0"):
        fetch("scienceqa", str(tmp_path / "llava.json"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    meta = fetch("scienceqa", str(tmp_path / "llava.json"), tmp_path / "out", policy="skip")
    assert meta["images"] == 1 and meta["images_refused"]["count"] == 1
    assert (tmp_path / "out" / "images" / "7.png").read_bytes() == png_bytes((255, 0, 0))
    with pytest.raises(ValidationFailed, match="no record left to keep") as e:
        validate("scienceqa", tmp_path / "out", tmp_path / "validated", policy="skip")
    assert e.value.report.invalid_records == 2 and e.value.report.invalid["image refused by fetch"] == 2
    assert not (tmp_path / "validated" / "records.jsonl").exists()


def test_an_hf_image_cell_that_is_no_image_struct_is_refused_by_pid(tmp_path):
    """HF's parquet export holds each image as a {bytes, path} struct; a column of another kind (a bare path string,
    as other exports write) stopped the fetch with an AttributeError traceback. It is refused as an unreadable image
    is: policy fail names the source and the pid, skip lists it and keeps the record without its image."""
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table({"question": ["Q?", "R?"], "choices": [["a", "b"], ["c", "d"]], "answer": [0, 1],
                             "hint": ["", ""], "image": ["x.png", None]}),
                   tmp_path / "src" / "train-00000-of-00001.parquet")
    with pytest.raises(FetchError, match=r"pid train-0: image cell is a str \('x.png'\)"):
        fetch("scienceqa", str(tmp_path / "src"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    meta = fetch("scienceqa", str(tmp_path / "src"), tmp_path / "out", policy="skip")
    assert meta["images_refused"]["count"] == 1 and meta["images_refused"]["records"][0]["pid"] == "train-0"
    assert [(r["pid"], r["has_image"], r["image"]) for r in read_records(tmp_path / "out")] == [
        ("train-0", True, None), ("train-1", False, None)]


@pytest.mark.parametrize("cell", [b"\x89PNG", "\x89PNG", 5], ids=["binary", "string", "integer"])
def test_an_hf_image_struct_whose_bytes_are_no_bytes_is_refused_by_pid(tmp_path, cell):
    """An image struct whose `bytes` held a string was taken for the reason it holds no image ("image \x89PNG"), and
    one holding a number stopped the fetch with a TypeError traceback. Both are refused by pid, saying what the cell
    holds, as a cell that is no image struct is."""
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table({"question": ["Q?"], "choices": [["a", "b"]], "answer": [0], "hint": [""],
                             "image": [{"bytes": cell, "path": None}]}),
                   tmp_path / "src" / "train-00000-of-00001.parquet")
    match = ("is not an image in any format PIL reads" if isinstance(cell, bytes) else
             re.escape(f"pid train-0: image cell's bytes are a {type(cell).__name__} ({cell!r}), not bytes"))
    with pytest.raises(FetchError, match=match):
        fetch("scienceqa", str(tmp_path / "src"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
