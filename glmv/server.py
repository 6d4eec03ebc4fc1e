"""A persistent engine in a thread of its own: callers in any thread submit prompt batches and wait for their rows.

The engine's thread runs rounds while any row is queued or decoding and sleeps when there is none, so a caller that
submits while others' rows decode gets a free slot at the next round, and the slots never drain between callers.
Callers do their host work (templates, tokenizing, patchifying before; detokenizing, parsing after) in their own
threads, beside the decode steps.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from glmv.engine import Engine, Ticket
from glmv.prompts import PromptBatch

log = logging.getLogger(__name__)


class EngineServer:
    def __init__(self, engine: Engine, name: str = "glmv-engine"):
        self.engine = engine
        self.started: float | None = None  # first submission: the start of the engine's wall time
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self._thread.start()

    def submit(self, batch: PromptBatch, max_new: list[int], seeds: list[int], budgets: list[int] | None = None,
               **ticket) -> Ticket:
        """Queue a batch (see Engine.add; `ticket`: exclusive, on_admit, on_leave); wait on the returned ticket."""
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self.started is None:
                self.started = time.perf_counter()
            queued = self.engine.add(batch, max_new, seeds, budgets, **ticket)
            self._wake.notify()
        return queued

    def stats(self) -> dict:
        """The engine's counters so far (EngineStats) and its wall time since the first submission."""
        wall = time.perf_counter() - self.started if self.started is not None else 0.0
        return {**dataclasses.asdict(self.engine.stats), "wall_s": wall}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        self.engine.fail_all(RuntimeError("the engine was closed"))

    def _loop(self) -> None:
        with torch.inference_mode():  # thread-local: this thread's own
            while True:
                with self._wake:
                    while not self._closed and not self.engine.busy():
                        self._wake.wait()
                    if self._closed:
                        return
                try:
                    self.engine.round()
                except Exception as e:  # noqa: BLE001 - the tickets it failed carry the error to their callers
                    log.warning("engine round failed (%s: %s); its tickets fail, the queue goes on",
                                type(e).__name__, e)
