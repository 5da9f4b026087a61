"""Running the workflow from tests: the repository's Snakefile on a folder of the test's choosing."""

import csv
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
# The results folder of the one full demo run (conftest.py's demo_run): a space and a quote in its name, so that
# every rule's shell command is checked to quote its paths (issue 16).
DEMO_RESULTS = "demo results 'quoted'"
POLLING = Path(__file__).resolve().parent / "slurm_polling"


def snakemake(*args, cwd=REPO, timeout=300):
    """The rules call `llama-adapter`, which lives beside this interpreter; MLflow goes to the run's own
    results/mlflow.db, whatever the caller's environment names. A dry run (-n) runs in a fork of a snakemake that
    has imported itself once (snakemake_forks.py); a run that starts jobs, in a new process."""
    command = snakemake_command(*args, cwd=cwd)
    if "-n" in args or "--dry-run" in args:
        return _forks.run(command, snakemake_env(), timeout)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=snakemake_env())


class _Forks:
    """The session's snakemake_forks.py server, started at its first request."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.replies: queue.Queue = queue.Queue()

    def run(self, command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("snakemake_forks.py"))],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            self.replies = queue.Queue()
            threading.Thread(target=self._read, args=(self.proc.stdout, self.replies), daemon=True).start()
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            self.proc.stdin.write(json.dumps({"argv": command, "env": env, "cwd": os.getcwd(), "stdout": str(out),
                                              "stderr": str(err)}) + "\n")
            self.proc.stdin.flush()
            pid = self._reply(60)["pid"]
            try:
                returncode = self._reply(timeout)["returncode"]
            except queue.Empty:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended as the wait did
                    pass
                self._reply(60)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(command, returncode, out.read_text(), err.read_text())

    def _reply(self, timeout: float) -> dict:
        reply = self.replies.get(timeout=timeout)
        if reply is None:
            raise RuntimeError(f"tests/snakemake_forks.py ended (exit code {self.proc.wait()})")
        return reply

    @staticmethod
    def _read(stream, replies: queue.Queue) -> None:
        for line in stream:
            replies.put(json.loads(line))
        replies.put(None)


_forks = _Forks()


def snakemake_started(*args, cwd=REPO, output: Path) -> subprocess.Popen:
    """`snakemake` as snakemake() runs it, started and left running, its stdout and stderr going to `output`."""
    with open(output, "wb") as out:
        return subprocess.Popen(snakemake_command(*args, cwd=cwd), stdout=out, stderr=subprocess.STDOUT,
                                env=snakemake_env())


def stop_started(proc: subprocess.Popen, grace: float) -> None:
    """A snakemake_started() process, if still running: SIGTERM (snakemake cancels its jobs, which may take a
    while), then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def snakemake_command(*args, cwd=REPO) -> list[str]:
    return [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(cwd), *args]


def snakemake_env() -> dict:
    # The tests' MLflow store and experiment, not the caller's (nor one mlflow.set_experiment exported in the tests)
    mine = ("MLFLOW_TRACKING_URI", "MLFLOW_PARENT_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
    env = {k: v for k, v in os.environ.items() if k not in mine}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    # snakemake under the SLURM executor checks its jobs at most POLLING's cap apart (slurm_polling/sitecustomize.py)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(POLLING), os.environ.get("PYTHONPATH")) if p)
    # The DAGs run beside the tests, on the same cores. OpenMP's waiting threads spin by default (libgomp), so a
    # two-thread job (pretrain_base) whose other thread waits for a core burnt 3x its CPU and ran 2x slower: 373
    # CPU-s for the SLURM DAG's pretraining in a 2-core session, about 80 alone. Waiting threads sleep instead.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def demo_configfiles(root: Path) -> list[str]:
    """--configfile for a run into DEMO_RESULTS under `root`: the shipped config.yaml, then `results:` over it."""
    import yaml

    extra = root / "demo_results.yaml"
    extra.write_text(yaml.safe_dump({"results": DEMO_RESULTS}))
    return ["--configfile", str(REPO / "config.yaml"), str(extra)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
