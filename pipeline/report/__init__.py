"""A run report people look at: one self-contained HTML file made from an output prefix as it stands.

    build_report(output_uri, opts)  -> the HTML (str)
    write_report(output_uri, opts)  -> writes <output>/_state/report.html (or `out`), returns where it went

Steps: merge the result files' summaries kept in the manifest (counts, histograms, throughput, error kinds; see
scan.py and pipeline/filestats.py: O(files), no row is read unless a file has no summary yet), draw a stratified
sample of item ids from a few files, read only the sampled items' rows, make their thumbnails in a child process
(thumbs.py: a decoder that crashes costs that thumbnail, not the caller), render.
"""

from __future__ import annotations

import json
import logging
import time

import fsspec

from pipeline import storage
from pipeline.state import STATE_DIR, StateDir
from pipeline.report import cards, render, rows, scan, thumbs
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
DEFAULT_SAMPLE = 48
MAX_RECORDS = 200   # newest run records read


def build_report(output_uri: str, opts: StorageOptions, sample: int = DEFAULT_SAMPLE,
                 current_run: str = "", listed: dict[str, int] | None = None) -> str:
    """The report's HTML. `current_run`: the run making it, under its lease (its own lease is not news, and the
    summaries it computes for files without one are kept in the manifest); `listed`: see scan.collect."""
    fs, root = storage.filesystem(output_uri, opts)
    root = root.rstrip("/")
    scanned = survey(output_uri, opts, sample, persist=bool(current_run), listed=listed)
    by_id = rows.fetch_rows(fs, root, opts, scan.pick_sample(scanned.candidates, sample), scanned.holders,
                            set(scanned.names), scanned.read_whole)
    banners = _lease_banner(fs, root, opts, current_run)
    if scanned.left_out:
        banners.append(f"{len(scanned.left_out)} file(s) under the prefix were left out: not result files of this "
                       f"pipeline, or unreadable (listed at the end with why).")
    items = [r for r in by_id.values() if r]
    pictures = thumbs.thumbnails([(str(r[0].get("uri") or ""), str(r[0].get("media_type") or "")) for r in items],
                                 opts)
    gallery = [cards.card(r, p, scan.task_colors(scanned)) for r, p in zip(items, pictures)]
    return render.render(output_uri, scanned, read_records(fs, root, opts), gallery, banners)


def survey(output_uri: str, opts: StorageOptions, sample: int = DEFAULT_SAMPLE, persist: bool = False,
           listed: dict[str, int] | None = None) -> scan.Scan:
    """The output's statistics (from the files' summaries) and the gallery's candidate ids (from a few files).
    `persist`: keep summaries computed from files without one in the manifest (see scan.collect)."""
    fs, root = storage.filesystem(output_uri, opts)
    root = root.rstrip("/")
    if not storage.with_retries(lambda: fs.exists(root), output_uri, opts):
        raise FileNotFoundError(f"{output_uri}: no such output (nothing written yet?)")
    scanned, strata_of, rows_of = scan.collect(fs, root, StateDir(output_uri, opts), opts, persist=persist,
                                               listed=listed)
    files = scan.sample_files(scanned, strata_of, sample, rows_of)
    scanned.candidates, scanned.holders, seen = scan.read_sample(fs, root, opts, files, sample)
    if seen is not None:
        scanned.read_whole = set(files)
        if len(files) == scanned.files:   # every file read whole: items counted, not estimated
            scanned.distinct, scanned.exact = len(seen), True
    return scanned


def write_report(output_uri: str, opts: StorageOptions, sample: int = DEFAULT_SAMPLE, out: str = "",
                 current_run: str = "", listed: dict[str, int] | None = None) -> str:
    """Build the report and write it to `out` (a path or URL), by default <output>/_state/report.html; returns
    where it went. Writing is atomic where the storage allows it, so a reader never sees half a report."""
    start = time.monotonic()
    html = build_report(output_uri, opts, sample, current_run, listed).encode("utf-8", errors="replace")
    if out:
        fs, path = storage.filesystem(out, opts)
        staging = f"{path.rsplit('/', 1)[0]}/.report-staging" if "/" in path else ".report-staging"
    else:
        fs, root = storage.filesystem(output_uri, opts)
        path = f"{root.rstrip('/')}/{STATE_DIR}/{REPORT_NAME}"
        staging = f"{root.rstrip('/')}/{STATE_DIR}/staging"
    storage.with_retries(lambda: storage.write_atomic(fs, path, html, staging), path, opts)
    if out and storage.is_local(fs):
        _remove_empty(fs, staging)
    log.info("report: %s (%d KiB in %.1fs)", path, len(html) // 1024, time.monotonic() - start)
    return storage.full_uri(fs, path)


def _remove_empty(fs: fsspec.AbstractFileSystem, folder: str) -> None:
    try:
        fs.rmdir(folder)
    except OSError:
        pass


def read_records(fs: fsspec.AbstractFileSystem, root: str, opts: StorageOptions) -> list[tuple[str, dict]]:
    """(run tag, record) of the newest run records under _state/runs/, oldest first; unreadable ones are named."""
    try:
        paths = sorted(fs.glob(f"{root}/{STATE_DIR}/runs/*.json"))[-MAX_RECORDS:]
    except OSError:
        return []
    out = []
    for path in paths:
        tag = path.rsplit("/", 1)[-1][: -len(".json")]
        try:
            record = json.loads(storage.with_retries(lambda: fs.cat_file(path), path, opts))
        except (OSError, ValueError) as e:
            tag, record = f"{tag} (unreadable run record: {e})", {}
        out.append((tag, record if isinstance(record, dict) else {}))
    return out


def _lease_banner(fs, root: str, opts: StorageOptions, current_run: str) -> list[str]:
    path = f"{root}/{STATE_DIR}/lease.json"
    try:
        held = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return []
    if not isinstance(held, dict) or held.get("run") == current_run:
        return []
    age = time.time() - render.finite_float(held.get("heartbeat"))
    return [f"Run {held.get('run')} (host {held.get('host')}, pid {held.get('pid')}) held this output when the "
            f"report was made, last heartbeat {age:.0f}s before: if it is still running, the report shows the output "
            f"as it stood; if it was killed, rerunning it resumes where it stopped."]
