"""Fetch: turn any supported source of Alpaca or ScienceQA into one normalised dataset folder.

The paper's data reaches us in many shapes (the Hugging Face hub, a URL, Stanford's JSON list, ScienceQA's
original problems.json, its HF parquet export, LLaVA's conversation file), and the hub is often unreachable
from the machines we run on. Every later stage therefore reads one format only (see `llama_adapter.data`),
and fetch.json records where the records came from and their digests, so a rerun can tell whether its
input changed. Contents are not judged here (the validate stage reports on them); only a source that cannot
be read at all is a `FetchError`, or one holding a value records.jsonl cannot (a NaN or an infinity, which JSON
has no number for: written, it would be no JSON, and every later reader would refuse the file; a parquet column's
bytes, timestamp or decimal, which it has no type for).

Names inside a source are untrusted: an image name or problem id is resolved inside the source's own folder
(`data.paths.inside`) before anything is opened, and one that leaves it (absolute, `..`, a symlink out) stops
the fetch naming the pid and the path (policy `fail`) or is left out, counted and listed in fetch.json (policy
`skip`: the record keeps has_image true with no image, and validate drops it as invalid). The same policy
covers an image that cannot be decoded (truncated, corrupt, not an image), a split file naming pids that the
problems do not hold, a pid in two splits or listed twice in one, or a second image for a pid whose image is already
stored (a pid given twice, as LLaVA's file may: images/<pid>.png is never overwritten with another record's picture).
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import io
import os
import shutil
import string
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from ..config import POLICIES, FetchConfig
from ..errors import FetchError, UnsafePathError
from ..io import atomic_dir, holds, json_line, read_json, read_jsonl, sha256_file, write_json
from . import FETCH_INFO, FORMAT_VERSION, RECORDS, SCIENCEQA_FIELDS, SCIENCEQA_SPLITS, image_read_errors, in_split_order
from .paths import file_name, inside, relative

Row = dict[str, Any]
# A normalised record and the image to store for it: its bytes, a checked file inside the source, None (no
# image), the refusal of an image path that leaves the source, or why a cell holds no image (a string).
Item = tuple[Row, bytes | Path | UnsafePathError | str | None]
Splits = Sequence[tuple[str, Iterable[Row]]]  # (split name, rows), as the hub and its parquet export give

ACCEPTED = {
    "alpaca": ("a JSON list file, a JSONL file, a parquet file, or a folder of HF parquet files (train-*.parquet, "
               "and validation-*.parquet, test-*.parquet if held out)"),
    "scienceqa": (
        "a folder with problems.json + pid_splits.json (+ images/<pid>/<file>), a folder of HF parquet files "
        "(train-*.parquet, validation-*.parquet, test-*.parquet), or LLaVA's conversation JSON list"
    ),
}
HF_SPLITS = ("train", "validation", "test")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_CHUNK = 1 << 20
LETTERS = string.ascii_uppercase


class Source(NamedTuple):
    kind: str  # "hf" | "url" | "path"
    sha256: str | None
    revision: str | None
    items: Iterator[Item]


class Refusals:
    """What a fetch refused under policy `skip` (counted and listed in fetch.json); under `fail` the first
    refusal stops the fetch with a FetchError naming the source, the record and the offending path."""

    def __init__(self, source: str, policy: str):
        if policy not in POLICIES:
            raise FetchError(f"fetch policy must be one of {POLICIES}, got {policy!r}")
        self.source, self.policy = source, policy
        self.images: list[dict] = []
        self.split_pids: dict[str, list[str]] = {}

    def image(self, pid: str, why: UnsafePathError | str) -> None:
        """Refuse a pid's image: a path leaving the source (never opened), or a file that is no readable image."""
        if self.policy == "fail":
            unopened = "; nothing outside the dataset is read" if isinstance(why, UnsafePathError) else ""
            raise FetchError(f"{self.source}: pid {pid}: image {why}{unopened} "
                             "(set the data validation policy to skip to leave such records out)")
        self.images.append({"pid": pid, "why": str(why)})

    def splits(self, path: Path, kind: str, pids: list[str]) -> None:
        if not pids:
            return
        if self.policy == "fail":
            raise FetchError(f"{path}: {len(pids)} pids {kind} (first: {', '.join(pids[:5])}); fix the split "
                             "file or set the data validation policy to skip to count and list them")
        self.split_pids[kind] = pids

    def summary(self) -> dict:
        """fetch.json's entries: each kind counted and listed in full (validate reads images_refused)."""
        out = {}
        if self.images:
            out["images_refused"] = {"count": len(self.images), "records": self.images}
        for kind, pids in self.split_pids.items():
            out[f"split_pids_{kind.replace(' ', '_').replace('.', '')}"] = {"count": len(pids), "pids": pids}
        return out


def fetch(dataset: str, source: str, out_dir: Path, sha256: str | None = None, revision: str | None = None,
          assign_splits: dict[str, float] | None = None, split_seed: int = FetchConfig.split_seed,
          policy: str = FetchConfig.policy) -> dict:
    """Normalise `source` into `out_dir` (records.jsonl, images/, fetch.json) and return fetch.json's content.

    `source` is `hf:<dataset id or local folder>`, an http(s) URL, or a local path; `sha256` pins a file or
    folder source, `revision` a hub source. assign_splits (ScienceQA; {split: fraction}) replaces the source's
    splits by a seeded rule (`assign_split_names`), for a source that has none, such as LLaVA's test file.
    `policy` (fail / skip) decides what an image path leaving the source, or a split file naming unknown
    pids, does (the module's docstring says how).
    """
    refusals = Refusals(source, policy)
    check_fetch_options(dataset, source, sha256, revision, assign_splits)
    out_dir = Path(out_dir)
    local = Path(source.removeprefix("hf:")).expanduser()  # a local source's path (an hf: folder's too)
    hub, remote = source.startswith("hf:"), source.startswith(("http://", "https://"))
    if not remote and local.exists() and holds(out_dir, local):
        # the folder is written whole over out_dir, and removed if the fetch fails: the source would go with it
        raise FetchError(f"--out {out_dir} is, or holds, the source {source}, which the fetch reads"
                         + (f" (the local folder {local}, which `datasets` loads in place of the hub's dataset of "
                            "that name)" if hub else "")
                         + "; writing it would replace the source (and a failed fetch would remove it): expected an "
                         "output folder apart from the source")
    if not remote and local.is_dir() and holds(local, out_dir.parent):
        raise FetchError(f"--out {out_dir} lies inside the source folder {source}, "
                         + ("whose files `datasets` reads as the dataset: the next fetch would read this one's output"
                            if hub else "whose digest (and a --sha256 pin of it) would then change with every "
                            "fetch's own output")
                         + "; expected an output folder outside the source")
    # Downloads go to a scratch folder beside the output, so that they never end up inside it and are
    # removed whether or not the fetch succeeds; it is named as atomic_dir names its partials, so that the
    # next fetch removes the scratch of one that was killed. A failed fetch leaves no earlier output behind.
    with atomic_dir(out_dir, remove_on_failure=True) as tmp, tempfile.TemporaryDirectory(
        dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"
    ) as scratch:
        try:
            src = _open(dataset, source, sha256, revision, Path(scratch), refusals)
            if dataset == "scienceqa":
                (tmp / "images").mkdir()
            records, images, missing = _write(src.items, tmp, refusals)
        except FetchError as e:  # a download's readers name its copy in the scratch folder, which goes with it
            if not remote:
                raise
            raise FetchError(str(e).replace(str(_download_path(source, Path(scratch))), source)) from e
        if not records:  # validate refuses an empty records.jsonl: no later stage could take this fetch
            raise FetchError(f"{source}: holds no {dataset} records; expected at least one")
        assigned = (None if assign_splits is None
                    else _reassign(tmp / RECORDS, assign_splits, split_seed, source))
        meta = {
            "format": FORMAT_VERSION,
            "dataset": dataset,
            "source": source,
            "source_kind": src.kind,
            "revision": src.revision,
            "source_sha256": src.sha256,
            "records": records,
            "records_sha256": sha256_file(tmp / RECORDS),
            "images": images,
            "images_missing": missing,
            **refusals.summary(),
            **({"assigned_splits": assigned} if assigned else {}),
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json(tmp / FETCH_INFO, meta)
    return meta


def assign_split_names(keys: list[str], fractions: dict[str, float], seed: int) -> list[str]:
    """Each key's split: keys ordered by sha256(seed, key) and cut into consecutive runs of the given fractions
    (rounded to whole records), one run per split in `in_split_order`. A key's split depends only on the seed,
    the set of keys and the fractions: not on file order, nor on the order the fractions are given in."""
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"{seed}\0{keys[i]}".encode()).digest())
    names, bounds, total = in_split_order(fractions), [], 0.0
    for name in names:
        total += fractions[name]
        bounds.append(round(total * len(keys)))
    split_of = [""] * len(keys)
    start = 0
    for name, end in zip(names, bounds):
        for rank in range(start, end):
            split_of[order[rank]] = name
        start = end
    return split_of


def check_fetch_options(dataset: str, source: str, sha256: str | None = None, revision: str | None = None,
                        assign_splits: dict[str, float] | None = None) -> None:
    """The settings of a fetch, each and together, before anything is read or written (the command line runs it
    before the command starts: a usage error): a known dataset, a source naming a path, a pin of its kind (a
    revision for a hub dataset, a sha256 for the others), split fractions it can follow."""
    if dataset not in ACCEPTED:
        raise FetchError(f"unknown dataset {dataset!r}; expected one of {sorted(ACCEPTED)}")
    if not source.removeprefix("hf:"):  # Path("") is the current folder: whatever lies there would be fetched
        raise FetchError(f"--source {source!r} names no path; expected hf:<dataset id or local folder>, an http(s) "
                         f"URL, or a local path: {ACCEPTED[dataset]}")
    if source.startswith("hf:") and sha256:
        raise FetchError(f"{source}: a sha256 cannot pin a hub dataset; pin its `revision` instead")
    # a revision of another source: fetch.json would record it as this data's provenance, though nothing could check it
    if not source.startswith("hf:") and revision:
        raise FetchError(f"{source}: a revision pins a hub dataset (hf:...); a URL or local source is pinned by its "
                         "sha256 instead")
    if assign_splits is not None:
        _check_fractions(dataset, assign_splits)


def _check_fractions(dataset: str, fractions: dict[str, float]) -> None:
    if dataset != "scienceqa":
        raise FetchError(f"assigning splits applies to scienceqa records (alpaca's split is made by tokenize), "
                         f"not {dataset}")
    if not fractions or set(fractions) - set(SCIENCEQA_SPLITS):
        raise FetchError(f"split fractions must name train, val and/or test; got {sorted(fractions)}")
    if not all(f > 0 for f in fractions.values()) or not abs(sum(fractions.values()) - 1) <= 1e-6:
        raise FetchError(f"split fractions must be positive and sum to 1; got {fractions}")


def _reassign(records_path: Path, fractions: dict[str, float], seed: int, source: str) -> dict:
    """Rewrite records.jsonl with each record's split assigned by `assign_split_names`; returns what fetch.json
    records of it (the rule, the counts, and the source's own split counts that it replaced). Refused, naming the
    source: a pid given twice (splits are assigned by pid), or a split whose fraction rounds to no record."""
    rows = read_jsonl(records_path, "the records.jsonl fetch writes", FetchError)
    pids = [r["pid"] for r in rows]
    first: dict[str, int] = {}
    for index, pid in enumerate(pids):
        if pid in first:
            raise FetchError(f"{source}: pid {pid!r} is given twice (records {first[pid]} and {index}); splits are "
                             "assigned by pid: expected each pid once")
        first[pid] = index
    source_splits: dict[str, int] = {}
    for row, split in zip(rows, assign_split_names(pids, fractions, seed)):
        source_splits[str(row["split"])] = source_splits.get(str(row["split"]), 0) + 1
        row["split"] = split
    with open(records_path, "w", encoding="utf-8") as f:
        f.writelines(json_line(r, f"{source}: record {index}", FetchError) for index, r in enumerate(rows))
    fractions = {name: fractions[name] for name in in_split_order(fractions)}  # fetch.json's, in the cut's order
    counts = {name: sum(r["split"] == name for r in rows) for name in fractions}
    empty = [name for name, n in counts.items() if not n]
    if empty:
        raise FetchError(f"{source}: split(s) {empty} get no record of {len(rows)} at fractions {fractions}; expected "
                         "every split named to get some: raise its fraction, or leave it out")
    return {"rule": "pids ordered by sha256(seed, pid), cut by fraction", "seed": seed, "fractions": fractions,
            "records": counts, "source_splits": source_splits}


def _open(dataset: str, source: str, sha256: str | None, revision: str | None, scratch: Path,
          refusals: Refusals) -> Source:
    if source.startswith("hf:"):  # (a pin of the other kind: refused by check_fetch_options)
        splits, revision = _load_hub(dataset, source, revision)
        # A path-only image of a hub dataset is read only from inside a local folder named as the source.
        local = Path(source.removeprefix("hf:")).expanduser()
        return Source("hf", None, revision, SPLIT_READERS[dataset](splits, local if local.is_dir() else None, source))
    if source.startswith(("http://", "https://")):
        path, kind = _download(dataset, source, scratch), "url"
    else:
        path, kind = Path(source).expanduser(), "path"
        if not path.exists():
            raise FetchError(f"source path {path} does not exist; expected {ACCEPTED[dataset]}")
    digest = _digest(path)
    if sha256 and digest != sha256.lower():
        raise FetchError(f"sha256 mismatch for {source}: expected {sha256}, got {digest}")
    return Source(kind, digest, revision, _read_path(dataset, path, refusals))


def _load_hub(dataset: str, source: str, revision: str | None) -> tuple[Splits, str | None]:
    """Load every split through `datasets`; the revision recorded is the commit it resolved (if any)."""
    import datasets

    # load_dataset_builder + download_and_prepare + as_dataset is what load_dataset does; calling the steps
    # ourselves keeps the builder, whose `hash` is the hub commit sha (for a local folder: a digest of its
    # data files), which is what makes a fetch reproducible.
    try:
        builder = datasets.load_dataset_builder(source.removeprefix("hf:"), revision=revision)
        builder.download_and_prepare()
        splits = builder.as_dataset()
    except OSError as e:  # offline, unreachable, not found: all OSError subclasses in datasets/huggingface_hub
        raise FetchError(
            f"could not load {source} through `datasets` ({type(e).__name__}: {e}). Download it where the hub "
            f"is reachable and set the source to a local path: {ACCEPTED[dataset]}"
        ) from e
    return [(name, _undecoded(ds)) for name, ds in splits.items()], builder.hash or revision


def _undecoded(ds: Any) -> Any:
    """Keep hub images as their published bytes rather than decoded PIL images, so they are stored unchanged."""
    import datasets

    if isinstance(ds.features.get("image"), datasets.Image):
        return ds.cast_column("image", datasets.Image(decode=False))
    return ds


def _download_path(url: str, scratch: Path) -> Path:
    """Where `url` is downloaded to: named like the URL's file, so that the readers dispatch on its suffix."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return scratch / (name if name not in ("", ".", "..") else "download")


def _download(dataset: str, url: str, scratch: Path) -> Path:
    dest = _download_path(url, scratch)
    if "\x00" in dest.name:  # open() would stop on it with a bare "embedded null byte", naming no URL
        raise FetchError(f"{url}: its file name {dest.name!r} decodes to a NUL byte (%00), which no file name can "
                         f"hold; expected a URL whose last path segment names the dataset file ({ACCEPTED[dataset]})")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as f:
            shutil.copyfileobj(response, f, DOWNLOAD_CHUNK)
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(
            f"could not download {url} ({e}); download it where it is reachable and set the source to a "
            f"local path: {ACCEPTED[dataset]}"
        ) from e
    return dest


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, file sha256) listing, with each symlink that
    is not read (a folder, or a file outside the folder) as (relative path, -> its target)."""
    if path.is_file():
        return sha256_file(path)
    files, links = _dataset_files(path)
    listing = "".join(f"{rel}\t{sha256_file(p)}\n" for rel, p in files)
    listing += "".join(f"{rel}\t-> {target}\n" for rel, target in links)
    return hashlib.sha256(listing.encode()).hexdigest()


def _dataset_files(root: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """(the files inside `root`, the symlinks not followed), both as sorted (relative path, ...) pairs. The walk
    does not enter symlinked folders, and a symlinked file that resolves outside `root` is never opened."""
    files, links = [], []
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            p = Path(folder) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink() and (p.is_dir() or not _is_inside(root, rel)):
                links.append((rel, os.readlink(p)))
            elif p.is_file():
                files.append((rel, p))
    return sorted(files), sorted(links)


def _is_inside(root: Path, name: str) -> bool:
    try:
        inside(root, name)
    except UnsafePathError:
        return False
    return True


def _write(items: Iterator[Item], folder: Path, refusals: Refusals) -> tuple[int, int, int]:
    """Write records.jsonl (and images/<pid>.png); return (records, images written, images missing)."""
    records = images = missing = 0
    stored: dict[str, int] = {}  # pid -> the record whose image is stored as images/<pid>.png
    with open(folder / RECORDS, "w", encoding="utf-8") as f:
        for record, image in items:
            if image is not None and not isinstance(image, str | UnsafePathError):
                try:  # the pid names the stored file: it must not lead out of the images folder
                    file_name(record["pid"])
                except UnsafePathError as e:
                    image = UnsafePathError(f"cannot be stored: the pid {e}")
                else:  # nor replace the image of an earlier record of the same pid (a pid given twice)
                    if record["pid"] in stored:
                        image = (f"{image if isinstance(image, Path) else 'embedded in the source'} cannot be stored: "
                                 f"images/{record['pid']}.png already holds the image of record {stored[record['pid']]}"
                                 f", of the same pid (record {records} gives it again); expected each pid once")
            if isinstance(image, str | UnsafePathError):
                refusals.image(record["pid"], image)
            elif image is not None:
                png = _as_png(image.read_bytes() if isinstance(image, Path) else image,
                              str(image) if isinstance(image, Path) else "embedded in the source")
                if isinstance(png, str):
                    refusals.image(record["pid"], png)
                else:
                    (folder / "images" / f"{record['pid']}.png").write_bytes(png)
                    record["image"] = f"images/{record['pid']}.png"
                    stored[record["pid"]] = records
                    images += 1
            elif record.get("has_image"):
                missing += 1
            # the record's number in the source's order (its pid too, for ScienceQA), as the source is to be fixed
            pid = f" (pid {record['pid']})" if isinstance(record.get("pid"), str) else ""
            f.write(json_line(record, f"{refusals.source}: record {records}{pid}", FetchError))
            records += 1
    return records, images, missing


def _as_png(data: bytes, name: str) -> bytes | str:
    """The image as PNG bytes, or why it is no readable image. Decoded in full either way, so that a truncated
    or corrupt file is refused here, naming its pid, rather than stored for encode-images to trip over."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if data.startswith(PNG_SIGNATURE):
                return data  # stored byte for byte, so its digest still matches the source's
            out = io.BytesIO()
            im.save(out, format="PNG")
    except UnidentifiedImageError:  # its message names the in-memory buffer, which fetch.json would keep
        return f"{name} is not an image in any format PIL reads"
    except image_read_errors() as e:
        return f"{name} cannot be decoded ({e})"
    return out.getvalue()


def _read_path(dataset: str, path: Path, refusals: Refusals) -> Iterator[Item]:
    """Dispatch a local file or folder to the reader of its layout."""
    if path.is_dir():
        files = {rel for rel, _ in _dataset_files(path)[0]}  # a symlink out of the folder is no file of it
        if dataset == "scienceqa" and {"problems.json", "pid_splits.json"} <= files:
            return _scienceqa_original(path, refusals)
        if splits := _parquet_splits(path):
            return SPLIT_READERS[dataset](splits, path, str(path))
    elif dataset == "alpaca" and path.suffix in ALPACA_FILES:
        return _alpaca_file(path)
    elif dataset == "scienceqa" and path.suffix == ".json":
        return _scienceqa_llava(path)
    raise FetchError(f"{path} is not a known {dataset} layout; accepted: {ACCEPTED[dataset]}")


# --- file formats ---


def _load_json(path: Path, expected: type) -> Any:
    value = read_json(path, f"a JSON {expected.__name__} (a dataset file)", FetchError, allow_nan=False)
    if not isinstance(value, expected):
        raise FetchError(f"{path} holds a JSON {type(value).__name__}, expected a {expected.__name__}")
    return value


def _jsonl_rows(path: Path) -> list[Any]:
    return read_jsonl(path, "one JSON object per line (a dataset file)", FetchError)


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
    except pyarrow.ArrowException as e:
        raise FetchError(f"{path} is not a parquet file: {e}") from e
    while True:
        # A footer that reads says nothing of the pages: damaged ones fail here, as a bare OSError naming no file.
        try:
            batch = next(batches, None)
        except (pyarrow.ArrowException, OSError) as e:
            raise FetchError(f"{path} cannot be read as a parquet file ("
                             f"{' '.join(str(e).split())}); expected an intact parquet file") from e
        if batch is None:
            return
        yield from batch.to_pylist()


def _parquet_splits(folder: Path) -> list[tuple[str, Iterator[Row]]]:
    """HF's parquet export: <split>-NNNNN-of-NNNNN.parquet shards, possibly under data/, read in shard order."""
    files = _dataset_files(folder)[0]
    shards = {split: [p for _, p in files if fnmatch.fnmatch(p.name, f"{split}-*.parquet")] for split in HF_SPLITS}
    # beside the shards, a parquet file of no split (test.parquet, dev-*.parquet) would be left out unsaid
    unread = sorted(rel for rel, p in files if p.suffix == ".parquet" and not any(p in s for s in shards.values()))
    if unread and any(shards.values()):
        shown = ", ".join(unread[:5]) + (", ..." if len(unread) > 5 else "")
        raise FetchError(f"{folder}: {len(unread)} parquet file(s) name no split of {', '.join(HF_SPLITS)} ({shown}), "
                         "so their records would be left out; expected HF's <split>-NNNNN-of-NNNNN.parquet shards "
                         "alone (rename those files, or move them out of the folder)")
    return [(split, (row for f in files for row in _parquet_rows(f))) for split, files in shards.items() if files]


# --- Alpaca ---

ALPACA_FILES = {".json": lambda path: _load_json(path, list), ".jsonl": _jsonl_rows, ".parquet": _parquet_rows}


def _alpaca_file(path: Path) -> Iterator[Item]:
    for i, row in enumerate(ALPACA_FILES[path.suffix](path)):
        if not isinstance(row, dict):
            raise FetchError(f"{path}: record {i} is a {type(row).__name__}, not an object")
        yield row, None


def _alpaca_splits(splits: Splits, root: Path | None, source: str) -> Iterator[Item]:
    """HF's Alpaca rows (hub or parquet export). From a source of several splits each record keeps its own, as
    ScienceQA's do (`_scienceqa_splits`), for `tokenize --split-by field`: pooled, a held-out row could be drawn
    into training. A source of one split (tatsu-lab/alpaca's train alone) gives its rows unchanged, as a file does."""
    # tatsu-lab/alpaca adds `text`, the prompt already filled in; the tokenize stage builds its own.
    index = 0
    for name, rows in splits:
        for row in rows:
            record = {k: v for k, v in row.items() if k != "text"}
            if len(splits) > 1:
                split = _split_name(name)
                if record.get("split", split) != split:  # which of the two holds the row would be a guess
                    raise FetchError(f"{source}: record {index} (split {name}) holds split {record['split']!r:.60}; "
                                     f"expected none, or its own split {split!r}")
                record["split"] = split
            yield record, None
            index += 1


# --- ScienceQA ---


def _scienceqa_record(pid: str, split: str | None, has_image: bool, fields: Row) -> Row:
    """Key a record exactly as SCIENCEQA_FIELDS; `image` is filled in once the image is stored."""
    fixed = {"pid": pid, "split": split, "image": None, "has_image": has_image}
    return {key: fixed[key] if key in fixed else fields.get(key) for key in SCIENCEQA_FIELDS}


def _split_name(name: str) -> str:
    """A record's split from its HF split's name: HF's "validation" is our "val" (SCIENCEQA_SPLITS)."""
    return "val" if name == "validation" else name


def _scienceqa_splits(splits: Splits, root: Path | None, source: str) -> Iterator[Item]:
    """HF's ScienceQA rows (hub or parquet export) from a local folder `root`, or from the hub (root None); a row
    names no source in an error (its record number and pid do, in `_write`)."""
    # The hub's rows carry no pid: number them within their split, as the HF export orders them.
    for name, rows in splits:
        split = _split_name(name)
        for i, row in enumerate(rows):
            image = row.get("image")  # {"bytes", "path"} or None
            yield _scienceqa_record(f"{split}-{i}", split, image is not None, row), _hf_image(image, root)


def _hf_image(image: Any, root: Path | None) -> bytes | Path | UnsafePathError | str | None:
    """An HF image cell's embedded bytes; failing those, its path, read only from inside the local folder. A cell
    that is no {bytes, path} struct is refused: why, as a string (the fetch policy decides, naming the pid)."""
    if not image:
        return None
    if not isinstance(image, dict):
        return (f"cell is a {type(image).__name__} ({image!r:.60}), not an image; expected HF's image struct "
                "{bytes, path} or null")
    if image.get("bytes"):
        if not isinstance(image["bytes"], bytes):  # (a string here would read as the reason it holds no image)
            return (f"cell's bytes are a {type(image['bytes']).__name__} ({image['bytes']!r:.60}), not bytes; "
                    "expected HF's image struct {bytes, path} or null")
        return image["bytes"]
    if not image.get("path"):
        return None
    if root is None:
        return UnsafePathError(f"{image['path']!r} is a path without embedded bytes in a hub dataset, which has "
                               "no local folder to read it from")
    return _existing(root, [image["path"]])


def _existing(root: Path, names: list[str]) -> Path | UnsafePathError | None:
    """The first of `names` that is a file inside `root`; the refusal if any of them leaves `root`."""
    try:
        paths = [inside(root, name) for name in names]
    except UnsafePathError as e:
        return e
    return next((p for p in paths if p.is_file()), None)


def read_pid_splits(path: Path) -> dict[str, str]:
    """pid -> train / val / test from ScienceQA's pid_splits.json (trainval, minitrain, ... are subsets)."""
    return _pid_splits(path)[0]


def _pid_splits(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(pid -> split, the pids refused per kind: listed in more than one of train / val / test, or listed twice in
    one of them; each keeps its first split). The two are told apart, as the split file is to be fixed by them."""
    pid_splits = _load_json(path, dict)
    split_of: dict[str, str] = {}
    twice: dict[str, list[str]] = {"in two splits": []}
    for split in SCIENCEQA_SPLITS:
        pids = pid_splits.get(split, [])
        if not isinstance(pids, list):
            raise FetchError(f"{path}: {split!r} holds a JSON {type(pids).__name__}, expected a list of pids")
        for pid in map(str, pids):
            if pid not in split_of:
                split_of[pid] = split
            else:
                kind = f"listed twice in {split}" if split_of[pid] == split else "in two splits"
                twice.setdefault(kind, []).append(pid)
    return split_of, twice


def _scienceqa_original(folder: Path, refusals: Refusals) -> Iterator[Item]:
    problems = _load_json(folder / "problems.json", dict)
    split_of, twice = _pid_splits(folder / "pid_splits.json")
    for kind, pids in twice.items():
        refusals.splits(folder / "pid_splits.json", kind, pids)
    refusals.splits(folder / "pid_splits.json", "not in problems.json", [p for p in split_of if p not in problems])
    for pid, problem in problems.items():
        if not isinstance(problem, dict):
            raise FetchError(f"{folder / 'problems.json'}: problem {pid} is a {type(problem).__name__}, not an object")
        split, name = split_of.get(pid), problem.get("image")
        yield _scienceqa_record(pid, split, bool(name), problem), _problem_image(folder, split, pid, name)


def _problem_image(folder: Path, split: str | None, pid: str, name: Any) -> Path | UnsafePathError | None:
    """The problem's image file, at images/<pid>/<name> or (as ScienceQA's zips unpack) images/<split>/<pid>/<name>."""
    if not name:
        return None
    try:  # the name alone must be relative: joined below a folder, "/x" would read as "images/<pid>//x"
        relative(name, folder)
    except UnsafePathError as e:
        return e
    return _existing(folder, [f"images/{pid}/{name}"] + ([f"images/{split}/{pid}/{name}"] if split else []))


def _scienceqa_llava(path: Path) -> Iterator[Item]:
    """LLaVA's conversation file: question, context and options folded into one prompt, the answer a letter.
    Its `image` (<pid>/image.png) is read from beside the file, or from images/ there, where it is shipped."""
    for i, item in enumerate(_load_json(path, list)):
        try:
            pid, human, answer = item["id"], item["conversations"][0]["value"], item["conversations"][1]["value"]
            # The text is cut at "\n" (the image tag, the options, the hint from the question): with "\r\n" (or a
            # bare "\r") no line would end in "?" and each would keep a "\r"; read as the "\n" they stand for.
            human = human.replace("\r\n", "\n").replace("\r", "\n")
            text, choices = _split_options(human.removeprefix("<image>\n"))
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise FetchError(f"{path}: item {i} is not a LLaVA conversation ({e!r})") from e
        # the id becomes the pid as text: a null, list, bool or float would pass as the pid "None", "[1]", "True"
        if isinstance(pid, bool) or not isinstance(pid, str | int):
            raise FetchError(f"{path}: item {i}: id {pid!r:.60} is a {type(pid).__name__}; expected a string (the "
                             "problem's id)")
        hint, question = _split_context(text)
        fields = {"question": question, "hint": hint, "choices": choices, "answer": _letter_index(answer)}
        # Usually the file names images it does not ship: has_image says so, image stays null.
        name = item.get("image")
        image = None if name is None else _existing(path.parent, [name, f"images/{name}"])
        yield _scienceqa_record(str(pid), None, "image" in item, fields), image


def _split_context(text: str) -> tuple[str | None, str]:
    """(hint, question) of LLaVA's text, which opens with "Context: <hint>" when the hint is not empty. Both
    may span lines: the question starts at the last of the final three lines that ends in "?" (a two-line
    question asks first, then quotes what it asks about), else at the last line. This gives the original
    hint and question for every one of the 50 test problems that problems_150.json also holds."""
    if not text.startswith("Context: "):
        return None, text
    lines = text.removeprefix("Context: ").split("\n")
    asks = [i for i in range(max(1, len(lines) - 3), len(lines)) if lines[i].endswith("?")]
    start = asks[-1] if asks else len(lines) - 1
    return "\n".join(lines[:start]) or None, "\n".join(lines[start:])


def _split_options(prompt: str) -> tuple[str, list[str]]:
    """Split off the trailing options "A. …", "B. …"; a line not opening the next letter continues the option
    before it (letter closings and poems span several lines)."""
    lines = prompt.split("\n")
    # The last line starting "A. " opens the options; earlier ones (say "A. Lincoln said…") belong to the text.
    start = max((i for i, line in enumerate(lines) if line.startswith("A. ")), default=None)
    if start is None:
        return prompt, []
    choices: list[str] = []
    for line in lines[start:]:
        if len(choices) < len(LETTERS) and line.startswith(f"{LETTERS[len(choices)]}. "):
            choices.append(line[3:])
        else:
            choices[-1] += "\n" + line
    return "\n".join(lines[:start]), choices


def _letter_index(letter: Any) -> int | None:
    return LETTERS.index(letter) if isinstance(letter, str) and len(letter) == 1 and letter in LETTERS else None


SPLIT_READERS = {"alpaca": _alpaca_splits, "scienceqa": _scienceqa_splits}
