"""A two-node SLURM cluster on this machine, from Debian's packages, for testing `snakemake --profile slurm`:
one slurmctld and two slurmd daemons (NODES), each with its own node name and port, sharing the host, and job
accounting as most clusters have it: slurmdbd over a MariaDB server of its own (loopback only, its data, socket
and port under STATE), so that `sacct`, the executor plugin's default status query, answers.

    python tests/slurm_cluster.py install  # apt-get the packages if missing (root)
    python tests/slurm_cluster.py up       # install if missing, write configs, start the daemons
    python tests/slurm_cluster.py down     # stop what `up` started, by PID

Facts this relies on (Debian 12, slurm-wlm 22.05):
- The executor plugin's job step strips every SLURM_* variable, SLURM_CONF included, so the `srun` inside a
  job only finds the configuration at /etc/slurm/slurm.conf: that is where it is written.
- munged wants its socket directory world-readable (755) and its key in a 700 directory.
- Every `up` starts from an empty STATE: slurmctld recovers the jobs of its state folder, so a cluster whose
  daemons were killed while jobs ran (a session ended with them, as an ended session's processes are) comes back
  with those jobs running on its nodes, which then never turn idle; job ids start at 1 again, so the accounting
  database is new too (else `sacct -j ID` finds an earlier cluster's job of that id).
- The accounting: `mariadbd --no-defaults` on 127.0.0.1:MARIADB_PORT, its data folder made by
  `mariadb-install-db` (root without a password, reachable only from this host; under a second); slurmdbd (its
  config, /etc/slurm/slurmdbd.conf, mode 600 as it insists) on DBD_PORT; the cluster, an ACCOUNT and the user
  registered with sacctmgr before slurmctld starts. jobacct_gather/linux reads each job's memory and CPU from
  /proc (no cgroups needed), so `sacct` shows them too.
- One cluster per host (its ports and /etc/slurm are the host's): STATE/pids.json names the process that started
  it (its owner) and each daemon, with their start times, so that `up` refuses while another live process owns the
  cluster (a second test session on this host) and `down` signals only the processes it started, not others that
  took their PIDs after a reboot or a session's end.
- MinJobAge keeps finished jobs in slurmctld (`scontrol show job`) for 10 minutes, for the tests to read.
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
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
STATE = Path(os.environ.get("SLURM_TEST_STATE", "/tmp/llama-adapter-slurm"))
CONF = Path("/etc/slurm/slurm.conf")
DBD_CONF = CONF.with_name("slurmdbd.conf")
CLUSTER = "llama-adapter-test"
ACCOUNT = "llama-adapter"  # the account jobs are submitted under (the profile's slurm_account)
PARTITION = "debug"
MUNGE_SOCKET_DIR = Path("/run/munge")
MUNGE_SOCKET = MUNGE_SOCKET_DIR / "munge.socket.2"
MUNGE_KEY = Path("/etc/munge/munge.key")


def installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "squeue", "munged", "slurmdbd", "sacctmgr",
                                         "mariadbd", "mariadb-install-db"))


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
ClusterName={CLUSTER}
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
SlurmctldPort={SLURMCTLD_PORT}
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={host}
AccountingStoragePort={DBD_PORT}
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
{node_config(host, cpus, memory_mb)}
"""


# The nodes: one slurmd each, on this host, at SLURMD_PORT + its index.
NODES = ("node1", "node2")
SLURMCTLD_PORT = 6817
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


# The accounting: slurmdbd on DBD_PORT, over a MariaDB server on 127.0.0.1:MARIADB_PORT (next to slurmd's ports).
DBD_PORT = 6830
MARIADB_PORT = 6831
DATABASE = STATE / "mariadb"


def slurmdbd_conf(host: str) -> str:
    return f"""\
# Written by tests/slurm_cluster.py: the test cluster's accounting, in MariaDB on this host's loopback.
AuthType=auth/munge
DbdHost={host}
DbdPort={DBD_PORT}
SlurmUser=root
PidFile={STATE}/slurmdbd.pid
LogFile={STATE}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={MARIADB_PORT}
StorageUser=root
StorageLoc=slurm_acct_db
"""


def start_mariadb() -> int:
    """mariadbd on 127.0.0.1:MARIADB_PORT, over a new data folder under STATE; its PID. The InnoDB settings are ones
    slurmdbd starts with without logging an error about them (it does for a 256 MB buffer pool); memory is taken as
    used, about 120 MB here."""
    data = DATABASE / "data"
    DATABASE.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                          "--auth-root-authentication-method=normal", "--skip-test-db"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"mariadb-install-db failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    return _start("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
                               "--bind-address=127.0.0.1", f"--port={MARIADB_PORT}",
                               f"--socket={DATABASE / 'mariadb.sock'}", f"--pid-file={DATABASE / 'mariadb.pid'}",
                               f"--log-error={DATABASE / 'error.log'}", "--skip-log-bin",
                               "--innodb-buffer-pool-size=1G", "--innodb-log-file-size=64M",
                               "--innodb-lock-wait-timeout=900"])


def register_accounting(timeout: float) -> None:
    """The cluster, ACCOUNT and this user's association with it in slurmdbd's new database."""
    _wait(lambda: _sacctmgr("show", "cluster").returncode == 0, timeout, "slurmdbd answering sacctmgr",
          (STATE / "slurmdbd.log",))
    _sacctmgr("add", "cluster", CLUSTER, check=True)
    _sacctmgr("add", "account", ACCOUNT, f"cluster={CLUSTER}", "description=tests", "organization=tests", check=True)
    _sacctmgr("add", "user", pwd.getpwuid(os.getuid()).pw_name, f"account={ACCOUNT}", f"cluster={CLUSTER}",
              check=True)


def _sacctmgr(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """sacctmgr, answering yes to its question, output without header, fields split by |."""
    out = subprocess.run(["sacctmgr", "-i", "-n", "-P", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"sacctmgr {' '.join(args)}: {out.stdout}{out.stderr}")
    return out


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start(name: str, cmd: list[str]) -> int:
    log = open(STATE / f"{name}.out", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


# The demo through SLURM without the ablation axes whose points are trainings of their own (adapter_layers, epochs,
# gate_init: ten jobs, about 130 s of job time in a local run, of the same rules as the method axis's points):
# every rule, every experiment and the method axis still run as SLURM jobs, and their tables are compared with the
# local run's.
DROPPED_AXES = ("adapter_layers", "epochs", "gate_init")


def demo_config(root: Path) -> Path:
    """The config merged over config.yaml for the SLURM run: the dropped axes set to null."""
    path = root / "slurm_demo.json"  # a config file in JSON, which YAML reads too
    path.write_text(json.dumps({"ablations": {"vary": dict.fromkeys(DROPPED_AXES)}}))
    return path


def overrides(*set_resources: str) -> list[str]:
    """The options `snakemake --profile slurm` needs on this cluster, only what differs from a GPU cluster: its
    partition and account (which the plugin checks with sacctmgr), no GPUs, and a first status check after 1 s
    rather than 40 (the plugin goes back to that interval after each finished job, so the DAG's short jobs are
    noticed at once; dag.snakemake_env caps every later wait at 3 s). Everything else comes from
    slurm/config.yaml; the plugin queries job states with its default, sacct (slurmdbd answers it), through
    common.smk's mend."""
    return ["--default-resources", f"slurm_partition={PARTITION}", f"slurm_account={ACCOUNT}",
            "--set-resources", "train_adapter:gpu=0", "generate:gpu=0", "evaluate:gpu=0", *set_resources,
            "--slurm-init-seconds-before-status-checks", "1"]


def _node_memory_mb() -> int:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    real = int(next(f for f in out.split() if f.startswith("RealMemory=")).split("=")[1])
    return real - 1024  # leave the OS some room


def up(timeout: float = 60) -> dict:
    """Start munged, MariaDB, slurmdbd, slurmctld and a slurmd per node in the foreground mode (-D/-F) as our own
    children's children, from an empty STATE, and wait until the nodes are idle; their PIDs by daemon name. The
    record for `down` (STATE/pids.json) names this process as the cluster's owner and each daemon as soon as it
    starts; a failed start stops what did start."""
    install()
    owner = _running_owner()
    if owner is not None:
        raise RuntimeError(f"the SLURM test cluster of this host belongs to process {owner}, which still runs (one "
                           f"cluster per host: its ports and {CONF}); end that process, or `python {__file__} down`")
    down()
    shutil.rmtree(STATE, ignore_errors=True)
    taken = [port for port in _ports() if _port_open(port)]
    if taken:
        raise RuntimeError(f"ports {taken} on 127.0.0.1 are taken, where the test cluster's daemons listen: daemons "
                           f"of a cluster started elsewhere (STATE {STATE} records none of them)?")
    for sub in ("ctld", "d", "munge"):
        (STATE / sub).mkdir(parents=True)
    record = {"owner": _identity(os.getpid()), "daemons": {}}

    def started(**new: int) -> None:
        record["daemons"].update({name: _identity(pid) for name, pid in new.items()})
        _write_record(record)

    _write_record(record)
    try:
        host = socket.gethostname().split(".")[0]
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(slurm_conf(host, os.cpu_count() or 1, _node_memory_mb()))
        DBD_CONF.write_text(slurmdbd_conf(host))
        DBD_CONF.chmod(0o600)  # slurmdbd refuses a config others may read (it may hold the database password)
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        MUNGE_SOCKET_DIR.chmod(0o755)
        if not MUNGE_KEY.exists():
            subprocess.run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)], check=True)
        MUNGE_SOCKET.unlink(missing_ok=True)  # an ended munged's, else waited for below
        started(munged=_start("munged", ["munged", "-F", "--force", "--key-file", str(MUNGE_KEY),
                                         "--pid-file", str(STATE / "munge" / "munged.pid"),
                                         "--seed-file", str(STATE / "munge" / "munged.seed"),
                                         "--log-file", str(STATE / "munge" / "munged.log")]))
        _wait(lambda: MUNGE_SOCKET.exists(), timeout, "munged's socket")
        started(mariadbd=start_mariadb())
        _wait(lambda: _port_open(MARIADB_PORT), timeout, f"MariaDB on port {MARIADB_PORT}",
              (DATABASE / "error.log",))
        started(slurmdbd=_start("slurmdbd", ["slurmdbd", "-D"]))
        register_accounting(timeout)
        started(slurmctld=_start("slurmctld", ["slurmctld", "-D", "-i"]))
        started(**start_slurmds())
        _wait(_node_idle, timeout, f"nodes {', '.join(NODES)} idle in sinfo")
    except BaseException:
        down()
        raise
    return {name: pid for name, (pid, _) in record["daemons"].items()}


def _ports() -> list[int]:
    return [SLURMCTLD_PORT, *(SLURMD_PORT + i for i in range(len(NODES))), DBD_PORT, MARIADB_PORT]


def _node_idle() -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    return out.returncode == 0 and sorted(out.stdout.split()) == sorted([*NODES, *["idle"] * len(NODES)])


def _wait(ready, timeout: float, what: str, logs: tuple[Path, ...] = ()) -> None:
    """Until ready(); else raise, with the daemons' output and the given logs."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tails = {p.name: p.read_text(errors="replace")[-1500:] for p in [*sorted(STATE.glob("*.out")), *logs]
                     if p.exists()}
            raise TimeoutError(f"no {what} after {timeout:.0f} s; daemon output: {json.dumps(tails, indent=1)}")
        time.sleep(0.5)


def down() -> None:
    """Stop the daemons `up` started, those of STATE/pids.json that still run as the processes it recorded, and
    wait for them to exit: the SLURM daemons first, then slurmdbd (which takes what slurmctld sent last), MariaDB
    and munged."""
    record = _read_record()
    if record is None:
        return
    daemons = {name: (pid, start) for name, (pid, start) in record["daemons"].items() if _start_time(pid) == start}
    later = ("slurmdbd", "mariadbd", "munged")
    for wave in ([identity for name, identity in daemons.items() if name not in later],
                 *([daemons[name]] for name in later if name in daemons)):
        for pid, _ in wave:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for pid, start in wave:
            while _start_time(pid) == start and time.monotonic() < deadline:
                time.sleep(0.2)
            if _start_time(pid) == start:
                os.killpg(pid, signal.SIGKILL)
    (STATE / "pids.json").unlink()


def _start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot): with the PID, which process it is, as a PID alone is not
    once the process ended. None where no process of that PID runs (a zombie of ours counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces and parentheses
    return None if fields[0] == "Z" else int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)


def _identity(pid: int) -> tuple[int, int | None]:
    return pid, _start_time(pid)


def _running_owner() -> int | None:
    """The PID of the process that started the recorded cluster, where it still runs and is not this one."""
    record = _read_record()
    if record is None:
        return None
    pid, start = record["owner"]
    return pid if pid != os.getpid() and _start_time(pid) == start else None


def _read_record() -> dict | None:
    """STATE/pids.json: {"owner": [pid, start time], "daemons": {name: [pid, start time]}}; None where absent or
    in another form (an older record, whose PIDs cannot be told from later processes': nothing of it is stopped)."""
    try:
        record = json.loads((STATE / "pids.json").read_text())
        identities = [record["owner"], *record["daemons"].values()]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    return record if all(isinstance(i, list) and len(i) == 2 for i in identities) else None


def _write_record(record: dict) -> None:
    tmp = STATE / "pids.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(STATE / "pids.json")


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
