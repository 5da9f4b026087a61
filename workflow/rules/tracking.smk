# One MLflow parent run per invocation, which every job's run nests under (llama_adapter.tracking): RUNNING while
# the invocation runs, then FINISHED, FAILED, or KILLED where a stop signal (SIGTERM, Ctrl-C, SIGHUP) ended it.
# onstart records the stops before it opens the run, so that a stop from then on ends it KILLED: SIGTERM through
# onerror, Ctrl-C while the run is set up through start_parent_run. Not covered: a stop inside MLflow's create_run
# (no id yet), and a hangup before the id is exported. Its start also ends the runs that jobs killed outright left
# RUNNING (tracking.end_orphaned_runs), which also covers those.

import time

from llama_adapter.tracking import (
    end_invocation_run,
    record_invocation_stops,
    start_invocation_run,
)


onstart:
    record_invocation_stops()
    start_invocation_run(f"snakemake {time.strftime('%Y-%m-%d %H:%M:%S')}", config)


onsuccess:
    end_invocation_run("FINISHED")


onerror:
    end_invocation_run("FAILED")
