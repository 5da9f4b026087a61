"""A two-node SLURM cluster on this machine, from Debian's packages, for testing `snakemake --profile slurm`:
one slurmctld and two slurmd daemons (NODES), each with its own node name and port, sharing the host.

    python tests/slurm_cluster.py install  # apt-get the packages if missing (root)
    python tests/slurm_cluster.py up       # install if missing, write configs, start the daemons
    python tests/slurm_cluster.py down     # stop what `up` started, by PID

Facts this relies on (Debian 12, slurm-wlm 22.05):
- The executor plugin's job step strips every SLURM_* variable, SLURM_CONF included, so the `srun` inside a
  job only finds the configuration at /etc/slurm/slurm.conf: that is where it is written.
- munged wants its socket directory world-readable (755) and its key in a 700 directory.
- Without slurmdbd, `sacct` fails and the plugin would wait forever: the caller polls with
  `--slurm-status-command squeue`, which needs finished jobs kept visible (MinJobAge) well beyond the
  plugin's first status check.
- No mail, no cgroups on a CI machine: MailProg=/bin/true, proctrack/linuxproc, task/none.
- Several slurmd on one host, as Debian builds slurmd (no build option needed for what follows): each node's
  line names the host as NodeHostname, 127.0.0.1 as NodeAddr and a Port of its own; each daemon runs as
  `slurmd -N NAME`, and %n in SlurmdSpoolDir/SlurmdPidFile/SlurmdLogFile keeps their files apart. The node
  names need not resolve: a multi-node job finds its first node's address with `scontrol show node`.
- Each node offers every core of the host (a 2-thread job such as pretrain_base needs 2 CPUs on one node), so
  SLURM may run twice as many 1-CPU jobs at once as there are cores; the memory is shared out between them.
- The executor plugin runs a job with an `mpi` resource in the batch step, without an srun of its own: there the
  rule's srun starts a step over all the job's nodes. Under the plugin's usual one-node step (srun -n1), a nested
  srun over both nodes waits forever unless given --overlap.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
STATE = Path(os.environ.get("SLURM_TEST_STATE", "/tmp/llama-adapter-slurm"))
CONF = Path("/etc/slurm/slurm.conf")
PARTITION = "debug"
MUNGE_SOCKET_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")


def installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "squeue", "munged"))


def install() -> None:
    if installed():
        return
    if os.geteuid() != 0:
        raise SystemExit(f"need root to apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, check=True)


def slurm_conf(host: str, cpus: int, memory_mb: int) -> str:
    return f"""\
# Written by tests/slurm_cluster.py: a two-node test cluster on one host.
ClusterName=llama-adapter-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
StateSaveLocation={STATE}/ctld
SlurmdSpoolDir={STATE}/d/%n
SlurmctldPidFile={STATE}/slurmctld.pid
SlurmdPidFile={STATE}/slurmd-%n.pid
SlurmctldLogFile={STATE}/slurmctld.log
SlurmdLogFile={STATE}/slurmd-%n.log
SlurmctldPort=6817
{node_config(host, cpus, memory_mb)}
"""


# The nodes: one slurmd each, on this host, at SLURMD_PORT + its index.
NODES = ("node1", "node2")
SLURMD_PORT = 6818


def node_config(host: str, cpus: int, memory_mb: int) -> str:
    """slurm.conf's node and partition lines: NODES on this host, each with every core and a share of the memory."""
    share = memory_mb // len(NODES)
    nodes = [f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={SLURMD_PORT + i} CPUs={cpus} "
             f"RealMemory={share} State=UNKNOWN" for i, name in enumerate(NODES)]
    return "\n".join([*nodes, f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE "
                                "State=UP"])


def start_slurmds() -> dict:
    """One `slurmd -D -N NAME` per node; their PIDs by daemon name."""
    for name in NODES:
        (STATE / "d" / name).mkdir(parents=True, exist_ok=True)
    return {f"slurmd-{name}": _start(f"slurmd-{name}", ["slurmd", "-D", "-N", name]) for name in NODES}


def _start(name: str, cmd: list[str]) -> int:
    log = open(STATE / f"{name}.out", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def _node_memory_mb() -> int:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    real = int(next(f for f in out.split() if f.startswith("RealMemory=")).split("=")[1])
    return real - 1024  # leave the OS some room


def up(timeout: float = 60) -> dict:
    """Start munged, slurmctld and a slurmd per node in the foreground mode (-D/-F) as our own children's children,
    wait until the nodes are idle, and record the PIDs in STATE/pids.json for `down`."""
    install()
    down()
    STATE.mkdir(parents=True, exist_ok=True)
    for sub in ("ctld", "d", "munge"):
        (STATE / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(slurm_conf(host, os.cpu_count() or 1, _node_memory_mb()))
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    MUNGE_SOCKET_DIR.chmod(0o755)
    if not MUNGE_KEY.exists():
        subprocess.run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)], check=True)
    pids = {"munged": _start("munged", ["munged", "-F", "--force", "--key-file", str(MUNGE_KEY),
                                        "--pid-file", str(STATE / "munge" / "munged.pid"),
                                        "--seed-file", str(STATE / "munge" / "munged.seed"),
                                        "--log-file", str(STATE / "munge" / "munged.log")])}
    _wait(lambda: (MUNGE_SOCKET_DIR / "munge.socket.2").exists(), timeout, "munged's socket")
    pids["slurmctld"] = _start("slurmctld", ["slurmctld", "-D", "-i"])
    pids.update(start_slurmds())
    (STATE / "pids.json").write_text(json.dumps(pids))
    _wait(_node_idle, timeout, f"nodes {', '.join(NODES)} idle in sinfo")
    return pids


def _node_idle() -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    return out.returncode == 0 and sorted(out.stdout.split()) == sorted([*NODES, *["idle"] * len(NODES)])


def _wait(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            logs = {p.name: p.read_text(errors="replace")[-1500:] for p in sorted(STATE.glob("*.out"))}
            down()
            raise TimeoutError(f"no {what} after {timeout:.0f} s; daemon output: {json.dumps(logs, indent=1)}")
        time.sleep(0.5)


def down() -> None:
    """Stop the daemons `up` started (by their recorded PIDs) and wait for them to exit."""
    record = STATE / "pids.json"
    if not record.exists():
        return
    pids = json.loads(record.read_text())
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for pid in pids.values():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    record.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action == "install":
        install()
    elif action == "up":
        print(json.dumps(up()))
    elif action == "down":
        down()
    else:
        raise SystemExit(__doc__)
