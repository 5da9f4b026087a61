"""torch.compile's work kept beyond the process, for the next job on this node or any other (--compile-cache).

Inductor keeps everything it compiled in one folder, TORCHINDUCTOR_CACHE_DIR (node-local: /tmp/torchinductor_$USER
by default): the FX graphs' generated code, AOTAutograd's graphs, the kernels built from them (Triton's GPU
binaries, the CPU's shared libraries), the configurations autotuning chose, dynamo's shape decisions. A job on
another node never sees it. Pointing the folder at a shared file system instead would share it, but inductor
takes file locks there (filelock's flock, which Lustre without `-o flock` and some NFS setups refuse) and
writes many small files.

So within compile_cache() the process compiles into a folder of its own on local disk, and the folder travels
as one file per kind of job (`name`) in the shared folder, a tar unpacked into the next job's folder before it
compiles. PyTorch's "mega-cache" (`torch.compiler.save_cache_artifacts()`) would carry less: it holds the
generated code but not the kernels built from it, which a job reading it compiles again (a CPU job spent 28 of
its 34 s there, and a GPU job rebuilt its Triton kernels; BENCHMARKS.md). Jobs that compile the same shapes
read and write the same file, each writing a whole file under a name of its own and renaming it into place
(atomic on POSIX file systems, NFS included), so that concurrent jobs never see a partial file; the last writer
wins, with the same contents. A file is written only when the job compiled something the one it read did not
hold. Another torch or another GPU model gets a file of its own (the name's digest), and inductor's own keys
(the source, the compiler, the device) decide what in a file still fits. TRITON_CACHE_DIR, if set, keeps
Triton's binaries out of the job's folder and so out of the file.
What the files hold is code the next job runs (generated Python, built libraries): keep the shared folder
writable only by those whose jobs you would run, as with any cache of compiled code.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def blob_path(folder: str | os.PathLike, kind: dict) -> Path:
    """The file for jobs of this kind (what they compile: the command, the model's shapes, dtype, batch rows...)
    on this torch and this device model: readable name, then a digest of everything."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    full = {**kind, "torch": torch.__version__, "device": device}
    digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(folder) / f"{kind.get('command', 'compile')}-{digest}.tar"


@contextmanager
def compile_cache(folder: str | os.PathLike | None, kind: dict) -> Iterator[Path | None]:
    """Within the block, torch.compile works in a fresh local cache folder that starts with this kind of job's
    file in `folder` (if any); after the block, however it ends (a signal's stop too: what was compiled is as
    good), the folder is written back when the job added to it. Enter it before the process compiles anything:
    inductor's compile workers keep the cache folder they started with. None: no file, PyTorch's caches as
    they are. Yields the file's path."""
    if folder is None:
        yield None
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    path = blob_path(folder, kind)
    with tempfile.TemporaryDirectory(prefix="llama-adapter-inductor-") as local:
        unpack(path, Path(local))
        read = listing(Path(local))
        with temporary_cache_dir(local):
            try:
                yield path
            finally:
                if listing(Path(local)) - read:
                    write_blob(path, pack(Path(local)))


def cached_files(folder: Path) -> list[Path]:
    """The folder's files, but inductor's lock files, which every run touches and no run reads."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix != ".lock")


def listing(folder: Path) -> set[tuple[str, int]]:
    """The folder's cached files as (relative path, size)."""
    return {(str(f.relative_to(folder)), f.stat().st_size) for f in cached_files(folder)}


def pack(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for f in cached_files(folder):
            tar.add(f, arcname=str(f.relative_to(folder)), recursive=False)
    return buffer.getvalue()


def unpack(path: Path, folder: Path) -> None:
    """The file's contents into the empty `folder`; only plain files and folders inside it (tarfile's data
    filter), so that a file in a shared folder cannot write elsewhere. A file that cannot be read (truncated, or
    damaged: the whole gzip stream is decompressed, and its checksum checked, before anything is extracted) costs a
    cold compile, from an empty folder again: one line on stderr."""
    if not path.is_file():
        return
    try:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(path.read_bytes())), mode="r:") as tar:
            tar.extractall(folder, filter="data")
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
        reason = " ".join(str(e).split())  # one line
        print(f"llama-adapter: compile cache {path} not read ({reason}); compiling from scratch", file=sys.stderr)
        for entry in folder.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def write_blob(path: Path, blob: bytes) -> None:
    """Write the whole file under a name of this process's, then rename it into place. A cache that cannot be
    written costs the next job a compilation, not this job its results: one line on stderr."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep other users' jobs from reading a shared cache
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        print(f"llama-adapter: compile cache {path} not written: {e.strerror or e}", file=sys.stderr)
