"""The output store: everything under `output.uri`, owned by one object for a run's life.

Its lifecycle is that of Ray Data's Datasink: `open` (the lease, the state checked against the listing, or against
the manifest where the last run sealed it, what is done and what is pending), `write` (result blocks, whole files,
completion records), `commit` (records folded and trusted, small files merged, the run's record) and `close` (the
output sealed after a clean commit, the lease released). Inside it, each piece keeps its
own module: the lease (pipeline.lease), the run state (pipeline.state), completion records and the manifest
(pipeline.progress, pipeline.manifest), result files (pipeline.output) and compaction (pipeline.compact).
The driver's thread is its only caller.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pyarrow as pa

from pipeline import compact, output, progress, seal
from pipeline.config import Config, ConfigError
from pipeline.lease import Lease
from pipeline.state import StateDir
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

COMPACT_EVERY_S = 30.0    # how often a run looks for finished small files to merge


@dataclass(frozen=True)
class OutputSettings:
    """What the store uses of the config, resolved once."""
    uri: str
    rows_per_file: int
    flush_seconds: float
    takeover: bool
    quarantine: bool
    compact: bool
    target_bytes: int
    partition_by: tuple[str, ...]
    verify: str = "auto"    # "always": list the result files at every start, whatever the seal says

    @classmethod
    def from_config(cls, cfg: Config) -> "OutputSettings":
        o = cfg.output
        return cls(o.uri, o.rows_per_file, o.flush_seconds, o.takeover, o.quarantine, o.compact,
                   int(o.target_file_mb * 2**20), tuple(o.partition_by), o.verify)


class OutputStore:
    def __init__(self, settings: OutputSettings, opts: StorageOptions):
        self.settings, self.opts = settings, opts
        # checks that the output can be written (a missing bucket, a read-only folder) before anything else
        self.writer = output.ResultWriter(settings.uri, opts, settings.rows_per_file, settings.flush_seconds,
                                          partition_by=settings.partition_by)
        self.run_tag = self.writer.run_tag
        self.lease = Lease(settings.uri, opts, self.run_tag, takeover=settings.takeover)   # before any state
        self.state = StateDir(settings.uri, opts)
        self.ledger: progress.Ledger | None = None
        self.shards: progress.OpenShards | None = None
        self.compactor: compact.Compactor | None = None
        self.tasks: tuple[str, ...] = ()
        self.looked_for_merges = 0.0
        self.commit_done = False    # the commit finished: the manifest holds every file this run landed
        self.sealed_start = False   # this start took the listing from a sealed manifest

    # -- open -------------------------------------------------------------------------------------------------

    def open(self, fingerprint: str, tasks: tuple[str, ...], retry_errors: bool = False, say=print) -> progress.Resume:
        """The output checked against its manifest and records: what is done (`Resume`); from here on, rows
        written count towards their shards' records."""
        # first, before anything is written: a run that does not close cleanly leaves no seal behind
        sealed = seal.take(self.state, trust=self.settings.verify == "auto")   # the manifest, or None: list
        self.state.remove("staging", recursive=True)   # a killed run's staged files are incomplete: never read
        self.ledger = progress.Ledger(self.state, fingerprint, move_foreign=self.settings.quarantine)
        self.tasks = tasks
        trusted = self.ledger.trusted()
        if retry_errors and not trusted:   # the output is scanned whole anyway: every file loses its error rows
            say(f"output {self.settings.uri}: {self._reopen_errors()} error row(s) reopened to run again")
        if not trusted:   # every file is read (a scan): they come from a listing, which is cheap beside it
            sealed = None
        self.sealed_start = sealed is not None
        existing = self.listed() if sealed is None else {name: row["size"] for name, row in sealed.items()}
        self._check_layout(existing)
        resume = self.ledger.load(existing) if sealed is None else self.ledger.load(existing, sealed)
        if retry_errors and trusted:
            resume, existing = self._retry_errors(resume, say)
        if resume.scanned and not existing:
            self.ledger.mark_trusted()   # a new output: the records cover everything from its first row on
        self.scanned_existing = resume.scanned and bool(existing)
        if self.settings.compact:
            self.compactor = compact.Compactor(self.ledger, self.settings.uri, self.opts, self.settings.target_bytes)
        self._count_shards()
        return resume

    def listed(self) -> dict[str, int]:
        return output.listed_files(self.writer.fs, self.writer.root, self.opts)

    def last_run_record(self) -> dict:
        records = [n for n in self.state.list("runs") if n.endswith(".json")]
        return (self.state.read_json(f"runs/{records[-1]}") or {}) if records else {}

    def _count_shards(self) -> None:
        self.shards = progress.OpenShards(self.ledger, self.tasks)
        w = self.writer
        w.note_file, w.committed, w.landed = self.ledger.note_file, self.ledger.committed, self.shards.wrote

    def _reopen_errors(self) -> int:
        return reopen_errors(self.settings.uri, self.opts, self.ledger, self.writer.staging)

    def _retry_errors(self, resume: progress.Resume, say) -> tuple[progress.Resume, dict[str, int]]:
        """`run.retry_errors` on trusted records: only the files with error rows change and only their shards open
        again (the output is not scanned); an earlier version's files (shards unknown) mean the whole way."""
        reopened = self.ledger.retry_errors(self.settings.uri, self.opts, self.writer.staging)
        if reopened is None:
            reopened = self._reopen_errors()
        say(f"output {self.settings.uri}: {reopened} error row(s) reopened to run again")
        existing = self.listed()
        return self.ledger.load(existing), existing

    def _check_layout(self, existing: dict[str, int]) -> None:
        """Result files in hive folders and result files directly under the prefix do not mix: a reader that finds
        folders named task=... takes `task` from them and refuses files that hold it as a column."""
        layouts = {"/" in name for name in existing if output.is_ours(name)}
        if layouts and layouts != {bool(self.settings.partition_by)}:
            held = "in hive folders (task=NAME/)" if True in layouts else "directly under it"
            raise ConfigError(f"output.partition_by is {list(self.settings.partition_by)} but {self.settings.uri} "
                              f"holds result files {held}: readers cannot take both layouts in one output; set "
                              f"output.partition_by as the output was written, or write to a new output.uri")

    def set_schema(self, schema: pa.Schema) -> None:
        """The result files' columns (known once the input's kept columns are typed)."""
        self.writer.schema = schema

    def use_ray(self) -> None:
        """Merges run as Ray tasks from here on (the job), not in this process."""
        if self.compactor is not None:
            self.compactor.submit, self.compactor.ready = compact.on_ray()

    # -- write ------------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raises LeaseLost once another run took the output over: stop before writing anything more."""
        self.lease.check()

    def write(self, batch: pa.Table) -> None:
        self.check()
        self.writer.add(batch)

    def shards_read(self, shards: dict, units: dict) -> None:
        """What the read tasks found each shard to hold: a shard whose rows have all landed gets its record."""
        self.shards.listed(shards, units)

    def maintain(self) -> None:
        """Now and then while rows stream in: merge finished small files (in the background)."""
        now = time.monotonic()
        if self.compactor is not None and now - self.looked_for_merges >= COMPACT_EVERY_S:
            self.compactor.step()
            self.looked_for_merges = time.monotonic()

    def flush(self) -> None:
        self.lease.check()   # taken over since the last block: its buffered rows are not ours to write
        self.writer.flush()

    def flush_what_is_done(self) -> None:
        flush_what_is_done(self.writer, self.lease)

    def pending_pairs(self) -> int:
        return self.shards.pending_pairs()

    def reopen(self) -> progress.Resume:
        """After a cluster fault ended a dataset: what landed is folded, the output checked again, and the count of
        open shards starts afresh for the next dataset."""
        if self.compactor is not None:
            self.compactor.settle()   # a merge still running must not be taken for one a killed run left
        self.ledger.fold()   # what landed is in the manifest before the output is checked against it
        resume = self.ledger.load(self.listed())
        self._count_shards()
        return resume

    # -- commit, close ----------------------------------------------------------------------------------------

    def commit(self, complete: bool) -> None:
        """The end of a run: `complete` (every shard of the input has its record) makes the records trusted for
        the input; records are folded, and finished small files merged."""
        if complete:
            self.ledger.mark_trusted()
        self.ledger.fold()
        if self.compactor is not None:
            self.compactor.finish()   # the run's own small files too, now that their shards are finished
        self.commit_done = True

    @property
    def compacted(self) -> tuple[int, int]:
        """(small files merged, files they became) by this run."""
        c = self.compactor
        return (c.merged_files, c.written_files) if c is not None else (0, 0)

    def write_run_record(self, record: dict) -> None:
        self.writer.write_run_record(record)

    def close(self) -> None:
        try:
            self._seal()
        finally:
            self.lease.release()

    def _sealable(self) -> bool:
        """The commit is done and the manifest is all the prefix holds as far as this run knows: no foreign file was
        left under it at the start (every start names one), and the lease was not taken over."""
        return self.commit_done and not self.lease.lost and self.ledger is not None and not self.ledger.foreign

    def known(self) -> dict[str, int] | None:
        """After the commit, where the output will be sealed: its result files and sizes, from the manifest (the run
        report takes them instead of listing the output); else None."""
        return {name: row["size"] for name, row in self.ledger.files.items()} if self._sealable() else None

    def _seal(self) -> None:
        """After a clean commit, while the lease is still ours: the next start may take the manifest as the listing.
        A seal not written costs the next start a listing, so a failure here is a warning."""
        if not self._sealable():
            return
        try:
            seal.seal(self.state, self.run_tag)
        except Exception as e:  # noqa: BLE001 - the run's results are written; only the next start's shortcut is lost
            log.warning("could not seal the output state (the next start lists the result files): %s", e)


def reopen_errors(uri: str, opts: StorageOptions, ledger: progress.Ledger, staging: str) -> int:
    """`run.retry_errors`: the output's error rows become pending pairs; returns how many."""
    # The records are dropped before any file is rewritten. A kill anywhere after that leaves an output without
    # trusted records, which the next run scans whole; as each file is replaced whole, every pair is then either
    # still in a file (an error row: done, until the next retry_errors run) or in none (pending: redone). In the
    # other order, a kill between the two left records calling shards finished whose error rows were gone: those
    # pairs were never run again. (forget() drops the trust marker first, so a kill inside it is safe too.)
    ledger.forget()
    return output.reopen_errors(uri, opts, staging)


def flush_what_is_done(writer: output.ResultWriter, lease: Lease) -> None:
    """Rows that finished before a stop are written, so a rerun does not redo them; unless another run took the
    output over, which may be running the same pairs."""
    if lease.lost:
        log.warning("%d finished result rows not written: another run holds the output now", writer.buffered)
        return
    try:
        writer.flush()
    except Exception as e:  # noqa: BLE001 - the error that stopped the run is the one to report
        log.warning("could not write the last %d result rows: %s", writer.buffered, e)
