"""Validation reports and policies; tokenization with the paper's templates, masks, truncation and split."""

import json

import pytest

from llama_adapter.config import DATASET_SPLIT_BY, TokenizeConfig
from llama_adapter.data.scienceqa import categories, parse_answer, qcm_prompt, qcm_target
from llama_adapter.data.tokens import TokenDataset, tokenize
from llama_adapter.data.validate import DATASETS, validate
from llama_adapter.errors import ValidationError
from llama_adapter.prompts import alpaca_prompt
from llama_adapter.tokenizer import load_tokenizer


def fetched(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("one", "two", "three", "four", "five")]


@pytest.fixture(scope="module")
def llama_tok(llama_sp_model):
    return load_tokenizer(llama_sp_model)


# ---------------------------------------------------------------- validation


def test_every_dataset_has_a_default_split():
    """ScienceQA's records carry their split (train/val/test), which is the default; Alpaca's draw a seeded one."""
    assert set(DATASET_SPLIT_BY) == set(DATASETS)
    assert TokenizeConfig().split_rule("scienceqa") == {"by": "field"}
    assert TokenizeConfig().split_rule("alpaca") == {"by": "seed", "val_size": 200, "seed": 0}
    assert TokenizeConfig(split_by="seed", seed=3).split_rule("scienceqa")["seed"] == 3


def test_invalid_alpaca_fails_with_a_report_and_no_records(tmp_path):
    bad = GOOD + [{"instruction": "x", "input": ""}, {"instruction": 3, "input": "", "output": "y"}, "text",
                  {"instruction": " ", "input": "", "output": "z"}]
    with pytest.raises(ValidationError, match=r"4 invalid of 9 records.*validation.json"):
        validate("alpaca", fetched(tmp_path / "f", bad), tmp_path / "v")
    report = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert report["invalid"] == {"missing output": 1, "instruction not a string": 1, "not an object": 1,
                                 "empty instruction": 1}
    assert report["examples"]["missing output"][0]["index"] == 5
    assert not (tmp_path / "v" / "records.jsonl").exists()


def test_skip_policy_counts_what_it_drops(tmp_path):
    bad = GOOD + [{"instruction": "x", "input": ""}]
    report = validate("alpaca", fetched(tmp_path / "f", bad), tmp_path / "v", policy="skip")
    assert (report.total, report.kept, dict(report.invalid)) == (6, 5, {"missing output": 1})
    assert len((tmp_path / "v" / "records.jsonl").read_text().splitlines()) == 5


def test_flags_are_counted_and_kept_unless_dropped(tmp_path):
    recs = GOOD + [GOOD[0], {"instruction": "a", "input": "", "output": ""},
                   {"instruction": "b", "input": "", "output": "<nooutput>"}]
    report = validate("alpaca", fetched(tmp_path / "f", recs), tmp_path / "v")
    assert dict(report.flagged) == {"duplicate": 1, "empty_output": 1, "nooutput": 1} and report.kept == 8
    report = validate("alpaca", tmp_path / "f", tmp_path / "v2", drop_flags=["duplicate", "nooutput"])
    assert report.kept == 6 and report.dropped_flags == ["duplicate", "nooutput"]


def test_a_training_record_copied_into_a_held_out_split_is_a_duplicate(tmp_path):
    """Alpaca records now keep a multi-split source's split (fetch), and the duplicate key took every field, the
    split too: a training record copied into the test split was no longer flagged, the very leak the flag is for.
    The split is no part of what makes two records the same."""
    recs = [{**GOOD[0], "split": "train"}, {**GOOD[0], "split": "test"}, {**GOOD[1], "split": "train"}]
    report = validate("alpaca", fetched(tmp_path / "f", recs), tmp_path / "v")
    assert dict(report.flagged) == {"duplicate": 1}


def test_scienceqa_checks(tmp_path):
    ok = {"pid": "1", "split": "train", "question": "Q?", "choices": ["a", "b"], "answer": 1, "hint": "",
          "image": None, "has_image": False}
    recs = [ok, {**ok, "pid": "2", "choices": ["a"]}, {**ok, "pid": "3", "answer": 2},
            {**ok, "pid": "4", "image": "images/4.png"}, {**ok, "pid": "5", "has_image": True},
            {**ok, "pid": "6", "answer": True}, {**ok, "pid": "7", "split": "test"}]
    report = validate("scienceqa", fetched(tmp_path / "f", recs), tmp_path / "v", policy="skip")
    assert dict(report.invalid) == {"choices not 2-5 strings": 1, "answer out of range": 2, "image file not found": 1}
    assert dict(report.flagged) == {"image_missing": 1, "duplicate": 1}  # pid 7 repeats pid 1's problem
    assert report.examples["answer out of range"][0]["pid"] == "3"


def test_real_alpaca_sample_flags(shared_data, tmp_path):
    records = json.loads((shared_data / "alpaca" / "alpaca_sample_5000.json").read_text())
    report = validate("alpaca", fetched(tmp_path / "f", records), tmp_path / "v")
    assert report.kept == 5000 and not report.invalid
    assert report.flagged["empty_output"] == 2 and report.flagged["nooutput"] == 2


# ---------------------------------------------------------------- tokenization


def test_real_alpaca_lengths_match_the_measured_facts(shared_data, llama_tok, tmp_path):
    """Mean 127.9, median 112, p95 244, max 793, 3 over 512; padding to 512 leaves 25.0% real."""
    records = json.loads((shared_data / "alpaca" / "alpaca_sample_5000.json").read_text())
    fetched(tmp_path / "v", records)
    stats = tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "t")
    s = stats["length_before_truncation"]
    measured = (round(s["mean"], 1), s["median"], round(s["p95"]), s["max"], s["over_max_seq_len"])
    assert measured == (127.9, 112, 243, 793, 3)
    assert round(s["real_fraction_if_padded"], 3) == 0.250
    assert stats["splits"]["train"]["truncated"] + stats["splits"]["val"]["truncated"] == 3
    # A response starting with punctuation merges with "Response:"'s last piece, which the prompt's mask covers
    # (as in the paper's code): counted, not silent. Recount from the records themselves.
    merged = 0
    for r in records:
        prompt = alpaca_prompt(r["instruction"], r["input"])
        ids = llama_tok.encode(prompt + r["output"], bos=True, eos=True)
        merged += ids[:len(llama_tok.encode(prompt, bos=True))] != llama_tok.encode(prompt, bos=True)
    assert sum(split["response_start_masked"] for split in stats["splits"].values()) == merged == 149
    assert (tmp_path / "t" / "lengths.png").stat().st_size > 1000


def test_sample_layout_mask_and_template(llama_tok, tmp_path):
    recs = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add.", "input": "2 and 3", "output": "5"}] * 3
    fetched(tmp_path / "v", recs)
    tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "t", split={"by": "seed", "val_size": 2, "seed": 1})
    ds = TokenDataset(tmp_path / "t" / "train")
    for i in range(len(ds)):
        tokens, mask = ds[i]
        rec = recs[ds.source_index[i]]
        prompt = alpaca_prompt(rec["instruction"], rec["input"])
        assert tokens[0] == llama_tok.bos_id and tokens[-1] == llama_tok.eos_id
        assert llama_tok.decode(tokens) == prompt + rec["output"]
        n_prompt = len(llama_tok.encode(prompt, bos=True))
        assert not mask[:n_prompt].any() and mask[n_prompt:].all()
    assert "### Input:\n2 and 3" in alpaca_prompt("Add.", "2 and 3")


def test_no_prompt_mask_trains_on_everything_but_bos(llama_tok, tmp_path):
    fetched(tmp_path / "v", GOOD)
    tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "t", mask_prompt=False,
             split={"by": "seed", "val_size": 1, "seed": 0})
    _, mask = TokenDataset(tmp_path / "t" / "train")[0]
    assert not mask[0] and mask[1:].all()


def test_truncation_policies(llama_tok, tmp_path):
    long_out = {"instruction": "Write.", "input": "", "output": "word " * 300}
    long_prompt = {"instruction": "Read. " + "word " * 300, "input": "", "output": "ok"}
    fetched(tmp_path / "v", GOOD + [long_out, long_prompt])
    rule = {"by": "seed", "val_size": 1, "seed": 0}
    stats = tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "t", max_seq_len=128, split=rule)
    both = [stats["splits"][s] for s in ("train", "val")]
    assert sum(s["truncated"] for s in both) == 1 and sum(s["dropped_no_response"] for s in both) == 1
    assert max(TokenDataset(tmp_path / "t" / "train").lengths) <= 128
    stats = tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "t2", max_seq_len=128, truncation="drop",
                     split=rule)
    assert sum(stats["splits"][s]["dropped_too_long"] for s in ("train", "val")) == 2


def test_seeded_split_is_disjoint_and_reproducible(llama_tok, tmp_path):
    recs = [{"instruction": f"Count to {i}.", "input": "", "output": str(i)} for i in range(50)]
    fetched(tmp_path / "v", recs)
    rule = {"by": "seed", "val_size": 0.2, "seed": 7}
    tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "a", split=rule)
    tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "b", split=rule)
    train, val = (set(TokenDataset(tmp_path / "a" / s).source_index) for s in ("train", "val"))
    assert len(val) == 10 and len(train) == 40 and not train & val
    for name in ("tokens.npy", "source_index.npy"):
        assert (tmp_path / "a" / "val" / name).read_bytes() == (tmp_path / "b" / "val" / name).read_bytes()
    assert "never appear in training" in json.loads((tmp_path / "a" / "stats.json").read_text())["split_note"]


def test_a_seeded_draw_over_records_of_held_out_splits_is_refused(llama_tok, tmp_path):
    """Alpaca from a source of several splits keeps each record's split (fetch); tokenize's default seeded draw took
    every record as a candidate for training, so the source's validation and test rows were drawn into it without a
    word. Refused, naming the file and the splits; --split-by field keeps them apart, --split-by seed given by name
    draws over them all, and records of train alone (or of no split) are drawn as before."""
    from llama_adapter.errors import TokenizeError

    splits = ["train", "train", "val", "test", "train"]
    fetched(tmp_path / "v", [{**r, "split": s} for r, s in zip(GOOD, splits)])
    with pytest.raises(TokenizeError, match=r"records.jsonl: 2 of 5 records carry a held-out split of their own "
                                            r"\(test, val\), which a seeded validation draw would mix into training"):
        tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "t", split={"by": "seed", "val_size": 1, "seed": 0})
    assert not (tmp_path / "t").exists()
    stats = tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "t", split={"by": "field"})
    assert {name: split["samples"] for name, split in stats["splits"].items()} == {"train": 3, "val": 1, "test": 1}
    stats = tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "s",
                     split={"by": "seed", "val_size": 1, "seed": 0}, draw_held_out=True)  # --split-by seed: over all
    assert {name: split["samples"] for name, split in stats["splits"].items()} == {"train": 4, "val": 1}
    fetched(tmp_path / "w", [{**r, "split": "train"} for r in GOOD])
    tokenize("alpaca", tmp_path / "w", llama_tok, tmp_path / "u", split={"by": "seed", "val_size": 1, "seed": 0})


def test_stats_json_records_the_tokenizer_by_its_vocabulary(llama_tok, llama_sp_model, tmp_path):
    """Which tokenizer made the ids: its vocabulary's digest (what train compares with the base's own tokenizer) and,
    for people, the file it was read from."""
    fetched(tmp_path / "v", GOOD)
    stats = tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "t",
                     split={"by": "seed", "val_size": 1, "seed": 0})
    recorded = {"source": str(llama_sp_model), "vocabulary_sha256": llama_tok.vocabulary_digest(), "vocab_size": 32000,
                "bos_id": 1, "eos_id": 2}
    assert stats["tokenizer"] == recorded
    assert json.loads((tmp_path / "t" / "stats.json").read_text())["tokenizer"] == recorded


def test_tokenize_failure_leaves_nothing(llama_tok, tmp_path, monkeypatch):
    import llama_adapter.data.tokens as tokens

    fetched(tmp_path / "v", GOOD)
    monkeypatch.setattr(tokens, "plot_lengths", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        tokenize("alpaca", tmp_path / "v", llama_tok, tmp_path / "t", split={"by": "seed", "val_size": 1, "seed": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


# ---------------------------------------------------------------- ScienceQA format


def test_qcm_format_and_answer_parsing():
    rec = {"question": "Which is a mammal?", "choices": ["frog", "whale", "shark"], "answer": 1, "hint": ""}
    assert qcm_prompt(rec) == "Question: Which is a mammal?\nContext: N/A\nOptions: (A) frog (B) whale (C) shark\n"
    assert qcm_target(rec) == "Answer: The answer is (B)."
    assert parse_answer("Answer: The answer is (B).", 3) == 1
    assert parse_answer("the answer is C", 3) == 2
    # the paper's phrase, not its last words alone, whatever their case
    for text in ("Answer:\n answer is (A).", "Answer is (A).", "My answer is (A).", "Bathe answer is (A)."):
        assert parse_answer(text, 3) is None, text
    assert parse_answer("The answer is (D).", 3) is None and parse_answer("whale", 3) is None
    assert parse_answer("The answer is B.\nBecause", 3) == 1  # a bare letter standing alone
    for end in ("", "\n", " ", " \n", "\t", "\r\n", "\r"):  # at a line's or the output's end, after spaces too
        assert parse_answer(f"The answer is B{end}", 3) == 1, repr(end)
    assert parse_answer("The answer is B  bird", 3) is None
    # an option's text is not its first letter (these real option texts were read as (E), (D), (B), (A))
    for text in ("Earth.", "Denver.", "Both are chemical changes.", "Arizona."):
        assert parse_answer(f"Answer: The answer is {text}", 5) is None, text
    assert parse_answer("The answer is (A). The answer is (B).", 3) is None  # two answers: none (the official way)
    assert parse_answer("The answer is (A). The answer is (A).", 3) == 0  # one answer said twice


def test_categories():
    base = {"subject": "natural science", "grade": "grade3", "hint": "", "image": None, "has_image": False}
    assert categories(base) == ["NAT", "NO", "G1-6"]
    assert categories({**base, "subject": "language science", "grade": "grade11", "hint": "h", "has_image": True}) == \
        ["LAN", "TXT", "IMG", "G7-12"]
    assert categories({"hint": None, "has_image": True, "subject": None, "grade": None}) == ["IMG"]


def test_scienceqa_tokenized_by_its_own_splits(llama_tok, tmp_path):
    recs = [{"pid": str(i), "split": ["train", "val", "test"][i % 3], "question": f"Is {i} even?",
             "choices": ["yes", "no"], "answer": i % 2, "hint": "", "image": None, "has_image": False}
            for i in range(9)]
    fetched(tmp_path / "v", recs)
    stats = tokenize("scienceqa", tmp_path / "v", llama_tok, tmp_path / "t")
    assert {k: v["samples"] for k, v in stats["splits"].items()} == {"train": 3, "val": 3, "test": 3}
    tokens, mask = TokenDataset(tmp_path / "t" / "val")[0]
    assert llama_tok.decode(tokens[mask]) == "Answer: The answer is (B)."
