"""A snakemake that starts once: this process imports snakemake and the heavy modules the Snakefile imports, then runs
each command it is sent in a forked child of itself (its own session, its own stdout and stderr files). A test's dry
run then pays for its plan alone, not for a new interpreter's imports (most of a dry run's 3 s of a core on the CI
machine; the suite runs some seventy). Each run starts from this process as it stood after the imports, so no run
sees another's state. tests/dag.py starts it and sends it the dry runs.

One request at a time, a line of JSON each way on stdin and stdout:
    -> {"argv": [...], "env": {...}, "cwd": ..., "stdout": path, "stderr": path}
    <- {"pid": N}         as the child starts (its process group, for the caller to kill on a timeout)
    <- {"returncode": N}  as it ends
It ends when its stdin closes.
"""

import json
import os
import sys
import traceback


def serve() -> None:
    import pandas  # noqa: F401  (the Snakefile's heaviest import after snakemake's own)
    import snakemake.cli

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run(snakemake.cli.main, request)
        reply(pid=pid)
        _, status = os.waitpid(pid, 0)
        reply(returncode=os.waitstatus_to_exitcode(status))


def run(main, request: dict) -> None:
    """In the child: snakemake's main with the request's argv, environment, folder and output files; never returns."""
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the requests are the server's
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = request["argv"]
        main()
        code = 0
    except SystemExit as e:  # as the interpreter would report it
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def reply(**message) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    serve()
