"""Training over several nodes of a SLURM job: one `torchrun` per node, started by `srun`, meeting at a c10d
rendezvous on the first node of the job step.

The workflow's train_adapter rule, given nodes > 1, runs in the job's batch step (the SLURM executor does so for a
job with an `mpi` resource, instead of wrapping the command in a one-node `srun` of its own):

    srun --nodes N --ntasks N --ntasks-per-node 1 --cpus-per-task C [--gres gpu:G] --kill-on-bad-exit=1 --label \\
        python -m llama_adapter.launch --nproc-per-node P -- train ...

and on each node this module replaces itself with

    python -m torch.distributed.run --nnodes N --nproc-per-node P --rdzv-backend c10d \\
        --rdzv-endpoint FIRST_NODE_ADDR:PORT --rdzv-id JOB_ID --tee 3 -m llama_adapter.cli train ...

P is the GPUs per node (one process each; NCCL), or 1 on nodes without GPUs (Gloo on the CPU). Every rank's
output goes to srun's, so to the job's log: srun labels each line with its node (`0: `), torchrun with the
global rank (`[rank3]:`). SLURM's SIGTERM reaches each node's torchrun (a task of the step), which passes it on
to its processes: training saves its checkpoint at the next step boundary, all ranks at the same one, for which
torchrun waits up to SHUTDOWN_TIMEOUT before it kills them.

Nothing here builds a shell string: every piece is one argument.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

# The c10d store listens on the first node at RDZV_PORT_BASE + job id % RDZV_PORT_SPAN: two jobs sharing a node
# rarely pick the same port, and a job's port is the same on every node without any exchange.
RDZV_PORT_BASE = 29500
RDZV_PORT_SPAN = 1000
LOG_PREFIX = "[rank${rank}]:"
# How long torchrun, once signalled, waits for its workers before it kills them (its default: 30 s): as long as the
# profile's --signal=TERM@600 leaves before the time limit, so that the step under way, the checkpoint's gather and
# its write all fit (SLURM ends the job at its limit anyway). An environment variable, which a torchrun without
# --shutdown-timeout ignores.
SHUTDOWN_TIMEOUT = ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")


def slurm_launch(srun: str, nodes: int, gpus_per_node: int, cpus_per_node: int) -> list[str]:
    """The command that starts one launcher per node of the job, as a list of arguments (the rule appends the
    CLI's own `train ...`). `srun`: the job step launcher, as the SLURM executor's `mpi` resource names it
    (e.g. `srun`, or `srun --mpi=none`)."""
    if nodes < 2:
        raise ValueError(f"nodes {nodes}: a multi-node launch needs at least 2 nodes")
    if gpus_per_node < 0 or cpus_per_node < 1:
        raise ValueError(f"gpus_per_node {gpus_per_node} (>= 0), cpus_per_node {cpus_per_node} (>= 1)")
    return [*shlex.split(srun), "--nodes", str(nodes), "--ntasks", str(nodes), "--ntasks-per-node", "1",
            "--cpus-per-task", str(cpus_per_node), *(["--gres", f"gpu:{gpus_per_node}"] if gpus_per_node else []),
            "--kill-on-bad-exit=1", "--label",
            "python", "-m", "llama_adapter.launch", "--nproc-per-node", str(max(gpus_per_node, 1)), "--"]


def first_host(hostlist: str) -> str:
    """The first name of a SLURM hostlist expression: node[07-09,12],gpu1 -> node07 (zero padding kept)."""
    depth, end = 0, len(hostlist)
    for i, c in enumerate(hostlist):  # the first comma outside brackets ends the first item
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    item = hostlist[:end].strip()
    while m := re.search(r"\[([^\]]*)\]", item):  # each bracket: its first number
        item = item[: m.start()] + re.split(r"[-,]", m[1])[0] + item[m.end():]
    if not item:
        raise ValueError(f"empty SLURM hostlist {hostlist!r}")
    return item


def node_address(node: str) -> str:
    """How the job's nodes reach `node`: its NodeAddr from `scontrol show node` (a node's name need not resolve
    where NodeAddr says otherwise), else the name itself."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return node
    m = re.search(r"\bNodeAddr=(\S+)", out.stdout) if out.returncode == 0 else None
    return m[1] if m else node


def rendezvous_port(job_id: str) -> int:
    return RDZV_PORT_BASE + int(job_id) % RDZV_PORT_SPAN if job_id.isdigit() else RDZV_PORT_BASE


def torchrun_command(env: dict[str, str], nproc_per_node: int, cli_args: list[str], port: int | None = None
                     ) -> list[str]:
    """torchrun's command line on this node of a SLURM job step, from the step's variables."""
    missing = [v for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES") if not env.get(v)]
    if missing:
        raise SystemExit(f"llama_adapter.launch: {', '.join(missing)} unset; it runs on each node of a SLURM job "
                         "step (srun --ntasks-per-node 1 ...), as the workflow's train_adapter rule starts it")
    job_id = env["SLURM_JOB_ID"]
    endpoint = f"{node_address(first_host(env['SLURM_STEP_NODELIST']))}:{port or rendezvous_port(job_id)}"
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", env["SLURM_STEP_NUM_NODES"],
            "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", job_id, "--tee", "3", "-m", "llama_adapter.cli", *cli_args]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llama_adapter.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc-per-node", type=int, required=True, help="processes on this node (its GPUs, or 1)")
    p.add_argument("--port", type=int, help=f"the rendezvous port (default {RDZV_PORT_BASE} + job id % "
                                            f"{RDZV_PORT_SPAN})")
    p.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the llama-adapter command, e.g. -- train ...")
    ns = p.parse_args(argv)
    cli = ns.cli[1:] if ns.cli[:1] == ["--"] else ns.cli
    if not cli:
        p.error("no llama-adapter command after --")
    cmd = torchrun_command(dict(os.environ), ns.nproc_per_node, cli, ns.port)
    os.environ.setdefault("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", LOG_PREFIX)
    os.environ.setdefault(*SHUTDOWN_TIMEOUT)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # torchrun takes this process's place: srun's signals reach it


if __name__ == "__main__":
    main()
