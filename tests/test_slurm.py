"""The cluster path for real: the demo DAG through the repository's `slurm` profile on a one-node SLURM
cluster started on this machine (tests/slurm_cluster.py), and the same report as a local run.

Needs root (to install the packages, write /etc/slurm/slurm.conf and run the daemons); CI runs as root.
"""

import os
import subprocess

import pytest
import slurm_cluster
from dag import DEMO_RESULTS, REPO, read_csv, snakemake

# Only what differs on this cluster: its partition (no account: there is no accounting database), no GPUs,
# and squeue for job status (sacct needs slurmdbd). Everything else comes from slurm/config.yaml.
CLUSTER_OVERRIDES = ["--default-resources", f"slurm_partition={slurm_cluster.PARTITION}",
                     "--set-resources", "train_adapter:gpu=0", "generate:gpu=0", "evaluate:gpu=0",
                     "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5"]
# Columns that name where a number came from, or how long it took, differ between any two runs; and the config
# hash, as the local run writes to another results folder (a name that tests the rules' quoting).
RUN_SPECIFIC = {"mlflow_run", "eval_run", "training_h", "hardware", "config_hash"}


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:  # it writes /etc/slurm/slurm.conf and runs the daemons
        pytest.skip("the one-node SLURM cluster needs root (sudo python tests/slurm_cluster.py up, as CI does)")
    slurm_cluster.up()
    try:
        yield
    finally:
        subprocess.run(["scancel", "--user", str(os.getuid())], check=False)
        slurm_cluster.down()


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-dag")
    proc = snakemake("--profile", str(REPO / "slurm"), "--configfile", str(REPO / "config.yaml"),
                     *CLUSTER_OVERRIDES, cwd=root, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, proc.stdout + proc.stderr


def test_every_job_went_through_slurm(slurm_run):
    root, log = slurm_run
    # every job of the demo DAG but `all` and the two downloads (`fetch` is a local rule: compute nodes are
    # often offline)
    assert log.count("has been submitted with SLURM jobid") == 44
    assert log.count("localrule fetch:") == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llama-adapter").experiment_id], max_results=100)
    jobs = [r for r in runs if r.data.tags.get("rule") in ("train_adapter", "evaluate")]
    assert len(jobs) == 30 and all(r.data.tags.get("slurm_job_id", "").isdigit() for r in jobs)


def test_report_equals_the_local_run(slurm_run, demo_run):
    root, _ = slurm_run
    for table in ("scienceqa", "insertion_layers", "gate_init", "epochs", "ablation_method", "generations",
                  "efficiency"):
        ours = read_csv(root / "results" / "report" / f"{table}.csv")
        local = read_csv(demo_run / DEMO_RESULTS / "report" / f"{table}.csv")
        strip = [{k: v for k, v in row.items() if k not in RUN_SPECIFIC} for row in ours]
        assert strip == [{k: v for k, v in row.items() if k not in RUN_SPECIFIC} for row in local], table
