"""The multi-node launch (llama_adapter.launch) without a cluster: the srun line the rule runs, the torchrun line
each node runs, and the checks of GPUs per node and world size. tests/test_slurm.py runs it on two nodes."""

import sys

import pytest

from llama_adapter.errors import GPUAllocationError
from llama_adapter.launch import first_host, rendezvous_port, slurm_launch, torchrun_command


@pytest.mark.parametrize(("hostlist", "first"), [
    ("node1", "node1"), ("node1,node2", "node1"), ("node[1-2]", "node1"), ("gpu[007-009,012],cpu1", "gpu007"),
    ("a[3,5-6]b", "a3b"), ("rack[2-3]-n[01-04]", "rack2-n01"), ("big.example.org", "big.example.org"),
])
def test_first_host_of_a_slurm_hostlist(hostlist, first):
    assert first_host(hostlist) == first


def test_srun_line_one_torchrun_per_node():
    assert slurm_launch("srun", 2, 8, 64) == [
        "srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--cpus-per-task", "64",
        "--gres", "gpu:8", "--kill-on-bad-exit=1", "--label",
        "python", "-m", "llama_adapter.launch", "--nproc-per-node", "8", "--"]
    cpu = slurm_launch("srun --mpi=none", 3, 0, 1)  # the plugin's mpi resource, split into arguments
    assert cpu[:2] == ["srun", "--mpi=none"] and "--gres" not in cpu and cpu[-2:] == ["1", "--"]
    with pytest.raises(ValueError, match="at least 2 nodes"):
        slurm_launch("srun", 1, 8, 8)


def test_torchrun_line_meets_on_the_first_node(monkeypatch):
    import llama_adapter.launch as launch

    monkeypatch.setattr(launch, "node_address", lambda node: {"gpu007": "10.0.0.7"}.get(node, node))
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_STEP_NUM_NODES": "2"}
    cmd = torchrun_command(env, 8, ["train", "--base", "b c"])
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.7:29956", "--rdzv-id", "123456",
                   "--tee", "3", "-m", "llama_adapter.cli", "train", "--base", "b c"]
    assert rendezvous_port("123456") == 29500 + 456
    with pytest.raises(SystemExit, match="SLURM_STEP_NODELIST"):
        torchrun_command({"SLURM_JOB_ID": "1"}, 1, ["train"])


def test_expect_gpus_counts_per_node_and_expect_world_size_all(monkeypatch):
    from llama_adapter.train import check_gpus, check_world_size

    # 2 nodes x 8 GPUs: each node sees its 8 and runs 8 of the 16 processes
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    check_gpus(8)
    check_world_size(16)
    with pytest.raises(GPUAllocationError, match="per node"):
        check_gpus(16)  # a total given where a per-node count belongs
    with pytest.raises(GPUAllocationError, match=r"expected 24 .* runs 16 \(2 node\(s\) x 8 per node\)"):
        check_world_size(24)  # the rendezvous formed without the third node
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)  # a node given half its GPUs
    with pytest.raises(GPUAllocationError, match="sees 4"):
        check_gpus(8)
