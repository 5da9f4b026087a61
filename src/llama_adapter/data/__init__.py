"""The data stage: fetch → validate → tokenize, for Alpaca and ScienceQA, plus the embedded demo data.

Every source layout is normalised by `fetch` into one folder per dataset:
  records.jsonl   one JSON object per record (schemas below), in source order
  images/         ScienceQA only: images extracted/copied as images/<pid>.png
  fetch.json      where the records came from and their digests, so a rerun can tell whether inputs changed

Alpaca record: the source object unchanged (validation checks `instruction`, `input`, `output`), but that a hub
or HF parquet source of several splits gives each record its `split` (HF's "validation" becomes "val").
ScienceQA record: the fields of the original `problems.json`, keyed and typed as listed in
SCIENCEQA_FIELDS; a field the source lacks is null (never guessed).
"""

FORMAT_VERSION = "llama-adapter-data/1"
RECORDS = "records.jsonl"  # the records of a fetched or validated folder
TOKEN_STATS = "stats.json"  # a tokenize folder's counts, split rule and provenance
FETCH_INFO = "fetch.json"  # a fetched folder's source and digests
VALIDATION_REPORT = "validation.json"  # a validated folder's counts: records kept, invalid (by reason), flagged

# Normalised ScienceQA record fields. `image` is a path relative to the dataset folder (images/<pid>.png)
# or null; `has_image` says whether the source problem had an image at all (LLaVA's file names images it
# does not ship); `split` is train / val / test (HF's "validation" becomes "val") or null if the source
# assigns none.
SCIENCEQA_FIELDS = (
    "pid", "split", "question", "choices", "answer", "hint", "image", "has_image",
    "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution",
)
# The splits fetch gives ScienceQA records from the demo and from a local or downloaded source, and the names
# --assign-splits may give; a hub dataset keeps its own split names (HF's "validation" becomes "val").
SCIENCEQA_SPLITS = ("train", "val", "test")


def in_split_order(names) -> list[str]:
    """Split names in one order, whatever order they were given in: SCIENCEQA_SPLITS' (train, val, test), then any
    other name, sorted. --assign-splits cuts its runs in this order, so a split assignment (and the workflow's
    fetch command) does not change with the order of a config's keys; train, val, test keeps the assignment that
    fractions written in that order (every shipped config's) always got."""
    rank = {name: i for i, name in enumerate(SCIENCEQA_SPLITS)}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))


def image_read_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file it cannot decode: OSError (truncated, unidentified), ValueError, SyntaxError (a
    damaged PNG chunk: "broken PNG file"), and its decompression-bomb refusal."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError
