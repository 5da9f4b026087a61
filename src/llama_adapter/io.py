"""Writing outputs so that a failure never leaves a partial file or folder under the final name; reading JSON
and JSON Lines with errors that name the file, the line and what was expected.

A write goes to a hidden `.<name>.<random>.partial` beside the destination and is renamed onto it only when
complete. A run killed outright (SIGKILL, a node lost, a job's time limit) cannot remove its partial, so the
next write of the same destination removes the partials earlier runs left: the pipeline runs one writer per
destination at a time (Snakemake locks a job's outputs; a stage is one process, and under torchrun only rank 0
writes; a training also holds its folder against a second one outside Snakemake's lock: hold), so a partial of
this destination that exists when a write starts belongs to a run that is dead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import DataError, InputError, OutputInUse

# tempfile's names: `prefix` + 8 characters from this alphabet + `suffix`; matched exactly, so that the
# partials of `x` are never confused with those of `x.y` (whose prefix `.x.y.` is not followed by 8 of these).
_RANDOM = r"[a-z0-9_]{8}"


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}."


def stale_partials(dest: Path) -> list[Path]:
    """Leftovers of earlier writes of `dest` that never finished: its `.partial` files or folders, and the
    `.<name>.old` that atomic_dir moves the previous output to while it swaps the new one in."""
    dest = Path(dest)
    pattern = re.compile(re.escape(_partial_prefix(dest)) + _RANDOM + r"\.partial")
    try:
        names = os.listdir(dest.parent)
    except FileNotFoundError:
        return []
    return [dest.parent / n for n in sorted(names) if pattern.fullmatch(n) or n == f".{dest.name}.old"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clean_stale_partials(dest: Path) -> list[Path]:
    """Remove what killed earlier writes of `dest` left beside it (see stale_partials); return those paths.
    Safe only because one writer per destination runs at a time (the module docstring says why)."""
    stale = stale_partials(dest)
    for path in stale:
        _remove(path)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def own_name(dest: str | os.PathLike, what: str = "output") -> Path:
    """`dest` as a Path, refused (InputError naming `what` and the path) where it ends in no name of its own: '.',
    '..', 'sub/..' or '/'. Path knows no folder holding such a path (Path('..').parent is '.'), so that the partial
    beside it, the swap and a failed write's removal all miss: the clean-up removed the current folder, or the one
    above it, with all it held, as the failed run's output."""
    dest = Path(dest)
    if dest.name in ("", ".."):
        raise InputError(f"{what} {dest}: names the current folder or one above it, not an output of its own "
                         "(written whole, or removed as a failed run's, it would take that folder's other files with "
                         f"it); expected a path ending in the output's own name, such as {dest / 'out'}")
    return dest


@contextmanager
def _named(dest: Path) -> Iterator[None]:
    """An OSError while preparing to write `dest` (its folder cannot be made, no permission) names `dest`,
    not the hidden partial."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"cannot be written ({e.strerror or e})", str(dest)) from e


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`, renamed onto it only if the block succeeds. Partials that killed
    earlier writes of `dest` left are removed first."""
    dest = own_name(dest)
    with _named(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(dest)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_partial_prefix(dest), suffix=".partial")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename; a plain file's mode instead
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(dest: Path, remove_on_failure: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest` that replaces `dest` (and whatever it held) on success.

    On failure the temporary folder goes; `dest` itself is kept as it was, or, with `remove_on_failure`,
    removed too: a stage whose run failed must not leave an earlier run's output where the next stage would
    take it for this run's. Partials that killed earlier writes of `dest` left are removed first."""
    dest = own_name(dest)
    with _named(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(dest)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_partial_prefix(dest), suffix=".partial"))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename; a plain folder's mode instead
    try:
        yield tmp
        if dest.exists() or dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old")
            _remove(old)
            os.replace(dest, old)
            os.replace(tmp, dest)
            _remove(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        if remove_on_failure:
            remove_output(dest)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def removed_on_failure_if_new(folder: Path) -> Iterator[None]:
    """Run the block; if it fails and `folder` was not there before it, remove `folder` where it is left empty: the
    block's own clean-up (evaluate's) has removed the failed run's files, and a stage that makes its output folder as
    it writes (evaluate's tracker) must not leave it, even empty, to pass for a run's output. Nothing else in it is
    removed: another process may have written there meanwhile (a second evaluate, or an MLflow store given the same
    folder). A folder that was there is kept."""
    made = not (folder.exists() or folder.is_symlink())
    try:
        yield
    except BaseException:
        if made:
            with contextlib.suppress(OSError):  # not empty (another's files), or gone
                folder.rmdir()
        raise


def holds(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether `folder` is `path` or one of the folders above it, symlinks resolved: replacing or removing
    `folder` would take `path` with it."""
    outer, inner = os.path.realpath(folder), os.path.realpath(path)
    return os.path.commonpath([outer, inner]) == outer


def remove_output(dest: Path) -> None:
    """Remove a stage's output (file or folder) and any partials of it, so that nothing of an earlier run
    remains under its name."""
    dest = own_name(dest)
    if dest.exists() or dest.is_symlink():
        _remove(dest)
    clean_stale_partials(dest)


# The folders this process holds. A POSIX lock belongs to the process: it never refuses the process its own, and
# closing any descriptor of the file, the holder's or not, releases it; so a second hold of a folder in this
# process is refused here, before it opens the file.
_held: set[str] = set()
_held_guard = threading.Lock()
IN_USE_ERRNOS = (errno.EACCES, errno.EAGAIN)  # what a non-blocking lockf raises where another process holds it


@contextmanager
def hold(folder: Path, what: str, option: str) -> Iterator[None]:
    """Hold `folder` for this process alone while the block runs; a second process asking for it gets OutputInUse
    at once, naming the folder and this process (pid, host, start: written in its lock_file), `what` it is
    (a training) and the `option` that named the folder.

    The lock is fcntl's POSIX record lock (lockf), not flock: NFS takes it to the server (NLM, NFSv4's own locks),
    so that it holds against processes on other nodes too, where a Linux client only emulates flock with it (and
    keeps flock to the host under `local_lock=flock`); Lustre honours both with `-o flock`, and neither across
    nodes with `-o localflock`. The kernel drops it when the process ends however it ends, SIGKILL included: the
    lock_file a killed holder leaves blocks no one, and the next holder writes itself over it. A node lost with
    its lock is another matter on NFS: NFSv4 frees the lock once the server's lease on the node expires (about 90
    s), NFSv3's lock manager only when that node starts again; the refusal names the lock file to delete where the
    holder's host is gone. A holder that ends removes the file, still locked, so that a refused or finished command
    leaves nothing behind. Where the lock file cannot be made or locked (a parent folder this user may not write,
    a read-only one, a file system that takes no lock, a symlink in its place) the folder goes unguarded, said in
    one line on stderr. Any code of the holding process that opens and closes the lock file drops the lock (POSIX
    locks are the process's): nothing but this reads it."""
    path = lock_file(folder)
    key = str(path)
    with _held_guard:
        if key in _held:
            raise OutputInUse(f"{option} {folder} is in use by another {what} in this process (pid {os.getpid()}); "
                              "expected one at a time: wait for it to end")
        _held.add(key)
    try:
        fd = locked(path, folder, what, option)
        if fd is None:
            yield
            return
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": datetime.now().astimezone().isoformat(timespec="seconds")}
                                    ).encode() + b"\n")
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: a process that opened it meanwhile locks anew
            os.close(fd)  # and with it the lock
    finally:
        with _held_guard:
            _held.discard(key)


def locked(path: Path, folder: Path, what: str, option: str) -> int | None:
    """A descriptor of the lock file `path`, locked by this process (hold); None where it cannot be made or locked
    (said on stderr). OutputInUse where another process holds it."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: in a folder anyone may write (/tmp), a symlink put in the lock file's place would have
            # its target truncated
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            return unguarded(path, folder, what, f"cannot be made ({e.strerror or e})")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            in_use = e.errno in IN_USE_ERRNOS
            message = (f"{option} {folder} is in use by another {what}: {holder(fd, path)}; wait for it to end, or "
                       f"stop that process, then run this again (if its host is gone, delete {path})")
            os.close(fd)
            if in_use:
                raise OutputInUse(message) from None
            return unguarded(path, folder, what, f"cannot be locked ({e.strerror or e})")
        if path.exists() and os.path.samestat(os.fstat(fd), path.stat()):
            return fd
        os.close(fd)  # a file its holder removed as it ended, after this process opened it: lock the new one


def unguarded(path: Path, folder: Path, what: str, why: str) -> None:
    print(f"llama-adapter: warning: {path} {why}: a second {what} of {folder} would not be refused", file=sys.stderr,
          flush=True)


def held_elsewhere(folder: Path) -> bool:
    """Whether another process (or another hold of this one) holds `folder` now (hold): a command that fails must
    then leave the folder's outputs alone, as the holder's. A probe: it locks the lock file for an instant."""
    path = lock_file(folder)
    if str(path) in _held:
        return True
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:  # no lock file: no holder (a holder's file is there while it holds)
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in IN_USE_ERRNOS
    finally:
        os.close(fd)
    return False


def lock_file(folder: Path) -> Path:
    """The file hold locks for `folder`: beside it (the folder's own files stay the command's outputs alone, and a
    refused command creates no folder), named after the folder its path resolves to (a symlink to it locks it too)."""
    real = Path(os.path.realpath(folder))
    return real.parent / f".{real.name}.lock"


def holder(fd: int, path: Path) -> str:
    """Who holds a lock, as its lock_file says: pid, host and start time."""
    try:
        who = json.loads(os.pread(fd, 4096, 0))
        return f"pid {who['pid']} on host {who['host']}, started {who['started']}"
    except (ValueError, TypeError, KeyError):  # it has not written itself yet
        return f"a process that has not yet written its pid, host and start in {path}"


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the header's __metadata__ keys in sorted order: safetensors keeps them in a Rust
    HashMap and writes them in its random order (safetensors#584), so that the same tensors saved twice differed
    in their bytes and sha256. The header is rewritten in place: the same keys and values in another order have
    the same length, and the tensors' offsets are relative to the header's end."""
    from safetensors.torch import save_file  # torch's, imported only where weights are saved

    save_file(tensors, path, metadata=metadata)
    if not metadata:
        return
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = f.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > size:  # JSON escaped otherwise than safetensors does: keep its header as written
            return
        f.seek(8)
        f.write(canonical.ljust(size, b" "))  # safetensors pads its header with spaces too


def read_npy(path: Path, where: str, remedy: str, error: type[Exception] = DataError):
    """A .npy array, memory-mapped. A file numpy cannot read (empty, truncated, not .npy, pickled objects) is `error`
    naming `where` and the file, then `remedy`: numpy's own message names no file."""
    import numpy as np

    try:
        return np.load(path, mmap_mode="r")
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, UnpicklingError for damaged files
        raise error(f"{where}: {Path(path).name} is not a readable numpy array ({type(e).__name__}: {e}); "
                    f"{remedy}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    return _sha256_update(hashlib.sha256(), path, chunk).hexdigest()


def sha256_tree(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a folder's files: each one's path relative to the folder, then its bytes, in sorted
    order (so renaming a file changes the digest, and the listing order of the file system does not)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path, chunk)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        _sha256_update(digest, f, chunk)
    return digest.hexdigest()


def _sha256_update(digest, path: Path, chunk: int):
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest


# JSON may spell a lone UTF-16 surrogate as an escape; Python then holds a str that cannot be written as UTF-8.
LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(value: Any) -> None:
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k)
            _check_unicode(v)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v)


def _read_bytes(path: Path, expected: str, error: type[Exception]) -> bytes:
    """A file's bytes; a folder, a missing file or a read failure is `error` naming the file."""
    if path.is_dir():
        raise error(f"{path}: is a folder; expected {expected}")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file; expected {expected}") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e}); expected {expected}") from None


def read_json(path: str | os.PathLike, expected: str = "a JSON file", error: type[Exception] = DataError,
              allow_nan: bool = True) -> Any:
    """The value of a JSON file. Any fault is `error` (the caller's kind: DataError, CheckpointError, ...) naming
    the file and what was expected there: missing, a folder, unreadable, not UTF-8, not JSON, a string with a
    lone surrogate (which no UTF-8 file can hold when written again), or an object with a repeated key (json would
    keep the last value silently: a ScienceQA problem given twice, lost uncounted). A leading byte-order mark is
    read past. Without `allow_nan`, a NaN, Infinity, -Infinity or a number beyond the floats is not JSON either: a
    dataset file must not hold one, as records.jsonl cannot. It is allowed by default because the pipeline's own
    JSON files hold them by design (scores.json's perplexity is Infinity where exp(loss) overflows, metrics.json's
    validation loss NaN over no targets), and the report checks those values itself, naming the key."""
    path = Path(path)
    data = _read_bytes(path, expected, error)
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as a JSON Lines file's, is read past
        value = json.loads(text, object_pairs_hook=no_duplicate_keys,
                           **({} if allow_nan else FINITE_ONLY))
        if LONE_SURROGATE_ESCAPE.search(text):
            _check_unicode(value)
        return value
    except _NonFinite as e:
        raise error(f"{path}{_non_finite_place(text, records=True)}: not valid JSON ({e}); expected {expected}"
                    ) from None
    except UnicodeEncodeError:
        raise error(f"{path}: a string holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair); "
                    f"expected valid Unicode text ({expected})") from None
    except DuplicateKey as e:
        raise error(f"{path}{_repeated_key(text, e.args[0], records=True)} appears twice in one object; expected "
                    f"each key once ({expected})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected {expected}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or a number Python will not read (over 4300 digits)
        raise error(f"{path}: not valid JSON ({e}); expected {expected}") from None


def read_json_object(path: str | os.PathLike, expected: str = "the JSON object a pipeline stage writes",
                     error: type[Exception] = DataError) -> dict:
    """A JSON file holding an object (read_json), else `error`."""
    value = read_json(path, expected, error)
    if not isinstance(value, dict):
        raise error(f"{path}: holds a JSON {type(value).__name__}; expected {expected}")
    return value


def read_string_list(path: str | os.PathLike, expected: str, error: type[Exception] = DataError, item: str = "item",
                     distinct: bool = False) -> list[str]:
    """A JSON file holding a list of strings (read_json), else `error` naming the file, the first entry that is not
    a string (by its index, as `item` i) and, with `distinct`, the first given twice, and what was expected: a list
    that keys something (a split's samples, a feature cache's rows) read as it came would give a key another's
    entry, or none, unsaid."""
    values = read_json(path, expected, error)
    if not isinstance(values, list):
        raise error(f"{path}: holds a JSON {type(values).__name__}; expected {expected}")
    if (i := next((i for i, v in enumerate(values) if not isinstance(v, str)), None)) is not None:
        raise error(f"{path}: {item} {i} is not a string ({type(values[i]).__name__} {values[i]!r:.80}); expected "
                    f"{expected}")
    if distinct:
        first: dict[str, int] = {}
        for i, v in enumerate(values):
            if v in first:
                raise error(f"{path}: {item} {i} repeats {item} {first[v]}'s {v!r:.80}; expected {expected}")
            first[v] = i
    return values


class DuplicateKey(Exception):
    """A key given twice in one JSON object (its args: the key)."""


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads' object_pairs_hook that refuses a key given twice in one object (DuplicateKey): json keeps the last
    value silently, as any reader of a JSON object written by hand, or edited, would not expect."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


class _Pairs(list):
    """An object's (key, value) pairs as read, a repeated key kept."""


def _repeated_key(text: str, key: str, records: bool) -> str:
    """Where in `text` the object no_duplicate_keys refused for `key` sits, for a message: ", record 17: key
    'output'" (records: an item of a top-level list is a record, as Alpaca's), ", at ['123']['hint']: key 'x'" (the
    keys down to it), ": key '1'" (the top-level object). Read again keeping every pair, as the hook is told no
    place; a value nested too deep to walk is told by its key alone."""
    try:
        keys = _first_repeat(json.loads(text, object_pairs_hook=_Pairs), [])
    except (RecursionError, ValueError):  # (a number too long to read, after the repeated key)
        keys = []
    return _place(keys or [], records) + f": key {key!r}"


def _place(keys: list, records: bool) -> str:
    """The keys down to a value, for a message: ", record 17, at ['output']" (records: an item of a top-level list
    is a record, as Alpaca's), ", at ['123']['hint']", or "" (the top level)."""
    keys = list(keys)
    where = [f"record {keys.pop(0)}"] if records and keys and isinstance(keys[0], int) else []
    where += ["at " + "".join(f"[{k!r}]" for k in keys)] if keys else []
    return "".join(f", {w}" for w in where)


class _NonFinite(Exception):
    """A NaN, Infinity or -Infinity where JSON has none: json reads and writes them by default (as bare words that
    are no JSON: other readers refuse them), so that one in a source would pass into records.jsonl unseen."""


def _no_constant(name: str) -> float:
    """json's parse_constant hook, called for NaN, Infinity and -Infinity: refuse them."""
    raise _NonFinite(f"{name}: JSON has no NaN or Infinity, only finite numbers")


def _finite_float(text: str) -> float:
    """json's parse_float hook: a number beyond the floats (1e400) would be read as infinity, unseen."""
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"{text}: beyond the largest float (read as infinity); expected finite numbers")
    return value


# The json.loads hooks that refuse a NaN or an infinity, written or reached (_NonFinite).
FINITE_ONLY = {"parse_constant": _no_constant, "parse_float": _finite_float}


def _first_where(value: Any, is_it: Callable[[Any], bool], keys: list | None = None) -> tuple[list, Any] | None:
    """(the keys down to the first value under `value`, itself included, of which `is_it` holds, in the order of its
    text, and that value); None where there is none."""
    keys = keys or []
    if is_it(value):
        return keys, value
    inside = (value if isinstance(value, _Pairs) else value.items() if isinstance(value, dict)
              else enumerate(value) if isinstance(value, list | tuple) else ())
    for k, v in inside:
        if (found := _first_where(v, is_it, [*keys, k])) is not None:
            return found
    return None


def _non_finite(value: Any) -> bool:
    """A NaN or an infinity: no JSON number."""
    return isinstance(value, float) and not math.isfinite(value)


def _not_json(value: Any) -> bool:
    """A value JSON has no type for: bytes, a date, a Decimal, as a parquet column holds them."""
    return not (value is None or isinstance(value, str | int | float | dict | list | tuple))


def _non_finite_place(text: str, records: bool) -> str:
    """Where in `text` the number FINITE_ONLY's hooks refused sits (_place), read again keeping every pair, as a
    hook is told no place; "" where it cannot be read again (nested too deep, a number too long after it)."""
    try:
        found = _first_where(json.loads(text, object_pairs_hook=_Pairs), _non_finite)
    except (RecursionError, ValueError):
        found = None
    return _place(found[0], records) if found else ""


def _first_repeat(value: Any, keys: list) -> list | None:
    """The keys down to the first object under `value` holding a key twice, in the order json ends objects (an
    object after those inside it): the one no_duplicate_keys refused."""
    inside = value if isinstance(value, _Pairs) else enumerate(value) if isinstance(value, list) else ()
    for k, v in inside:
        if (found := _first_repeat(v, [*keys, k])) is not None:
            return found
    if isinstance(value, _Pairs) and len({k for k, _ in value}) < len(value):
        return keys
    return None


def read_jsonl_lines(path: str | os.PathLike, expected: str = "a JSON Lines file",
                     error: type[Exception] = DataError) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON Lines file. Any fault is `error` naming the file
    (and line): missing, a folder, unreadable, not UTF-8, not JSON (NaN, Infinity, -Infinity and numbers beyond
    the floats included: every JSON Lines file read here is data, records or requests, which never holds one,
    unlike read_json's files), or an object with a repeated key (json would silently keep only the last value).
    `expected` says what the caller wanted there."""
    path = Path(path)
    out = []
    for line_no, data in enumerate(_read_bytes(path, expected, error).split(b"\n"), 1):
        try:
            text = data.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{path}, line {line_no}: not UTF-8 text ({e.reason} at byte {e.start}); "
                            f"expected {expected}") from None
        if not text.strip():
            continue
        try:
            value = json.loads(text, object_pairs_hook=no_duplicate_keys, **FINITE_ONLY)
            if LONE_SURROGATE_ESCAPE.search(text):
                _check_unicode(value)
            out.append((line_no, value))
        except _NonFinite as e:
            raise error(f"{path}, line {line_no}{_non_finite_place(text, records=False)}: not valid JSON ({e}); "
                        f"expected one JSON value per line ({expected})") from None
        except UnicodeEncodeError:
            raise error(f"{path}, line {line_no}: a string holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                            "escape without its pair); expected valid Unicode text") from None
        except DuplicateKey as e:
            raise error(f"{path}, line {line_no}{_repeated_key(text, e.args[0], records=False)} appears twice in "
                            "one object; expected each key once") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, or a number too long to read (see read_json)
            raise error(f"{path}, line {line_no}: not valid JSON ({e}); expected one JSON value per line "
                            f"({expected})") from None
    return out


def read_jsonl(path: str | os.PathLike, expected: str = "a JSON Lines file",
               error: type[Exception] = DataError) -> list:
    """The values of a JSON Lines file (see read_jsonl_lines)."""
    return [value for _, value in read_jsonl_lines(path, expected, error)]


def json_line(value: Any, where: str, error: type[Exception] = DataError) -> str:
    """`value` as one line of a JSON Lines file. A NaN or an infinity in it is `error` naming `where` (the file and
    the record), the keys down to it and the number: json would write it as a bare NaN or Infinity, which is no
    JSON, and which every reader of ours (read_jsonl_lines) and most others refuse. So is a value JSON has no type
    for (a parquet source's bytes, timestamp or decimal), which json refuses with a TypeError naming nothing."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False) + "\n"
    except TypeError:
        if (unwritable := _first_where(value, _not_json)) is None:
            raise
        keys, other = unwritable
        raise error(f"{where}{_place(keys, records=False)}: a {type(other).__name__} ({other!r:.60}), which JSON has "
                    "no type for; expected text, numbers, true or false, lists, objects or null") from None
    except ValueError:
        if (found := _first_where(value, _non_finite)) is None:
            raise
        keys, number = found
        raise error(f"{where}{_place(keys, records=False)}: {json.dumps(number)} is no JSON number (JSON has no NaN "
                    "or Infinity, so a JSON Lines file cannot hold it); expected finite numbers or null") from None


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """`records` as a JSON Lines file, whole or not at all; a record json_line refuses is a DataError naming it."""
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for index, r in enumerate(records):
            f.write(json_line(r, f"{path}: record {index}"))
