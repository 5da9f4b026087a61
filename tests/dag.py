"""Running the workflow from tests: the repository's Snakefile on a folder of the test's choosing."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))


def snakemake(*args, cwd=REPO, timeout=300):
    """The rules call `llama-adapter`, which lives beside this interpreter; MLflow goes to the run's own
    results/mlflow.db, whatever the caller's environment names."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_PARENT_RUN_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(cwd), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
