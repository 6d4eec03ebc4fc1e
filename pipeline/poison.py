"""Finding the item that kills its worker process (a decoder's segfault, the OOM killer on a huge image).

Python cannot catch such a death, and Ray would retry the task forever. So before each risky step a task writes
down, in a small file on its node, which position of its block it is at. When Ray retries the task after the
worker died (a bounded number of times: `MAX_RETRIES`), the new attempt finds the note, counts one crash
against that position, and once a position has crashed `CRASHES_TO_GIVE_UP` times its item becomes an error row
instead of being tried again. A retry on another node has no note and may crash once more; the retry budget
covers that. Notes live under the temp folder, keyed by the run and the block's item ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MAX_RETRIES = 6            # Ray task retries / actor restarts after a worker died
CRASHES_TO_GIVE_UP = 2     # an item that killed its worker this often is an error row


class CrashGuard:
    def __init__(self, run_tag: str, stage: str, ids: list[str]):
        key = hashlib.sha256("\0".join([run_tag, stage, *ids]).encode()).hexdigest()[:32]
        self.folder = Path(tempfile.gettempdir()) / "glmv-crash" / (run_tag or "run")
        self.note = self.folder / f"{key}.at"
        self.counts_file = self.folder / f"{key}.json"
        self.crashes: dict[str, int] = {}
        if self.counts_file.exists():
            self.crashes = json.loads(self.counts_file.read_text())
        if self.note.exists():   # a previous attempt died at this position
            at = self.note.read_text().strip()
            if at:
                self.crashes[at] = self.crashes.get(at, 0) + 1
                self._write(self.counts_file, json.dumps(self.crashes))
            self.note.unlink(missing_ok=True)

    def poisoned(self, position: str) -> int:
        """How often this position killed the worker; 0 when it never did."""
        return self.crashes.get(position, 0)

    def gave_up(self, position: str) -> bool:
        return self.poisoned(position) >= CRASHES_TO_GIVE_UP

    def at(self, position: str) -> None:
        """Note the position about to run (the write survives the process: it is in the page cache)."""
        self._write(self.note, position)

    def left(self) -> None:
        """No position of the block runs now (its rows wait in a shared queue, or are done)."""
        self.note.unlink(missing_ok=True)

    def finished(self) -> None:
        """The block got through. Its crash counts stay when it had any: Ray may run a finished block again (a
        retried streaming task of the actor that died on a later block), and without them that rerun would start
        from scratch and crash on the same item again, spending the retry budget until the run fails."""
        self.note.unlink(missing_ok=True)
        if not self.crashes:
            self.counts_file.unlink(missing_ok=True)

    def _write(self, path: Path, text: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def crash_message(uri: str, stage: str, crashes: int) -> str:
    return (f"{uri}: worker crashed while {stage} (the process died {crashes} times on this item, e.g. a decoder "
            f"segfault or the out-of-memory killer); skipped")


def inject_crash(stage: str, uri: str) -> None:
    """Test hook: with GLMV_TEST_CRASH_ON="<stage>:<text>" (stage `read`, `decode` or `model`), a URI containing the text
    kills its worker with SIGSEGV at that stage, as a native decoder's segfault or a CUDA driver crash would."""
    marker = os.environ.get("GLMV_TEST_CRASH_ON", "")
    where, _, text = marker.partition(":")
    if where == stage and text and text in uri:
        import signal
        import threading

        # A real segfault hits the faulting thread. `os.kill` would hand it to any thread (Ray Data runs the UDF in a
        # thread of its own and the signal went to the main one), and this thread would go on past its position
        # until faulthandler's dump finished: the crash was then counted against a later item.
        signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
