"""Validation of fetched records: nothing is dropped without being counted and shown.

Each record either passes, is invalid (a reason such as a missing field or an answer index out of range),
or passes with flags (an empty or `<nooutput>` response, an exact duplicate, a missing image) that are
counted but kept unless the config asks to drop them; the paper trained on Alpaca as released, flags
included. Policy `fail` (default) stops at any invalid record; `skip` drops them, and validation.json
counts them per reason and lists every dropped record (index, line, pid).

What counts as invalid is whatever a later stage would otherwise train on, score or file wrongly without a
word:
- Alpaca: `instruction`, `input`, `output` must be strings, the instruction not blank; a `split`, if any, null or
  a plain name (`tokenize --split-by field` makes it a folder name).
- ScienceQA: a non-empty string `pid`, unique in the file (image features and predictions are keyed by
  it); `split` null or a plain name (it becomes a folder name); a question; 2-5 non-blank string choices;
  an integer answer index among them; `hint` a string or null; `has_image` a boolean or null; `image`
  null or a path inside the fetched folder to a file that exists; not an image that fetch refused under
  policy skip (fetch.json's `images_refused`: a path leading out of the dataset).
- ScienceQA metadata that the evaluation's columns are read from (scienceqa.categories): a source may
  lack it (LLaVA's file has no subject and no grade): a null or absent `subject` / `grade` is legitimate
  and the problem is then left out of that column only. A value that is present must be one the columns
  understand: `subject` one of scienceqa.SUBJECTS ("natural science", "social science", "language
  science"; an empty string or other spelling is unknown, not missing), `grade` "grade1" ... "grade12".
  Anything else would silently leave the problem out of NAT/SOC/LAN or G1-6/G7-12.

A run writes its folder whole (io.atomic_dir): on success `records.jsonl` (the records kept) and
`validation.json`; when records fail under policy `fail`, or none are left to keep, the folder holds only
`validation.json` (status "failed", the faults per reason, every bad record; the CLI also prints it to stdout,
the workflow's log), and no `records.jsonl` that a later stage could take for this run's output. Any other
failure (an unreadable input, an unknown setting) removes the folder an earlier run left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import POLICIES, ValidateConfig
from ..errors import DataError, UnsafePathError, ValidationError, ValidationFailed
from ..io import atomic_dir, holds, read_json_object, read_jsonl_lines, write_json, write_jsonl
from . import FETCH_INFO, RECORDS, VALIDATION_REPORT
from .paths import inside, is_file_name
from .scienceqa import SUBJECTS, grade_number

EXAMPLES_PER_REASON = 5
DATASETS = ("alpaca", "scienceqa")
FLAGS = {"alpaca": ("empty_output", "nooutput", "duplicate"), "scienceqa": ("duplicate", "image_missing")}
# One drop_flags list serves both datasets in the config, so a flag of either dataset is accepted for both.
ALL_FLAGS = tuple(sorted({f for flags in FLAGS.values() for f in flags}))
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class ValidationReport:
    dataset: str
    source: str  # the fetched folder as given
    policy: str
    dropped_flags: list[str]
    # The fetched folder relative to the validated one, as the records' image paths are: later stages find it
    # from wherever they run (fetched_folder), and a results tree moved whole keeps it.
    fetched: str = ""
    status: str = "ok"  # "failed": invalid records under policy fail, or nothing left to keep
    total: int = 0  # records in the file
    kept: int = 0
    invalid_records: int = 0  # records with at least one fault
    invalid: dict[str, int] = field(default_factory=dict)  # reason -> faults (a record can have several)
    flagged: dict[str, int] = field(default_factory=dict)  # flag -> count
    examples: dict[str, list[dict]] = field(default_factory=dict)  # reason or flag -> first few records
    dropped: list[dict] = field(default_factory=list)  # every record not kept, and why

    def note(self, kind: str, key: str, where: dict, detail: str) -> None:
        counts = getattr(self, kind)
        counts[key] = counts.get(key, 0) + 1
        shown = self.examples.setdefault(key, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append({**where, "detail": detail})

    def summary(self) -> str:
        """One line: records invalid of the total, then each reason's fault count and its first record."""
        faults = sum(self.invalid.values())
        parts = []
        for reason, n in sorted(self.invalid.items(), key=lambda kv: (-kv[1], kv[0])):
            first = self.examples[reason][0]
            detail = f": {first['detail']:.100}" if first.get("detail") else ""
            parts.append(f"{reason} x{n} (first: {describe(first)}{detail})")
        return (f"{self.invalid_records} invalid of {self.total} records, {faults} fault{'s' * (faults != 1)}: "
                + "; ".join(parts))


def describe(where: dict) -> str:
    """'line 7 (record 6, pid '12')': where a record is in its file."""
    pid = f", pid {where['pid']!r}" if where.get("pid") is not None else ""
    return f"line {where['line']} (record {where['index']}{pid})"


Problem = tuple[str, str]  # (reason, detail)


def split_faults(record: dict) -> list[Problem]:
    """A record's own split, which `tokenize --split-by field` makes a folder of its output: null (none) or a plain
    name, not a path ('../x' would be written outside the output) nor a number or a list."""
    split = record.get("split")
    if split is not None and not (isinstance(split, str) and SPLIT_NAME.fullmatch(split)):
        return [("bad split", f"split={split!r:.80}; expected null or a name such as train, val, test")]
    return []


def check_alpaca(record: Any) -> tuple[list[Problem], list[Problem]]:
    """(invalid reasons, flags) of one Alpaca record."""
    if not isinstance(record, dict):
        return [("not an object", f"got {type(record).__name__}; expected a JSON object")], []
    invalid = []
    for key in ("instruction", "input", "output"):
        if key not in record:
            invalid.append((f"missing {key}", f"keys: {sorted(record)}; expected instruction, input, output"))
        elif not isinstance(record[key], str):
            invalid.append((f"{key} not a string", f"{key}={record[key]!r:.80}; expected a string"))
    if not invalid and not record["instruction"].strip():
        invalid.append(("empty instruction", "expected a non-blank instruction"))
    invalid += split_faults(record)
    flags = []
    if not invalid:
        output = record["output"].strip()
        if not output:
            flags.append(("empty_output", record["instruction"][:80]))
        elif output == "<nooutput>":
            flags.append(("nooutput", record["instruction"][:80]))
    return invalid, flags


def check_scienceqa(record: Any, root: Path | None) -> tuple[list[Problem], list[Problem]]:
    """(invalid reasons, flags) of one ScienceQA record; with root None (a validated file, whose image paths
    point into the fetched folder), the image file itself is not looked at."""
    if not isinstance(record, dict):
        return [("not an object", f"got {type(record).__name__}; expected a JSON object")], []
    invalid = []
    pid = record.get("pid")
    if not (is_file_name(pid) and pid.strip()):
        invalid.append(("bad pid", f"pid={pid!r:.80}; expected a non-empty string that can name a file"))
    invalid += split_faults(record)
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        invalid.append(("missing question", f"question={question!r:.80}; expected a non-blank string"))
    if not (isinstance(choices, list) and 2 <= len(choices) <= 5
            and all(isinstance(c, str) and c.strip() for c in choices)):
        invalid.append(("choices not 2-5 strings", f"choices={choices!r:.120}; expected a list of 2 to 5 non-blank "
                                                   "strings"))
    elif not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
        invalid.append(("answer out of range", f"answer={answer!r:.40} with {len(choices)} choices; expected an "
                                               f"index 0..{len(choices) - 1}"))
    hint = record.get("hint")
    if hint is not None and not isinstance(hint, str):
        invalid.append(("hint not a string", f"hint={hint!r:.80}; expected a string or null"))
    subject = record.get("subject")
    if subject is not None and not (isinstance(subject, str) and subject in SUBJECTS):
        invalid.append(("unknown subject", f"subject={subject!r:.80}; expected one of {', '.join(SUBJECTS)} or null"))
    grade = record.get("grade")
    if grade is not None and grade_number(grade) is None:
        invalid.append(("unknown grade", f"grade={grade!r:.40}; expected 'grade1' ... 'grade12' or null"))
    has_image = record.get("has_image")
    if has_image is not None and not isinstance(has_image, bool):
        invalid.append(("has_image not a boolean", f"has_image={has_image!r:.40}; expected true, false or null"))
    image = record.get("image")
    if image is not None:  # (a validated file's paths lead back to the fetched folder, through '..')
        if not isinstance(image, str):
            invalid.append(("bad image path", f"image={image!r:.80}; expected null or a path in the fetched folder"))
        elif root is not None:
            try:  # the path is data: it must name a file inside the fetched folder, not through a symlink out
                if not inside(root, image).is_file():
                    invalid.append(("image file not found", f"{root / image}; expected the image that fetch stored"))
            except UnsafePathError as e:
                invalid.append(("bad image path", f"image={image!r:.60}; expected null or a path in the fetched "
                                                  f"folder ({e})"))
    flags = []
    if record.get("has_image") is True and image is None:
        flags.append(("image_missing", "the source names an image it does not ship"))
    return invalid, flags


def record_faults(dataset: str, record: Any) -> list[Problem]:
    """The faults that make a record unusable for training or scoring (no file checks, no flags)."""
    return check_alpaca(record)[0] if dataset == "alpaca" else check_scienceqa(record, None)[0]


def duplicate_key(dataset: str, record: dict, fetched_dir: Path | None = None) -> str:
    """What makes two records the same: every field but its split (a training record copied into a held-out split
    is the leak the check is for); for ScienceQA, the same problem under another pid (its image's path, named after
    the pid, aside too), with the same picture: the image's content, not its path (many problems share their
    wording and differ by their picture alone)."""
    record = {k: v for k, v in record.items() if k != "split"}
    if dataset == "scienceqa":
        image = record.get("image")
        record = {k: v for k, v in record.items() if k not in ("pid", "image")}
        if image is not None and fetched_dir is not None:
            record["image_sha256"] = hashlib.sha256((fetched_dir / image).read_bytes()).hexdigest()
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def check_separate(inp: Path, out: Path, in_option: str, out_option: str = "--out") -> None:
    """Refuse an output folder that is the input folder or holds it: writing it would replace the input."""
    if holds(out, inp):
        raise DataError(f"{out_option} {out} would replace {in_option} {inp}; expected a separate output folder")


def validate(
    dataset: str,
    fetched_dir: Path,
    out_dir: Path,
    policy: str = ValidateConfig.policy,
    drop_flags: Iterable[str] = (),
) -> ValidationReport:
    """Check `fetched_dir/records.jsonl`; write `out_dir/records.jsonl` (kept records, image paths made
    relative to out_dir) and `out_dir/validation.json`. Raises ValidationError under policy `fail`, and under
    either policy when no record is left to keep (the folder then holds validation.json alone)."""
    fetched_dir, out_dir = Path(fetched_dir), Path(out_dir)
    check_separate(fetched_dir, out_dir, "--fetched")
    source = fetched_dir / RECORDS
    failure = None
    # Settings it cannot follow touch nothing (the command line refuses them as it parses them)
    if policy not in POLICIES:
        raise ValidationError(f"validation policy {policy!r} is unknown; expected one of {', '.join(POLICIES)}")
    if dataset not in DATASETS:
        raise ValidationError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    drop_flags = sorted(set(drop_flags))
    unknown = [f for f in drop_flags if f not in ALL_FLAGS]
    if unknown:
        raise ValidationError(f"drop flag {', '.join(map(repr, unknown))} is unknown; expected one of "
                              f"{', '.join(ALL_FLAGS)}")
    # Any failure from here on removes out_dir: an earlier run's records.jsonl must not outlive a failed run.
    with atomic_dir(out_dir, remove_on_failure=True) as tmp:
        check: Callable[[Any], tuple[list[Problem], list[Problem]]]
        if dataset == "alpaca":
            check = check_alpaca
        else:
            check = lambda r: check_scienceqa(r, fetched_dir)  # noqa: E731
        lines = read_jsonl_lines(source, expected="the records.jsonl that the fetch stage writes")
        if not lines:
            raise ValidationError(f"{source}: no records (the file is empty); expected one JSON object per line")
        report = ValidationReport(dataset, str(fetched_dir), policy, drop_flags, total=len(lines),
                                  fetched=os.path.relpath(fetched_dir, out_dir))
        refused = refused_images(fetched_dir) if dataset == "scienceqa" else {}
        kept, seen, pids = [], set(), {}
        for index, (line, record) in enumerate(lines):
            where = {"index": index, "line": line}
            invalid, flags = check(record)
            if dataset == "scienceqa" and isinstance(record, dict):
                pid = record.get("pid")
                where["pid"] = pid if isinstance(pid, str | int) else None
                if isinstance(pid, str) and pid in refused:
                    invalid.append(("image refused by fetch", f"{refused[pid]:.120}; listed under images_refused in "
                                                              f"{fetched_dir / FETCH_INFO}"))
                if isinstance(pid, str):
                    if pid in pids:
                        invalid.append(("repeated pid",
                                        f"pid {pid!r} is also at line {pids[pid]}; expected unique pids"))
                    pids.setdefault(pid, line)
            if not invalid:
                key = duplicate_key(dataset, record, fetched_dir)
                if key in seen:
                    flags.append(("duplicate", "an exact copy of an earlier record"))
                seen.add(key)
            for reason, detail in invalid:
                report.note("invalid", reason, where, detail)
            for flag, detail in [] if invalid else flags:  # an invalid record is counted as that alone
                report.note("flagged", flag, where, detail)
            if invalid:
                report.invalid_records += 1
                report.dropped.append({**where, "invalid": [reason for reason, _ in invalid]})
            elif any(flag in drop_flags for flag, _ in flags):
                report.dropped.append({**where, "flags": [flag for flag, _ in flags if flag in drop_flags]})
            else:
                kept.append(record)
        report.kept = len(kept)
        listed = out_dir / VALIDATION_REPORT
        if report.invalid_records and policy == "fail":
            failure = ValidationFailed(f"{source}: {report.summary()}; every one is listed in {listed} and on "
                                       "stdout (fix them, or set the validation policy to skip to drop them)", report)
        elif not kept:
            why = [report.summary()] if report.invalid_records else []
            n_flagged = len(report.dropped) - report.invalid_records
            if n_flagged:
                why.append(f"{n_flagged} dropped for flags {', '.join(drop_flags)}")
            failure = ValidationFailed(f"{source}: no record left to keep ({'; '.join(why)}); see {listed} or stdout",
                                       report)
        report.status = "failed" if failure else "ok"
        write_json(tmp / VALIDATION_REPORT, asdict(report))
        if failure is None:
            if dataset == "scienceqa":
                rel = os.path.relpath(fetched_dir, out_dir)
                kept = [{**r, "image": None if r.get("image") is None else f"{rel}/{r['image']}"} for r in kept]
            write_jsonl(tmp / RECORDS, kept)
    if failure is not None:
        raise failure
    return report


def check_validated_records(dataset: str, source: Path, lines: list[tuple[int, object]]) -> None:
    """Refuse records validate would not have kept (a file that skipped validation, or was edited since):
    one line naming how many, and the first one's line, fault and what was expected."""
    bad, pids = [], {}
    for index, (line, record) in enumerate(lines):
        faults = record_faults(dataset, record)
        if dataset == "scienceqa" and not faults:
            pid = record["pid"]
            if pid in pids:
                faults = [("repeated pid", f"pid {pid!r} is also at line {pids[pid]}; expected unique pids")]
            pids.setdefault(pid, line)
        if faults:
            bad.append((index, line, faults))
    if bad:
        index, line, faults = bad[0]
        first = "; ".join(f"{reason} ({detail:.120})" if detail else reason for reason, detail in faults)
        raise DataError(f"{source}: {len(bad)} of {len(lines)} records are not valid {dataset} records (first: "
                        f"line {line}, record {index}: {first}); expected records as the validate stage keeps "
                        "them (run validate on the data)")


def fetched_folder(validated_dir: Path) -> Path | None:
    """The fetched folder behind a validated one, as its validation.json names it (None without one, or when that
    folder is gone). A validation.json written before `fetched` was recorded gives `source`, which is relative to
    the folder validate ran from."""
    report = Path(validated_dir) / VALIDATION_REPORT
    if not report.is_file():
        return None
    meta = read_json_object(report, "the validation.json validate writes")
    if isinstance(meta.get("fetched"), str) and meta["fetched"]:
        folder = Path(validated_dir) / meta["fetched"]
    elif isinstance(meta.get("source"), str):
        folder = Path(meta["source"])
    else:
        return None
    return folder if folder.is_dir() else None


def refused_images(fetched_dir: Path) -> dict[str, str]:
    """pid -> why, for the images fetch refused under policy skip (fetch.json's images_refused): such a record
    keeps has_image true with no image, and is invalid here rather than a merely flagged missing image."""
    path = Path(fetched_dir) / FETCH_INFO
    if not path.exists():
        return {}
    listed = read_json_object(path).get("images_refused") or {}
    entries = listed.get("records", []) if isinstance(listed, dict) else []
    return {str(e["pid"]): str(e.get("why", "refused")) for e in entries if isinstance(e, dict) and "pid" in e}
