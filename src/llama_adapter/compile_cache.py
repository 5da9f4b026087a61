"""torch.compile's work kept beyond the process, for the next job on this node or any other (--compile-cache).

PyTorch's own caches (the FX graph, AOTAutograd, autotuning and Triton caches) live in a node-local folder
(TORCHINDUCTOR_CACHE_DIR, /tmp/torchinductor_$USER by default), which a job on another node never sees. Pointing
that folder at a shared file system instead would share them, but inductor takes file locks there (filelock's
flock, which Lustre without `-o flock` and some NFS setups refuse) and writes many small files. So the caches stay
local, and what a job compiled travels as PyTorch's "mega-cache": `torch.compiler.save_cache_artifacts()` gives
one blob of every artifact the process compiled or read from the caches, and `load_cache_artifacts()` puts such
a blob into the local caches of a fresh process, whose compilation then finds them there.

The shared folder holds one blob per kind of job (`name`): jobs that compile the same shapes read and write the
same file, each writing a whole file under a name of its own and renaming it into place (atomic on POSIX file
systems, NFS included), so that concurrent jobs never see a partial file; the last writer wins, with the same
artifacts. A blob compiled for another torch, Triton or GPU is never used: PyTorch keys every artifact by them,
and a blob that does not fit only misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def blob_path(folder: str | os.PathLike, kind: dict) -> Path:
    """The blob for jobs of this kind (what they compile: the command, the model's shapes, dtype, batch rows...)
    on this torch and this device model: readable name, then a digest of everything."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    full = {**kind, "torch": torch.__version__, "device": device}
    digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(folder) / f"{kind.get('command', 'compile')}-{digest}.bin"


@contextmanager
def compile_cache(folder: str | os.PathLike | None, kind: dict) -> Iterator[Path | None]:
    """Within the block, torch.compile starts from the blob of this kind of job in `folder` (if any); after it,
    however it ends (a signal's stop too: the compiled code is as good), the process's artifacts are written back
    when they differ from what was read. None: no blob, PyTorch's caches as they are. Yields the blob's path."""
    if folder is None:
        yield None
        return
    import torch

    path = blob_path(folder, kind)
    read = path.read_bytes() if path.is_file() else None
    if read is not None:
        torch.compiler.load_cache_artifacts(read)  # a blob it cannot read: a warning, and a cold compile
    try:
        yield path
    finally:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None and saved[0] != read:
            write_blob(path, saved[0])


def write_blob(path: Path, blob: bytes) -> None:
    """Write the whole blob under a name of this process's, then rename it into place. A cache that cannot be
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
