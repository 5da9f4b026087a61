"""The compile cache and the MLflow tracking at their edges: a cut or damaged cache file costs a cold compile and
extracts nothing; a run whose logging failed still ends with the job's status and leaves the process's next run
free; a stale parent run id, a non-object $LLAMA_ADAPTER_TAGS, a parent run whose set-up failed; a run whose
process was killed outright, ended by the next invocation. MLflow on a SQLite file in tmp_path; no server, no GPU."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

# ---------------------------------------------------------------- compile_cache


def _blob(tmp_path: Path) -> tuple[bytes, bytes]:
    """A cache tar as pack() writes it, holding one incompressible 'kernel library'."""
    from llama_adapter.compile_cache import pack

    src = tmp_path / "src"
    src.mkdir()
    payload = random.Random(0).randbytes(200_000)
    (src / "kernel.so").write_bytes(payload)
    return pack(src), payload


def test_truncated_cache_file_costs_a_cold_compile_not_a_crash(tmp_path, capsys):
    """A cut cache file costs a cold compile, one line on stderr (it raised EOFError, and every later job of the
    kind crashed the same way)."""
    from llama_adapter.compile_cache import unpack

    blob, _ = _blob(tmp_path)
    cut = tmp_path / "decode-cut.tar"
    cut.write_bytes(blob[: len(blob) // 2])
    job = tmp_path / "job"
    job.mkdir()
    unpack(cut, job)
    err = capsys.readouterr().err
    assert "compiling from scratch" in err and list(job.iterdir()) == []


def test_truncated_cache_file_through_compile_cache(tmp_path, capsys):
    pytest.importorskip("torch")
    from llama_adapter.compile_cache import blob_path, compile_cache

    kind = {"command": "decode", "probe": 1}
    blob, _ = _blob(tmp_path)
    path = blob_path(tmp_path / "shared cache", kind)
    path.parent.mkdir()
    path.write_bytes(blob[:30_000])
    with compile_cache(tmp_path / "shared cache", kind) as yielded:
        assert yielded == path
    assert "compiling from scratch" in capsys.readouterr().err


def test_corrupted_cache_file_is_not_extracted_silently(tmp_path, capsys):
    """Bytes damaged inside the gzip stream are caught by its checksum: nothing damaged lands in the job's cache
    folder (tarfile alone stops at the archive's end marker and never checks it)."""
    from llama_adapter.compile_cache import unpack

    blob, payload = _blob(tmp_path)
    bad = tmp_path / "decode-bad.tar"
    bad.write_bytes(blob[:5000] + bytes(100) + blob[5100:])
    job = tmp_path / "job"
    job.mkdir()
    unpack(bad, job)
    got = job / "kernel.so"
    assert not got.exists() or got.read_bytes() == payload, "a corrupted file was extracted without a word"


# ---------------------------------------------------------------- tracking


@pytest.fixture
def store(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("LLAMA_ADAPTER_TAGS", raising=False)
    # mlflow.set_experiment (a caller's, in a test) exports the experiment's id, which would choose the next test's
    # experiment in another store: unset, and undone after the test (monkeypatch restores only what it saw set).
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    yield tmp_path
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()


SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    from pathlib import Path
    import mlflow
    from mlflow.exceptions import MlflowException
    from llama_adapter.tracking import Tracker
    warnings.simplefilter("ignore")
    d = Path(sys.argv[1])
    t = Tracker(d / "out", "job", "tests")
    (d / "run_id").write_text(t.run_id)
    real = mlflow.log_metrics
    calls = []
    def flaky(*a, **k):  # the store gone after the first call: MLflow is dropped
        calls.append(1)
        if len(calls) >= 2:
            raise MlflowException("(sqlite3.OperationalError) unable to open database file")
        return real(*a, **k)
    mlflow.log_metrics = flaky
    for step in range(1, 6):
        t.log_metrics({"loss": 1.0 / step}, step)
    t.close(status="KILLED")  # e.g. stopped by SIGTERM at a time limit
""")


def test_run_closed_after_mlflow_was_dropped_keeps_its_status(store):
    """A stopped training ends its MLflow run KILLED even after failed MLflow calls dropped it (MLflow's exit hook
    marked it FINISHED)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(store)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from mlflow import MlflowClient

    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run((store / "run_id").read_text())
    assert run.info.status == "KILLED"


def test_a_dropped_tracker_does_not_disable_the_next_one_in_the_process(store):
    """A run whose logging failed is ended at close, so the process's next run starts (it failed with 'Run ... is
    already active')."""
    from llama_adapter.tracking import MLFLOW_FAILURES_TO_DROP, Tracker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = Tracker(store / "a", "a", "tests")
        for step in range(MLFLOW_FAILURES_TO_DROP):  # refused that many times in a row: MLflow is dropped
            first.log_metrics({"bad name!": 1.0}, step)
        assert not first.logging
        first.close(failed=True)
        second = Tracker(store / "b", "b", "tests")
        second.close()
    assert second.run_id is not None


def failing_from(monkeypatch, fails) -> list[int]:
    """mlflow.log_metrics refused at the calls (counted from 1) `fails` says: a locked database, a server
    restarting or gone, which a real store does not do on demand. Every other call is MLflow's own. The steps of
    the calls made, filled as they come."""
    import mlflow
    from mlflow.exceptions import MlflowException

    real, calls = mlflow.log_metrics, []

    def flaky(*args, **kwargs):
        calls.append(kwargs["step"])
        if fails(len(calls)):
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", flaky)
    return calls


def test_one_failed_mlflow_call_loses_that_call_alone(store, monkeypatch):
    """One refused log_metrics turned MLflow off for the rest of the run (every later step missing from its
    history, said once at the failure): now that call alone is lost, the run goes on logging, and its end warns
    of and tags the run with how many calls were lost. metrics.jsonl holds every step."""
    import mlflow

    from llama_adapter.tracking import LOST_CALLS_TAG, Tracker

    t = Tracker(store / "out", "job", "tests")
    failing_from(monkeypatch, lambda n: n == 2)
    with pytest.warns(UserWarning) as warned:
        for step in range(1, 6):
            t.log_metrics({"loss": 1.0 / step}, step)
        t.close()
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(t.run_id, "loss")] == [1, 3, 4, 5]
    run = client.get_run(t.run_id)
    assert (run.data.tags[LOST_CALLS_TAG], run.info.status) == ("1", "FINISHED")
    assert any(f"MLflow run {t.run_id}: 1 logging call(s) failed" in str(w.message) for w in warned)
    assert [json.loads(line)["step"] for line in (store / "out" / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3, 4, 5]


def test_mlflow_failing_call_after_call_is_dropped(store, monkeypatch):
    """MLflow failing MLFLOW_FAILURES_TO_DROP calls in a row is gone (a server down for good): no later call is
    tried (each would wait out the client's retries), and it says so; metrics.jsonl holds every step."""
    import mlflow

    from llama_adapter.tracking import MLFLOW_FAILURES_TO_DROP, Tracker

    t = Tracker(store / "out", "job", "tests")
    calls = failing_from(monkeypatch, lambda n: n >= 2)
    with pytest.warns(UserWarning) as warned:
        for step in range(1, 9):
            t.log_metrics({"loss": 1.0 / step}, step)
        t.close(failed=True)
    assert calls == list(range(1, 2 + MLFLOW_FAILURES_TO_DROP))
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(t.run_id, "loss")] == [1]
    assert client.get_run(t.run_id).info.status == "FAILED"
    messages = [str(w.message) for w in warned]
    assert any(m.startswith("MLflow unavailable") for m in messages)
    assert any(f"{MLFLOW_FAILURES_TO_DROP} logging call(s) failed, then MLflow was dropped" in m for m in messages)
    assert len((store / "out" / "metrics.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize("parent", ["deleted", "unknown"])
def test_a_stale_parent_run_id_still_gives_the_job_a_run(store, monkeypatch, parent):
    """An exported parent run id naming a deleted run, or one of another store: the job logs a top-level run (it
    logged nothing to MLflow)."""
    import mlflow

    from llama_adapter import tracking

    if parent == "deleted":
        pid = tracking.start_parent_run("snakemake x", config={"a": 1})
        mlflow.MlflowClient().delete_run(pid)
    else:
        pid = "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", pid)  # (restored after the test: no other test inherits it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = tracking.Tracker(store / "out", "child", "tests")
        t.log_metrics({"loss": 1.0}, 1)
        t.close()
    assert t.run_id is not None
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(t.run_id, "loss")] == [1]


@pytest.mark.parametrize("value", ["[1, 2]", "null", '"abc"'])
def test_tags_env_that_is_not_an_object_is_named(monkeypatch, value):
    """Valid JSON that is not an object is refused naming the variable (an AttributeError before)."""
    from llama_adapter.tracking import run_tags

    monkeypatch.setenv("LLAMA_ADAPTER_TAGS", value)
    with pytest.raises(ValueError, match="LLAMA_ADAPTER_TAGS"):
        run_tags("x")


def test_parent_run_not_left_running_when_its_setup_fails(store, monkeypatch):
    """A parent run whose config could not be logged (the invocation then exports none) is ended FAILED, not left
    RUNNING for ever."""
    import mlflow

    from llama_adapter import tracking

    def refuse(*a, **k):
        raise OSError("artifact store not writable")

    monkeypatch.setattr(mlflow.MlflowClient, "log_dict", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tracking.start_invocation_run("snakemake x", {"a": 1}) is None
    tracking.end_invocation_run("FAILED")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("llama-adapter").experiment_id])
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []


def test_a_parent_run_stopped_by_ctrl_c_as_it_is_set_up_ends_killed(store, monkeypatch):
    """Ctrl-C in onstart while the parent run logs the config (a server's calls): the KeyboardInterrupt passed the
    set-up's `except Exception`, and the run, whose id no job or hook had yet, stayed RUNNING for ever; now it ends
    KILLED, tagged stopped_by SIGINT."""
    import mlflow

    from llama_adapter import tracking

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.MlflowClient, "log_dict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tracking.start_invocation_run("snakemake x", {"a": 1})
    assert "MLFLOW_PARENT_RUN_ID" not in os.environ
    client = mlflow.MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("llama-adapter").experiment_id])
    assert (run.info.status, run.data.tags.get("stopped_by")) == ("KILLED", "SIGINT")


def test_a_ctrl_c_in_the_parent_runs_set_up_is_not_lost_when_the_store_fails_again(store, monkeypatch):
    """The store failing again as the interrupted run is ended (a broken connection) replaced the KeyboardInterrupt
    with its own error, which start_invocation_run turned into a warning: the invocation went on after a Ctrl-C."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from llama_adapter import tracking

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    def broken(*a, **k):
        raise MlflowException("store gone")

    monkeypatch.setattr(mlflow.MlflowClient, "log_dict", interrupted)
    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", broken)
    with pytest.raises(KeyboardInterrupt):
        tracking.start_invocation_run("snakemake x", {"a": 1})
    assert "MLFLOW_PARENT_RUN_ID" not in os.environ


# ---------------------------------------------------------------- the experiment: $MLFLOW_EXPERIMENT_NAME or _ID


@pytest.fixture
def experiments(store, monkeypatch):
    """Two experiments in the store ("chosen", "other": name -> id), and neither variable set."""
    import mlflow

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # No current experiment of an earlier test's mlflow.set_experiment (MLflow's own in-process state): the id it
    # exported is not the user's, and one of these experiments may have the same id in this store.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    return {name: client.create_experiment(name) for name in ("chosen", "other")}


@pytest.mark.parametrize("named", [False, True])
def test_an_experiment_id_the_user_sets_takes_the_runs(experiments, store, monkeypatch, named):
    """MLFLOW_EXPERIMENT_ID, MLflow's other way to choose an experiment (an existing one's id), was ignored: the
    job's and the invocation's runs went to the library's experiment (llama-adapter). Alone, or with
    MLFLOW_EXPERIMENT_NAME naming the same experiment, it takes them."""
    import mlflow

    from llama_adapter import tracking

    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiments["chosen"])
    if named:
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "chosen")
    parent = tracking.start_parent_run("snakemake x")
    t = tracking.Tracker(store / "out", "job", "tests")
    t.close()
    client = mlflow.MlflowClient()
    assert [client.get_run(r).info.experiment_id for r in (parent, t.run_id)] == [experiments["chosen"]] * 2
    assert client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT) is None


def test_an_experiment_id_and_a_name_apart_are_refused(experiments, store, monkeypatch):
    """MLFLOW_EXPERIMENT_ID and MLFLOW_EXPERIMENT_NAME naming two experiments (MLflow refuses them too): the runs
    went to the name's, the id silently ignored; now a job and the invocation stop, both variables named."""
    from llama_adapter import tracking
    from llama_adapter.errors import InputError

    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiments["chosen"])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "other")
    expected = rf"MLFLOW_EXPERIMENT_ID={experiments['chosen']}.*'chosen'.*MLFLOW_EXPERIMENT_NAME='other'"
    with pytest.raises(InputError, match=expected):
        tracking.Tracker(store / "out", "job", "tests")
    with pytest.raises(InputError, match=expected):
        tracking.start_invocation_run("snakemake x")
    assert "MLFLOW_PARENT_RUN_ID" not in os.environ


@pytest.mark.parametrize("value", ["4711", "not a number"])
def test_an_experiment_id_the_store_lacks_is_refused(experiments, store, monkeypatch, value):
    """An id the store has no experiment of (another store's, a typo) was ignored; now it is refused, naming the
    variable, its value and the store."""
    from llama_adapter import tracking
    from llama_adapter.errors import InputError

    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", value)
    with pytest.raises(InputError, match=f"MLFLOW_EXPERIMENT_ID={value}.*{os.environ['MLFLOW_TRACKING_URI']}"):
        tracking.Tracker(store / "out", "job", "tests")


def test_the_workflow_names_no_experiment_over_a_users_id(monkeypatch):
    """The workflow exports mlflow.experiment as MLFLOW_EXPERIMENT_NAME unless the user set one: beside a user's
    MLFLOW_EXPERIMENT_ID it named the config's experiment (llama-adapter by default), which then clashed with the
    id. The environment's choice wins, as its MLFLOW_TRACKING_URI does."""
    from llama_adapter import tracking

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", tracking.TAGS_ENV):  # restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "7")
    tracking.export_invocation("sqlite:///x.db", "llama-adapter", {})
    assert "MLFLOW_EXPERIMENT_NAME" not in os.environ and os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"


# ---------------------------------------------------------------- under a caller's own MLflow run


@pytest.fixture
def callers_run(store, monkeypatch):
    """An MLflow run the caller (a notebook, a script) started before calling the library, as mlflow.start_run
    leaves it: active in this process."""
    import mlflow

    from llama_adapter import tracking

    for name, value in tracking.MLFLOW_DEFAULTS.items():  # the tracker sets them; undone after the test
        monkeypatch.setenv(name, os.environ.get(name, value))
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # not an earlier test's store
    mlflow.set_experiment("notebook")
    return mlflow.start_run(run_name="the caller's own run")


def assert_still_the_callers(run) -> None:
    import mlflow

    assert mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"


@pytest.mark.parametrize("exported_parent", [False, True])
def test_under_a_callers_run_the_tracker_logs_a_child_of_it(callers_run, store, monkeypatch, exported_parent):
    """Called under a run of the caller's own, the tracker could not start its run ('Run ... is already active')
    and logged to metrics.jsonl only: now its run is a child of the caller's (nearer than an exported workflow
    parent), takes the metrics, ends FINISHED, and the caller's run goes on."""
    import mlflow

    from llama_adapter import tracking

    if exported_parent:
        monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", tracking.start_parent_run("snakemake x"))
    t = tracking.Tracker(store / "out", "child", "tests")
    t.log_metrics({"loss": 1.0}, 1)
    t.close()
    run = mlflow.MlflowClient().get_run(t.run_id)
    assert run.data.tags["mlflow.parentRunId"] == callers_run.info.run_id
    assert (run.info.status, run.data.metrics) == ("FINISHED", {"loss": 1.0})
    assert_still_the_callers(callers_run)


def test_under_a_callers_run_a_resumed_run_is_that_run(callers_run, store):
    """A run resumed by id (train --resume) under a caller's run reopens that run, not a new one, and ends it
    alone."""
    import mlflow

    from llama_adapter.tracking import Tracker

    first = Tracker(store / "out", "interrupted", "tests")
    first.log_metrics({"loss": 1.0}, 1)
    first.close(status="KILLED")
    t = Tracker(store / "out", "resumed", "tests", run_id=first.run_id)
    t.log_metrics({"loss": 0.5}, 2)
    t.close()
    assert t.run_id == first.run_id
    client = mlflow.MlflowClient()
    assert client.get_run(t.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(t.run_id, "loss")] == [1, 2]
    assert_still_the_callers(callers_run)


@pytest.mark.parametrize("error", ["failure", "SIGTERM", "Ctrl-C"])
def test_a_failure_or_stop_under_a_callers_run_ends_the_child_only(callers_run, store, monkeypatch, error):
    """A failure, stop signal or Ctrl-C while the tracker records its environment ended the caller's run (KILLED
    or FAILED) in its place: now it ends the tracker's child run, and the caller's run stays active."""
    import mlflow

    from llama_adapter import tracking
    from llama_adapter.errors import StoppedBySignal

    raised = {"failure": RuntimeError("no torch"), "SIGTERM": StoppedBySignal(signal.SIGTERM),
              "Ctrl-C": KeyboardInterrupt()}[error]

    def environment():
        raise raised

    monkeypatch.setattr(tracking, "environment", environment)
    with pytest.raises(type(raised)):
        tracking.Tracker(store / "out", "stopped child", "tests")
    [child] = mlflow.MlflowClient().search_runs([callers_run.info.experiment_id],
                                                "attributes.run_name = 'stopped child'")
    assert child.data.tags["mlflow.parentRunId"] == callers_run.info.run_id
    assert child.info.status == ("FAILED" if error == "failure" else "KILLED")
    assert_still_the_callers(callers_run)


def test_a_stop_as_the_child_run_ends_leaves_the_callers_run_alone(callers_run, store, monkeypatch):
    """Ctrl-C once mlflow.end_run has taken the child run off the stack (its system-metrics thread's join): the
    tracker's second end_run, meant for its own run, ended the caller's KILLED."""
    import mlflow

    from llama_adapter.tracking import Tracker

    t = Tracker(store / "out", "child", "tests")
    real = mlflow.end_run

    def end_run(status="FINISHED"):
        ending = mlflow.active_run().info.run_id
        real(status)
        if ending == t.run_id and status == "FINISHED":  # the child's run alone: the caller ends its own at teardown
            raise KeyboardInterrupt

    monkeypatch.setattr(mlflow, "end_run", end_run)
    with pytest.raises(KeyboardInterrupt):
        t.close()
    assert mlflow.MlflowClient().get_run(t.run_id).info.status == "FINISHED"
    assert_still_the_callers(callers_run)


@pytest.mark.parametrize("named", [None, "named by the user"])
def test_under_a_callers_run_the_child_is_in_that_runs_experiment(callers_run, store, monkeypatch, named):
    """The child of a caller's run went to the library's experiment (llama-adapter), apart from its parent, and the
    UI, which nests runs within one experiment, did not show it nested: now it goes to its parent's experiment,
    unless $MLFLOW_EXPERIMENT_NAME names one."""
    import mlflow

    from llama_adapter.tracking import Tracker

    if named:
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", named)
    t = Tracker(store / "out", "child", "tests")
    t.close()
    expected = mlflow.get_experiment_by_name(named).experiment_id if named else callers_run.info.experiment_id
    assert mlflow.MlflowClient().get_run(t.run_id).info.experiment_id == expected
    assert_still_the_callers(callers_run)


def test_under_a_callers_run_of_another_store_the_child_is_in_the_librarys_experiment(store, tmp_path, monkeypatch):
    """A caller's run in another store than the one the library logs to (the caller named a store after starting
    its run) has no experiment there: the child goes to the library's own experiment, not without MLflow."""
    import mlflow

    from llama_adapter.tracking import DEFAULT_EXPERIMENT, Tracker

    library_store, callers_store = os.environ["MLFLOW_TRACKING_URI"], f"sqlite:///{tmp_path}/the caller's.db"
    mlflow.set_tracking_uri(callers_store)  # sets $MLFLOW_TRACKING_URI too
    mlflow.set_experiment("notebook")
    callers_run = mlflow.start_run(run_name="the caller's own run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", library_store)
    t = Tracker(store / "out", "child", "tests")
    t.close()
    library = mlflow.MlflowClient(library_store)
    librarys_experiment = library.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id
    assert library.get_run(t.run_id).info.experiment_id == librarys_experiment
    assert mlflow.active_run().info.run_id == callers_run.info.run_id
    mlflow.set_tracking_uri(callers_store)  # where the caller ends its run
    mlflow.end_run()


# ---------------------------------------------------------------- a workflow invocation's stop signals


@pytest.fixture
def stop_handlers():
    """SIGTERM's and SIGINT's handlers, stand-ins for Snakemake's, which count the signals; restored after."""
    import signal

    seen = []
    before = {s: signal.signal(s, lambda signum, frame: seen.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    yield seen
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_a_second_invocation_in_one_process_forgets_the_first_ones_stop(stop_handlers, monkeypatch):
    """Two invocations through Snakemake's API in one process: each onstart calls record_invocation_stops. The
    second kept the first one's stop (its failure ended KILLED, tagged with a signal it never received) and wrapped
    the first's wrapper again (each signal then passed through both)."""
    import signal

    from llama_adapter import tracking

    monkeypatch.setattr(tracking, "invocation_stopped_by", None)
    tracking.record_invocation_stops()
    signal.raise_signal(signal.SIGINT)  # the first invocation, stopped by Ctrl-C
    assert tracking.invocation_stopped_by == "SIGINT"
    tracking.record_invocation_stops()  # the second one's onstart
    assert tracking.invocation_stopped_by is None
    signal.raise_signal(signal.SIGTERM)
    assert tracking.invocation_stopped_by == "SIGTERM"
    assert stop_handlers == [signal.SIGINT, signal.SIGTERM]  # each handled once, by the handler it had before
    for signum in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(signum)
        assert handler.func is tracking._remember_stop and not hasattr(handler.args[0], "func"), handler


def test_a_dataset_another_job_inserted_first_into_a_sqlite_store_is_recorded(store, monkeypatch):
    """The SQLite store looks a dataset up, then inserts it: of two jobs that record one new dataset at once, the
    second's insert fails on the unique key (an MlflowException, not a server's RestException, which alone was
    asked again). Forced here on the first call, where tests/test_mlflow_server.py's race of 6 jobs may not lose it:
    asked again, the store finds the row."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from llama_adapter.tracking import Tracker

    (store / "data").mkdir()
    (store / "data" / "records.jsonl").write_text('{"a": 1}\n')
    t = Tracker(store / "out", "job", "tests")
    real, calls = mlflow.log_input, []

    def second_to_insert(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", second_to_insert)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no call lost, none warned of
        t.log_dataset(store / "data", "shared/train", "training", records=1)
        t.close()
    inputs = mlflow.MlflowClient().get_run(t.run_id).inputs.dataset_inputs
    assert ([d.dataset.name for d in inputs], t.lost) == (["shared/train"], 0)


# ---------------------------------------------------------------- runs whose process was killed outright

HOLD_A_RUN = textwrap.dedent("""
    import sys, time, warnings
    from pathlib import Path
    from llama_adapter.tracking import Tracker
    warnings.simplefilter("ignore")
    t = Tracker(Path(sys.argv[1]), sys.argv[2], "tests")
    Path(sys.argv[1], "run_id").write_text(t.run_id)
    time.sleep(600)  # a long job: SIGKILLed (the out-of-memory killer) or left running
""")


def test_a_run_whose_process_was_killed_outright_is_ended_as_the_next_invocation_starts(store, monkeypatch):
    """A job killed by SIGKILL (the out-of-memory killer) runs no handler: its run stayed RUNNING for ever. The next
    invocation's start ends it KILLED, tagged ended_by=orphaned, and names it; a job still running keeps its run
    RUNNING."""
    import mlflow

    from llama_adapter import tracking

    env = {**os.environ, "PYTHONPATH": str(Path(tracking.__file__).parents[1])}
    jobs = {name: subprocess.Popen([sys.executable, "-c", HOLD_A_RUN, str(store / name), name], env=env)
            for name in ("killed", "alive")}
    try:
        run_ids = {}
        for name, job in jobs.items():
            while not (store / name / "run_id").exists():
                assert job.poll() is None, f"the {name} job ended before its run opened"
                time.sleep(0.1)
            run_ids[name] = (store / name / "run_id").read_text()
        jobs["killed"].kill()
        jobs["killed"].wait()
        monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", "")  # restored (absent) after the test
        monkeypatch.delenv("MLFLOW_PARENT_RUN_ID")
        with pytest.warns(UserWarning, match=r"1 run\(s\) left RUNNING by a process killed outright ended KILLED, "
                                             r"tagged ended_by=orphaned: killed$"):
            parent = tracking.start_invocation_run("snakemake next", None)
        client = mlflow.MlflowClient()
        killed, alive = (client.get_run(run_ids[name]) for name in ("killed", "alive"))
        assert killed.info.status == "KILLED" and killed.data.tags["ended_by"] == "orphaned"
        assert alive.info.status == "RUNNING" and "ended_by" not in alive.data.tags
        assert client.get_run(parent).info.status == "RUNNING"  # the new invocation's own run
    finally:
        for job in jobs.values():
            job.kill()
            job.wait()


def test_only_a_run_whose_end_is_certain_is_ended(store):
    """end_orphaned_runs reads each RUNNING run's process tags: it ends a run of this host whose pid is gone or
    is another process now (a pid is reused: its start differs), and leaves alone another user's run, a run of
    another host outside SLURM or of another PID namespace (a container), a run without process tags (an older
    run) and a live process's run."""
    import mlflow

    from llama_adapter import tracking

    me = tracking.process_tags()
    boot, ticks = me["process.started"].split("/")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cases = {
        "this process": (me, "RUNNING"),
        "pid gone": ({**me, "process.pid": str(dead.pid)}, "KILLED"),
        "pid reused": ({**me, "process.started": f"{boot}/{int(ticks) - 1}"}, "KILLED"),
        "before a reboot": ({**me, "process.started": f"another-boot/{ticks}"}, "KILLED"),
        "another user": ({**me, "process.pid": str(dead.pid), "process.uid": str(os.getuid() + 1)}, "RUNNING"),
        "another host": ({**me, "process.pid": str(dead.pid), "process.host": "elsewhere"}, "RUNNING"),
        "another container": ({**me, "process.pid": str(dead.pid), "process.pid_namespace": "pid:[1]"}, "RUNNING"),
        "no process tags": ({}, "RUNNING"),
    }
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("orphans")
    runs = {name: client.create_run(experiment, tags=tags, run_name=name).info.run_id
            for name, (tags, _) in cases.items()}
    assert sorted(tracking.end_orphaned_runs(client, experiment)) == ["before a reboot", "pid gone", "pid reused"]
    for name, (_, status) in cases.items():
        assert client.get_run(runs[name]).info.status == status, name


def test_a_run_another_process_reopens_meanwhile_is_not_ended(store, monkeypatch):
    """A run left RUNNING by a killed training, which `train --resume` reopens in another process between the
    check's search and its second look: that process tagged the run as its own, so the run is left running."""
    import mlflow

    from llama_adapter import tracking

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("orphans")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_id = client.create_run(experiment, tags={**tracking.process_tags(), "process.pid": str(dead.pid)}).info.run_id
    looked = mlflow.MlflowClient.get_run

    def resumed_meanwhile(self, rid):  # the resumed training's resumed_run, as the check looks again
        for key, value in tracking.process_tags().items():
            client.set_tag(rid, key, value)
        return looked(self, rid)

    monkeypatch.setattr(mlflow.MlflowClient, "get_run", resumed_meanwhile)
    assert tracking.end_orphaned_runs(client, experiment) == []
    assert looked(client, run_id).info.status == "RUNNING"


def test_a_resumed_run_is_tagged_as_its_new_process_before_it_runs_again(store, monkeypatch):
    """Reopened, a run is RUNNING again: with the killed process's tags still on it, a check at that moment would
    end it. resumed_run tags it as the new process first."""
    import mlflow

    from llama_adapter import tracking

    first = tracking.Tracker(store / "out", "interrupted", "tests")
    first.close(status="KILLED")
    mlflow.MlflowClient().set_tag(first.run_id, "process.pid", "1")  # as the killed process left it
    seen, real = [], mlflow.start_run

    def start_run(*args, **kwargs):
        seen.append(mlflow.MlflowClient().get_run(kwargs["run_id"]).data.tags["process.pid"])
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "start_run", start_run)
    resumed = tracking.Tracker(store / "out", "resumed", "tests", run_id=first.run_id)
    resumed.close()
    assert resumed.run_id == first.run_id and seen == [str(os.getpid())]


HANG_UP_AFTER_THE_END = textwrap.dedent("""
    import os, signal, sys
    from llama_adapter import tracking
    os.environ["MLFLOW_PARENT_RUN_ID"] = tracking.start_parent_run("snakemake x")
    tracking.record_invocation_stops()
    tracking.end_invocation_run("FINISHED")  # onsuccess
    print(os.environ["MLFLOW_PARENT_RUN_ID"], flush=True)
    os.kill(os.getpid(), signal.SIGHUP)  # the terminal closed in snakemake's last moments
""")


def test_a_hangup_after_the_invocation_ended_leaves_its_run_finished(store):
    """The hangup handler stays installed after onsuccess: a SIGHUP then re-ended the FINISHED run as KILLED."""
    import mlflow

    from llama_adapter import tracking

    env = {**os.environ, "PYTHONPATH": str(Path(tracking.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", HANG_UP_AFTER_THE_END], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGHUP, done.stderr[-2000:]
    run = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(done.stdout.split()[0])
    assert (run.info.status, run.data.tags.get("stopped_by")) == ("FINISHED", None)


def test_the_tracker_alone_writes_its_run_log(store):
    """metrics.jsonl has one writer, the Tracker: keep_through cuts an earlier run's lines at a step (a resumed
    training's checkpoint; -1: none) before this run appends, and train and evaluate ask it to rather than
    rewriting or removing the file themselves."""
    import inspect
    import json

    from llama_adapter import evaluate, train
    from llama_adapter.tracking import Tracker

    log = store / "out" / "metrics.jsonl"
    first = Tracker(store / "out", "interrupted", "tests")
    for step in (1, 2, 3):
        first.log_metrics({"loss": 1.0 / step}, step)
    first.close(status="KILLED")
    resumed = Tracker(store / "out", "resumed", "tests", run_id=first.run_id, keep_through=2)
    resumed.log_metrics({"loss": 0.25}, 3)
    resumed.close()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    fresh = Tracker(store / "out", "fresh", "tests", keep_through=-1)
    fresh.close()
    assert log.read_text() == ""
    for module in (train, evaluate):
        source = inspect.getsource(module)
        assert "keep_through=" in source and "truncate_" not in source and "RUN_LOG).unlink" not in source
