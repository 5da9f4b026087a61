"""Stopping and resuming training: SIGTERM/SIGUSR1 save a checkpoint and stop (one line, MLflow run KILLED), a
resumed run is bit-exact and its MLflow history holds each step once, an unreadable checkpoint falls back to the
previous one, the checkpoints go once the adapter is written, and the SLURM profile asks for the warning signal."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from test_train import config, random_base_and_splits, run_cli_train

import llama_adapter.train as train_mod
from llama_adapter.checkpoint import read_adapter
from llama_adapter.errors import CheckpointError, TrainingDiverged
from llama_adapter.train import TrainingInterrupted, train

mlflow = pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3  # 18 steps of 16 samples (6 per epoch)
TOTAL = 6 * EPOCHS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return random_base_and_splits(tmp_path_factory.mktemp("signals"))


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite store for the module's runs (creating one costs seconds); each test reads its own run ids."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory, tracking_uri):
    """The uninterrupted run's adapter."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        train(config(setup, root / "run", epochs=EPOCHS))
    return read_adapter(root / "run" / "adapter.safetensors")[2]


@pytest.fixture(autouse=True)
def mlflow_in_tmp(tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)


def client():
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.MlflowClient()


def logged_steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client().get_metric_history(run_id, key))


def assert_same_adapter(out: Path, reference: dict) -> None:
    trained = read_adapter(out / "adapter.safetensors")[2]
    assert trained.keys() == reference.keys()
    assert all(torch.equal(trained[k], reference[k]) for k in reference)


def assert_each_step_once(run_id: str, last: int) -> None:
    assert logged_steps(run_id, "loss") == list(range(1, last + 1))
    assert logged_steps(run_id, "val_loss") == [s for s in range(0, last + 1) if s % 6 == 0 or s == last]


def jsonl_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- signals


def test_sigterm_saves_a_checkpoint_and_stops_then_resume_is_bit_exact(setup, tmp_path, reference):
    cfg = config(setup, tmp_path / "run", epochs=EPOCHS)
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint.pt"
    # No periodic checkpoint before the signal: the one found afterwards is the signal's.
    cmd = run_cli_train(cfg, "--checkpoint-every", "1000")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(jsonl_steps(out)) >= 3:  # step 0 (held-out loss), 2 steps
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    reached = jsonl_steps(out)[-1]
    assert 2 <= reached < TOTAL
    said = [line for line in err.splitlines() if "SIGTERM" in line]
    assert len(said) == 1, err[-3000:]
    assert said[0].startswith("llama-adapter train: stopped by SIGTERM after step")
    assert f"step {reached}" in said[0] and str(ckpt) in said[0] and "--resume" in said[0]
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == reached
    run = client().get_run(state["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["checkpoint_step"] == str(reached) and run.data.tags["stopped_by"] == "SIGTERM"

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(out, reference)
    assert_each_step_once(state["mlflow_run_id"], TOTAL)
    assert client().get_run(state["mlflow_run_id"]).info.status == "FINISHED"
    assert jsonl_steps(out) == list(range(0, TOTAL + 1))
    assert not ckpt.exists() and not (out / "checkpoint.prev.pt").exists()  # the adapter is written: gone


def signal_at_step(monkeypatch, signum: int, at: int) -> None:
    """Send `signum` to this process while step `at` runs (from inside the step, as a scheduler would)."""
    real, calls = train_mod.gate_magnitudes, {"n": 0}

    def gates(model):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signum)
        return real(model)

    monkeypatch.setattr(train_mod, "gate_magnitudes", gates)


def test_sigusr1_in_process_stops_at_the_step_boundary(setup, tmp_path, monkeypatch, reference):
    """The library, with SLURM's usual warning signal (SIGTERM takes the same path, through the CLI above): the
    run stops after the step the signal arrived in, restores the handlers, and resumes exactly."""
    signum = signal.SIGUSR1
    before = signal.getsignal(signum)
    cfg = config(setup, tmp_path / "run", epochs=EPOCHS, checkpoint_every=1000)
    with monkeypatch.context() as mp:
        signal_at_step(mp, signum, at=3)
        with pytest.raises(TrainingInterrupted) as e:
            train(cfg, resume=True)
    assert signal.getsignal(signum) == before
    assert e.value.signum == signum and e.value.step == 3
    assert f"stopped by {signal.Signals(signum).name} after step 3" in str(e.value)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3
    assert client().get_run(state["mlflow_run_id"]).info.status == "KILLED"
    result = train(cfg, resume=True)
    assert_same_adapter(tmp_path / "run", reference)
    assert result["mlflow_run_id"] == state["mlflow_run_id"]
    assert_each_step_once(state["mlflow_run_id"], TOTAL)


def environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(e.split("=", 1) for e in entries if "=" in e)


def test_two_processes_stop_together_when_one_is_signalled(setup, tmp_path):
    """torchrun, 2 processes (gloo): SIGTERM to rank 1 alone; both stop at the same step and rank 0 saves."""
    cfg = config(setup, tmp_path / "two", epochs=EPOCHS)
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29547",
           "-m", "llama_adapter.cli", *run_cli_train(cfg, "--checkpoint-every", "1000")[3:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(jsonl_steps(out)) >= 3:
            break
        time.sleep(0.01)
    workers = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()
               for pid in (task / "children").read_text().split()]
    rank1 = [pid for pid in workers if environ(pid).get("RANK") == "1"]
    assert len(rank1) == 1, workers
    os.kill(rank1[0], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # a rank left waiting in a collective would hang here
    assert proc.returncode != 0
    said = [line for line in err.splitlines() if line.startswith("llama-adapter train: stopped by SIGTERM")]
    assert len(said) == 1, err[-3000:]  # rank 0's line only
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 2 <= state["step"] < TOTAL and f"after step {state['step']}:" in said[0]


# --------------------------------------------------------------------------- MLflow history of a resumed run


def test_steps_redone_after_a_crash_are_logged_to_mlflow_once(setup, tmp_path, monkeypatch):
    """Checkpoint at step 4, crash during step 6: step 5 is redone on resume, and MLflow holds it once."""
    cfg = config(setup, tmp_path / "run", max_steps=8, checkpoint_every=2)
    real = train_mod.lr_at

    def crash(step, *a):
        if step == 5:
            raise RuntimeError("node lost")
        return real(step, *a)

    with monkeypatch.context() as mp:
        mp.setattr(train_mod, "lr_at", crash)
        with pytest.raises(RuntimeError, match="node lost"):
            train(cfg)
    run_id = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["mlflow_run_id"]
    assert logged_steps(run_id, "loss") == [1, 2, 3, 4, 5]
    result = train(cfg, resume=True)
    assert logged_steps(run_id, "loss") == list(range(1, 9))
    assert logged_steps(run_id, "val_loss") == [0, 6, 8]
    assert jsonl_steps(tmp_path / "run") == list(range(0, 9))
    history = {m.step: m.value for m in client().get_metric_history(run_id, "loss")}
    assert [history[h["step"]] for h in result["history"]] == [h["loss"] for h in result["history"]]  # same values


# --------------------------------------------------------------------------- unreadable checkpoints


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_unreadable_checkpoint_falls_back_to_the_previous_one(setup, tmp_path, capsys, how):
    reference = train(config(setup, tmp_path / "ref", max_steps=6, val_data=None))
    cfg = config(setup, tmp_path / "run", max_steps=4, checkpoint_every=1, val_data=None)
    train(cfg, keep_checkpoint=True)
    ckpt, prev = tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "checkpoint.prev.pt"
    assert torch.load(prev, weights_only=True)["step"] == 3  # kept while step 4's was written
    damage(ckpt, how)
    capsys.readouterr()
    result = train(replace(cfg, max_steps=6), resume=True)
    said = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
    assert len(said) == 1
    assert str(ckpt) in said[0] and "unreadable" in said[0] and f"previous checkpoint {prev} (step 3)" in said[0]
    assert [h["loss"] for h in result["history"]] == [h["loss"] for h in reference["history"]]
    assert_same_adapter(tmp_path / "run", read_adapter(tmp_path / "ref" / "adapter.safetensors")[2])


@pytest.mark.parametrize("previous", ["absent", "unreadable"])
@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_no_readable_checkpoint_is_one_error_naming_the_files(setup, tmp_path, how, previous):
    cfg = config(setup, tmp_path / "run", max_steps=2, checkpoint_every=2, val_data=None)
    train(cfg, keep_checkpoint=True)
    ckpt, prev = tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "checkpoint.prev.pt"
    assert not prev.exists()  # one save only
    damage(ckpt, how)
    if previous == "unreadable":
        prev.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        train(replace(cfg, max_steps=4), resume=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith("cannot resume: ")
    assert f"{ckpt} is unreadable" in message
    assert (f"{prev} is unreadable" in message) == (previous == "unreadable")


def test_checkpoints_go_once_the_adapter_is_written_unless_kept(setup, tmp_path):
    run = tmp_path / "run"
    train(config(setup, run, max_steps=3, checkpoint_every=1, val_data=None))
    assert (run / "adapter.safetensors").exists()
    assert not (run / "checkpoint.pt").exists() and not (run / "checkpoint.prev.pt").exists()
    train(config(setup, run, max_steps=3, checkpoint_every=1, val_data=None), keep_checkpoint=True)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3


# --------------------------------------------------------------------------- the SLURM profile


def test_slurm_profile_asks_for_sigterm_before_the_time_limit():
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    class Resources(dict):
        __getattr__ = dict.__getitem__

    profile = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    resources = profile["set-resources"]
    # As Snakemake hands the profile's value to the plugin: the inner quotes make it one string.
    extra = resources["train_adapter"]["slurm_extra"].strip("'")
    assert re.fullmatch(r"--signal=TERM@\d+", extra) and int(extra.split("@")[1]) >= 300
    assert "slurm_extra" not in resources["generate"] and "slurm_extra" not in resources["evaluate"]
    job = SimpleNamespace(threads=2, resources=Resources(gpu=1, mem_mb=32000, runtime=1440, slurm_extra=extra))
    validate_slurm_extra(job)  # not an option the plugin manages itself
    params = {"run_uuid": "id", "slurm_logfile": "log", "comment_str": "rule_train_adapter", "account": "",
              "partition": "", "workdir": str(REPO)}
    assert f" {extra}" in get_submit_command(job, params)


def test_a_stop_signal_once_the_weights_are_written_keeps_the_training(setup, tmp_path, monkeypatch):
    """SIGTERM while the finished run's MLflow run is being ended (a remote server's calls, the system-metrics
    thread's join: seconds): the adapter and metrics.json are written and the checkpoints are gone by then, so
    the command line's removal of a stopped command's outputs would throw the whole training away. The run is
    complete: it ends normally, its outputs kept."""
    from llama_adapter.cli import main
    from llama_adapter.tracking import Tracker

    real = Tracker.close

    def close(self, failed=False, status=None):
        if not failed and status is None:  # the finished run's close
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, failed, status)

    monkeypatch.setattr(Tracker, "close", close)
    cfg = config(setup, tmp_path / "run", max_steps=2)
    try:
        code = main(run_cli_train(cfg, "--max-steps", "2")[3:])
    finally:
        mlflow.end_run()
    out = tmp_path / "run"
    assert (code, (out / "adapter.safetensors").exists(), (out / "metrics.json").exists()) == (0, True, True)
    assert not (out / "checkpoint.pt").exists()


def zero_inside_a_tensor(path: Path) -> None:
    """64 bytes of the largest tensor record zeroed in place: the file keeps its size and its zip structure."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        record = max(z.infolist(), key=lambda i: i.file_size)
    start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra) + 100
    data = bytearray(path.read_bytes())
    data[start: start + 64] = bytes(64)
    path.write_bytes(bytes(data))


def test_a_checkpoint_damaged_inside_a_tensor_is_not_resumed_from(setup, tmp_path, capsys):
    """A checkpoint whose tensor bytes were damaged in place (the size and zip layout intact) loads in torch.load
    without a word; its records' CRC-32 tell. It is unreadable like a truncated one: the previous one is taken."""
    cfg = config(setup, tmp_path / "run", max_steps=4, checkpoint_every=1, val_data=None, method="full", blr=0.01)
    train(cfg, keep_checkpoint=True)
    ckpt, prev = tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "checkpoint.prev.pt"
    zero_inside_a_tensor(ckpt)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        steps = []
        mp.setattr(train_mod, "restore", lambda state, *a: steps.append(state["step"]) or (_ for _ in ()).throw(
            RuntimeError("stop here")))
        with pytest.raises(RuntimeError, match="stop here"):
            train(replace(cfg, max_steps=6), resume=True)
    said = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
    assert steps == [3] and len(said) == 1 and f"{ckpt} is unreadable" in said[0] and "CRC" in said[0]
    zero_inside_a_tensor(prev)
    with pytest.raises(CheckpointError, match="cannot resume: .* is unreadable"):
        train(replace(cfg, max_steps=6), resume=True)


def test_lora_with_dropout_resumes_only_with_the_rows_per_micro_batch_it_drew_with(setup, tmp_path):
    """--rows-per-micro-batch may change on resumption (a memory knob), but LoRA's dropout draws its masks one
    micro-batch at a time: resumed with other micro-batches, the run's draws, and so its adapter, differ from the
    uninterrupted run's. Refused with dropout, with a message saying what to give; without dropout allowed, and
    the same run to round-off."""
    def lora(out, **kw):
        return config(setup, out, method="lora", lora_rank=2, lora_targets="wq,wv,w2", blr=0.5, max_steps=6,
                      val_data=None, **kw)

    for dropout in (0.3, 0.0):
        whole = train(lora(tmp_path / f"whole{dropout}", lora_dropout=dropout))
        cut = lora(tmp_path / f"cut{dropout}", lora_dropout=dropout)
        train(replace(cut, max_steps=3), keep_checkpoint=True)
        if dropout:
            with pytest.raises(ValueError, match="cannot resume with --rows-per-micro-batch 1: .* 2 rows at a time.*"
                                                 "resume with --rows-per-micro-batch 2"):
                train(replace(cut, rows_per_micro_batch=1), resume=True)
            continue
        resumed = train(replace(cut, rows_per_micro_batch=1), resume=True)
        assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in whole["history"]],
                                                                        rel=1e-5)


SLOW_STEP = """
import os
if os.environ.get("RANK") is not None and os.environ.get("SLOW_STEP_MARK"):  # a torchrun worker of the test
    import time
    from pathlib import Path

    import llama_adapter.train as train_mod

    real, calls = train_mod.gate_magnitudes, [0]

    def slow(model):  # step 2 lasts {seconds} s more: a large model's step, or its gather and save
        calls[0] += 1
        if calls[0] == 2:
            Path(os.environ["SLOW_STEP_MARK"] + os.environ["RANK"]).touch()
            time.sleep({seconds})
        return real(model)

    train_mod.gate_magnitudes = slow
"""


def test_torchrun_waits_for_its_workers_to_save_after_slurms_sigterm(setup, tmp_path):
    """SLURM's SIGTERM (--signal=TERM@600, 10 minutes before the limit) reaches torchrun and its workers alike.
    torchrun passes it on, then kills the workers outright after its shutdown timeout: 30 s unless told, so a
    step (or the checkpoint's gather and write) running longer than that lost the signal's checkpoint and every
    step since the last periodic one. Each node's torchrun, as llama_adapter.launch starts it, waits longer."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_STEP.replace("{seconds}", "35"))
    out = tmp_path / "run"
    cfg = config(setup, out, epochs=EPOCHS)
    cmd = [sys.executable, "-m", "llama_adapter.launch", "--nproc-per-node", "2", "--port", "29553", "--",
           *run_cli_train(cfg, "--checkpoint-every", "1000")[3:]]
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1",
           "OMP_NUM_THREADS": "1", "SLOW_STEP_MARK": str(tmp_path / "slow"),
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "slow0").exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM signals a step: every process of it
    _, err = proc.communicate(timeout=180)
    assert (out / "checkpoint.pt").exists(), err[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("where", ["new_run", "environment"])
@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_a_stop_as_the_mlflow_run_opens_ends_it_killed(tmp_path, monkeypatch, stop, where):
    """A stop just after the tracker has started its MLflow run (as start_run returns, or while the tracker records
    the environment), before the caller holds the tracker to close it: the run ends KILLED, not FINISHED by
    MLflow's exit hook as if the job had run to its end."""
    import llama_adapter.tracking as tracking
    from llama_adapter.errors import StoppedBySignal, stop_signals_raise

    real = getattr(tracking, where)

    def stopped(*args):
        real(*args)
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking, where, stopped)
    for name, value in tracking.MLFLOW_DEFAULTS.items():  # the tracker sets them; undone after the test
        monkeypatch.setenv(name, os.environ.get(name, value))
    name = f"stopped by {stop} in {where}"
    with pytest.raises(StoppedBySignal if stop == "SIGTERM" else KeyboardInterrupt), stop_signals_raise():
        tracking.Tracker(tmp_path / "run", name, "llama_adapter.test")
    left_open = mlflow.active_run()
    mlflow.end_run()  # a run left open would be the next test's parent
    assert left_open is None
    [run] = client().search_runs([client().get_experiment_by_name("llama-adapter").experiment_id],
                                 f"attributes.run_name = '{name}'")
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_a_stop_while_the_finished_run_ends_ends_it_killed(tmp_path, monkeypatch, stop):
    """A stop while a finished run is being ended (a server's calls, the system-metrics thread's join: seconds)
    stops the command, which removes its outputs: the run ends KILLED, not FINISHED by MLflow's exit hook. (train
    takes SIGTERM over at that point and keeps its training; Ctrl-C, and evaluate, stop.)"""
    import llama_adapter.tracking as tracking
    from llama_adapter.errors import StoppedBySignal, stop_signals_raise

    for name, value in tracking.MLFLOW_DEFAULTS.items():  # the tracker sets them; undone after the test
        monkeypatch.setenv(name, os.environ.get(name, value))
    name = f"ended while stopped by {stop}"
    tracker = tracking.Tracker(tmp_path / "run", name, "llama_adapter.test")
    real = mlflow.end_run

    def end_run(status="FINISHED"):
        if status == "FINISHED":
            if stop == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
            raise KeyboardInterrupt
        real(status)

    monkeypatch.setattr(mlflow, "end_run", end_run)
    with pytest.raises(StoppedBySignal if stop == "SIGTERM" else KeyboardInterrupt), stop_signals_raise():
        tracker.close()
    left_open = mlflow.active_run()
    real()  # a run left open would be the next test's parent
    assert left_open is None
    [run] = client().search_runs([client().get_experiment_by_name("llama-adapter").experiment_id],
                                 f"attributes.run_name = '{name}'")
    assert run.info.status == "KILLED"


def test_a_second_close_after_a_stop_in_the_first_starts_no_run(tmp_path, monkeypatch):
    """Ctrl-C while the run ends (close ends it KILLED and re-raises), then the caller's own handler closes the
    tracker again, as train's does: the run is ended already, and the second close must not log to it. It set the
    lost calls' tag, and mlflow.set_tags with no active run starts a new one, an empty run of its own."""
    import llama_adapter.tracking as tracking

    for name, value in tracking.MLFLOW_DEFAULTS.items():  # the tracker sets them; undone after the test
        monkeypatch.setenv(name, os.environ.get(name, value))
    tracker = tracking.Tracker(tmp_path / "run", "closed twice", "llama_adapter.test")
    tracker.lost = 1  # a logging call MLflow did not take, earlier in the run
    real = mlflow.end_run

    def end_run(status="FINISHED"):
        if status == "FINISHED":
            raise KeyboardInterrupt
        real(status)

    monkeypatch.setattr(mlflow, "end_run", end_run)
    experiment = client().get_experiment_by_name("llama-adapter").experiment_id
    before = {r.info.run_id for r in client().search_runs([experiment])}  # this tracker's run among them
    with pytest.raises(KeyboardInterrupt):
        tracker.close()
    tracker.close(status="KILLED")  # train: except (KeyboardInterrupt, StoppedBySignal): tracker.close(...)
    left_open = mlflow.active_run()
    real()  # a run left open would be the next test's parent
    assert left_open is None
    runs = client().search_runs([experiment])
    assert {r.info.run_id for r in runs} == before, [r.info.run_name for r in runs]
    assert [r.info.status for r in runs if r.info.run_name == "closed twice"] == ["KILLED"]


# --------------------------------------------------------------------------- a stopped workflow invocation

# A one-job workflow with the project's MLflow hooks; its job marks that it started, then does `job`.
ONE_JOB_WORKFLOW = """
include: {hooks!r}


rule all:
    output:
        "done",
    shell:
        "touch started; {job}; touch {{output}}"
"""


def one_job_invocation(tmp_path: Path, job: str, started: str = "started") -> tuple[subprocess.Popen, str]:
    """snakemake running ONE_JOB_WORKFLOW's job `job` in tmp_path, in a process group of its own, with an MLflow
    store there (its URI); returned once the file `started` exists (the job's mark unless the job makes its own),
    or snakemake ended."""
    from dag import REPO, SNAKEMAKE, snakemake_env

    from llama_adapter.tracking import sqlite_uri

    if not Path(SNAKEMAKE).exists():
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(ONE_JOB_WORKFLOW.format(hooks=str(REPO / "workflow/rules/tracking.smk"), job=job))
    uri = sqlite_uri(tmp_path / "mlflow.db")
    proc = subprocess.Popen([SNAKEMAKE, "--snakefile", str(snakefile), "--directory", str(tmp_path), "--cores", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=snakemake_env() | {"MLFLOW_TRACKING_URI": uri})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (tmp_path / started).exists():
        time.sleep(0.05)
    return proc, uri


@pytest.mark.parametrize("end", ["job fails", "SIGTERM", "SIGINT", "SIGHUP"])
def test_an_invocation_stopped_by_a_signal_ends_its_parent_run_killed(tmp_path, end):
    """SIGTERM (scancel, a time limit), Ctrl-C or a hangup (the terminal closed, ssh dropped) to a running snakemake
    and its job, as SLURM and a terminal send them: Snakemake calls onerror as for a failed job, and the parent run
    ended FAILED; now KILLED, tagged stopped_by. Snakemake has no handler for SIGHUP, whose default action ended it
    before any hook, the run left RUNNING for ever: now the run ends KILLED, and snakemake then dies of SIGHUP as
    it did. A job that fails still ends it FAILED."""
    proc, uri = one_job_invocation(tmp_path, "exit 1" if end == "job fails" else "sleep 120")
    if end != "job fails":
        os.killpg(proc.pid, getattr(signal, end))  # the whole process group, as SLURM and a terminal do
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    if end == "SIGHUP":
        assert proc.returncode == -signal.SIGHUP, out[-3000:]
    store = mlflow.MlflowClient(uri)
    [parent] = store.search_runs([store.get_experiment_by_name("llama-adapter").experiment_id])
    expected = ("FAILED", None) if end == "job fails" else ("KILLED", end)
    assert (parent.info.status, parent.data.tags.get("stopped_by")) == expected, out[-3000:]


# A job as the command line runs one (cli.main): its MLflow run open under stop_signals_raise, ended KILLED and
# tagged with the signal on a stop (as evaluate's); it marks `tracking` once the run is open.
TRACKED_JOB = """
import sys, time
from pathlib import Path
from llama_adapter.errors import STOPS, stop_signals_raise
from llama_adapter.tracking import Tracker

with stop_signals_raise():
    tracker = Tracker(Path("job"), "job", "tests")
    try:
        Path("tracking").touch()
        time.sleep(120)
    except STOPS as e:
        tracker.set_tags({"stopped_by": getattr(e, "signal_name", "SIGINT")})
        tracker.close(status="KILLED")
        sys.exit(128 + getattr(e, "signum", 2))
"""


def test_a_hangup_ends_a_local_jobs_run_killed(tmp_path):
    """A hangup reaches a local job too (one process group): its MLflow run, which a stop signal ends KILLED, was
    left RUNNING by SIGHUP's default action; now it ends KILLED, tagged SIGHUP, as its parent run does."""
    (tmp_path / "job.py").write_text(TRACKED_JOB)
    proc, uri = one_job_invocation(tmp_path, f"{sys.executable} job.py", started="tracking")
    os.killpg(proc.pid, signal.SIGHUP)
    out, _ = proc.communicate(timeout=120)  # once the job has closed the output it shares with snakemake
    store = mlflow.MlflowClient(uri)
    runs = store.search_runs([store.get_experiment_by_name("llama-adapter").experiment_id])
    ended = {r.info.run_name: (r.info.status, r.data.tags.get("stopped_by")) for r in runs}
    assert ended.pop("job") == ("KILLED", "SIGHUP"), out[-3000:]
    assert list(ended.values()) == [("KILLED", "SIGHUP")], out[-3000:]


# --------------------------------------------------------------------------- checkpoints that do not fit the run


@pytest.fixture(scope="module")
def saved_run(setup, tmp_path_factory, tracking_uri):
    """A run kept after step 4 of one checkpoint a step: checkpoint.pt holds step 4, checkpoint.prev.pt step 3."""
    out = tmp_path_factory.mktemp("saved") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        train(config(setup, out, max_steps=4, checkpoint_every=1, val_data=None), keep_checkpoint=True)
    return out


def copied_run(saved_run: Path, tmp_path: Path, change) -> tuple[Path, Path]:
    """The saved run copied, its checkpoints rewritten whole by torch.save as the copy's (its --out-dir), checkpoint.pt
    after `change(state)`: their records' CRC-32 pass, so only its contents tell it apart. (checkpoint.pt,
    checkpoint.prev.pt)."""
    import shutil

    out = shutil.copytree(saved_run, tmp_path / "run")
    ckpt, prev = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    for path in (prev, ckpt):
        state = torch.load(path, weights_only=True)
        state["config"] = json.dumps({**json.loads(state["config"]), "out_dir": str(out)}, sort_keys=True)
        if path == ckpt:
            change(state)
        torch.save(state, path)
    return ckpt, prev


def resumed_steps(setup, out: Path, capsys) -> tuple[list[int], list[str]]:
    """(the step of the checkpoint resumed from, what was said of checkpoints on stderr), the run stopped there."""
    capsys.readouterr()
    steps = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "restore", lambda state, *a: steps.append(state["step"]) or (_ for _ in ()).throw(
            RuntimeError("stop here")))
        with pytest.raises(RuntimeError, match="stop here"):
            train(config(setup, out, max_steps=6, checkpoint_every=1, val_data=None), resume=True)
    return steps, [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]


def setter(*keys, value):
    """A change of the checkpoint: state[keys[0]]...[keys[-1]] = value(the old value)."""
    def change(state):
        *path, last = keys
        for k in path:
            state = state[k]
        state[last] = value(state[last])
    return change


def popper(*keys):
    def change(state):
        *path, last = keys
        for k in path:
            state = state[k]
        del state[last]
    return change


GATE, QUERY = "adapter_gate", "adapter_query"
NOT_FITTING = {
    # the tensors as the model and its optimizer hold them: shape, dtype, names
    "mis-shaped": (setter("tuned", GATE, value=lambda t: t[:, :2]),
                   f"mis-shaped (1): tuned.{GATE}: (3, 2) (expected (3, 4))"),
    "bf16 moment": (setter("optimizer", "state", QUERY, "exp_avg", value=lambda t: t.bfloat16()),
                    f"optimizer.state.{QUERY}.exp_avg: torch.bfloat16 (expected torch.float32)"),
    "float64": (setter("tuned", QUERY, value=lambda t: t.double()), f"tuned.{QUERY}: torch.float64 (expected"),
    "missing": (popper("tuned", GATE), f"missing (1): tuned.{GATE}"),
    "missing moment": (popper("optimizer", "state", GATE, "exp_avg_sq"), f"optimizer.state.{GATE}.exp_avg_sq"),
    "extra": (lambda state: state["tuned"].update({"layers.0.attention.wq.weight": torch.zeros(64, 64)}),
              "unexpected (1): tuned.layers.0.attention.wq.weight"),
    "integer": (setter("tuned", GATE, value=lambda t: t.long()), f"tuned.{GATE}: torch.int64"),
    # the counters and the schedule's state, as train writes them
    "step as float": (setter("step", value=float), "step: 4.0 (a float); expected a non-negative integer"),
    "step as string": (setter("step", value=str), "step: '4' (a str); expected a non-negative integer"),
    "negative step": (setter("step", value=lambda s: -s), "step: -4 (an int); expected a non-negative integer"),
    "lr as string": (setter("optimizer", "param_groups", 0, "lr", value=str),
                     "optimizer.param_groups[0].lr: a str; expected a float"),
    "betas as list": (setter("optimizer", "param_groups", 0, "betas", value=list),
                      "optimizer.param_groups[0].betas: a list; expected a tuple"),
    "group without params": (popper("optimizer", "param_groups", 0, "params"),
                             "optimizer.param_groups[0]: missing params"),
    "rng as floats": (setter("torch_rng", value=lambda t: t.float()), "torch_rng: "),
    "config not JSON": (setter("config", value=lambda c: c[:-1]), "config: "),
    "extra entry": (lambda state: state.update(note=1), "unexpected entries: note"),
    "no history": (popper("history"), "missing entries: history"),
}


@pytest.mark.parametrize("case", NOT_FITTING)
def test_a_checkpoint_that_does_not_fit_the_run_falls_back_to_the_previous_one(setup, saved_run, tmp_path, capsys,
                                                                                 case):
    """A checkpoint whose bytes are whole (their CRC-32 pass) but whose tensors do not fit the model and its optimizer
    (another shape or dtype, one missing or one more), or whose counters are of another type, was resumed from:
    set_state_dict cast another dtype silently and left out extra tensors, and the rest failed with a bare torch or
    Python error, or later, mid-run. It is unreadable as a truncated one is: the previous checkpoint is taken, and
    the one line names the file and the key."""
    change, needle = NOT_FITTING[case]
    ckpt, prev = copied_run(saved_run, tmp_path, change)
    steps, said = resumed_steps(setup, tmp_path / "run", capsys)
    assert steps == [3] and len(said) == 1, (steps, said)
    assert f"{ckpt} is unreadable" in said[0] and f"previous checkpoint {prev} (step 3)" in said[0], said[0]
    assert needle in said[0], said[0]


def test_no_checkpoint_that_fits_is_one_error_naming_both(setup, saved_run, tmp_path):
    ckpt, prev = copied_run(saved_run, tmp_path, NOT_FITTING["mis-shaped"][0])
    state = torch.load(prev, weights_only=True)
    state["step"] = "3"
    torch.save(state, prev)
    with pytest.raises(CheckpointError) as e:
        train(config(setup, tmp_path / "run", max_steps=6, checkpoint_every=1, val_data=None), resume=True)
    message = str(e.value)
    assert message.startswith("cannot resume: ") and "\n" not in message
    assert f"{ckpt} is unreadable" in message and f"tuned.{GATE}: (3, 2)" in message
    assert f"{prev} is unreadable" in message and "step: '3' (a str)" in message


@pytest.mark.parametrize(("key", "value"), [(("tuned", GATE), float("nan")),
                                             (("optimizer", "state", QUERY, "exp_avg_sq"), float("inf"))])
def test_a_checkpoint_holding_nan_stops_the_run_naming_the_tensor(setup, saved_run, tmp_path, key, value):
    """NaN or infinity in a checkpoint whose bytes pass their CRC-32 check was written so: the run diverged (a
    non-finite gradient under a finite loss reaches the weights and the optimizer's moments, and the NaN-loss stop
    sees it a step later). It was resumed from, to a NaN loss, or the moments' infinity kept the adapter from moving.
    It stops the run as that NaN loss does, naming the file and the tensor, rather than falling back: the previous
    checkpoint of the same run replays the same steps into it."""
    def poison(state):
        *path, last = key
        for k in path:
            state = state[k]
        state[last] = state[last].clone()
        state[last].view(-1)[1] = value

    ckpt, prev = copied_run(saved_run, tmp_path, poison)
    name = f"tuned.{GATE}" if key[0] == "tuned" else f"optimizer.state.{QUERY}.exp_avg_sq"
    counts = "1 NaN and 0 infinite" if key[0] == "tuned" else "0 NaN and 1 infinite"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "restore", lambda *a: pytest.fail("resumed from a checkpoint holding NaN"))
        with pytest.raises(TrainingDiverged) as e:
            train(config(setup, tmp_path / "run", max_steps=6, checkpoint_every=1, val_data=None), resume=True)
    message = str(e.value)
    assert message.startswith(f"cannot resume: {ckpt} (step 4) holds NaN or infinity") and "\n" not in message
    assert f"{name}: {counts}" in message and str(prev) in message, message
