"""Bad input to validate and tokenize (issue 16): every failure is one line naming the file, record or key and
what was expected; nothing is dropped without being counted; a failed or killed run leaves nothing a later
stage could take for its output. Driven through the command line, as a user and the workflow run it."""

import datetime
import decimal
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_adapter.data.tokens import tokenize
from llama_adapter.data.validate import validate
from llama_adapter.errors import PipelineError
from llama_adapter.tokenizer import load_tokenizer

GOOD = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("one", "two", "three", "four", "five", "six")]
SQA = {"pid": "1", "split": "train", "question": "Which is red?", "choices": ["apple", "sky"], "answer": 0,
       "hint": "", "image": None, "has_image": False, "subject": "natural science", "grade": "grade3"}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llama_adapter.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def one_line_error(proc, command, *needles):
    """The run failed with exactly one stderr line, `llama-adapter <command>: error: ...`, holding every needle."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith(f"llama-adapter {command}: error: "), lines[0]
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def records_dir(path, records=None, raw=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "records.jsonl").write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small SentencePiece model trained here (the demo's recipe), so the tests need no shared data."""
    from llama_adapter.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    words = ("say one two three four five six which is red apple sky question context options answer the "
             "below instruction response input write request task yes no").split()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30))})
                                               + "\n" for _ in range(300)))
    return train_sentencepiece(root / "corpus.jsonl", root / "tok.model", 300)


def tokenize_cli(validated, out, tokenizer, *extra):
    return cli("tokenize", "--dataset", "alpaca", "--validated", validated, "--tokenizer", tokenizer, "--out", out,
               *extra)


# ---------------------------------------------------------------- validate: silent accepts


def test_unknown_subject_fails_and_is_listed_under_skip(tmp_path):
    recs = [SQA, {**SQA, "pid": "2", "subject": "biology"}, {**SQA, "pid": "3", "subject": None, "grade": None}]
    fetched = records_dir(tmp_path / "f", recs)
    proc = cli("validate", "--dataset", "scienceqa", "--fetched", fetched, "--out", tmp_path / "v")
    one_line_error(proc, "validate", fetched / "records.jsonl", "1 invalid of 3 records", "unknown subject",
                   "'biology'", "pid '2'", "natural science")
    assert not (tmp_path / "v" / "records.jsonl").exists()

    proc = cli("validate", "--dataset", "scienceqa", "--fetched", fetched, "--out", tmp_path / "v", "--policy", "skip")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert (report["kept"], report["invalid"]) == (2, {"unknown subject": 1})
    assert report["dropped"] == [{"index": 1, "line": 2, "pid": "2", "invalid": ["unknown subject"]}]
    kept = [json.loads(line)["pid"] for line in (tmp_path / "v" / "records.jsonl").read_text().splitlines()]
    assert kept == ["1", "3"]  # a missing subject (LLaVA's file has none) is legitimate


@pytest.mark.parametrize("change, reason", [
    ({"grade": "Grade 3"}, "unknown grade"),
    ({"grade": 3}, "unknown grade"),
    ({"grade": "grade13"}, "unknown grade"),
    ({"subject": ""}, "unknown subject"),
    ({"subject": ["natural science"]}, "unknown subject"),
    ({"hint": 5}, "hint not a string"),
    ({"has_image": "yes"}, "has_image not a boolean"),
    ({"image": 5}, "bad image path"),
    ({"image": "../../etc/passwd"}, "bad image path"),
    ({"pid": None}, "bad pid"),
    ({"pid": "a/b"}, "bad pid"),
    ({"pid": "1"}, "repeated pid"),
    ({"split": 7}, "bad split"),
    ({"split": "../x"}, "bad split"),
    ({"choices": ["apple", " "]}, "choices not 2-5 strings"),
])
def test_scienceqa_fields_that_would_be_mis_scored_are_invalid(tmp_path, change, reason):
    bad = {**SQA, "pid": "2", "question": "Which is blue?", **change}
    fetched = records_dir(tmp_path / "f", [SQA, bad])
    proc = cli("validate", "--dataset", "scienceqa", "--fetched", fetched, "--out", tmp_path / "v")
    one_line_error(proc, "validate", fetched / "records.jsonl", "1 invalid of 2 records", reason, "line 2",
                   "expected")


@pytest.mark.parametrize("dataset, line", [("alpaca", "[1, 2]"), ("scienceqa", '"text"'), ("scienceqa", "3")])
def test_a_record_that_is_not_an_object_is_invalid(tmp_path, dataset, line):
    good = SQA if dataset == "scienceqa" else GOOD[0]
    fetched = records_dir(tmp_path / "f", raw=json.dumps(good) + "\n" + line + "\n")
    proc = cli("validate", "--dataset", dataset, "--fetched", fetched, "--out", tmp_path / "v")
    one_line_error(proc, "validate", "1 invalid of 2 records", "not an object", "line 2")


def test_unknown_drop_flag_is_refused(tmp_path):
    fetched = records_dir(tmp_path / "f", GOOD)
    proc = cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", tmp_path / "v", "--drop-flag", "dupe")
    one_line_error(proc, "validate", "'dupe'", "duplicate", "nooutput")
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------- validate: counts and messages


def test_one_record_with_two_faults_is_one_invalid_record(tmp_path):
    fetched = records_dir(tmp_path / "f", GOOD + [{"instruction": 3, "input": ""}])
    proc = cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", tmp_path / "v")
    one_line_error(proc, "validate", "1 invalid of 7 records", "2 faults", "missing output x1",
                   "instruction not a string x1", "line 7", tmp_path / "v" / "validation.json")
    report = json.loads(proc.stdout)  # the whole report, for the workflow's log
    assert report["status"] == "failed" and report["invalid_records"] == 1
    assert report["invalid"] == {"missing output": 1, "instruction not a string": 1}


@pytest.mark.parametrize("command", ["validate", "tokenize"])
def test_an_empty_records_file_is_named(tmp_path, tok, command):
    folder = records_dir(tmp_path / "in", raw="\n")
    if command == "validate":
        proc = cli("validate", "--dataset", "alpaca", "--fetched", folder, "--out", tmp_path / "out")
    else:
        proc = tokenize_cli(folder, tmp_path / "out", tok)
    one_line_error(proc, command, folder / "records.jsonl", "no records")
    assert not (tmp_path / "out").exists()


def test_every_record_dropped_under_skip_is_a_failure(tmp_path):
    bad = [{"instruction": "x", "input": ""}, {"instruction": 1, "input": "", "output": ""}]
    fetched = records_dir(tmp_path / "f", bad)
    proc = cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", tmp_path / "v", "--policy", "skip")
    one_line_error(proc, "validate", fetched / "records.jsonl", "no record left", "2 invalid of 2 records")
    assert not (tmp_path / "v" / "records.jsonl").exists()


def test_malformed_lines_name_the_file_and_line(tmp_path, tok):
    for raw, needle in [('{"instruction": "a", "input": "", "output": "b"}\n{bad\n', "not valid JSON"),
                        ('{"instruction": "a", "input": "", "output": "b", "output": "c"}\n', "'output' appears twice"),
                        ('{"instruction": "a\\ud800", "input": "", "output": "b"}\n', "surrogate")]:
        folder = records_dir(tmp_path / "in", raw=raw)
        line = raw.count("\n")
        one_line_error(cli("validate", "--dataset", "alpaca", "--fetched", folder, "--out", tmp_path / "v"),
                       "validate", f"{folder / 'records.jsonl'}, line {line}", needle)
        one_line_error(tokenize_cli(folder, tmp_path / "t", tok), "tokenize",
                       f"{folder / 'records.jsonl'}, line {line}", needle)


def test_a_number_too_long_to_read_names_the_file_and_line(tmp_path):
    """Python refuses to read an integer of more than 4300 digits with a ValueError that is no JSONDecodeError:
    it too is the file's fault, named with its line (JSON Lines) or its file (JSON), not Python's bare message."""
    huge = "1" * 5000
    folder = records_dir(tmp_path / "in", raw='{"instruction": "a", "input": "", "output": "b"}\n'
                                              f'{{"instruction": "a", "input": "", "output": "b", "n": {huge}}}\n')
    one_line_error(cli("validate", "--dataset", "alpaca", "--fetched", folder, "--out", tmp_path / "v"), "validate",
                   f"{folder / 'records.jsonl'}, line 2: not valid JSON", "4300")
    (tmp_path / "alpaca.json").write_text(f'[{{"instruction": "a", "input": "", "output": "b", "n": {huge}}}]')
    one_line_error(cli("fetch", "--dataset", "alpaca", "--source", tmp_path / "alpaca.json", "--out", tmp_path / "a"),
                   "fetch", f"{tmp_path / 'alpaca.json'}: not valid JSON", "4300")
    assert not (tmp_path / "v").exists() and not (tmp_path / "a").exists()


def test_a_nan_or_infinity_in_a_source_or_records_file_is_refused_where_it_is(tmp_path):
    """json reads NaN, Infinity and -Infinity and writes them back as bare words that are no JSON: one in a field
    that validation does not look at (an extra Alpaca column, a ScienceQA lecture) passed from the source into
    fetch's and validate's records.jsonl, which other readers then refuse. Now the readers refuse it as invalid
    JSON and fetch refuses a parquet number JSON cannot hold, each naming the file, the record or line and the
    key; nothing is written."""
    from llama_adapter.data.fetch import fetch
    from llama_adapter.data.validate import validate

    ok = {"instruction": "a", "input": "", "output": "b"}
    (tmp_path / "alpaca.json").write_text(json.dumps([ok, {**ok, "score": 1.5}]).replace("1.5", "NaN"))
    with pytest.raises(PipelineError) as e:
        fetch("alpaca", str(tmp_path / "alpaca.json"), tmp_path / "a")
    assert str(e.value).startswith(f"{tmp_path / 'alpaca.json'}, record 1, at ['score']: not valid JSON (NaN")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{**ok, "score": 1.0}, {**ok, "score": float("-inf")}]),
                   tmp_path / "alpaca.parquet")
    with pytest.raises(PipelineError) as e:
        fetch("alpaca", str(tmp_path / "alpaca.parquet"), tmp_path / "a")
    assert str(e.value).startswith(f"{tmp_path / 'alpaca.parquet'}: record 1, at ['score']: -Infinity is no JSON "
                                   "number"), str(e.value)

    folder = records_dir(tmp_path / "in", raw=json.dumps(ok) + "\n" + json.dumps({**ok, "m": {"x": [1, 2.5]}})
                         .replace("2.5", "Infinity") + "\n")
    with pytest.raises(PipelineError) as e:
        validate("alpaca", folder, tmp_path / "v")
    assert str(e.value).startswith(f"{folder / 'records.jsonl'}, line 2, at ['m']['x'][1]: not valid JSON "
                                   "(Infinity"), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpaca.json", "alpaca.parquet", "in"]


@pytest.mark.parametrize("value, shown", [(b"Say a.", "a bytes (b'Say a.')"),
                                          (datetime.datetime(2020, 1, 2), "a datetime (datetime.datetime(2020, 1, 2"),
                                          (decimal.Decimal("1.50"), "a Decimal (Decimal('1.50'))")])
def test_a_parquet_value_json_has_no_type_for_is_refused_where_it_is(tmp_path, value, shown):
    """A parquet column of bytes, timestamps or decimals (a binary instruction, a date an export added) reached
    records.jsonl's writer as a value JSON has no type for: the fetch stopped with a TypeError traceback. It is
    refused as a NaN is, naming the file, the record, the key and what it holds; nothing is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llama_adapter.data.fetch import fetch

    ok = {"instruction": "a", "input": "", "output": "b"}
    pq.write_table(pa.Table.from_pylist([{**ok, "extra": None}, {**ok, "extra": value}]), tmp_path / "a.parquet")
    with pytest.raises(PipelineError) as e:
        fetch("alpaca", str(tmp_path / "a.parquet"), tmp_path / "a")
    assert str(e.value).startswith(f"{tmp_path / 'a.parquet'}: record 1, at ['extra']: {shown}"), str(e.value)
    assert "which JSON has no type for" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]


def test_a_number_beyond_the_floats_is_refused_where_it_is_written(tmp_path):
    """1e400 is a JSON number that Python reads as infinity without calling parse_constant: it passed the readers
    and was refused only when validate wrote its records, naming its own temporary file."""
    from llama_adapter.data.validate import validate
    from llama_adapter.io import read_json

    ok = {"instruction": "a", "input": "", "output": "b"}
    folder = records_dir(tmp_path / "in", raw=json.dumps(ok) + "\n" + json.dumps({**ok, "m": 2.5}).replace(
        "2.5", "1e400") + "\n")
    with pytest.raises(PipelineError) as e:
        validate("alpaca", folder, tmp_path / "v")
    assert str(e.value).startswith(f"{folder / 'records.jsonl'}, line 2, at ['m']: not valid JSON (1e400: beyond "
                                   "the largest float"), str(e.value)
    (tmp_path / "a.json").write_text('[{"x": -1e999}]')
    with pytest.raises(PipelineError, match=r"a\.json, record 0, at \['x'\]: not valid JSON \(-1e999"):
        read_json(tmp_path / "a.json", allow_nan=False)
    assert read_json(tmp_path / "a.json") == [{"x": float("-inf")}]  # the pipeline's own files may hold one


def test_write_jsonl_refuses_a_nan_naming_the_record_and_leaves_no_file(tmp_path):
    """write_jsonl (validate's records, generate's answers) wrote a NaN as a bare NaN, which is no JSON."""
    from llama_adapter.io import write_jsonl

    with pytest.raises(PipelineError, match=r"out\.jsonl: record 1, at \['b'\]\[0\]: NaN is no JSON number"):
        write_jsonl(tmp_path / "out.jsonl", [{"a": 1}, {"b": [float("nan")]}])
    assert list(tmp_path.iterdir()) == []


def test_a_key_given_twice_in_a_json_source_is_an_error_not_a_lost_record(tmp_path):
    """json keeps the last of a repeated key silently: a ScienceQA problem given twice under one pid (the first
    lost, counted nowhere), an Alpaca record with two instructions."""
    (tmp_path / "alpaca.json").write_text('[{"instruction": "first", "input": "", "output": "b", '
                                          '"instruction": "second"}]')
    one_line_error(cli("fetch", "--dataset", "alpaca", "--source", tmp_path / "alpaca.json", "--out", tmp_path / "a"),
                   "fetch", tmp_path / "alpaca.json", "key 'instruction' appears twice")
    problem = '{"question": "Q?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": null, "split": "test"}'
    (tmp_path / "sq").mkdir()
    (tmp_path / "sq" / "problems.json").write_text(f'{{"1": {problem}, "2": {problem}, "1": {problem}}}')
    (tmp_path / "sq" / "pid_splits.json").write_text('{"train": ["2"], "val": [], "test": ["1"]}')
    one_line_error(cli("fetch", "--dataset", "scienceqa", "--source", tmp_path / "sq", "--out", tmp_path / "s"),
                   "fetch", tmp_path / "sq" / "problems.json", "key '1' appears twice")
    assert not (tmp_path / "a").exists() and not (tmp_path / "s").exists()


def test_a_repeated_key_names_the_record_or_the_keys_down_to_it(tmp_path):
    """A repeated key is named with where it is, not the file alone (a 52,000-record file to search by hand): the
    record of a list (Alpaca's), the keys down from the top (a ScienceQA problem's pid), and in a JSON Lines
    record the keys below its line."""
    records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(20)]
    text = json.dumps(records).replace('"Say 17."', '"Say 17.", "instruction": "again"')
    (tmp_path / "alpaca.json").write_text(text)
    one_line_error(cli("fetch", "--dataset", "alpaca", "--source", tmp_path / "alpaca.json", "--out", tmp_path / "a"),
                   "fetch", f"{tmp_path / 'alpaca.json'}, record 17: key 'instruction' appears twice")
    problem = '{"question": "Q?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": null, "split": "test"}'
    (tmp_path / "sq").mkdir()
    twice = problem.replace('"hint": ""', '"hint": "", "hint": "h"')
    (tmp_path / "sq" / "problems.json").write_text(f'{{"122": {problem}, "123": {twice}}}')
    (tmp_path / "sq" / "pid_splits.json").write_text('{"train": ["122"], "val": [], "test": ["123"]}')
    one_line_error(cli("fetch", "--dataset", "scienceqa", "--source", tmp_path / "sq", "--out", tmp_path / "s"),
                   "fetch", f"{tmp_path / 'sq' / 'problems.json'}, at ['123']: key 'hint' appears twice")
    folder = records_dir(tmp_path / "in", raw='{"instruction": "a", "input": "", "output": "b"}\n'
                                              '{"instruction": "a", "input": "", "output": "b", "meta": '
                                              '{"n": [{"x": 1, "x": 2}]}}\n')
    one_line_error(cli("validate", "--dataset", "alpaca", "--fetched", folder, "--out", tmp_path / "v"), "validate",
                   f"{folder / 'records.jsonl'}, line 2, at ['meta']['n'][0]: key 'x' appears twice")
    assert not any((tmp_path / d).exists() for d in ("a", "s", "v"))


def test_missing_records_names_the_file_and_what_the_stage_expected(tmp_path, tok):
    msg = one_line_error(tokenize_cli(tmp_path / "nothing", tmp_path / "t", tok), "tokenize",
                         tmp_path / "nothing" / "records.jsonl", "no such file", "validate")
    assert "fetch" not in msg  # the old message blamed the fetch stage whatever called it


def test_output_folder_that_is_the_input_is_refused(tmp_path, tok):
    fetched = records_dir(tmp_path / "f", GOOD)
    one_line_error(cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", fetched), "validate",
                   f"--out {fetched} is, or holds, --fetched {fetched}", "would replace the input")
    one_line_error(tokenize_cli(fetched, fetched, tok, "--val-size", "1"), "tokenize",
                   f"--out {fetched} is, or holds, --validated {fetched}", "would replace the input")
    assert sorted(p.name for p in fetched.iterdir()) == ["records.jsonl"]


def test_output_over_the_fetched_folder_behind_a_validated_one_is_refused(tmp_path, tok):
    """tokenize (its fetch.json) and encode-images (its images) read the fetched folder that the validated
    folder's validation.json names, though no option names it: an --out over it would replace that input."""
    fetched = records_dir(tmp_path / "f", GOOD)
    validated = tmp_path / "v"
    assert cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", validated).returncode == 0
    one_line_error(tokenize_cli(validated, fetched, tok, "--val-size", "1"), "tokenize",
                   f"--out {fetched} is, or holds, the fetched folder {fetched}", "validation.json",
                   "would replace the input")
    one_line_error(cli("encode-images", "--encoder", tmp_path, "--records", validated / "records.jsonl",
                       "--out", tmp_path / "f"), "encode-images",
                   f"--out {fetched} is, or holds, the fetched folder {fetched}", "would replace the input")
    assert sorted(p.name for p in fetched.iterdir()) == ["records.jsonl"]


def test_an_output_inside_an_input_folder_of_a_data_stage_is_refused(tmp_path, tok):
    """The data stages' outputs inside a folder they read (validate's inside --fetched, tokenize's inside
    --validated, fetch's inside its local source, encode-images' inside --encoder) were written into that input;
    refused by option before the stage runs, the input left as it was."""
    fetched = records_dir(tmp_path / "f", GOOD)
    validated = tmp_path / "v"
    assert cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", validated).returncode == 0
    (tmp_path / "clip").mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for proc, command, needle in [
        (cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", fetched / "v"), "validate",
         f"--out {fetched / 'v'} lies inside --fetched {fetched}"),
        (tokenize_cli(validated, validated / "t", tok, "--val-size", "1"), "tokenize",
         f"--out {validated / 't'} lies inside --validated {validated}"),
        (cli("fetch", "--dataset", "alpaca", "--source", fetched, "--out", fetched / "again"), "fetch",
         f"--out {fetched / 'again'} lies inside --source {fetched}"),
        (cli("encode-images", "--encoder", tmp_path / "clip", "--records", validated / "records.jsonl", "--out",
             tmp_path / "clip" / "features"), "encode-images", "lies inside --encoder"),
    ]:
        one_line_error(proc, command, needle, "expected an output outside the inputs")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert set(tmp_path.rglob("*")) == {*before, fetched, validated, tmp_path / "clip"}  # nothing made


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_an_output_naming_the_current_folder_or_one_above_is_refused(tmp_path, monkeypatch, out):
    """validate --out . (or .., or sub/..) took the current folder for its output folder: the write failed on its
    empty name (.. on a rename into itself), and the failure's clean-up removed that folder as the failed run's
    output, with everything in it (for .., the folder above, the current one included). Refused before anything is
    written or removed, naming the option and the path; the library refuses such an output as well."""
    fetched = records_dir(tmp_path / "f", GOOD)
    here = tmp_path / "a" / "b"
    (here / "sub").mkdir(parents=True)
    for keep in (here / "keep", tmp_path / "a" / "keep"):
        keep.write_text("the user's")
    one_line_error(cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", out, cwd=here), "validate",
                   f"--out {out}: names the current folder or one above it")
    monkeypatch.chdir(here)
    with pytest.raises(PipelineError, match=re.escape(f"{out}: names the current folder or one above it")):
        validate("alpaca", fetched, Path(out))
    assert (here / "keep").read_text() == (tmp_path / "a" / "keep").read_text() == "the user's"
    assert sorted(p.name for p in here.iterdir()) == ["keep", "sub"]


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_command_writing_files_into_its_folder_may_be_given_the_current_folder(tmp_path, command):
    """train and evaluate write their files into --out-dir / --out and remove only those after a failure: '.' is
    a folder of their own choosing, which the refusal of '.' for the stages that write their folder whole took from
    them. Their runs here fail on the missing base, past the output's checks."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "keep").write_text("the user's")
    args = (["train", "--train-data", tmp_path / "none", "--out-dir", "."] if command == "train" else
            ["evaluate", "--task", "scienceqa", "--data", tmp_path / "none", "--out", "."])
    proc = cli(*args[:1], "--base", tmp_path / "no-base", *args[1:], cwd=here)
    assert proc.returncode != 0 and "names the current folder" not in proc.stderr, proc.stderr[-2000:]
    assert "no-base" in proc.stderr, proc.stderr[-2000:]
    assert (here / "keep").read_text() == "the user's"


# ---------------------------------------------------------------- stale output


def test_failed_validate_leaves_no_records_of_an_earlier_run(tmp_path, tok):
    fetched = records_dir(tmp_path / "f", GOOD)
    assert cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", tmp_path / "v").returncode == 0
    records_dir(fetched, GOOD + [{"instruction": "x", "input": ""}])
    one_line_error(cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", tmp_path / "v"), "validate",
                   "1 invalid of 7 records")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["validation.json"]
    assert json.loads((tmp_path / "v" / "validation.json").read_text())["status"] == "failed"
    # tokenize then finds nothing to take for this run's output
    one_line_error(tokenize_cli(tmp_path / "v", tmp_path / "t", tok), "tokenize",
                   tmp_path / "v" / "records.jsonl", "no such file")


@pytest.mark.parametrize("damage, needle", [(lambda f: records_dir(f, raw="{not json\n"), "not valid JSON"),
                                           (lambda f: shutil.rmtree(f), "records.jsonl: no such file")])
def test_failed_validate_of_unreadable_input_removes_the_earlier_folder(tmp_path, damage, needle):
    """A validate that cannot read its records (not JSON, or no --fetched folder at all) writes no validation.json
    (it reports on records read) and removes the folder an earlier run left: the one-line error says why."""
    fetched = records_dir(tmp_path / "f", GOOD)
    assert cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", tmp_path / "v").returncode == 0
    damage(fetched)
    one_line_error(cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", tmp_path / "v"), "validate",
                   needle)
    assert not (tmp_path / "v").exists()


def test_failed_tokenize_removes_the_earlier_output(tmp_path, tok):
    validated = records_dir(tmp_path / "v", GOOD)
    assert tokenize_cli(validated, tmp_path / "t", tok, "--val-size", "1").returncode == 0
    assert (tmp_path / "t" / "train" / "tokens.npy").exists()
    one_line_error(tokenize_cli(validated, tmp_path / "t", tok, "--val-size", "1", "--max-seq-len", "4",
                                "--truncation", "drop"), "tokenize", "max_seq_len 4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_stale_partials_of_killed_runs_are_cleaned_by_a_rerun(tmp_path, tok):
    validated = records_dir(tmp_path / "v", GOOD)
    (tmp_path / ".t.k1ll3d_0.partial" / "train").mkdir(parents=True)  # a tokenize killed mid-way
    (tmp_path / ".t.k1ll3d_0.partial" / "train" / "tokens.npy").write_bytes(b"half")
    (tmp_path / ".t.old").mkdir()  # killed between moving the old output aside and the new one in
    (tmp_path / ".t2.abcdefgh.partial").mkdir()  # another destination's: not ours to remove
    (tmp_path / "v" / ".validation.json.zzzzzzzz.partial").write_text("{")
    assert tokenize_cli(validated, tmp_path / "t", tok, "--val-size", "1").returncode == 0
    assert cli("validate", "--dataset", "alpaca", "--fetched", validated, "--out", tmp_path / "vv").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t2.abcdefgh.partial", "t", "v", "vv"]
    assert (tmp_path / "v" / ".validation.json.zzzzzzzz.partial").exists()  # in the input folder: not ours


def test_sigkilled_tokenize_leaves_nothing_a_rerun_keeps(tmp_path, tok):
    many = [{"instruction": f"Say {i} one two three.", "input": "", "output": f"{i} yes"} for i in range(20000)]
    validated = records_dir(tmp_path / "v", many)
    proc = subprocess.Popen([sys.executable, "-m", "llama_adapter.cli", "tokenize", "--dataset", "alpaca",
                             "--validated", str(validated), "--tokenizer", str(tok), "--out", str(tmp_path / "t")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".t.") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "tokenize ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "v")
    assert len(left) == 1 and left[0].startswith(".t.") and left[0].endswith(".partial")  # what the kill left

    assert tokenize_cli(validated, tmp_path / "t", tok, "--val-size", "10").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "v"]


# ---------------------------------------------------------------- tokenize: settings and records


@pytest.mark.parametrize("size", ["abc", "0", "-3", "1.5", "1.0", "200", "0.01", "nan"])
def test_bad_val_size_is_one_line(tmp_path, tok, size):
    validated = records_dir(tmp_path / "v", GOOD)
    one_line_error(tokenize_cli(validated, tmp_path / "t", tok, "--val-size", size), "tokenize", "val_size",
                   "expected")
    assert not (tmp_path / "t").exists()


def test_val_size_larger_than_the_data_names_the_file_and_count(tmp_path, tok):
    validated = records_dir(tmp_path / "v", GOOD)
    one_line_error(tokenize_cli(validated, tmp_path / "t", tok, "--val-size", "200"), "tokenize",
                   validated / "records.jsonl", "val_size 200", "out of 6", "1..5")


@pytest.mark.parametrize("args, needle", [
    (["--split-by", "random"], "--split-by"),
    (["--max-seq-len", "many"], "--max-seq-len"),
    (["--max-seq-len", "0"], "--max-seq-len: expected a number of tokens in [1, "),
    (["--max-seq-len", "-5"], "--max-seq-len: expected a number of tokens in [1, "),
    (["--seed", "-1"], "--seed: expected an integer in [0, 2**63), got '-1'"),
])
def test_bad_settings_are_one_line(tmp_path, tok, args, needle):
    validated = records_dir(tmp_path / "v", GOOD)
    one_line_error(tokenize_cli(validated, tmp_path / "t", tok, "--val-size", "1", *args), "tokenize", needle)


def test_prompt_longer_than_max_seq_len_emptying_training_is_named(tmp_path, tok):
    validated = records_dir(tmp_path / "v", GOOD)
    proc = tokenize_cli(validated, tmp_path / "t", tok, "--val-size", "1", "--max-seq-len", "8", "--truncation", "drop")
    msg = one_line_error(proc, "tokenize", validated / "records.jsonl", "max_seq_len 8", "5 dropped for length",
                         "'train'")
    assert "zero-size" not in msg and "prompt alone" not in msg
    assert not (tmp_path / "t").exists()
    # Truncated, every sample keeps its prompt whole and loses its response: said so, with no count of a drop policy
    # the run did not use
    proc = tokenize_cli(validated, tmp_path / "t", tok, "--val-size", "1", "--max-seq-len", "8", "--truncation",
                        "truncate")
    msg = one_line_error(proc, "tokenize", "max_seq_len 8", "5 whose prompt alone fills max_seq_len", "'train'")
    assert "dropped for length" not in msg and "'drop'" not in msg
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("record, needle", [
    ({"instruction": "x", "input": ""}, "missing output"),
    ({"instruction": "x", "input": None, "output": "y"}, "input not a string"),
    ([1], "not an object"),
])
def test_tokenize_refuses_records_validate_would_not_keep(tmp_path, tok, record, needle):
    validated = records_dir(tmp_path / "v", GOOD + [record])
    one_line_error(tokenize_cli(validated, tmp_path / "t", tok, "--val-size", "1"), "tokenize",
                   validated / "records.jsonl", "1 of 7 records", "line 7", needle)


@pytest.mark.parametrize("split", [["train"], 5, "../../escaped"])
def test_an_alpaca_split_that_can_name_no_folder_is_invalid(tmp_path, tok, split):
    """An Alpaca record's own split (--split-by field) names a folder of the token output, as a ScienceQA record's
    does, yet went unchecked: a list or a number stopped tokenize with a TypeError traceback, and '../../escaped'
    wrote that split's arrays two folders above the output's partial, outside the output. Invalid, as a ScienceQA
    record's: validate and tokenize name the record."""
    records = [{**r, "split": "train"} for r in GOOD] + [{**GOOD[0], "instruction": "Say zero.", "split": split}]
    fetched = records_dir(tmp_path / "f", records)
    one_line_error(cli("validate", "--dataset", "alpaca", "--fetched", fetched, "--out", tmp_path / "v"), "validate",
                   "1 invalid of 7 records", "bad split", "line 7")
    validated = records_dir(tmp_path / "v", records)
    one_line_error(tokenize_cli(validated, tmp_path / "out" / "t", tok, "--split-by", "field"), "tokenize",
                   validated / "records.jsonl", "1 of 7 records", "line 7", "bad split")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out" / "t").exists()


def test_field_split_needs_a_split_on_every_record_and_a_training_one(tmp_path, tok):
    no_split = [{**SQA, "pid": str(i), "question": f"Q{i}?", "split": None if i == 2 else "train"} for i in range(4)]
    validated = records_dir(tmp_path / "v", no_split)
    one_line_error(cli("tokenize", "--dataset", "scienceqa", "--validated", validated, "--tokenizer", tok,
                       "--out", tmp_path / "t", "--split-by", "field"), "tokenize", validated / "records.jsonl",
                   "1 of 4 records have no split")
    only_test = [{**r, "split": "test"} for r in no_split]
    validated = records_dir(tmp_path / "v", only_test)
    one_line_error(cli("tokenize", "--dataset", "scienceqa", "--validated", validated, "--tokenizer", tok,
                       "--out", tmp_path / "t", "--split-by", "field"), "tokenize", "no record has split 'train'")


def test_tokenizer_ids_outside_its_vocabulary_are_refused(tmp_path, tok):
    class Overflowing(type(load_tokenizer(tok))):
        def _encode(self, text):
            return [*super()._encode(text), self.vocab_size + 7]

    real = load_tokenizer(tok)
    bad = Overflowing(real.backend, real.bos_id, real.eos_id, None)
    validated = records_dir(tmp_path / "v", GOOD)
    with pytest.raises(PipelineError, match=r"my\.model: encoding .*records\.jsonl line \d+ .*id 307, outside its "
                                            r"vocabulary of 300"):
        tokenize("alpaca", validated, bad, tmp_path / "t", split={"by": "seed", "val_size": 1, "seed": 0},
                 tokenizer_name="my.model")
    assert not (tmp_path / "t").exists()


def test_an_image_fetch_refused_is_invalid_not_just_missing(tmp_path):
    refused = {**SQA, "pid": "2", "question": "Which is blue?", "has_image": True, "image": None}
    fetched = records_dir(tmp_path / "f", [SQA, refused])
    (fetched / "fetch.json").write_text(json.dumps({"dataset": "scienceqa", "images_refused": {
        "count": 1, "records": [{"pid": "2", "why": "'../../x.png' leaves the dataset folder"}]}}))
    proc = cli("validate", "--dataset", "scienceqa", "--fetched", fetched, "--out", tmp_path / "v")
    one_line_error(proc, "validate", "1 invalid of 2 records", "image refused by fetch", "pid '2'", "images_refused")
    proc = cli("validate", "--dataset", "scienceqa", "--fetched", fetched, "--out", tmp_path / "v", "--policy", "skip")
    assert proc.returncode == 0 and json.loads(proc.stdout)["kept"] == 1


def test_tokenize_refuses_a_folder_whose_validation_failed(tmp_path, tok):
    validated = records_dir(tmp_path / "v", GOOD)  # records.jsonl beside a report of a failed run: not to be trusted
    (validated / "validation.json").write_text(json.dumps({"status": "failed", "source": str(tmp_path / "f")}))
    one_line_error(tokenize_cli(validated, tmp_path / "t", tok, "--val-size", "1"), "tokenize",
                   validated / "validation.json", "failed validation")
    assert not (tmp_path / "t").exists()


def test_seed_split_options_with_a_field_split_are_refused(tmp_path, tok):
    recs = [{**SQA, "pid": str(i), "question": f"Q{i}?"} for i in range(3)]
    validated = records_dir(tmp_path / "v", recs)
    one_line_error(cli("tokenize", "--dataset", "scienceqa", "--validated", validated, "--tokenizer", tok,
                       "--out", tmp_path / "t", "--split-by", "field", "--val-size", "1"), "tokenize",
                   "--val-size given with --split-by field")
    one_line_error(cli("tokenize", "--dataset", "scienceqa", "--validated", validated, "--tokenizer", tok,
                       "--out", tmp_path / "t", "--seed", "1"), "tokenize",
                   "--seed given with scienceqa's default split (--split-by field)")


@pytest.mark.parametrize("keys, needle", [('["1", ', "not valid JSON"), ('{"0": "1"}', "holds a JSON dict"),
                                          ('["1"]', "1 key(s) for 2 samples"),
                                          ('["1", 2]', "key 1 is not a string (int 2)")])
def test_a_damaged_keys_file_of_a_token_split_is_named(tmp_path, keys, needle):
    """keys.json gives each sample its ScienceQA pid, by which a multimodal training finds its image features: a
    damaged one failed the training with json's bare "Expecting value: line 2 column 1 (char 7)", naming no file,
    and one of the wrong length or kind gave samples another's image, or none, unsaid."""
    import numpy as np

    from llama_adapter.data.tokens import Encoded, TokenDataset, write_split

    enc = Encoded([np.array([1, 5, 2], np.int32)] * 2, [np.array([0, 1, 1], bool)] * 2, [0, 1], [0, 1])
    write_split(tmp_path / "train", enc, np.arange(2), keys=["1", "2"])
    assert TokenDataset(tmp_path / "train").keys == ["1", "2"]
    (tmp_path / "train" / "keys.json").write_text(keys)
    with pytest.raises(PipelineError, match=f"{re.escape(str(tmp_path / 'train' / 'keys.json'))}.*{re.escape(needle)}"):
        TokenDataset(tmp_path / "train")


@pytest.mark.parametrize("blank", ["", " "])
def test_a_blank_revision_is_refused(tmp_path, blank):
    """An empty --revision named no revision: a hub dataset's fell back to its default branch without a word (a
    local source's was passed over, though a revision given with one is refused); refused by option and value."""
    (tmp_path / "alpaca.json").write_text(json.dumps(GOOD))
    one_line_error(cli("fetch", "--dataset", "alpaca", "--source", tmp_path / "alpaca.json", "--revision", blank,
                       "--out", tmp_path / "a"), "fetch", f"--revision {blank!r}", "no name")
    assert not (tmp_path / "a").exists()
