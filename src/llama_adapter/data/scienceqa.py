"""ScienceQA in the official QCM→A format, and the categories its evaluation reports.

Prompt and target follow the ScienceQA / MM-CoT convention the paper evaluates with:
  Question: {question}\nContext: {hint or "N/A"}\nOptions: (A) … (B) …\n  →  Answer: The answer is (X).
"""

from __future__ import annotations

import re

LETTERS = "ABCDE"
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
# The columns of the paper's ScienceQA table, in its order.
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


def qcm_prompt(record: dict) -> str:
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(record["choices"]))
    context = record.get("hint") or "N/A"
    return f"Question: {record['question']}\nContext: {context}\nOptions: {options}\n"


def qcm_target(record: dict) -> str:
    return f"Answer: The answer is ({LETTERS[record['answer']]})."


ANSWER_RE = re.compile(r"answer is \(?([A-E])\)?")


def parse_answer(text: str, n_choices: int) -> int | None:
    """The chosen option index in a generated answer, or None if it names no valid option."""
    m = ANSWER_RE.search(text)
    if m is None or LETTERS.index(m.group(1)) >= n_choices:
        return None
    return LETTERS.index(m.group(1))


def categories(record: dict) -> list[str]:
    """The table columns a problem counts in, as the official evaluation assigns them: subject; context
    modality (TXT if it has a hint, IMG if it has an image, both possible; NO if neither); grade band.
    A column whose metadata the source lacks (e.g. LLaVA's file has no subject or grade) is left out."""
    cols = []
    if record.get("subject") in SUBJECTS:
        cols.append(SUBJECTS[record["subject"]])
    has_text, has_image = bool(record.get("hint")), bool(record.get("has_image") or record.get("image"))
    cols += ["TXT"] * has_text + ["IMG"] * has_image + ["NO"] * (not has_text and not has_image)
    grade = record.get("grade")
    if isinstance(grade, str) and grade.startswith("grade") and grade[5:].isdigit():
        cols.append("G1-6" if int(grade[5:]) <= 6 else "G7-12")
    return cols
