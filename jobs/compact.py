"""Merge an output's small result files into files of about --target-file-mb (zstd, row groups of >= 100k rows),
for outputs written without compaction (output.compact = false, an earlier version) or by runs that were stopped.

    python jobs/compact.py --output out/demo
    python jobs/compact.py --output s3://bucket/results/ --target-file-mb 512

It holds the output's lease while it works (no run writes meanwhile; a run started now waits or stops with exit 5),
and is safe to kill at any moment: the next compaction or run finishes or undoes the merge it was in. Readers that
take the file list from the manifest (pipeline.snapshot) see every row once throughout. S3 credentials come from the
environment, as for a run. Exit codes as for jobs/caption.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo root, when not pip-installed

from jobs.caption import known_error, report  # noqa: E402
from pipeline import compact, output, progress, seal  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.lease import Lease  # noqa: E402
from pipeline.state import StateDir  # noqa: E402
from pipeline.storage import StorageOptions  # noqa: E402


def compact_output(uri: str, opts: StorageOptions, target_mb: float) -> tuple[int, int, int]:
    """Returns (files merged, files written, files left because their rows are unknown)."""
    state = StateDir(uri, opts)
    if not state.read_json(progress.MARKER) and not output.listed_files(state.fs, state.root, opts):
        raise ConfigError(f"{uri}: no result files and no run state here: is this a run's output.uri?")
    lease = Lease(uri, opts, compact.new_tag())
    try:
        seal.take(state, trust=False)   # it rewrites the manifest: a run's seal no longer holds (and is checked anyway)
        state.remove("staging", recursive=True)   # a killed run's or compaction's staged files: never read
        marker = state.read_json(progress.MARKER) or {}
        ledger = progress.Ledger(state, marker.get("input", ""))
        ledger.load(output.listed_files(state.fs, state.root, opts))
        ledger.fold()
        compactor = compact.Compactor(ledger, uri, opts, int(target_mb * 2**20), everything=True)
        compactor.finish()
        unknown = sum(1 for row in ledger.files.values() if row["shards"] is None or row["rows"] < 0)
        return compactor.merged_files, compactor.written_files, unknown
    finally:
        lease.release()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the run's output.uri (local folder or URL)")
    parser.add_argument("--target-file-mb", type=float, default=256.0, help="size of the merged files (MB)")
    parser.add_argument("--endpoint-url", default="", help="S3-compatible endpoint, as storage.endpoint_url")
    parser.add_argument("--region", default="", help="S3 region, as storage.region")
    parser.add_argument("--anon", action="store_true", help="anonymous S3 access, as storage.anon")
    args = parser.parse_args(argv)
    if args.target_file_mb <= 0:
        parser.error("--target-file-mb must be more than 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(compact.__name__).setLevel(logging.INFO)   # one line per merge: the job's progress
    opts = StorageOptions(endpoint_url=args.endpoint_url, region=args.region, anon=args.anon)
    start = time.monotonic()
    try:
        merged, written, unknown = compact_output(args.output, opts, args.target_file_mb)
    except Exception as e:  # noqa: BLE001 - a known error is one line and its exit code; anything else a traceback
        known = known_error(e)
        if known is None:
            raise
        return report(known)
    print(f"compacted: {merged} result files into {written} in {time.monotonic() - start:.1f}s")
    if unknown:
        print(f"left as they are: {unknown} files written by an earlier version or before a run had completion "
              f"records (their rows are not known); a run that finishes on this output makes them known")
    return 0


if __name__ == "__main__":
    sys.exit(main())
