"""Regenerate requirements.lock and environment.yml from pyproject.toml, in one command:

    pip install uv && python tools/lock.py            # keeps the versions already locked
    python tools/lock.py --upgrade                     # moves every package to its newest allowed release

requirements.lock pins every package that the project and its test, lint and workflow extras need, each with
the sha256 of its files, for Linux x86_64 and Python 3.11: all but torch, whose build depends on the machine
(the CPU wheel here, a CUDA one on a GPU cluster), so it is installed first, at the version TORCH names. The
lock is resolved against torch's CPU build, so that it holds no CUDA packages; a CUDA torch brings its own.
environment.yml is written from the same pins (without hashes, which conda's pip section does not check): the
conda environment of the workflow's rules (--sdm conda), which environment.post-deploy.sh completes with this
checkout.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
ENVIRONMENT = REPO / "environment.yml"
TORCH = "2.13.0"  # the build machines' CPU wheel; README, .ci/run and environment.yml install this version
PYTHON = "3.11"
EXTRAS = ("test", "lint", "workflow")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


def pins(lock_text: str) -> list[tuple[str, str]]:
    """(name, version) of every package a lock file pins, in its order."""
    return PIN.findall(lock_text)


def environment_yml(locked: list[tuple[str, str]]) -> str:
    lines = ["# Written by tools/lock.py from requirements.lock: edit pyproject.toml and rerun it, not this file.",
             "# Every package but this checkout, which environment.post-deploy.sh installs: with --sdm conda,",
             "# Snakemake builds the rules' environment from a copy of this file elsewhere, where a `-e .` here",
             "# would name no package. By hand, from the repository root:",
             "#   conda env create -f environment.yml && conda activate llama-adapter && pip install --no-deps -e .",
             "name: llama-adapter", "channels:", "  - conda-forge", "dependencies:", f"  - python={PYTHON}",
             "  - pip", "  - pip:", f"      - torch=={TORCH}"]
    lines += [f"      - {name}=={version}" for name, version in locked]
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upgrade", action="store_true", help="newest allowed releases, not the locked ones")
    args = parser.parse_args()
    uv = shutil.which("uv")
    if uv is None:
        sys.exit("tools/lock.py: uv not found; pip install uv")
    # torch's CPU build: from a local wheel folder where pip is told of one, else PyTorch's CPU index.
    torch_source = ([arg for folder in os.environ["PIP_FIND_LINKS"].split() for arg in ("--find-links", folder)]
                    if os.environ.get("PIP_FIND_LINKS") else
                    ["--extra-index-url", "https://download.pytorch.org/whl/cpu", "--index-strategy",
                     "unsafe-best-match"])
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as override:
        override.write(f"torch=={TORCH}+cpu\n")
        override.flush()
        command = [uv, "pip", "compile", str(REPO / "pyproject.toml"), *(a for e in EXTRAS for a in ("--extra", e)),
                   "--generate-hashes", "--python-version", PYTHON, "--python-platform", "x86_64-manylinux_2_28",
                   "--override", override.name, "--no-emit-package", "torch", "--no-header", "--quiet",
                   *torch_source, *(["--upgrade"] if args.upgrade else []), "--output-file", str(LOCK)]
        subprocess.run(command, check=True, cwd=REPO)  # uv keeps what the output file already pins
    text = LOCK.read_text()
    header = (f"# Written by tools/lock.py: every package but torch (install torch=={TORCH} first), with hashes;\n"
              f"# Linux x86_64, Python {PYTHON}. pip install torch=={TORCH} && "
              "pip install --require-hashes -r requirements.lock && pip install --no-deps -e .\n")
    LOCK.write_text(header + text.removeprefix(header))
    ENVIRONMENT.write_text(environment_yml(pins(text)))
    print(f"{LOCK.name}: {len(pins(text))} packages; {ENVIRONMENT.name} written")


if __name__ == "__main__":
    main()
