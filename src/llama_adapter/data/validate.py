"""Validation of fetched records: nothing is dropped without being counted and shown.

Each record either passes, is invalid (a reason such as a missing field or an answer index out of range),
or passes with flags (an empty or `<nooutput>` response, an exact duplicate, a missing image) that are
counted but kept unless the config asks to drop them; the paper trained on Alpaca as released, flags
included. Policy `fail` (default) stops at any invalid record; `skip` drops them. The report is always
written, beside the output, so a failed run still says which records were bad.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ValidationError
from ..io import atomic_path, write_json

EXAMPLES_PER_REASON = 5
POLICIES = ("fail", "skip")


@dataclass
class ValidationReport:
    dataset: str
    source: str
    policy: str
    dropped_flags: list[str]
    total: int = 0
    kept: int = 0
    invalid: dict[str, int] = field(default_factory=dict)  # reason -> count
    flagged: dict[str, int] = field(default_factory=dict)  # flag -> count
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def note(self, kind: str, key: str, where: dict, detail: str) -> None:
        counts = getattr(self, kind)
        counts[key] = counts.get(key, 0) + 1
        shown = self.examples.setdefault(key, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append({**where, "detail": detail})

    def summary(self) -> str:
        parts = [f"{n} {reason}" for reason, n in sorted(self.invalid.items(), key=lambda kv: -kv[1])]
        return f"{sum(self.invalid.values())} invalid of {self.total} records ({', '.join(parts)})"


Problem = tuple[str, str]  # (reason, detail)


def check_alpaca(record: Any) -> tuple[list[Problem], list[Problem]]:
    """(invalid reasons, flags) of one Alpaca record."""
    if not isinstance(record, dict):
        return [("not an object", f"got {type(record).__name__}")], []
    invalid = []
    for key in ("instruction", "input", "output"):
        if key not in record:
            invalid.append((f"missing {key}", f"keys: {sorted(record)}"))
        elif not isinstance(record[key], str):
            invalid.append((f"{key} not a string", f"{key}={record[key]!r:.80}"))
    if not invalid and not record["instruction"].strip():
        invalid.append(("empty instruction", ""))
    flags = []
    if not invalid:
        output = record["output"].strip()
        if not output:
            flags.append(("empty_output", record["instruction"][:80]))
        elif output == "<nooutput>":
            flags.append(("nooutput", record["instruction"][:80]))
    return invalid, flags


def check_scienceqa(record: dict, root: Path) -> tuple[list[Problem], list[Problem]]:
    invalid = []
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        invalid.append(("missing question", f"question={question!r:.80}"))
    if not (isinstance(choices, list) and 2 <= len(choices) <= 5 and all(isinstance(c, str) and c for c in choices)):
        invalid.append(("choices not 2-5 strings", f"choices={choices!r:.120}"))
    elif not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
        invalid.append(("answer out of range", f"answer={answer!r} with {len(choices)} choices"))
    if record.get("image") is not None and not (root / record["image"]).is_file():
        invalid.append(("image file not found", str(record["image"])))
    flags = []
    if record.get("has_image") and record.get("image") is None:
        flags.append(("image_missing", "the source names an image it does not ship"))
    return invalid, flags


def duplicate_key(dataset: str, record: dict) -> str:
    if dataset == "scienceqa":  # the same problem under another pid is a duplicate
        record = {k: v for k, v in record.items() if k not in ("pid", "split", "image")}
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def validate(
    dataset: str,
    fetched_dir: Path,
    out_dir: Path,
    policy: str = "fail",
    drop_flags: Iterable[str] = (),
) -> ValidationReport:
    """Check `fetched_dir/records.jsonl`; write `out_dir/records.jsonl` (kept records, image paths made
    relative to out_dir) and `out_dir/validation.json`. Raises ValidationError under policy `fail`."""
    if policy not in POLICIES:
        raise ValueError(f"validation policy must be one of {POLICIES}, got {policy!r}")
    fetched_dir, out_dir = Path(fetched_dir), Path(out_dir)
    records = read_jsonl(fetched_dir / "records.jsonl")
    check: Callable[[Any], tuple[list[Problem], list[Problem]]]
    if dataset == "alpaca":
        check = check_alpaca
    elif dataset == "scienceqa":
        check = lambda r: check_scienceqa(r, fetched_dir)  # noqa: E731
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected alpaca or scienceqa")
    drop_flags = sorted(set(drop_flags))
    report = ValidationReport(dataset, str(fetched_dir), policy, drop_flags, total=len(records))
    kept, seen = [], set()
    for index, record in enumerate(records):
        where = {"index": index} if dataset == "alpaca" else {"index": index, "pid": record.get("pid")}
        invalid, flags = check(record)
        if not invalid:
            key = duplicate_key(dataset, record)
            if key in seen:
                flags.append(("duplicate", "an exact copy of an earlier record"))
            seen.add(key)
        for reason, detail in invalid:
            report.note("invalid", reason, where, detail)
        for flag, detail in flags:
            report.note("flagged", flag, where, detail)
        if not invalid and not any(flag in drop_flags for flag, _ in flags):
            kept.append(record)
    report.kept = len(kept)
    write_json(out_dir / "validation.json", asdict(report))
    if report.invalid and policy == "fail":
        raise ValidationError(f"{fetched_dir / 'records.jsonl'}: {report.summary()}; see {out_dir / 'validation.json'} "
                              "(or set the validation policy to skip)")
    if dataset == "scienceqa":
        rel = os.path.relpath(fetched_dir, out_dir)
        kept = [{**r, "image": None if r["image"] is None else f"{rel}/{r['image']}"} for r in kept]
    write_jsonl(out_dir / "records.jsonl", kept)
    return report


def read_jsonl(path: Path) -> list:
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    records.append(json.loads(line))
    except FileNotFoundError:
        raise ValidationError(f"{path}: not found (run the fetch stage first)") from None
    except json.JSONDecodeError as e:
        raise ValidationError(f"{path}, line {line_no}: not valid JSON ({e})") from None
    return records


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
