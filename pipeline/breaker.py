"""The circuit breaker: failures that are not about one item are never recorded as done.

A corrupt file is that item's error row. But a store that is unreachable or throttling past its retries, denied
credentials, a CUDA error or a whole batch out of memory say nothing about the items they hit: recording them as
done would "complete" a corpus during an outage. Rows marked `_outage` by the stages are therefore never written
(their shards stay open, so a plain rerun does them), and when they pass `rate` of the last `window` pairs the run
stops with one line; at the end, any left over make the run exit non-zero too.
"""

from __future__ import annotations

from collections import deque

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import RunStopped

OUTAGE = "_outage"


class Breaker:
    def __init__(self, rate: float, window: int):
        self.rate, self.window = rate, window
        self.recent: deque[bool] = deque(maxlen=window)
        self.in_window = 0
        self.total = 0
        self.cause = ""

    def admit(self, batch: pa.Table) -> pa.Table:
        """The rows to write: all but the outage rows, which are counted (and may stop the run)."""
        if OUTAGE not in batch.column_names:
            self._count([False] * batch.num_rows)
            return batch
        flags = batch[OUTAGE].fill_null(False)
        outage = batch.filter(flags)
        if outage.num_rows:
            self.cause = outage["error"][0].as_py() or self.cause
            self.total += outage.num_rows
        self._count(flags.to_pylist())
        return batch.filter(pc.invert(flags)).drop_columns([OUTAGE])

    def _count(self, flags: list[bool]) -> None:
        for flag in flags:
            if len(self.recent) == self.window:
                self.in_window -= self.recent[0]
            self.recent.append(flag)
            self.in_window += flag
        if self.in_window >= max(1, self.rate * self.window):
            raise RunStopped(f"{self.in_window} of the last {len(self.recent)} (item, task) pairs failed for a "
                             f"reason that is not about one item (last: {self.cause}); nothing was recorded for "
                             f"them, and running the same command again does them once the cause is fixed")

    def check_finished(self) -> None:
        """At the end of a run: pairs left undone by such failures make it exit non-zero."""
        if self.total:
            raise RunStopped(f"{self.total} (item, task) pair(s) were not done because of failures that are not "
                             f"about one item (last: {self.cause}); they were not recorded: run the same command "
                             f"again to do them")
