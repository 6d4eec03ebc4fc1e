"""Compaction at scale: an output of --rows result rows in files of 512 rows (as runs write them, 8x smaller than
the default), compacted by jobs/compact.py while readers of the manifest's snapshot count the rows in a loop and the
compaction is killed (SIGKILL) at random moments; then resumed to its end.

Prints: files before/after, compaction time against the same bytes read and written once by pyarrow alone (the
reference, same run), the compaction process's peak RSS, every reader's row count (must all be --rows), duckdb's
query time over the small files against the merged ones, and a resume's start (Ledger.load) after compaction.

    python bench/bench_compact.py --rows 1000000 [--target-mb 64] [--kills 3]
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import output, progress, snapshot, storage  # noqa: E402
from pipeline.state import StateDir  # noqa: E402
from pipeline.storage import StorageOptions  # noqa: E402

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)
ROWS_PER_FILE = 512
SHARD_ROWS = 4096
WORDS = np.array("a photo of the red cat on a wooden table next to window with light and two cups".split())


def _block(start: int, n: int, rng: np.random.Generator, shard: str) -> pa.Table:
    ids = [f"{k:032x}" for k in range(start, start + n)]
    text = [" ".join(WORDS[rng.integers(0, len(WORDS), 40)]) for _ in range(n)]
    columns = {f.name: pa.nulls(n, f.type) for f in output.SCHEMA}
    columns.update(id=pa.array(ids), uri=pa.array([f"s3://corpus/img/{i}.jpg" for i in ids]),
                   media_type=pa.array(["image"] * n), task=pa.array(["caption"] * n), prompt=pa.array(["p"] * n),
                   text=pa.array(text), thinking=pa.array([""] * n), answer=pa.array(text),
                   boxes=pa.array([[]] * n, pa.list_(output.BOX)),
                   num_input_tokens=pa.array(rng.integers(200, 900, n).astype(np.int32)),
                   num_output_tokens=pa.array(rng.integers(10, 60, n).astype(np.int32)),
                   finish_reason=pa.array(["eos"] * n), model=pa.array(["glm"] * n),
                   run_config_hash=pa.array(["h"] * n),
                   processed_at=pa.array(np.full(n, 1_700_000_000_000_000), pa.timestamp("us", tz="UTC")))
    table = pa.Table.from_arrays([columns[f.name].cast(f.type) for f in output.SCHEMA], schema=output.SCHEMA)
    return table.append_column("_shard", pa.array([shard] * n))


def synthesize(out: str, rows: int) -> None:
    """Rows written as a run writes them: sidecars, small files, shard records, folds."""
    rng = np.random.default_rng(0)
    ledger = progress.Ledger(StateDir(out, OPTS), "bench")
    ledger.load({})
    ledger.mark_trusted()
    shards = progress.OpenShards(ledger, ("caption",))
    writer = output.ResultWriter(out, OPTS, ROWS_PER_FILE, 1e9, note_file=ledger.note_file,
                                 committed=ledger.committed, landed=shards.wrote)
    for start in range(0, rows, SHARD_ROWS):
        n = min(SHARD_ROWS, rows - start)
        name = f"unit#{start // SHARD_ROWS}"
        shards.listed({name: ({"caption": n}, n)}, {})
        writer.add(_block(start, n, rng, name))
    writer.flush()
    ledger.fold()


def reference(out: str) -> float:
    """The same bytes read and written once, by pyarrow alone: what any merge must cost at least."""
    start = time.monotonic()
    files = sorted(Path(out).glob("part-*.parquet"))
    with tempfile.TemporaryDirectory() as tmp, pq.ParquetWriter(f"{tmp}/all.parquet", output.SCHEMA,
                                                                compression="zstd") as w:
        for f in files:
            w.write_table(pq.read_table(f))
    return time.monotonic() - start


def compact_job(out: str, target_mb: float) -> subprocess.Popen:
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child started from this big process reports ours
    code = ("import re, sys; sys.path.insert(0, %r); from jobs.compact import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('peak_rss_mb', int(hwm) // 1024); sys.exit(rc)" % str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, "--output", out, "--target-file-mb", str(target_mb)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def untrusted_restart(out: str) -> str:
    """A start whose records do not count (another input on this output, or an earlier version's output): every
    result file's keys are read and kept in one array."""
    t = time.monotonic()
    state = StateDir(out, OPTS)
    resume = progress.Ledger(state, "another-input").load(output.listed_files(state.fs, state.root, OPTS))
    return f"{time.monotonic() - t:.1f}s, {len(resume.done_keys)} keys ({resume.done_keys.nbytes / 2**20:.1f} MB)"


def duckdb_seconds(files: list[str]) -> float:
    import duckdb

    start = time.monotonic()
    duckdb.sql(f"select task, count(*), avg(num_output_tokens) from read_parquet({files!r}) group by task").fetchall()
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--target-mb", type=float, default=64.0)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-compact-")
    out = f"{root}/out"
    try:
        t = time.monotonic()
        synthesize(out, args.rows)
        small = output.listed_files(*storage.filesystem(out, OPTS), OPTS)
        print(f"synthesized {args.rows} rows in {len(small)} files ({sum(small.values()) / 2**20:.1f} MB) in "
              f"{time.monotonic() - t:.1f}s")
        ref = reference(out)
        small_query = duckdb_seconds(snapshot.files(out))
        # on a copy: the scan rewrites the manifest without shards (as a start with another input would)
        shutil.copytree(out, f"{root}/scanned")
        print(f"restart without trusted records over {len(small)} small files: {untrusted_restart(f'{root}/scanned')}")
        shutil.rmtree(f"{root}/scanned")

        counts, stop = [], threading.Event()

        def reader():
            while not stop.is_set():
                counts.append(snapshot.read_table(out, OPTS, columns=["id"]).num_rows)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        rng = random.Random(1)
        t = time.monotonic()
        for _ in range(args.kills):
            proc = compact_job(out, args.target_mb)
            time.sleep(rng.uniform(1.5, max(2.0, ref * 0.6)))   # start-up ~1 s: the kill lands among merges
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        proc = compact_job(out, args.target_mb)
        text, _ = proc.communicate()
        elapsed = time.monotonic() - t
        stop.set()
        thread.join()
        assert proc.returncode == 0, text
        last = time.monotonic()
        compact_job(out, args.target_mb).communicate()
        merged = output.listed_files(*storage.filesystem(out, OPTS), OPTS)
        print(f"readers: {len(counts)} reads during compaction and {args.kills} kills, row counts "
              f"{sorted(set(counts))} (must be [{args.rows}])")
        print(f"compaction with {args.kills} kills: {elapsed:.1f}s; {len(small)} files -> {len(merged)} files of "
              f"{min(merged.values()) / 2**20:.1f}-{max(merged.values()) / 2**20:.1f} MB; "
              f"{[line for line in text.splitlines() if line.startswith(('compacted', 'peak'))]}")
        print(f"a compaction with nothing left to merge: {time.monotonic() - last:.1f}s")

        # a compaction from scratch, unkilled, against the reference
        fresh = f"{root}/fresh"
        synthesize(fresh, args.rows)
        t = time.monotonic()
        proc = compact_job(fresh, args.target_mb)
        text, _ = proc.communicate()
        took = time.monotonic() - t
        peak = [line for line in text.splitlines() if line.startswith("peak_rss_mb")]
        print(f"compaction unkilled: {took:.1f}s; reference (pyarrow read + write once): {ref:.1f}s; "
              f"ratio {took / ref:.2f}; {peak[0] if peak else ''}")
        big_query = duckdb_seconds(snapshot.files(out))
        shutil.copytree(out, f"{root}/scanned")
        print(f"restart without trusted records over {len(merged)} merged files: {untrusted_restart(f'{root}/scanned')}")
        print(f"duckdb group-by over the output: {small_query:.2f}s on {len(small)} small files, {big_query:.2f}s on "
              f"{len(merged)} merged ones (ratio {small_query / max(big_query, 1e-9):.1f})")
        t = time.monotonic()
        opened = []
        real = progress.read_keys
        progress.read_keys = lambda s, names, lost=None: opened.extend(names) or real(s, names, lost)
        resume = progress.Ledger(StateDir(out, OPTS), "bench").load(
            output.listed_files(*storage.filesystem(out, OPTS), OPTS))
        print(f"resume after compaction: {time.monotonic() - t:.2f}s, {len(resume.records)} records, "
              f"{len(opened)} result files opened, {len(resume.done_keys)} keys")
        print(f"peak RSS of this process (synthesis, readers): "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
