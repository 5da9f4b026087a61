# One MLflow parent run per invocation, which every job's run nests under (llama_adapter.tracking): RUNNING while
# the invocation runs, then FINISHED, FAILED, or KILLED where a stop signal (SIGTERM, Ctrl-C) ended it. Its start
# also ends the runs that jobs killed outright left RUNNING (tracking.end_orphaned_runs).

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
