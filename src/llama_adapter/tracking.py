"""Experiment tracking: MLflow when it is reachable, and always a local JSONL of the same metrics.

Only rank 0 of a distributed job tracks. A tracking server that is down or a locked database must not
kill a training run that may have hours left, and `metrics.jsonl` always receives everything. One MLflow call
that fails (a locked database, a server restarting, one refused value) loses that call alone: the run goes on
logging, and at its end warns of, and tags the run with, how many calls were lost. MLflow is dropped for the
rest of the run where it cannot be reached at the start, or fails MLFLOW_FAILURES_TO_DROP calls in a row (a
server gone for good, whose every later call would wait out the client's retries).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import RUN_LOG
from .errors import STOPS, DataError, InputError
from .io import atomic_path, sha256_tree

DEFAULT_TRACKING_URI = "sqlite:///results/mlflow.db"  # MLflow >= 3.13 refuses the plain file store
DEFAULT_EXPERIMENT = "llama-adapter"
# MLflow's two variables that choose the experiment: a name (created if missing), or an existing experiment's id.
EXPERIMENT_NAME_ENV, EXPERIMENT_ID_ENV = "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"
TAGS_ENV = "LLAMA_ADAPTER_TAGS"  # a JSON object of tags for every run of a workflow invocation (config hash...)
# The MLflow client's settings for a job, unless the caller set them: give up on a dead server within seconds,
# not minutes; sample CPU, memory and GPU every 5 s (MLflow's 10 s would leave a short job without a point: the
# monitor logs nothing before its first interval ends).
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "5"}
PARAM_VALUE_LIMIT = 6000  # MLflow's maximum length of a parameter value
MLFLOW_FAILURES_TO_DROP = 3  # calls failed in a row that mean MLflow is gone, not one call refused
ORPHANED = {"ended_by": "orphaned"}  # the tag of a run whose process was killed outright (end_orphaned_runs)
LOST_CALLS_TAG = "mlflow_calls_lost"  # on a run that lost calls: how many (its history lacks what they logged)


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the code that runs (the package's own checkout; None for an installed wheel), not of
    whatever folder a job runs in."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def config_hash(config: dict) -> str:
    """The short hash of a resolved workflow config (key order does not matter) that tags every run of it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def run_tags(source: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Tags of a run: the caller's, the invocation's (from $LLAMA_ADAPTER_TAGS), the git commit and the SLURM
    job id when there is one. The commit and the entry point (`source`) also go in MLflow's own
    mlflow.source.* tags, which its UI shows as the run's source and version. (The MLflow run also gets
    process_tags, which are not the results' provenance.)"""
    try:
        shared = json.loads(os.environ.get(TAGS_ENV) or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"${TAGS_ENV} must be a JSON object of tags: {e}") from None
    if not isinstance(shared, dict):
        raise ValueError(f"${TAGS_ENV} must be a JSON object of tags; it holds a JSON {type(shared).__name__}")
    commit = git_commit()
    found = {"git_commit": commit, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
             "mlflow.source.git.commit": commit, "mlflow.source.name": source, "mlflow.source.type": "LOCAL"}
    return {**{k: str(v) for k, v in shared.items()}, **{k: v for k, v in found.items() if v}, **(extra or {})}


def process_tags() -> dict[str, str]:
    """Which process runs a run: its user id, host, PID namespace, pid and start (process_start), and, where it runs
    inside a SLURM job's step, the job and its cluster. What end_orphaned_runs reads to tell a run whose process
    was killed outright (SIGKILL, the kernel's out-of-memory killer: no handler runs, and the run would stay
    RUNNING for ever) from a live one. The job only where slurmd started the process's step ($SLURMD_NODENAME): a
    shell that merely inherited a job's variables (a tmux started in salloc) outlives the job."""
    tags = {"process.uid": str(os.getuid()), "process.host": socket.gethostname(), "process.pid": str(os.getpid()),
            "process.pid_namespace": pid_namespace(), "process.started": process_start(os.getpid())}
    if os.environ.get("SLURMD_NODENAME") and os.environ.get("SLURM_JOB_ID"):
        tags |= {"process.slurm_job": os.environ["SLURM_JOB_ID"],
                 "process.slurm_cluster": os.environ.get("SLURM_CLUSTER_NAME")}
    return {k: v for k, v in tags.items() if v}


# The tags that name a run's process: a run whose tags changed was reopened by another process (a resumed training).
PROCESS_TAGS = ("process.host", "process.pid_namespace", "process.pid", "process.started", "process.slurm_job",
                "process.slurm_cluster")


def process_start(pid: int) -> str | None:
    """When process `pid` started, as this boot's id and the clock ticks from boot to its start (Linux's /proc):
    no clock step (NTP, a resumed VM) moves it, and a pid used again has another. None where the process is gone
    (a zombie has exited) or there is no /proc (then no run is ever taken for orphaned here)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, *rest = stat[stat.rindex(")") + 2:].split()  # after the command's name, which may hold ")" and spaces
    return None if state == "Z" else f"{boot}/{rest[18]}"  # field 22 of proc(5): starttime


def environment() -> dict[str, str]:
    """What a run ran on, as tags: Python, torch and CUDA versions, the GPUs' name and count (none: CPU)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"env.python": platform.python_version(), "env.torch": torch.__version__,
            "env.cuda": torch.version.cuda or "none", "env.platform": platform.platform(),
            "env.gpu": torch.cuda.get_device_name(0) if gpus else "none", "env.gpu_count": str(gpus)}


def installed_distributions() -> str:
    """Every installed Python distribution as NAME==VERSION lines, sorted: the run's full software list."""
    found = {(d.metadata["Name"] or "?", d.version) for d in metadata.distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(found, key=lambda x: x[0].lower()))


def start_parent_run(name: str, tags: dict[str, str] | None = None, config: dict | None = None) -> str:
    """Open the run that every job of one workflow invocation nests under (via $MLFLOW_PARENT_RUN_ID); it
    stays RUNNING until end_run, so the UI shows an invocation in progress. It holds the resolved config as an
    artifact (config.yaml) and its hash as a param."""
    import mlflow

    experiment_id = chosen_experiment(mlflow, use_store(mlflow))
    # The client, not mlflow.start_run: an active run would be ended by MLflow's exit hook with this process.
    client = mlflow.MlflowClient()
    run_id = client.create_run(experiment_id, run_name=name,
                               tags={**run_tags("snakemake", tags), **process_tags()}).info.run_id
    if config is not None:
        try:
            client.log_param(run_id, "config_hash", config_hash(config))
            client.log_dict(run_id, config, "config.yaml")
        except BaseException as e:  # not left RUNNING for ever, unnamed by any job or hook
            # Ctrl-C in onstart (a KeyboardInterrupt, which `except Exception` lets by): a stop, KILLED as onerror
            # ends a stopped invocation's run. The store failing again here must not replace the error (a Ctrl-C
            # turned into a warning would let the invocation go on): the next invocation ends the run then.
            stopped = isinstance(e, KeyboardInterrupt)
            with contextlib.suppress(Exception):
                if stopped:
                    client.set_tag(run_id, "stopped_by", "SIGINT")
                client.set_terminated(run_id, status="KILLED" if stopped else "FAILED")
            raise
    return run_id


def end_run(run_id: str, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
    import mlflow

    use_store(mlflow)
    client = mlflow.MlflowClient()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=status)


def export_invocation(tracking_uri_: str, experiment: str, tags: dict[str, str]) -> None:
    """Set the environment every job of one workflow invocation inherits: the tracking store, experiment
    and tags, unless already set (a cluster job re-reading the workflow keeps what its invocation exported).
    An experiment the user chose by id ($MLFLOW_EXPERIMENT_ID) is not named: the environment's choice wins over
    the config's, as its store does, and a name beside the id would have to name the same experiment
    (chosen_experiment). Environment, not command line: a tag such as the config hash would otherwise change
    every job's command and make the engine rerun it."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri_)
    if not os.environ.get(EXPERIMENT_ID_ENV):
        os.environ.setdefault(EXPERIMENT_NAME_ENV, experiment)
    os.environ.setdefault(TAGS_ENV, json.dumps(tags))


def start_invocation_run(name: str, config: dict | None = None) -> str | None:
    """Open the invocation's parent run (holding `config`, the resolved workflow config) and export
    MLFLOW_PARENT_RUN_ID for its jobs (unless the caller exported one). A tracking store that is down must not
    stop the pipeline: warn, and jobs log top-level runs. An experiment variable that is wrong (InputError) does
    stop it: every job would be refused it too."""
    if "MLFLOW_PARENT_RUN_ID" not in os.environ:
        try:
            os.environ["MLFLOW_PARENT_RUN_ID"] = start_parent_run(name, {"rule": "all"}, config)
        except InputError:
            raise
        except Exception as e:
            warnings.warn(f"MLflow parent run not created ({type(e).__name__}: {e})", stacklevel=2)
            return None
        report_orphaned_runs(os.environ["MLFLOW_PARENT_RUN_ID"])
    return os.environ["MLFLOW_PARENT_RUN_ID"]


def pid_namespace() -> str:
    """This process's PID namespace (Linux; "" elsewhere): two containers of one host name (Docker's host
    network) number their processes apart, and a pid is only looked up within its own namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def report_orphaned_runs(run_id: str) -> None:
    """As an invocation starts: end the orphaned runs of its parent run's experiment (end_orphaned_runs) and say
    which, in a warning. Not a reason to stop the pipeline where it fails."""
    import mlflow

    try:
        use_store(mlflow)
        client = mlflow.MlflowClient()
        ended = end_orphaned_runs(client, client.get_run(run_id).info.experiment_id)
    except Exception as e:
        warnings.warn(f"MLflow orphaned runs not looked for ({type(e).__name__}: {e})", stacklevel=3)
        return
    if ended:
        tag = ", ".join(f"{k}={v}" for k, v in ORPHANED.items())
        warnings.warn(f"MLflow: {len(ended)} run(s) left RUNNING by a process killed outright ended KILLED, tagged "
                      f"{tag}: {', '.join(ended)}", stacklevel=3)


def end_orphaned_runs(client, experiment_id: str) -> list[str]:
    """End KILLED, tagged ORPHANED, the RUNNING runs of an experiment whose process is gone: killed outright
    (SIGKILL, the out-of-memory killer, a node lost), it ran no handler to end its run. Only this user's runs
    (process_tags), and only where the end is certain: a run of this host and PID namespace whose process no
    longer runs (process_start: a pid is reused), a run of a SLURM job of this cluster that squeue no longer
    lists. A run of another host outside SLURM, or without process tags (an older run), is left as it is. Each
    process or job is found gone before its run is read again, and a run is ended only if it is still RUNNING
    with the same process tags: a run its job ended meanwhile keeps its status, and one another process reopened
    meanwhile (a resumed training, which tags itself before it reopens: resumed_run) keeps running. The names of
    the runs ended."""
    host, namespace, uid = socket.gethostname(), pid_namespace(), str(os.getuid())
    jobs = slurm_jobs()  # before the runs are read: a job squeue no longer lists had ended by then
    ended, page = [], None
    while True:
        runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000,
                                  page_token=page)
        for run in runs:
            tags = run.data.tags
            if tags.get("process.uid") != uid or not tags.get("process.started"):  # another's, or an older run
                continue
            if tags.get("process.host") == host and tags.get("process.pid_namespace", "") == namespace:
                try:
                    gone = process_start(int(tags["process.pid"])) != tags["process.started"]
                except (KeyError, ValueError):  # tags edited by hand: nothing certain
                    continue
            elif tags.get("process.slurm_job") and jobs is not None:
                gone = tags.get("process.slurm_cluster", "") == jobs[0] and tags["process.slurm_job"] not in jobs[1]
            else:
                continue
            if not gone:
                continue
            now = client.get_run(run.info.run_id)
            if now.info.status == "RUNNING" and all(now.data.tags.get(k) == tags.get(k) for k in PROCESS_TAGS):
                for key, value in ORPHANED.items():
                    client.set_tag(run.info.run_id, key, value)
                client.set_terminated(run.info.run_id, status="KILLED")
                ended.append(run.info.run_name or run.info.run_id)
        page = runs.token
        if not page:
            return ended


def slurm_jobs() -> tuple[str, set[str]] | None:
    """This SLURM cluster's name and the ids of this user's jobs squeue lists (pending, running, completing): each
    job's own id, an array's tasks' and a heterogeneous job's parts' too (squeue's %A, as $SLURM_JOB_ID gives it);
    None where SLURM does not answer here (not installed, its controller down)."""
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30,
                                check=True).stdout
        listed = subprocess.run(["squeue", "--noheader", "--user", str(os.getuid()), "--format", "%A"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    cluster = next((line.split("=", 1)[1].strip() for line in config.splitlines()
                    if line.split("=", 1)[0].strip() == "ClusterName"), "")
    return cluster, {job.split("+")[0] for job in listed.split()}


# The first stop signal (its name) this workflow invocation received since record_invocation_stops; None: none.
invocation_stopped_by: str | None = None
# Whether end_invocation_run ended this invocation's run (onsuccess, onerror): a hangup after it leaves the run be.
invocation_ended = False


def _remember_stop(previous, signum, frame):
    """A stop signal's handler while record_invocation_stops is in force: remember it, then `previous` acts."""
    import signal

    global invocation_stopped_by
    invocation_stopped_by = invocation_stopped_by or signal.Signals(signum).name
    previous(signum, frame)


# How long a hangup waits for the parent run to be ended before the process ends all the same.
HANGUP_END_TIMEOUT_S = 15


def _end_on_hangup(signum, frame):
    """SIGHUP's handler where Snakemake has none (record_invocation_stops): end the parent run KILLED, tagged
    stopped_by, then die of the signal as its default action would have (the same exit status), before any hook.
    The run is ended from a thread of its own, waited for a while: the handler interrupts the main thread
    wherever it is, perhaps inside MLflow holding the store's lock (use_store) or a connection, which the handler
    itself would wait for for ever. Where that thread does not finish in time, the process ends with the run still
    RUNNING, and the next invocation ends it (end_orphaned_runs)."""
    import signal
    import threading

    global invocation_stopped_by
    invocation_stopped_by = invocation_stopped_by or signal.Signals(signum).name
    if not invocation_ended:  # a hangup after onsuccess or onerror: the run has its status
        ending = threading.Thread(target=end_invocation_run, args=("FAILED",), daemon=True)
        ending.start()
        ending.join(HANGUP_END_TIMEOUT_S)
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def record_invocation_stops() -> None:
    """From now on, the first SIGTERM, SIGINT (Ctrl-C) or SIGHUP (the terminal closed, ssh dropped) of this process
    is remembered for end_invocation_run, then handled as before. Snakemake calls onerror alike for a failed job and
    for a stop (its SIGTERM handler lets the running jobs end, its Ctrl-C handling cancels them), and says to it
    neither which nor why. The workflow's onstart calls this: Snakemake has installed its SIGTERM handler by then,
    which stays the one that acts. SIGHUP has none: its default action ends the process before any hook, so its
    handler here ends the parent run itself, then lets the signal end the process (_end_on_hangup). Another signal
    without a Python handler, and SIGHUP ignored (nohup: the invocation goes on), is left as it is; outside the main
    thread (no handlers there) nothing changes. Called again (another invocation in the same process, through
    Snakemake's API), it forgets the earlier invocation's stop and wraps no handler twice."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    global invocation_stopped_by, invocation_ended
    invocation_stopped_by, invocation_ended = None, False
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous = signal.getsignal(signum)
        ours = previous is _end_on_hangup or (isinstance(previous, functools.partial)
                                              and previous.func is _remember_stop)
        if signum == signal.SIGHUP and previous is signal.SIG_DFL:
            signal.signal(signum, _end_on_hangup)
        elif callable(previous) and not ours:
            signal.signal(signum, functools.partial(_remember_stop, previous))


def end_invocation_run(status: str) -> None:
    """End the invocation's parent run with `status`; FAILED (onerror: the invocation did not complete) is KILLED,
    tagged stopped_by, where a stop signal reached the invocation (record_invocation_stops)."""
    global invocation_ended
    invocation_ended = True
    if run_id := os.environ.get("MLFLOW_PARENT_RUN_ID"):
        stopped_by = invocation_stopped_by if status == "FAILED" else None
        try:
            end_run(run_id, "KILLED" if stopped_by else status, {"stopped_by": stopped_by} if stopped_by else None)
        except Exception as e:
            warnings.warn(f"MLflow parent run {run_id} not closed ({type(e).__name__}: {e})", stacklevel=2)


def sqlite_uri(path: str | Path) -> str:
    """The tracking URI of a SQLite store at `path` (made absolute). SQLAlchemy takes what follows `sqlite:///`
    as the file name verbatim, without percent-decoding (so percent-encoding would name another file), up to
    a `?`, which starts its query. Spaces, quotes, `#`, `%` and `;` need nothing; a `?` is refused (SQLite's
    own `file:` URI form would do for SQLite, but MLflow then makes a folder named `file:…` where it runs)."""
    path = os.path.abspath(path)
    if "?" in path:
        raise ValueError(f"the MLflow store {path} holds '?', which a sqlite:/// URI reads as the start of its "
                         "query; choose a results folder without it, or set mlflow.tracking_uri")
    return f"sqlite:///{path}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI; None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    if (db := sqlite_path(uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


def use_store(mlflow) -> str:
    """Make tracking_uri() MLflow's store; its URI. A new SQLite file gets its tables from MLflow's migrations
    as a client first opens it: jobs that open one at once would each migrate it, and all but one lose MLflow
    ("table ... already exists"), so each call opens the store holding a lock on its folder (after a process's
    first, MLflow's opened store is kept and this is one query). The lock keeps out the processes of this host
    only where the folder is on NFS or Lustre (a directory's flock there is the host's own, without an error: jobs
    of several nodes on a new store still race; the README's advice for a cluster is a tracking server, and the
    workflow's onstart opens the store before any job does). Where flock fails, the store opens unlocked."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if (db := sqlite_path(uri)) is not None:
        folder = os.open(db.parent, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                fcntl.flock(folder, fcntl.LOCK_EX)
            mlflow.MlflowClient().search_experiments(max_results=1)  # MLflow keeps the opened store per URI
        finally:
            os.close(folder)  # and with it the lock
    return uri


def artifact_location(uri: str) -> str | None:
    """Beside a SQLite store, artifacts go to mlartifacts/ next to the database (MLflow's default would be
    ./mlruns in whatever folder the job started in); a tracking server decides for itself."""
    if (db := sqlite_path(uri)) is not None:
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def users_experiment(mlflow) -> tuple[str | None, str | None]:
    """The experiment the user chose: its name ($MLFLOW_EXPERIMENT_NAME, which the workflow sets from
    mlflow.experiment) and its id ($MLFLOW_EXPERIMENT_ID), each None where unset or empty. Not an id that
    mlflow.set_experiment put there in this process (a notebook's, for its subprocesses): MLflow itself reads that
    one as the process's current experiment, before the environment, and it may be of another store than the
    library's (the library follows a caller's experiment through its active run alone: run_experiment)."""
    chosen_id = os.environ.get(EXPERIMENT_ID_ENV) or None
    # MLflow keeps the experiment set_experiment chose in this private variable (None: none); an MLflow without it
    # leaves every id in the environment the user's.
    if chosen_id is not None and chosen_id == getattr(mlflow.tracking.fluent, "_active_experiment_id", None):
        chosen_id = None
    return os.environ.get(EXPERIMENT_NAME_ENV) or None, chosen_id


def chosen_experiment(mlflow, uri: str) -> str:
    """The id of the experiment the library's runs go to in the store `uri`: the one the user chose
    (users_experiment), by id (an experiment the store holds) or by name (created if missing, its artifacts
    beside a SQLite store), else the library's (DEFAULT_EXPERIMENT). Both set, they must name one experiment:
    MLflow refuses an id apart from an existing name's experiment too, and one apart from a name not yet created
    would clash with it once a job had created it. Nothing is made MLflow's current experiment: set_experiment
    would export its id for this process's subprocesses, which would read it as the user's choice."""
    name, chosen_id = users_experiment(mlflow)
    if chosen_id is not None:
        from mlflow.exceptions import MlflowException

        try:
            experiment = mlflow.MlflowClient().get_experiment(chosen_id)
        except MlflowException as e:
            # An id the store does not hold, or not an id at all; anything else (a server down) is no input error.
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise InputError(f"${EXPERIMENT_ID_ENV}={chosen_id}: the MLflow store {uri} holds no experiment of that "
                             f"id; expected the id of one of its experiments (or set ${EXPERIMENT_NAME_ENV} to "
                             "name one, created if missing)") from None
        if name is not None and experiment.name != name:
            raise InputError(f"${EXPERIMENT_ID_ENV}={chosen_id} is the experiment {experiment.name!r}, but "
                             f"${EXPERIMENT_NAME_ENV}={name!r} names another; expected one experiment: unset one "
                             "of them, or make them agree")
        return experiment.experiment_id
    name = name or DEFAULT_EXPERIMENT
    if (experiment := mlflow.get_experiment_by_name(name)) is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # another job created it in the meantime
        if (experiment := mlflow.get_experiment_by_name(name)) is None:
            raise
        return experiment.experiment_id


def run_experiment(mlflow, uri: str, caller_run_id: str | None) -> str:
    """The id of the experiment of a tracker's run. Under a caller's active run and unless the user chose an
    experiment, the caller's run's: MLflow's UI shows a child nested under its parent only within one experiment
    (MLflow itself puts a nested run in the current experiment, not its parent's). A caller's run this store does
    not hold (the caller's own tracking URI) has no experiment here: then, as without a caller,
    chosen_experiment()."""
    if caller_run_id is not None and users_experiment(mlflow) == (None, None):
        from mlflow.exceptions import MlflowException

        try:
            return mlflow.MlflowClient().get_run(caller_run_id).info.experiment_id
        except MlflowException:
            pass
    return chosen_experiment(mlflow, uri)


def truncate_log(path: Path, step: int) -> None:
    """metrics.jsonl's lines up to `step` (none for a fresh run, step -1), rewritten whole (a kill while rewriting
    keeps the old file). A last line cut short (a process killed, or a node lost, mid-write) is past the checkpoint
    and dropped; an unreadable line before it is an error naming the file and line."""
    if step < 0:  # a fresh run keeps no line: none need be read
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    kept, lines = [], path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            logged = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if number == len(lines):
                break
            raise DataError(f"{path}, line {number}: not a logged step ({type(e).__name__}: {e}); expected one JSON "
                            "object with its step per line, as a Tracker writes them") from None
        if logged <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in kept))


class Tracker:
    def __init__(self, out_dir: Path, run_name: str, source: str, enabled: bool = True,
                 tags: dict[str, str] | None = None, run_id: str | None = None, keep_through: int | None = None):
        """source: the entry point (e.g. llama_adapter.train), MLflow's mlflow.source.name. run_id: reopen that
        run (a resumed training run keeps its MLflow run; its tags are set again, so that they name the job
        that resumed it). A reopened run already holds the steps logged before the interruption, some of them
        after the checkpoint the run resumes from: those are redone, and go to metrics.jsonl again (which keep_through
        cut at the checkpoint) but not to MLflow, so that its history has each step of a metric
        once. Every run records its environment (tags env.*, and environment/requirements.txt) and system
        metrics (CPU, memory, GPU). Called under an MLflow run of the caller's own (a notebook's or script's
        mlflow.start_run), the new run is its child, in its experiment unless the user chose one
        ($MLFLOW_EXPERIMENT_NAME or $MLFLOW_EXPERIMENT_ID: chosen_experiment), and only that child is ever ended:
        the caller's run stays active. keep_through: what metrics.jsonl keeps of an earlier run's lines, the
        steps up to this one (a resumed training's checkpoint; -1: none, a fresh run), before this run appends to
        it; None: all of them."""
        self.enabled = enabled
        self.mlflow = None  # the module, once the run started; kept after a failure, to end the run as it ends
        self.logging = False  # whether MLflow takes what the run logs (off once dropped, and once closed)
        self.lost = 0  # MLflow calls that failed: what they logged is in metrics.jsonl only
        self.failed_in_a_row = 0
        self.run_id: str | None = None
        self.caller_run_id: str | None = None  # the caller's active run, which this tracker must never end
        self.tags: dict[str, str] = {}
        self.logged_through: dict[str, int] = {}  # metric -> the last step a reopened run holds
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if keep_through is not None:
            truncate_log(Path(out_dir) / RUN_LOG, keep_through)
        self.jsonl = open(Path(out_dir) / RUN_LOG, "a", encoding="utf-8")
        self.tags = tags = run_tags(source, tags)
        for name, value in MLFLOW_DEFAULTS.items():  # the caller's own settings win
            os.environ.setdefault(name, value)
        mlflow = None
        # A stop signal or Ctrl-C once the run may be open (start_run itself takes a while: the system-metrics
        # thread), before the caller holds this tracker to close it, would leave the run to MLflow's exit hook,
        # which ends it FINISHED.
        try:
            try:
                import mlflow

                if caller := mlflow.active_run():
                    self.caller_run_id = caller.info.run_id
                experiment_id = run_experiment(mlflow, use_store(mlflow), self.caller_run_id)
                tagged = {**tags, **process_tags()}  # the process's own in MLflow only, not in the results
                run = resumed_run(mlflow, run_id, tagged) if run_id is not None else None
                if run is not None:
                    self.logged_through = last_logged_steps(mlflow.MlflowClient(), run_id)
                else:
                    run = new_run(mlflow, run_name, tagged, self.caller_run_id, experiment_id)
                self.mlflow, self.run_id, self.logging = mlflow, run.info.run_id, True
            except InputError:  # an experiment variable that is wrong: the user's to fix, not MLflow's outage
                raise
            except Exception as e:  # unreachable server, locked database, missing package: keep training
                self._drop_mlflow(e)
            # Tags, not params: a run resumed on another machine records what it ran on last (params cannot
            # change).
            self.set_tags(environment())
            self._call("log_text", installed_distributions(), "environment/requirements.txt")
        except BaseException as e:
            self.mlflow = self.mlflow or mlflow  # stopped inside start_run: close ends its run, once on the stack
            self.close(status="KILLED" if isinstance(e, STOPS) else "FAILED")
            raise

    def _drop_mlflow(self, error: Exception) -> None:
        warnings.warn(f"MLflow unavailable ({type(error).__name__}: {error}); metrics go to metrics.jsonl only",
                      stacklevel=3)
        self.logging = False

    def _call(self, name: str, *args, **kwargs) -> None:
        if self.logging:
            try:
                getattr(self.mlflow, name)(*args, **kwargs)
            except Exception as e:
                self._lost(name, e)
            else:
                self.failed_in_a_row = 0

    def _lost(self, name: str, error: Exception) -> None:
        """A call MLflow did not take: counted (close reports the count), warned of the first time, and the run
        goes on logging, unless it is the MLFLOW_FAILURES_TO_DROP-th failure in a row."""
        self.lost += 1
        self.failed_in_a_row += 1
        if self.failed_in_a_row >= MLFLOW_FAILURES_TO_DROP:
            self._drop_mlflow(error)
        elif self.lost == 1:
            warnings.warn(f"MLflow {name} failed ({type(error).__name__}: {error}); its values are in "
                          "metrics.jsonl only, and the run goes on logging to MLflow", stacklevel=4)

    def log_params(self, params: dict) -> None:
        if self.enabled:
            flat = {k: json.dumps(v) if isinstance(v, list | tuple) else v for k, v in flatten(params).items()}
            self._call("log_params", {k: str(v)[:PARAM_VALUE_LIMIT] for k, v in flat.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
            new = {k: v for k, v in metrics.items() if step > self.logged_through.get(k, -1)}
            if new:
                self._call("log_metrics", new, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._call("set_tags", tags)

    def log_dataset(self, path: Path, name: str, context: str, **counts: int | str | None) -> None:
        """A dataset the run read, in MLflow's Datasets: its name, a digest of its files (sha256; the whole one
        as a tag), its path as the source, the context (training, validation, evaluation) and counts such as
        records or tokens as tags."""
        if not self.logging:
            return
        try:
            digest = sha256_tree(Path(path))
        except OSError as e:  # the data was read already; a record of it missing must not fail the run
            warnings.warn(f"MLflow dataset {name} not recorded: {path}: {e.strerror or e}", stacklevel=2)
            return
        try:
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            with warnings.catch_warnings():  # MLflow registers its local-file source twice, and warns of it
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(str(Path(path).resolve()))
            dataset = MetaDataset(source, name=name, digest=digest[:16])
        except Exception as e:
            self._lost("log_input", e)
            return
        tags = {"sha256": digest, **{k: str(v) for k, v in counts.items() if v is not None}}
        from mlflow.exceptions import MlflowException

        try:
            self.mlflow.log_input(dataset, context=context, tags=tags)
        except MlflowException:
            # The store (a server's or a SQLite file) looks the dataset up in the experiment, then inserts it: two
            # jobs that log the same new dataset at once both insert, and the second fails on the unique key.
            # Asked again, it finds the row.
            self._call("log_input", dataset, context=context, tags=tags)
        except Exception as e:
            self._lost("log_input", e)
        else:
            self.failed_in_a_row = 0

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files, into the run's artifacts (under artifact_path: the root by default)."""
        if self.enabled:
            if Path(path).is_dir():
                self._call("log_artifacts", str(path), artifact_path or Path(path).name)
            else:
                self._call("log_artifact", str(path), artifact_path)

    def close(self, failed: bool = False, status: str | None = None) -> None:
        """End the run: FINISHED, FAILED (failed=True), or the given MLflow status (KILLED: stopped by a
        signal). Also after failures dropped MLflow: the run ends with the job's status, not MLflow's exit
        hook's FINISHED, and the next run of the process starts afresh. Calls lost on the way are counted in a
        warning and, where MLflow still takes calls, in the run's LOST_CALLS_TAG."""
        if self.enabled:
            self.jsonl.close()
            if self.mlflow is not None:
                try:
                    if self.lost:
                        self.set_tags({LOST_CALLS_TAG: str(self.lost)})
                        warnings.warn(f"MLflow run {self.run_id}: {self.lost} logging call(s) failed"
                                      f"{'' if self.logging else ', then MLflow was dropped'}; its history lacks "
                                      "what they logged, which metrics.jsonl holds", stacklevel=2)
                    try:
                        self._end_own_run(status or ("FAILED" if failed else "FINISHED"))
                    except Exception as e:
                        warnings.warn(f"MLflow run {self.run_id} not ended ({type(e).__name__}: {e})", stacklevel=2)
                except STOPS:
                    # Stopped while the run ends (a server's calls, the system-metrics thread's join): the job stops
                    # and its outputs go, so the run ends KILLED, not FINISHED by MLflow's exit hook.
                    with contextlib.suppress(Exception):
                        self._end_own_run("KILLED")
                    raise
                finally:
                    # Closed once, however it ended: a caller's handler that closes again after a stop in here (as
                    # train's does) must not log to the ended run: mlflow.set_tags with no active run starts a new
                    # one.
                    self.mlflow, self.logging = None, False

    def _end_own_run(self, status: str) -> None:
        """End the active run unless it is the caller's: mlflow.end_run ends whatever run is on top, which is the
        caller's once this tracker's run is off the stack (stopped before start_run pushed it, or after end_run
        popped it)."""
        active = self.mlflow.active_run()
        if active is not None and active.info.run_id != self.caller_run_id:
            self.mlflow.end_run(status=status)


def resumed_run(mlflow, run_id: str, tags: dict[str, str]):
    """The run a resumed job continues, reopened, its `tags` set first: reopened, it is RUNNING again, and with
    the old process's tags still on it, end_orphaned_runs would take it for orphaned. None (a warning) where the
    store no longer holds it, e.g. deleted in the UI: the job then logs to a new run."""
    from mlflow.entities import RunTag

    try:
        mlflow.MlflowClient().log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        # nested: under a caller's active run, reopened on top of it (its parent stays the one it was made under)
        return mlflow.start_run(run_id=run_id, log_system_metrics=True, nested=True)
    except Exception as e:
        warnings.warn(f"MLflow run {run_id} cannot be resumed ({type(e).__name__}: {e}); logging to a new run",
                      stacklevel=3)
        return None


def new_run(mlflow, run_name: str, tags: dict[str, str], caller_run_id: str | None, experiment_id: str):
    """A new run in the experiment `experiment_id`: a child of the caller's active run `caller_run_id` where there
    is one (the nearer parent: a notebook's or script's own run), else nested under $MLFLOW_PARENT_RUN_ID; a
    top-level one (a warning) where that parent cannot be found (deleted, or of another store)."""
    parent = None if caller_run_id else os.environ.get("MLFLOW_PARENT_RUN_ID")
    if parent:
        try:
            stage = mlflow.MlflowClient().get_run(parent).info.lifecycle_stage
        except Exception as e:
            stage = f"not found ({type(e).__name__}: {e})"
        if stage != "active":
            warnings.warn(f"MLflow parent run {parent} is {stage}; a top-level run instead", stacklevel=3)
            parent = None
    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags, log_system_metrics=True,
                            parent_run_id=parent or None, nested=True)


def last_logged_steps(client, run_id: str) -> dict[str, int]:
    """Metric name -> the last step the run holds (system metrics keep their own count and are left out)."""
    names = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in names}


def progress(total: int, initial: int, desc: str, enabled: bool = True):
    """A tqdm bar (steps, loss, tokens/s, ETA) on an interactive terminal; disabled on a log file (SLURM,
    Snakemake), where the caller prints plain lines instead."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True)


def in_batches(total: int, batch_size: int, desc: str):
    """The start of each batch of `total` items, showing progress on stderr: a bar on a terminal; in a log file
    (SLURM, Snakemake) a line at about every tenth of the way and at the end, so that a long evaluation shows it
    is moving without flooding its log."""
    bar = progress(total, 0, desc)
    every = max(batch_size, -(-total // 10))
    printed = 0
    for start in range(0, total, batch_size):
        yield start
        done = min(start + batch_size, total)
        bar.update(done - start)
        if bar.disable and (done - printed >= every or done == total):
            print(f"{desc}: {done}/{total}", file=sys.stderr, flush=True)
            printed = done
    bar.close()
