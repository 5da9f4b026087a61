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


# "The answer is (X)" ("the" mid-sentence too), or a bare letter that stands alone ("The answer is B.", or at a
# line's end, spaces and a Windows line end "\r\n" before it included): not the first letter of an option's text
# ("The answer is Earth." names no option; read as (E), it was right or wrong by chance), and not "answer is (X)"
# without "the" ("Answer: answer is (A)." was read as (A), "Answer is (A)." not).
ANSWER_RE = re.compile(r"\b[Tt]he answer is (?:\(([A-E])\)|([A-E])(?=[.,;:!?)]|[ \t\r]*(?:\n|$)))")
ANY_LETTER_RE = re.compile(r"\(([A-E])\)")


def parse_answer(text: str, n_choices: int, pattern: re.Pattern = ANSWER_RE) -> int | None:
    """The chosen option index in a generated answer, or None if it names no valid option or names two different
    ones (as the official ScienceQA evaluation fails an output with more than one answer; the same answer said
    twice is that answer). The default pattern is the paper's "The answer is (X)"; ANY_LETTER_RE reads "(X)" in
    any wording."""
    letters = {next(g for g in m.groups() if g) for m in pattern.finditer(text)}
    if len(letters) != 1 or LETTERS.index(next(iter(letters))) >= n_choices:
        return None
    return LETTERS.index(letters.pop())


GRADE_RE = re.compile(r"grade([1-9]|1[0-2])")


def grade_number(grade: object) -> int | None:
    """1..12 for ScienceQA's "grade1" ... "grade12"; None for anything else."""
    m = GRADE_RE.fullmatch(grade) if isinstance(grade, str) else None
    return int(m.group(1)) if m else None


def categories(record: dict) -> list[str]:
    """The table columns a problem counts in, as the official evaluation assigns them: subject; context
    modality (TXT if it has a hint, IMG if it has an image, both possible; NO if neither); grade band.
    A column whose metadata the source lacks (e.g. LLaVA's file has no subject or grade) is left out;
    validation refuses a subject or grade that is present but not one of these (data/validate.py)."""
    cols = []
    subject = record.get("subject")
    if isinstance(subject, str) and subject in SUBJECTS:
        cols.append(SUBJECTS[subject])
    has_text, has_image = bool(record.get("hint")), bool(record.get("has_image") or record.get("image"))
    cols += ["TXT"] * has_text + ["IMG"] * has_image + ["NO"] * (not has_text and not has_image)
    grade = grade_number(record.get("grade"))
    if grade is not None:
        cols.append("G1-6" if grade <= 6 else "G7-12")
    return cols
