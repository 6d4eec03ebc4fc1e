"""The circuit breaker: failures that are not about one item are never recorded as done.

A corrupt file is that item's error row. But a store that is unreachable or throttling past its retries, denied
credentials, a CUDA error or a whole batch out of memory say nothing about the items they hit: recording them as
done would "complete" a corpus during an outage. Rows marked `_outage` by the stages are therefore never written
(their shards stay open, so a plain rerun does them), and when they pass `rate` of the last `window` pairs the run
stops with one line; at the end, any left over make the run exit non-zero too.

A web host whose name DNS says does not exist is a dead link, that item's error row; but when such rows pass the
same rate, this machine's DNS is the likelier cause, and the run stops too.
"""

from __future__ import annotations

from collections import deque

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import RunStopped
from pipeline.storage import UNRESOLVED_HOST

OUTAGE = "_outage"
OK, FAILED, UNRESOLVED = 0, 1, 2   # a pair in the window: done, an outage (not written), a dead web host (written)


class Breaker:
    def __init__(self, rate: float, window: int):
        self.rate, self.window = rate, window
        self.recent: deque[int] = deque(maxlen=window)
        self.in_window = 0
        self.unresolved_in_window = 0
        self.total = 0
        self.cause = ""
        self.unresolved_cause = ""

    def admit(self, batch: pa.Table) -> pa.Table:
        """The rows to write: all but the outage rows, which are counted (and may stop the run). Rows of web hosts
        whose names do not resolve are written as error rows (a dead domain), but counted too: when most hosts
        fail so, this machine's DNS is the likelier cause."""
        marks = [OK] * batch.num_rows
        if "error" in batch.column_names:
            unresolved = pc.match_substring(batch["error"], UNRESOLVED_HOST).fill_null(False)
            if pc.any(unresolved).as_py():
                self.unresolved_cause = batch.filter(unresolved)["error"][0].as_py()
                marks = [UNRESOLVED if u else OK for u in unresolved.to_pylist()]
        if OUTAGE not in batch.column_names:
            self._count(marks)
            return batch
        flags = batch[OUTAGE].fill_null(False)
        outage = batch.filter(flags)
        if outage.num_rows:
            self.cause = outage["error"][0].as_py() or self.cause
            self.total += outage.num_rows
        self._count([FAILED if flag else mark for flag, mark in zip(flags.to_pylist(), marks)])
        return batch.filter(pc.invert(flags)).drop_columns([OUTAGE])

    def _count(self, marks: list[int]) -> None:
        for mark in marks:
            if len(self.recent) == self.window:
                self.in_window -= self.recent[0] != OK
                self.unresolved_in_window -= self.recent[0] == UNRESOLVED
            self.recent.append(mark)
            self.in_window += mark != OK
            self.unresolved_in_window += mark == UNRESOLVED
        if not self._over_rate(self.window):
            return
        if self.unresolved_in_window:
            self._stop_for_dns()
        raise RunStopped(f"{self.in_window} of the last {len(self.recent)} (item, task) pairs failed for a "
                         f"reason that is not about one item (last: {self.cause}); nothing was recorded for "
                         f"them, and running the same command again does them once the cause is fixed")

    def _over_rate(self, pairs: int) -> bool:
        return self.in_window >= max(1, self.rate * pairs)

    def _stop_for_dns(self) -> None:
        raise RunStopped(f"{self.in_window} of the last {len(self.recent)} (item, task) pairs failed, "
                         f"{self.unresolved_in_window} of them because a web host name did not resolve (last: "
                         f"{self.unresolved_cause}): is this machine's DNS working? Those already written are error "
                         f"rows; once the cause is fixed, run the same command again with "
                         f"--set run.retry_errors=true")

    def check_finished(self) -> None:
        """At the end of a run: pairs left undone by such failures make it exit non-zero, and so do dead web hosts
        past the rate of the pairs seen (a run shorter than the window, on a machine whose DNS answers 'no such
        name' for every host, would otherwise end with exit 0 and every row an error)."""
        if self.unresolved_in_window and self._over_rate(len(self.recent)):
            self._stop_for_dns()
        if self.total:
            raise RunStopped(f"{self.total} (item, task) pair(s) were not done because of failures that are not "
                             f"about one item (last: {self.cause}); they were not recorded: run the same command "
                             f"again to do them")
