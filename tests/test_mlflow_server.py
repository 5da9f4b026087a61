"""MLflow in server mode, as a cluster uses it: many training jobs at once against one real `mlflow server`
lose no metric, and a server that dies mid-run does not take a training job with it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_train import random_base_and_splits

STEPS = 18  # 96 samples / global batch 16 x 3 epochs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """A real tracking server on loopback (SQLite behind it), stopped by PID."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # 12-35 s on 2 cores
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not answer /health: {(tmp_path / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return random_base_and_splits(tmp_path_factory.mktemp("server-train"))


def start_training(data, out: Path, url: str) -> subprocess.Popen:
    root, train_dir, val_dir = data
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MLFLOW_PARENT_RUN_ID", None)
    cmd = [sys.executable, "-m", "llama_adapter.cli", "train", "--base", str(root / "base"),
           "--train-data", str(train_dir), "--val-data", str(val_dir), "--out-dir", str(out), "--run-name", out.name,
           "--adapter-len", "8", "--adapter-layers", "3", "--epochs", "3", "--warmup-epochs", "1",
           "--global-batch", "16", "--rows-per-micro-batch", "2", "--row-len", "64", "--blr", "8.0",
           "--device", "cpu"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_jobs_lose_no_metric(server, data, tmp_path):
    from mlflow.tracking import MlflowClient

    url, _ = server
    jobs = {f"job{i}": start_training(data, tmp_path / f"job{i}", url) for i in range(4)}
    for name, proc in jobs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, err[-2000:])
        assert "MLflow unavailable" not in err, (name, err[-2000:])
    client = MlflowClient(url)
    for name in jobs:
        run_id = json.loads((tmp_path / name / "metrics.json").read_text())["mlflow_run_id"]
        steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
        assert steps == list(range(1, STEPS + 1)), name
        local = [json.loads(line)["step"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert local == [0, *steps]  # step 0: the held-out loss before training
        assert len(client.get_metric_history(run_id, "val_loss")) == 4


def test_server_killed_mid_run_training_completes_into_the_jsonl(server, data, tmp_path):
    url, proc = server
    job = start_training(data, tmp_path / "job", url)
    metrics = tmp_path / "job" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # the run is open and logging
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-2000:]
    assert "MLflow unavailable" in err
    assert (tmp_path / "job" / "adapter.safetensors").is_file()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(0, STEPS + 1))
