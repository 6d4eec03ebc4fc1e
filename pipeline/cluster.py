"""Lost nodes and preemption: what the driver treats as a cluster fault, where the run's own actors live, and the
stop a SIGTERM asks for.

A corpus run spends days on spot or preemptible nodes, so losing one is routine. The run's bookkeeping actor (the
read tasks' shard reports and the stop flag) lives on the driver's node, which the run cannot outlive anyway. What
Ray Data cannot recover from by itself (a model actor whose node is gone and whose restarts and task retries are
spent, a block lost with its node) ends the dataset with one of Ray's system errors: the driver then restarts the
dataset from the completion records in the same process (pipeline.run), up to `actors.max_restarts` times.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Iterator

import ray
import ray.exceptions as rex
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.errors import find_error, own_errors

log = logging.getLogger(__name__)

# Errors that mean a process or node of the cluster went away, not that an item or the run's settings are bad.
# (A worker killed by one poison item is retried in its task first: see pipeline.poison.) Not RaySystemError: Ray
# also raises it for code a worker cannot load (a module missing on a node), which no restart mends.
CLUSTER_FAULTS = (rex.RayActorError, rex.ObjectLostError, rex.WorkerCrashedError, rex.NodeDiedError,
                  rex.ObjectFetchTimedOutError)


def cluster_fault(exc: BaseException) -> BaseException | None:
    """The cluster fault behind exc, or None when exc is one of the pipeline's own errors or a bug."""
    if find_error(exc, own_errors()) is not None:
        return None
    return find_error(exc, CLUSTER_FAULTS)


def describe(fault: BaseException) -> str:
    """One line for a cluster fault: its kind and the first line of Ray's message."""
    first = next((line.strip() for line in str(fault).splitlines() if line.strip()), "")
    return f"{type(fault).__name__}: {first[:300]}"


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Pin an actor to the driver's node: it then lives exactly as long as the run can."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


class DrainOver(BaseException):
    """A SIGTERM's drain time is up while the driver waits for the next result block. A BaseException, as
    KeyboardInterrupt is: no `except Exception` on its way out of Ray Data's iterator takes it for an error of its own."""


class GracefulStop:
    """SIGTERM (a spot manager, `ray job stop`, `kill`) while results stream: the dataset's stages are told to take no
    new work, what is in flight comes out for up to `drain_s` seconds, then the stream ends; the run writes what
    finished, releases the lease and exits 143. A second SIGTERM stops at once (the `finally` blocks still write what
    finished).

    The driver iterates the dataset in its main thread, where Python delivers signals: the drain's end is a SIGALRM
    that interrupts only the wait for the next block (DrainOver), never the writing of one, so a file is written
    whole or not at all and its rows are never written twice. Installed only around the stream, from the main thread;
    elsewhere the entry point's handler ends the run at once, as nothing is in flight then."""

    def __init__(self, drain_s: float):
        self.drain_s = drain_s
        self.requested_at: float | None = None
        self.tracker = None        # the current dataset's tracker, which holds the stages' stop flag
        self._waiting = False      # the driver waits for the next block: DrainOver may interrupt it
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig, handler in ((signal.SIGTERM, self._on_sigterm), (signal.SIGALRM, self._on_alarm)):
                self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc) -> None:
        self.disarm()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def watch(self, tracker) -> None:
        """A new dataset's tracker: told at once when a SIGTERM came before it started."""
        self.tracker = tracker
        if self.requested:
            self._tell()

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested_at is not None:
            raise SystemExit(128 + signum)
        self.requested_at = time.monotonic()
        if self._previous:
            signal.setitimer(signal.ITIMER_REAL, max(self.drain_s, 1e-3))
        self._tell()

    def _tell(self) -> None:
        # from a thread of its own: a signal handler must not wait on Ray, whose locks its thread may hold
        if self.tracker is not None:
            threading.Thread(target=self.tracker.stop.remote, daemon=True, name="stop-stages").start()

    def _on_alarm(self, signum, frame) -> None:
        if self._waiting:
            raise DrainOver()

    def disarm(self) -> None:
        if self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def blocks(self, batches: Iterator) -> Iterator:
        """The result blocks until the stream ends, or, after a SIGTERM, until the drain time is up."""
        while True:
            self._waiting = True
            try:
                batch = next(batches)
            except (StopIteration, DrainOver):
                return
            finally:
                self._waiting = False
            yield batch
            if self.expired():
                return

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def expired(self) -> bool:
        return self.requested_at is not None and time.monotonic() - self.requested_at >= self.drain_s
