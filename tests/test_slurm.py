"""The cluster path for real: the demo DAG (less three ablation axes: slurm_cluster.DROPPED_AXES) through the
repository's `slurm` profile on a two-node SLURM cluster started on this machine (tests/slurm_cluster.py, with
slurmdbd: the plugin polls with sacct; conftest.py starts both with the session, so that the tests before these run
while the DAG's jobs wait), and the same report tables as a local run; then one training over both nodes (a torchrun
per node, Gloo on the CPU), which matches one process, and which one process resumes; then a job's end before its
time: a training cancelled with scancel fails its invocation promptly, and a training cut by its time limit resumes
in the next invocation.

Needs root (to install the packages, write /etc/slurm/slurm.conf and run the daemons); CI runs as root.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import slurm_cluster
import yaml
from dag import DEMO_RESULTS, REPO, read_csv, snakemake, snakemake_started, stop_started

from llama_adapter.report import ablation_table_name

CLUSTER_OVERRIDES = slurm_cluster.overrides()
# A training over both nodes, one process each (no GPUs: Gloo on the CPU). `mpi` (the step launcher) makes the
# plugin run the rule's command in the job's batch step, from where the rule's srun starts a step over both
# nodes; `tasks` is what the plugin asks of such a job: sbatch --nodes=2 --ntasks=2 (docs/MULTINODE.md).
TWO_NODES = ["train_adapter:nodes=2", "train_adapter:tasks=2", "train_adapter:mpi=srun"]
TWO_NODE_EXPERIMENT = "scienceqa_2nodes"
# Columns that name where a number came from, or how long it took, differ between any two runs; and the config
# hash, as the local run writes to another results folder (a name that tests the rules' quoting).
# storage_mb too: an adapter file's header records the base's path, and the local run's results folder has another name.
RUN_SPECIFIC = {"mlflow_run", "eval_run", "training_h", "hardware", "config_hash", "storage_mb"}


@pytest.fixture(scope="module")
def slurm_run(slurm_dag_started):
    """The demo DAG through the profile, which conftest.py started with the session: waited for here."""
    if slurm_dag_started is None:
        pytest.skip("the SLURM test cluster needs root (sudo python tests/slurm_cluster.py up, as CI does)")
    if isinstance(slurm_dag_started, Exception):
        pytest.fail(f"the SLURM test cluster did not start: {slurm_dag_started}")
    root, proc, output = slurm_dag_started
    try:
        proc.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the demo DAG through SLURM still runs after 30 minutes: {output.read_text()[-4000:]}")
    log = output.read_text()
    assert proc.returncode == 0, log[-8000:]
    return root, log


def recorded(*processes: subprocess.Popen | int, owner: int | None = None) -> dict:
    """A cluster record (STATE/pids.json) naming `owner` (this process by default) and the given processes as
    daemons; an int is a PID whose recorded start time is not its process's (another process that took the PID)."""
    def identity(p):
        return (list(slurm_cluster._identity(p.pid)) if isinstance(p, subprocess.Popen)
                else [p, slurm_cluster._start_time(p) + 1])

    return {"owner": list(slurm_cluster._identity(os.getpid() if owner is None else owner)),
            "daemons": {f"slurmd-node{i}": identity(p) for i, p in enumerate(processes)}}


def test_down_stops_only_the_processes_it_recorded(tmp_path, monkeypatch):
    """After a session ends (its daemons with it), a recorded PID may name another process: `down` signals a PID only
    while its start time is the recorded one, and leaves a record of another form alone."""
    monkeypatch.setattr(slurm_cluster, "STATE", tmp_path)
    ours, other = (subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2))
    try:
        (tmp_path / "pids.json").write_text(json.dumps({"slurmd-node1": other.pid}))  # an older record: PIDs alone
        slurm_cluster.down()
        assert other.poll() is None
        (tmp_path / "pids.json").write_text(json.dumps(recorded(ours, other.pid)))
        slurm_cluster.down()
        assert ours.wait(timeout=30) == -signal.SIGTERM
        assert other.poll() is None and not (tmp_path / "pids.json").exists()
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


def test_up_refuses_a_cluster_that_another_running_process_owns(tmp_path, monkeypatch):
    """One test cluster per host (its ports, /etc/slurm): a second session's `up` stops nothing of the first's while
    the process that started it runs, and names it; once that process has ended, its cluster is anyone's."""
    monkeypatch.setattr(slurm_cluster, "STATE", tmp_path)
    monkeypatch.setattr(slurm_cluster, "install", lambda: None)
    owner = subprocess.Popen(["sleep", "60"])
    daemon = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / "pids.json").write_text(json.dumps(recorded(daemon, owner=owner.pid)))
        with pytest.raises(RuntimeError, match=f"belongs to process {owner.pid}, which still runs"):
            slurm_cluster.up()
        assert daemon.poll() is None and (tmp_path / "pids.json").exists()
        owner.kill()
        owner.wait()
        assert slurm_cluster._running_owner() is None
    finally:
        for p in (owner, daemon):
            p.kill()
            p.wait()


def test_every_job_went_through_slurm(slurm_run):
    root, log = slurm_run
    # every job of the demo DAG (less the dropped axes' ten: slurm_cluster.DROPPED_AXES) but `all` and the two
    # downloads (`fetch` is a local rule: compute nodes are often offline)
    assert log.count("has been submitted with SLURM jobid") == 34
    assert log.count("localrule fetch:") == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llama-adapter").experiment_id], max_results=100)
    jobs = [r for r in runs if r.data.tags.get("rule") in ("train_adapter", "evaluate")]
    assert len(jobs) == 20 and all(r.data.tags.get("slurm_job_id", "").isdigit() for r in jobs)


def test_report_equals_the_local_run(slurm_run, demo_run):
    """The tables of the experiments and of the method axis, row for row; the dropped axes' tables
    (slurm_cluster.DROPPED_AXES) are the local run's alone."""
    root, _ = slurm_run
    for axis in slurm_cluster.DROPPED_AXES:
        table = ablation_table_name(axis)[0]
        assert not (root / "results" / "report" / f"{table}.csv").exists(), table
        assert (demo_run / DEMO_RESULTS / "report" / f"{table}.csv").is_file(), table
    for table in ("scienceqa", "instruction", "ablation_method", "generations", "efficiency"):
        ours = read_csv(root / "results" / "report" / f"{table}.csv")
        local = read_csv(demo_run / DEMO_RESULTS / "report" / f"{table}.csv")
        strip = [{k: v for k, v in row.items() if k not in RUN_SPECIFIC} for row in ours]
        assert strip == [{k: v for k, v in row.items() if k not in RUN_SPECIFIC} for row in local], table


# --- over two nodes -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_node_run(slurm_run):
    """One more training in the DAG's folder (its tokens and base are there): the demo's ScienceQA adapter for
    one epoch, as an experiment of its own, over 2 nodes x 1 process through the profile and the plugin."""
    root, _ = slurm_run
    extra = root / "two_nodes.yaml"
    extra.write_text(yaml.safe_dump({"experiments": {TWO_NODE_EXPERIMENT: {"dataset": "scienceqa",
                                                                           "train": {"epochs": 1}}}}))
    proc = snakemake("--profile", str(REPO / "slurm"), "--configfile", str(REPO / "config.yaml"), str(extra),
                     *slurm_cluster.overrides(*TWO_NODES), f"results/adapters/{TWO_NODE_EXPERIMENT}/metrics.json",
                     cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, proc.stdout + proc.stderr


def one_process_reference(root: Path, out: Path, **changes):
    """The two-node training's own settings (its config.json), trained here in one process."""
    from llama_adapter.train import TrainConfig, train

    saved = json.loads((root / "results" / "adapters" / TWO_NODE_EXPERIMENT / "config.json").read_text())
    paths = {k: str(root / saved[k]) for k in ("base", "train_data", "val_data")}  # the job's, from its folder
    cfg = TrainConfig(**{**saved, **paths, "betas": tuple(saved["betas"]), "out_dir": str(out), "device": "cpu",
                         "run_name": out.name, "tags": {}, **changes})
    return cfg, train(cfg)


def test_two_nodes_through_the_profile_match_one_process(two_node_run, tmp_path, monkeypatch):
    root, log = two_node_run
    [job_id] = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    job = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert "NumNodes=2 " in job and "NumTasks=2 " in job and "NodeList=node[1-2] " in job, job
    # every rank's lines in the job's log, labelled by srun (node) and torchrun (global rank)
    job_log = (root / "results" / "logs" / "train_adapter" / f"{TWO_NODE_EXPERIMENT}.log").read_text()
    assert {"0: ", "1: "} <= {line[:3] for line in job_log.splitlines()}, job_log[-2000:]
    assert "[rank0]:" in job_log and "[rank1]:" in job_log
    result = json.loads((root / "results" / "adapters" / TWO_NODE_EXPERIMENT / "metrics.json").read_text())
    assert (result["nodes"], result["processes_per_node"], result["world_size"]) == (2, 1, 2)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{root / 'results' / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert {k: run.data.params[k] for k in ("nodes", "processes_per_node", "world_size")} == {
        "nodes": "2", "processes_per_node": "1", "world_size": "2"}
    assert run.data.tags["slurm_job_id"] == job_id and run.info.status == "FINISHED"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    _, single = one_process_reference(root, tmp_path / "one")
    assert len(single["history"]) == len(result["history"]) == 27  # one epoch of the demo's ScienceQA
    np.testing.assert_allclose([h["loss"] for h in result["history"]], [h["loss"] for h in single["history"]],
                               rtol=1e-5)
    np.testing.assert_allclose(result["val_loss"], single["val_loss"], rtol=1e-5)


def test_one_node_resumes_a_two_node_start(two_node_run, tmp_path, monkeypatch):
    """The rule's multi-node launch (llama_adapter.launch under srun, as the rule runs it) stops after 4 steps
    keeping its checkpoint; one process continues it to the end and matches a one-process run."""
    from llama_adapter.launch import slurm_launch

    root, _ = two_node_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg, single = one_process_reference(root, tmp_path / "one")
    settings = yaml.safe_load((REPO / "config.yaml").read_text())["train"] | {"epochs": 1}
    cut = tmp_path / "cut"
    cli = ["train", "--base", cfg.base, "--train-data", cfg.train_data, "--val-data", cfg.val_data,
           "--out-dir", str(cut), "--max-steps", "4", "--keep-checkpoint", "--expect-world-size", "2",
           *(arg for k, v in sorted(settings.items()) for arg in (f"--{k.replace('_', '-')}", str(v)))]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([*slurm_launch("srun", 2, 0, 1), *cli], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import torch

    assert torch.load(cut / "checkpoint.pt", weights_only=True)["step"] == 4
    started = json.loads((cut / "metrics.json").read_text())
    assert started["nodes"] == 2 and started["world_size"] == 2
    from llama_adapter.train import train

    resumed = train(cfg.__class__(**{**cfg.__dict__, "out_dir": str(cut), "run_name": "cut"}), resume=True)
    assert resumed["world_size"] == 1 and len(resumed["history"]) == 27
    np.testing.assert_allclose([h["loss"] for h in resumed["history"]], [h["loss"] for h in single["history"]],
                               rtol=1e-5)


# --- cancelled, or cut by the time limit ----------------------------------------------------------------------

# The demo's ScienceQA adapter has 27 steps an epoch, each a fraction of a second on a CPU.
STEPS_PER_EPOCH = 27


def experiment_config(root: Path, name: str, epochs: int, **train) -> Path:
    """A --configfile adding the demo's ScienceQA adapter as experiment `name`, trained for `epochs` (and any other
    train settings given)."""
    extra = root / f"{name}.yaml"
    extra.write_text(yaml.safe_dump({"experiments": {name: {"dataset": "scienceqa",
                                                            "train": {"epochs": epochs, **train}}}}))
    return extra


def training_run(root: Path, name: str):
    """The MLflow run of experiment `name`'s training."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llama-adapter").experiment_id
    [run] = client.search_runs([experiment], f"tags.rule = 'train_adapter' AND tags.experiment = '{name}'")
    return run


def wait_for(ready, timeout: float, what: str, proc: subprocess.Popen, output: Path):
    """ready()'s first true value, polled every half second; fails (with snakemake's output) after `timeout` or
    once snakemake has exited."""
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s; snakemake: {output.read_text()[-3000:]}")
        time.sleep(0.5)
    return value


def sacct_state(job_id: str) -> str:
    return subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True,
                          text=True).stdout.strip()


def first_step(log: Path) -> int:
    """The first step a training's log reports (its plain lines: "step 5/81 loss ...")."""
    return int(re.search(r"^step (\d+)/", log.read_text(), re.MULTILINE).group(1))


CANCELLED = "scienceqa_cancelled"


def test_a_cancelled_training_fails_its_invocation_promptly(slurm_run):
    """scancel of a running training: the job stops (SIGTERM: a checkpoint, its MLflow run KILLED), sacct says
    "CANCELLED by 0", and the invocation fails within two minutes naming the job, instead of polling it forever
    (the executor plugin's bug that common.smk mends, docs/SLURM.md)."""
    root, _ = slurm_run
    target = f"results/adapters/{CANCELLED}/metrics.json"
    log = root / "results" / "logs" / "train_adapter" / f"{CANCELLED}.log"
    output = root / f"{CANCELLED}.out"
    log.unlink(missing_ok=True)  # only this job's lines count below
    # 100 epochs: minutes of training, far more than the test waits for
    proc = snakemake_started("--profile", str(REPO / "slurm"), "--configfile", str(REPO / "config.yaml"),
                             str(experiment_config(root, CANCELLED, 100)), *CLUSTER_OVERRIDES, target,
                             cwd=root, output=output)
    try:
        submitted = wait_for(lambda: re.findall(r"has been submitted with SLURM jobid (\d+)", output.read_text()),
                             120, "submission", proc, output)
        [job_id] = submitted
        # stepping: past its start (imports, loading), where SIGTERM would end it before it could save anything
        wait_for(lambda: log.exists() and re.search(r"^step \d+/", log.read_text(), re.MULTILINE), 120,
                 "training step in the job's log", proc, output)
        subprocess.run(["scancel", job_id], check=True)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"snakemake still runs 120 s after scancel {job_id} (sacct: {sacct_state(job_id)!r}): "
                        f"{output.read_text()[-3000:]}")
    finally:
        stop_started(proc, grace=30)
    out = output.read_text()
    assert proc.returncode != 0, out[-3000:]
    assert sacct_state(job_id).startswith("CANCELLED by "), sacct_state(job_id)
    assert re.search(rf"Error in rule train_adapter:.*?jobid: \d+.*?{CANCELLED}", out, re.DOTALL), out[-3000:]
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in out, out[-3000:]
    run = training_run(root, CANCELLED)
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "SIGTERM", run.data.tags
    assert run.data.tags["slurm_job_id"] == job_id and int(run.data.tags["checkpoint_step"]) > 0
    assert (root / "results" / "adapters" / CANCELLED / "checkpoint.pt").exists()
    assert not (root / "results" / "adapters" / CANCELLED / "metrics.json").exists()


TIME_LIMITED = "scienceqa_time_limit"


def test_a_training_cut_by_its_time_limit_resumes_in_the_next_invocation(slurm_run):
    """A 2-minute time limit with the profile's warning signal, 60 s ahead (slurmctld checks time limits every
    30 s, so it comes 30-60 s into the job): the training saves a checkpoint and stops, its MLflow run KILLED, and
    the invocation fails; the next invocation (no time limit to speak of) resumes from the checkpoint, in the same
    MLflow run, to its end. The schedule (100 epochs, 2,700 steps) outlasts the signal on any machine; the second
    invocation ends one epoch after the checkpoint (max_steps, which a resumed run may change) so that the test's
    length does not depend on how far the first got."""
    root, _ = slurm_run
    profile = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    signal = re.sub(r"@\d+", "@60", profile["set-resources"]["train_adapter"]["slurm_extra"])
    epochs = 100
    target = f"results/adapters/{TIME_LIMITED}/metrics.json"
    log = root / "results" / "logs" / "train_adapter" / f"{TIME_LIMITED}.log"

    def invocation(*overrides, **train):
        config = experiment_config(root, TIME_LIMITED, epochs, **train)
        return snakemake("--profile", str(REPO / "slurm"), "--configfile", str(REPO / "config.yaml"), str(config),
                         *overrides, target, cwd=root, timeout=300)

    cut = invocation(*slurm_cluster.overrides("train_adapter:runtime=2", f"train_adapter:slurm_extra={signal}"))
    [first_job] = re.findall(r"has been submitted with SLURM jobid (\d+)", cut.stdout + cut.stderr)
    assert cut.returncode != 0, cut.stderr[-3000:]
    assert "stopped by SIGTERM after step" in log.read_text(), log.read_text()[-2000:]
    run = training_run(root, TIME_LIMITED)
    stopped_at = int(run.data.tags["checkpoint_step"])
    assert run.info.status == "KILLED" and run.data.tags["slurm_job_id"] == first_job
    assert 0 < stopped_at < epochs * STEPS_PER_EPOCH

    last = stopped_at + STEPS_PER_EPOCH
    resumed = invocation(*CLUSTER_OVERRIDES, max_steps=last)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    [second_job] = re.findall(r"has been submitted with SLURM jobid (\d+)", resumed.stdout + resumed.stderr)
    assert first_step(log) == stopped_at + 1  # the resumed job's log: it started after the checkpoint
    result = json.loads((root / target).read_text())
    assert [h["step"] for h in result["history"]] == list(range(1, last + 1))
    assert result["mlflow_run_id"] == run.info.run_id  # the same run, continued
    run = training_run(root, TIME_LIMITED)
    assert run.info.status == "FINISHED" and run.data.tags["slurm_job_id"] == second_job != first_job
    assert run.data.tags["resumed_world_size"] == "1" and run.data.tags["checkpoint_step"] == str(stopped_at)


def test_a_run_of_a_slurm_job_that_squeue_no_longer_lists_is_ended(slurm_run, tmp_path, monkeypatch):
    """A run of a job on another node (its process out of reach) is read through SLURM: ended KILLED where squeue
    no longer lists its job, left alone where the job is listed, where it ran on another cluster (a tracking
    server shared by two), or where its process was no job's step (a shell that had inherited a job's variables
    outlives the job). A real job's runs carry the job (the demo's trainings through the profile)."""
    import mlflow

    from llama_adapter import tracking

    root, _ = slurm_run
    training = training_run(root, "scienceqa")
    assert training.data.tags["process.slurm_job"] == training.data.tags["slurm_job_id"]
    assert training.data.tags["process.slurm_cluster"]

    def submit(command: str) -> str:
        return subprocess.run(["sbatch", "--parsable", "--partition", slurm_cluster.PARTITION, "--account",
                               slurm_cluster.ACCOUNT, "--output", "/dev/null", "--wrap", command], check=True,
                              capture_output=True, text=True).stdout.strip().split(";")[0]

    def listed(job_id: str) -> bool:
        return job_id in subprocess.run(["squeue", "--noheader", "--format", "%A"], capture_output=True,
                                        text=True).stdout.split()

    live, ended = submit("sleep 300"), submit("true")
    try:
        deadline = time.monotonic() + 60
        while listed(ended):
            assert time.monotonic() < deadline, f"job {ended} (true) still in the queue after 60 s"
            time.sleep(0.5)
        cluster = tracking.slurm_jobs()[0]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.sqlite_uri(tmp_path / "mlflow.db"))
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("orphans")
        node = {**tracking.process_tags(), "process.host": "another-node", "process.slurm_cluster": cluster}
        cases = {"job gone": ({**node, "process.slurm_job": ended}, "KILLED"),
                 "job listed": ({**node, "process.slurm_job": live}, "RUNNING"),
                 "another cluster": ({**node, "process.slurm_job": ended, "process.slurm_cluster": "other"},
                                     "RUNNING"),
                 "no job's step": ({**node, "slurm_job_id": ended}, "RUNNING")}
        runs = {name: client.create_run(experiment, tags=tags, run_name=name).info.run_id
                for name, (tags, _) in cases.items()}
        assert tracking.end_orphaned_runs(client, experiment) == ["job gone"]
        for name, (_, status) in cases.items():
            assert client.get_run(runs[name]).info.status == status, name
    finally:
        subprocess.run(["scancel", live], check=False)
