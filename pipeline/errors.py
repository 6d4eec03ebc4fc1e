"""The pipeline's errors: one base class, one kind per way a run can stop, each with its exit code.

Errors about one item (a corrupt file, a missing object) never get here: they become that item's error row. What
is raised is about the whole run, and `jobs/caption.py` prints it as one line and exits with its `exit_code`:

    2  ConfigError         a config key, an input, the model checkpoint or the resource plan cannot work
    3  StorageUnavailable  storage unreachable, throttling past `storage.retries`, denied, bad credentials
    4  RunStopped          the run's circuit breaker: too many failures that are not about one item
    5  LeaseHeld/LeaseLost another run holds the output prefix (or took it over from this one)
    6  OutputChanged       the output holds result rows its manifest cannot account for (pipeline.manifest)
  143  Interrupted         SIGTERM: in-flight work drained and written, lease released
"""

from __future__ import annotations

import logging
import sys


class PipelineError(Exception):
    """Base class of every error the pipeline raises on purpose; the message is one readable line.

    The message is kept apart from `args`: Ray Data appends lines of retry advice to the args of an exception raised
    in a task ("Failed to apply UDF transform after 1/1 attempts ... configure DataContext"), which would then end
    the one line the user reads. The message is also what crosses process boundaries."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):   # Ray ships exceptions between processes by pickling
        return (type(self), (self.message,))


class ConfigError(PipelineError, ValueError):
    """A config file, key or value is wrong, or an input / checkpoint it names cannot be used; names the key."""

    exit_code = 2


class StorageUnavailable(PipelineError):
    """A storage call failed in a way that is not about one object: retries spent on throttling, 5xx or a
    dropped connection, or access denied / bad credentials. `uri` is the object or prefix (no query string, so no
    presigned signature), `cause` a short description of the last error (never a credential)."""

    exit_code = 3

    def __init__(self, uri: str, cause: str, attempts: int = 1):
        self.uri, self.cause, self.attempts = uri, cause, attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"storage unavailable{tries}: {uri}: {cause}")

    def __reduce__(self):   # Ray ships exceptions between processes by pickling
        return (type(self), (self.uri, self.cause, self.attempts))


class RunStopped(PipelineError):
    """The run stopped itself (circuit breaker): failures that are not about one item passed the threshold.
    Nothing was recorded as done for them, so a plain rerun picks them up."""

    exit_code = 4


class Interrupted(PipelineError):
    """SIGTERM (spot preemption, `ray job stop`): what was in flight finished within run.drain_s and was written, the
    lease released; the rest is pending for a plain rerun. 143 = 128 + SIGTERM, as a shell reports such an end."""

    exit_code = 143


class LeaseHeld(PipelineError):
    """Another run holds the output prefix's lease."""

    exit_code = 5


class LeaseLost(PipelineError):
    """This run's lease was taken over by another run (after a heartbeat gap longer than the lease's TTL)."""

    exit_code = 5


class OutputChanged(PipelineError):
    """A file under the output holds result rows that are not exactly those of the result files gone since the
    last run: counting them as done or ignoring them could lose or duplicate pairs, so the user decides."""

    exit_code = 6


def find_error(exc: BaseException | None, kinds) -> BaseException | None:
    """The first exception of `kinds` in exc's chain. Ray wraps what a task raised: a RayTaskError's `cause` is
    the original (its own message is the remote traceback); otherwise __cause__, then __context__ unless the
    exception was raised `from None`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        if isinstance(exc, kinds):
            return exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def own_errors() -> tuple[type, ...]:
    """The kinds said in one line at the entry point: PipelineError, and glmv's errors (a checkpoint the model
    cannot use) once glmv is loaded; importing it only to look would import torch."""
    glmv_errors = sys.modules.get("glmv.errors")
    return (PipelineError, glmv_errors.GlmvError) if glmv_errors else (PipelineError,)


class HideOwnErrors(logging.Filter):
    """For the loggers where Ray Data reports a failed task (its traceback, and a note calling it an internal Ray
    error) before it re-raises the error: when the error is one of the pipeline's own, the entry point prints it as
    one line instead. The records still go to Ray Data's log file: its console handler skips records marked
    `hide`. Some of them carry no exc_info but are logged while the error is being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        if exc is not None and find_error(exc, own_errors()) is not None:
            record.hide = True
        return True
