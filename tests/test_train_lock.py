"""One training at a time per output folder: a second training of a running one's --out-dir (from the command line,
from Python, under torchrun, or in the same process) is refused at once, naming the holder, and touches nothing;
the lock of a SIGKILLed training blocks no one."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_train import config, random_base_and_splits, run_cli_train

import llama_adapter.train as train_mod
from llama_adapter import errors, io
from llama_adapter.train import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return random_base_and_splits(tmp_path_factory.mktemp("lock"))


# each test's runs in a store of its own (conftest.py)
pytestmark = pytest.mark.usefixtures("mlflow_store")


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@contextmanager
def running_training(setup, out: Path):
    """A command-line training of `out` that is mid-run (its checkpoint written, steps logged) for the block, and far
    from its end (6,000 steps); SIGKILLed after it."""
    proc = subprocess.Popen(run_cli_train(config(setup, out, epochs=1000)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(logged_steps(out)) < 4:
            time.sleep(0.01)
        assert proc.poll() is None and len(logged_steps(out)) >= 4, "the first training did not get going"
        # A file among the training's outputs (its metrics.json, written at its end): a refused command must leave it.
        (out / "metrics.json").write_text("{}")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def assert_untouched(out: Path, proc: subprocess.Popen) -> None:
    """The running training still runs, its log still starts at step 0, its outputs are there."""
    assert proc.poll() is None
    assert logged_steps(out)[:4] == [0, 1, 2, 3]
    assert (out / "metrics.json").read_text() == "{}" and (out / "checkpoint.pt").exists()


def test_a_second_training_is_refused_naming_the_holder_and_a_killed_ones_lock_blocks_nothing(setup, tmp_path):
    out = tmp_path / "run"
    with running_training(setup, out) as first:
        second = subprocess.run(run_cli_train(config(setup, out, epochs=1)), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        said = second.stderr.strip().splitlines()[-1]
        assert said.startswith(f"llama-adapter train: error: --out-dir {out} is in use by another training: "
                               f"pid {first.pid} on host {socket.gethostname()}, started "), said
        assert said.endswith(f"; wait for it to end, or stop that process, then run this again (if its host is "
                             f"gone, delete {io.lock_file(out)})"), said
        assert_untouched(out, first)
        # A second training that fails before it reaches the lock (here LoRA's options without LoRA) leaves the
        # outputs too: it removed them as a failed command's.
        bad = subprocess.run([*run_cli_train(config(setup, out, epochs=1)), "--lora-rank", "4"], capture_output=True,
                             text=True, timeout=300)
        assert bad.returncode == 2 and "--lora-rank 4 given with --method adapter" in bad.stderr, bad.stderr[-3000:]
        assert_untouched(out, first)
        # From Python too (the library's error class, one the command line prints as one line).
        with pytest.raises(errors.InputError, match=f"is in use by another training: pid {first.pid} on host"):
            train(config(setup, out, epochs=1), resume=True)
        assert_untouched(out, first)
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert io.lock_file(out).exists()  # the killed training's, whose lock the kernel dropped
    third = subprocess.run(run_cli_train(config(setup, out, epochs=1)), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_a_refused_torchrun_job_stops_every_rank_and_removes_nothing(setup, tmp_path):
    """Rank 0 holds the folder for the job; the other ranks stop with it rather than wait in a collective, and
    none of them removes the training outputs, which are the running training's."""
    out = tmp_path / "run"
    with running_training(setup, out) as first:
        cli = run_cli_train(config(setup, out, epochs=1))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29561",
               "-m", "llama_adapter.cli", *cli[3:]]
        job = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                                    "OMP_NUM_THREADS": "1"})
        assert job.returncode != 0, job.stderr[-3000:]
        # Rank 0's line names the holder; rank 1's may come too, or not (torchrun stops it once rank 0 has exited).
        assert (f"llama-adapter train: error: --out-dir {out} is in use by another training: pid {first.pid} on host"
                in job.stderr), job.stderr[-3000:]
        assert_untouched(out, first)


def test_a_second_training_in_the_same_process_is_refused_and_keeps_the_first_ones_lock(setup, tmp_path,
                                                                                         monkeypatch):
    """A POSIX lock is the process's: the same process would get it again, and closing its file would drop it for
    the first training; the second is refused before it opens the file."""
    out = tmp_path / "run"
    started, go_on = threading.Event(), threading.Event()
    real = train_mod.gate_magnitudes

    def gates(model):  # the first training (in its thread) waits mid-run until the test is done
        if threading.current_thread() is not threading.main_thread():
            started.set()
            go_on.wait(120)
        return real(model)

    monkeypatch.setattr(train_mod, "gate_magnitudes", gates)
    first = threading.Thread(target=train, args=(config(setup, out, epochs=1),))
    first.start()
    try:
        assert started.wait(120)
        with pytest.raises(errors.InputError, match=f"--out-dir {out} is in use by another training in this process"):
            train(config(setup, out, epochs=1))
        other = subprocess.run([sys.executable, "-c", "import sys; from llama_adapter.io import hold\n"
                                "with hold(sys.argv[1], 'training', '--out-dir'): pass", str(out)],
                               capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and "OutputInUse" in other.stderr, other.stderr[-3000:]
    finally:
        go_on.set()
        first.join(120)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_a_lock_file_that_cannot_be_made_leaves_the_folder_unguarded_and_says_so(setup, tmp_path, capsys):
    """A lock file that cannot be made (here a symlink in its place, in a folder anyone may write: its target would
    have been truncated; a parent folder this user may not write fails alike) is no reason to refuse the training:
    it runs, unguarded, said on stderr, and the symlink's target is left as it was."""
    out = tmp_path / "run"
    target = tmp_path / "someone's file"
    target.write_text("kept")
    io.lock_file(out).symlink_to(target)
    train(config(setup, out, epochs=1))
    assert target.read_text() == "kept" and json.loads((out / "metrics.json").read_text())["steps"] == 6
    assert f"{io.lock_file(out)} cannot be made (" in capsys.readouterr().err


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_0_failing_to_take_the_lock_stops_every_rank(tmp_path, monkeypatch, rank):
    """Rank 0 failing otherwise than OutputInUse as it takes the lock (a full disk) told the other ranks nothing:
    they waited in the collective for a rank that had gone. Every rank now learns it and stops."""
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_mod, "hold", full)
    told = []

    def all_max(value: int) -> int:  # rank 0 reports its failure; the other ranks hear it
        told.append(value)
        return 2

    d = SimpleNamespace(rank=rank, all_max=all_max)
    expected = OSError if rank == 0 else errors.PipelineError
    with pytest.raises(expected, match="No space left" if rank == 0 else "rank 0 could not take its lock"):
        with train_mod.out_dir_held(tmp_path / "run", d):
            pass
    assert told == [2 if rank == 0 else 0]
