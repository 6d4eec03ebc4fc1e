"""A clean close's word that the manifest says what the output holds, so that the next start need not list it.

Listing the output at every start costs one LIST request per 1,000 result files on S3 (~2,000 at 1e9 items with
512-row files, ~250 with the default 4,096). A run whose commit finished (every landed file folded into the
manifest, its merges done) and whose lease is still its own writes, last before it releases the lease,
`_state/sealed.json`: the versions of the manifest and of the folded records as they are then (size and inode +
mtime locally, ETag on S3: one HEAD each).

The next start reads the seal and deletes it before it writes anything, so a run killed, crashed or stopped before
its close leaves none, and the start after it lists. A start takes the manifest's names and sizes as the listing only
when the seal is there, both tables are still the versions it names (no other writer, an earlier version of this
code say, changed them since) and no sidecar or compaction plan is left (the marks of a writer stopped midway).
A start without trusted records lists all the same (pipeline.store): its scan reads every file anyway.

What a sealed start cannot see: result files deleted, resized or added by hand between runs (`output.verify =
"always"` lists at every start). A run that found a foreign file under the prefix and left it there does not seal,
so every start keeps naming it.
"""

from __future__ import annotations

import logging

from pipeline import compact, manifest, progress
from pipeline.state import TABLE, StateDir

log = logging.getLogger(__name__)

SEAL = "sealed.json"
WATCHED = (manifest.MANIFEST, progress.FOLDED)   # the state tables a seal names the versions of


def _versions(state: StateDir) -> dict[str, dict | None]:
    return {stem: state.version(stem + TABLE) for stem in WATCHED}


def _unfinished(state: StateDir) -> bool:
    """A sidecar (a file written and not folded in) or a merge plan is left: only a listing tells what landed."""
    return bool(state.list(progress.INFLIGHT) or state.list(compact.PLANS))


def seal(state: StateDir, run: str) -> bool:
    """After a clean commit, under the lease. False (no seal) when something is left that a start must look at."""
    versions = _versions(state)
    if versions[manifest.MANIFEST] is None or _unfinished(state):
        return False
    state.write_json(SEAL, {"version": 1, "run": run, "tables": versions})
    return True


def take(state: StateDir, trust: bool = True) -> dict[str, dict] | None:
    """The manifest (result file -> row, its size the listing's), where a seal vouches for it; None when the output
    must be listed (no seal, one that no longer holds, or `trust` False). The seal is gone either way: this start
    may write, and only its own clean close seals again."""
    try:
        sealed = state.read_json(SEAL)
    except ValueError:   # torn by hand: no word at all
        sealed = {}
    if sealed is None:
        return None
    state.remove(SEAL)
    if not trust or not isinstance(sealed, dict):
        return None
    if sealed.get("version") != 1 or sealed.get("tables") != _versions(state):
        log.info("output state changed since run %s sealed it: listing the result files", sealed.get("run"))
        return None
    if _unfinished(state):
        return None
    files = manifest.read(state)
    if files is not None:
        log.info("output sealed by run %s: its %d result files taken from the manifest, not listed",
                 sealed.get("run"), len(files))
    return files
