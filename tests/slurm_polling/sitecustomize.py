"""Imported at start-up by every Python process the tests' snakemake runs start (dag.snakemake_env puts this folder
on PYTHONPATH): in a `snakemake` command, a remote executor's wait between two status checks is capped at
STATUS_CHECK_CAP seconds. snakemake-executor-plugin-slurm waits 10 s longer after each check that finds no job
finished (1, 12, 33, 64, 105 s after a submission with the tests' first interval of 1 s), and as long again
before a failed invocation exits: most of a SLURM test's minutes were these waits, not SLURM's or the jobs'.
The plugin still computes its schedule; only the sleeping is shorter. Every Python process the tests start imports
this module, and in any other (a rule's command; the job-level snakemake, run as `python -m snakemake`, which does
not poll) it changes nothing. It stands in for any other sitecustomize on the path (this venv has none)."""

import sys
from pathlib import Path

STATUS_CHECK_CAP = 3.0

if Path(sys.argv[0]).name == "snakemake":
    import asyncio

    from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor

    # the plugin's schedule lives here: a snakemake that renamed it would poll at its own pace again, unseen
    assert hasattr(RemoteExecutor, "next_seconds_between_status_checks"), "RemoteExecutor's polling API changed"

    async def _capped_sleep(self) -> None:
        await asyncio.sleep(min(self.next_seconds_between_status_checks, STATUS_CHECK_CAP))

    RemoteExecutor.sleep = _capped_sleep
