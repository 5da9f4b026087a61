"""Paths that come from data records are untrusted: they must name a file inside their dataset's folder.

A dataset downloaded from the internet chooses its own image names and problem ids. Joined to a folder
unchecked, `../../x`, `/etc/passwd` or a symlink that points outside would make the pipeline read (or, for a
pid that names an output file, write) anything the user can. Every such path goes through `inside`, which
refuses it before anything is opened.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..errors import UnsafePathError


def inside(root: Path, name: str) -> Path:
    """`root / name`, refused unless it stays inside `root`: `name` must be relative, hold no `..`
    component, and not resolve (through symlinks, at any level) to a place outside `root`. The file need not
    exist; nothing is opened (only `realpath`'s stat/readlink of the path's components)."""
    path = Path(root) / relative(name, root)
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise UnsafePathError(f"{name!r} leaves the dataset folder {root} (a symlink to {real})")
    return path


def relative(name: str, root: Path) -> str:
    """`name` if it is a relative path without `..` (so it cannot leave whatever folder it is joined to)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"{name!r} is not a file name")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if PurePosixPath(name).is_absolute() or name.startswith("\\") or ".." in parts:
        raise UnsafePathError(f"{name!r} leaves the dataset folder {root} (absolute or through '..')")
    return name


def is_file_name(name: object) -> bool:
    """Whether `name` can name a file in a folder of ours (a pid used as an image's file name): a non-empty
    string, not '.' or '..', without a path separator or a NUL."""
    return isinstance(name, str) and bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\x00")


def file_name(name: str) -> str:
    """`name` if it can name a file in a folder of ours (is_file_name), else refused."""
    if not is_file_name(name):
        raise UnsafePathError(f"{name!r} cannot name a file (it holds a path separator or is '.' or '..')")
    return name
