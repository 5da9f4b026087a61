"""The generated demo data: deterministic to the byte, in the exact Alpaca and ScienceQA layouts, balanced
so that every evaluation table row has members in every split, consistent with its own corpus, and written
all or nothing."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from llama_adapter.data import demo
from llama_adapter.data.demo import context_kind, generate_demo

SUBJECTS = {"natural science", "social science", "language science"}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "data"
    generate_demo(path, seed=0)
    return path


@pytest.fixture(scope="module")
def problems(out) -> dict[str, dict]:
    return json.loads((out / "scienceqa" / "problems.json").read_text())


@pytest.fixture(scope="module")
def alpaca(out) -> list[dict]:
    return json.loads((out / "alpaca.json").read_text())


def test_same_seed_same_bytes_other_seed_differs(out, tmp_path):
    generate_demo(tmp_path / "again", seed=0)
    generate_demo(tmp_path / "other", seed=1)
    first, again, other = _files(out), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert {"corpus.jsonl", "alpaca.json", "scienceqa/problems.json", "scienceqa/pid_splits.json"} <= set(first)
    assert first == again
    assert all(first[f] != other[f] for f in ("corpus.jsonl", "alpaca.json", "scienceqa/problems.json"))


def test_sizes(out):
    assert 50_000 < (out / "corpus.jsonl").stat().st_size < 3_000_000
    assert (out / "corpus.jsonl").read_bytes().isascii()


def test_summary_counts_match_files(tmp_path):
    summary = generate_demo(tmp_path / "d", seed=2, n_instructions=300, n_questions=144)
    assert summary["alpaca"]["records"] == 300 == sum(summary["alpaca"]["kinds"].values())
    assert sum(s["problems"] for s in summary["scienceqa"].values()) == 144
    assert summary["corpus"]["bytes"] == (tmp_path / "d" / "corpus.jsonl").stat().st_size


def test_alpaca_schema_and_no_duplicates(alpaca):
    assert len(alpaca) == 2000
    for record in alpaca:
        assert set(record) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in record.values())
        assert record["instruction"] and 1 <= len(record["output"].split()) <= 12
    assert len({(r["instruction"], r["input"]) for r in alpaca}) == len(alpaca)
    assert 0.55 <= sum(not r["input"] for r in alpaca) / len(alpaca) <= 0.65


def test_alpaca_answers_are_corpus_facts(out, alpaca):
    corpus = (out / "corpus.jsonl").read_text()
    stated = {"Add the two numbers.": "{0} plus {1} is {out}.",
              "Subtract the second number from the first.": "{0} minus {1} is {out}.",
              "Give the opposite of the word.": "The opposite of {0} is {out}.",
              "Write the plural of the word.": "The plural of {0} is {out}.",
              "Name the colour of this animal.": "A {0} is {out}.",
              "Where does this animal live?": "A {0} lives in the {out}."}
    checked = Counter()
    for r in alpaca:
        if not r["input"]:  # without input, the answer is the fact's sentence itself
            assert r["output"] in corpus, r
            checked["no input"] += 1
        elif r["instruction"] in stated:
            assert stated[r["instruction"]].format(*r["input"].split(" and "), out=r["output"]) in corpus, r
            checked[r["instruction"]] += 1
        elif r["instruction"] == "Which number is larger?":
            assert f"{r['output']} is more than " in corpus
            assert r["output"] == str(max(map(int, r["input"].split(" and "))))
            checked[r["instruction"]] += 1
    assert len(checked) == len(stated) + 2 and min(checked.values()) >= 20


def test_scienceqa_schema(out, problems):
    keys = {"question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic", "category",
            "skill", "lecture", "solution", "split"}
    assert sorted(problems, key=int) == [str(i) for i in range(1, 1201)]
    for pid, p in problems.items():
        assert set(p) == keys
        assert 2 <= len(p["choices"]) <= 5 and len(set(p["choices"])) == len(p["choices"])
        assert isinstance(p["answer"], int) and 0 <= p["answer"] < len(p["choices"])
        assert p["subject"] in SUBJECTS and p["task"] == "closed choice"
        assert re.fullmatch(r"grade([1-9]|1[0-2])", p["grade"])
        assert all(isinstance(p[k], str) for k in ("question", "hint", "topic", "category", "skill", "lecture"))
        assert p["image"] in (None, "image.png")
        assert (out / "scienceqa" / "images" / pid / "image.png").is_file() == (p["image"] is not None)
        if p["image"]:
            assert p["hint"] == ""
        if context_kind(p) == "TXT":  # the hint, not memory, holds the answer
            assert p["choices"][p["answer"]] in p["hint"]
    assert {d.name for d in (out / "scienceqa" / "images").iterdir()} == {k for k, p in problems.items() if p["image"]}
    assert 0.2 <= sum(bool(p["image"]) for p in problems.values()) / len(problems) <= 0.3


def test_images_small_and_show_the_answer(out, problems):
    for pid, p in problems.items():
        if not p["image"]:
            continue
        with Image.open(out / "scienceqa" / "images" / pid / "image.png") as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
            colours = {c for _, c in image.getcolors()} - {(255, 255, 255)}
        assert len(colours) == 1  # one solid shape on white
        answer = p["choices"][p["answer"]]
        if answer in demo.IMAGE_COLOURS:
            assert colours == {demo.IMAGE_COLOURS[answer]}


def test_every_split_has_every_table_row(out, problems):
    splits = json.loads((out / "scienceqa" / "pid_splits.json").read_text())
    assert set(splits) == {"train", "val", "test"}
    assert sorted(pid for pids in splits.values() for pid in pids) == sorted(problems)
    sizes = {s: len(pids) for s, pids in splits.items()}
    assert sizes["train"] / len(problems) == pytest.approx(0.6, abs=0.05)
    for split, pids in splits.items():
        rows = [problems[pid] for pid in pids]
        assert all(p["split"] == split for p in rows)
        assert {p["subject"] for p in rows} == SUBJECTS
        assert {context_kind(p) for p in rows} == {"TXT", "IMG", "NO"}
        assert {int(p["grade"][5:]) <= 6 for p in rows} == {True, False}


def test_answer_positions_balanced(problems):
    for k in range(2, 6):
        positions = Counter(p["answer"] for p in problems.values() if len(p["choices"]) == k)
        assert set(positions) == set(range(k)), k
        assert max(positions.values()) <= 1.3 * min(positions.values()), (k, positions)


def test_fact_answers_follow_the_corpus(out, problems):
    """Questions without context are answered by a sentence of the corpus, and "no" means it is not there."""
    corpus = (out / "corpus.jsonl").read_text()
    checked = Counter()
    for p in problems.values():
        if context_kind(p) != "NO":
            continue
        answer = p["choices"][p["answer"]]
        if m := re.fullmatch(r"Is (\w+) the (capital|opposite) of (\w+)\?", p["question"]):
            b, kind, a = m.groups()
            stated = demo.canonical(kind, a=a, b=b) in corpus
            assert (answer == "yes") == stated, p
        elif m := re.fullmatch(r"How do you make the plural of (\w+)\?", p["question"]):
            plural = dict(demo.PLURALS)[m.group(1)]
            assert answer == demo.plural_rule(m.group(1), plural)
            assert f"The plural of {m.group(1)} is {plural}." in corpus
        else:
            assert p["solution"] in corpus and answer in p["solution"], p
        checked[p["subject"]] += 1
    assert min(checked.values()) >= 100


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "_draw", broken)  # fails after corpus.jsonl and alpaca.json are written
    with pytest.raises(RuntimeError):
        generate_demo(tmp_path / "data")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_output(tmp_path, monkeypatch):
    generate_demo(tmp_path / "data", n_instructions=100, n_questions=72)
    before = _files(tmp_path / "data")
    monkeypatch.setattr(demo, "_draw", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        generate_demo(tmp_path / "data")
    assert _files(tmp_path / "data") == before and [p.name for p in tmp_path.iterdir()] == ["data"]


def test_too_many_instructions_rejected(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        generate_demo(tmp_path / "data", n_instructions=100_000)
    assert not (tmp_path / "data").exists()


def test_corpus_quizzes_never_use_the_benchmark_answer_format(out):
    """The base must learn the quiz layout and the facts, but not the answer format the benchmark parses: that
    is what fine-tuning teaches on the demo (and what zero-shot fails on)."""
    documents = [json.loads(line)["text"] for line in (out / "corpus.jsonl").read_text().splitlines()]
    sheets = [d for d in documents if d.startswith("Question: ")]
    assert len(sheets) == demo.WORKSHEETS
    assert all(re.search(r"\nOptions: \(A\) .*\nAnswer: \([A-E]\)$", s) for s in sheets)
    assert not any("answer is (" in d for d in documents)


def test_too_few_records_are_refused_before_anything_is_written(tmp_path):
    """No instruction (an empty alpaca.json fails only at tokenize), or fewer questions than kinds of question."""
    with pytest.raises(ValueError, match=r"^instructions 0: expected at least 1$"):
        generate_demo(tmp_path / "d", n_instructions=0)
    with pytest.raises(ValueError, match=rf"^questions 10: expected at least {len(demo.CELLS)}, so that every split"):
        generate_demo(tmp_path / "d", n_questions=10)
    assert not (tmp_path / "d").exists()
