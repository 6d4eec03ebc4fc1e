"""A start's check of the output (OutputStore.open) against the number of result files: listed (output.verify =
"always", or no seal) against sealed (a clean close's seal: the manifest taken as the listing, pipeline.seal).

The output is synthetic: --files result files of one row each (the bytes of one real result file, copied), each of
its own finished shard, their manifest rows, folded completion records and the trust marker, as a finished run
leaves them. With --s3 the same output goes to a moto S3 server in this process, and the LIST requests each start
makes are counted.

    python bench/bench_open.py --files 10000,100000 [--repeat 3] [--s3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import manifest, output, progress  # noqa: E402
from pipeline.state import StateDir  # noqa: E402
from pipeline.storage import StorageOptions  # noqa: E402
from pipeline.store import OutputSettings, OutputStore  # noqa: E402

TASKS = ("caption",)


def _file_bytes() -> tuple[bytes, dict]:
    row = output.error_row({"id": "0" * 32, "uri": "/x/0.png", "media_type": "image"}, "caption", "p", "", "m", "h")
    table = pa.Table.from_pylist([row], schema=output.SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue(), output.manifest_row(table, len(sink.getvalue()), [], "")


def synthesize(uri: str, opts: StorageOptions, n: int) -> None:
    """A finished output of n one-row files, each holding shard s<i>#0 of unit s<i>."""
    state = StateDir(uri, opts)
    data, row = _file_bytes()
    names = [f"part-20260101-000000-0badcafe-{i:06d}.parquet" for i in range(n)]
    state.fs.makedirs(state.path, exist_ok=True)   # a folder locally; nothing on a store
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: state.fs.pipe_file(f"{state.root}/{name}", data), names))
    manifest.write(state, {name: {**row, "shards": [f"s{i}#0"], "tasks": list(TASKS)} for i, name in enumerate(names)})
    ledger = progress.Ledger(state, "fp")
    ledger.records = {f"s{i}{part}": {"caption": 1} for i in range(n) for part in ("#0", "")}
    ledger._save(write_manifest=False)
    ledger.mark_trusted()


def start(uri: str, opts: StorageOptions, verify: str) -> tuple[float, int, int]:
    """One start: (seconds in open, listings of the result files, records it resumed from); sealed again after."""
    settings = OutputSettings(uri, 512, 30.0, False, False, False, 1 << 28, (), verify)
    store = OutputStore(settings, opts)
    try:
        with mock.patch.object(output, "listed_files", wraps=output.listed_files) as listing:
            t0 = time.perf_counter()
            resume = store.open("fp", TASKS, say=lambda line: None)
            seconds = time.perf_counter() - t0
        store.commit(complete=False)
        return seconds, listing.call_count, len(resume.records)
    finally:
        store.close()


def bench(uri: str, opts: StorageOptions, n: int, repeat: int, count_requests) -> None:
    t0 = time.perf_counter()
    synthesize(uri, opts, n)
    print(f"{n} result files synthesized in {time.perf_counter() - t0:.1f}s")
    state = StateDir(uri, opts)
    t0 = time.perf_counter()
    output.listed_files(state.fs, state.root, opts)
    print(f"  one listing of the result files alone: {time.perf_counter() - t0:.3f}s")
    for verify in ("always", "auto"):
        start(uri, opts, verify)   # the first start after synthesis lists (no seal yet) and seals
        times = []
        for _ in range(repeat):
            with count_requests() as lists:
                seconds, listings, records = start(uri, opts, verify)
            times.append(seconds)
        assert records == 2 * n, records
        what = "listed" if verify == "always" else "sealed"
        extra = f", {lists[0]} LIST requests" if lists else ""
        print(f"  {what:6s} (output.verify = {verify!r}): open {statistics.median(times):.3f}s median of {repeat} "
              f"({listings} listing(s) of the result files{extra})")


class _NoCount:
    def __enter__(self):
        return []

    def __exit__(self, *exc):
        return False


def _s3_counter():
    """Counts the ListObjects requests s3fs sends (through aiobotocore) while the context is open."""
    from aiobotocore.client import AioBaseClient

    class Counter:
        def __enter__(self):
            self.counts = [0]
            real = AioBaseClient._make_api_call

            async def counted(client, operation, params):
                if operation.startswith("ListObjects"):
                    self.counts[0] += 1
                return await real(client, operation, params)
            self.patch = mock.patch.object(AioBaseClient, "_make_api_call", counted)
            self.patch.start()
            return self.counts

        def __exit__(self, *exc):
            self.patch.stop()
            return False
    return Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="10000,100000", help="comma-separated numbers of result files")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="on a moto S3 server in this process")
    args = parser.parse_args()
    sizes = [int(float(x)) for x in args.files.split(",")]
    if not args.s3:
        for n in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                bench(f"{tmp}/out", StorageOptions(retries=2, retry_backoff_s=0.0), n, args.repeat, _NoCount)
        return
    from tests.pipeline_helpers import moto_s3, s3fs_for

    with moto_s3() as endpoint:
        s3fs_for(endpoint).mkdir("bench-open")
        opts = StorageOptions(endpoint_url=endpoint, retries=2, retry_backoff_s=0.0)
        for n in sizes:
            bench(f"s3://bench-open/out-{n}", opts, n, args.repeat, _s3_counter())


if __name__ == "__main__":
    main()
