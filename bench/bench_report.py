"""The run report on a large synthetic output: build time, report size and peak memory, against reading the whole
output with pandas (what a user's notebook would do) measured in the same run.

    .venv/bin/python bench/bench_report.py [--rows 100000] [--text-chars 600] [--sample 48] [--keep DIR]

Scale: the report's time and driver memory against rows and files, the old full-scan report (the code at
`--old-ref`, from git) measured on the same outputs as the reference:

    .venv/bin/python bench/bench_report.py --scale 1e6,1e7 [--rows-per-file 512] [--wide-files 5120] [--keep DIR]

Each output of N rows is written as a run leaves it: result files of `--rows-per-file` rows (the default
`output.rows_per_file`) and the manifest with each file's summary (`output.manifest_row`, as ResultWriter computes
it at commit). With `--wide-files`, the largest N is also written in files of that many rows (as many files as the
smallest N has at --rows-per-file: the same file count, more rows, as after a compaction), which separates the cost
per file from the cost per row.

The output: `--rows` rows in result files of 512 rows (8x smaller than the default `output.rows_per_file`: more
files, the harder case), three tasks per item, 2% error rows of a few kinds, boxes on some rows, model text of
about `--text-chars` characters (plus thinking), processed_at over two runs. Items point at symbolic links to a
pool of real images and videos, so that the report's thumbnails decode real media. Each side runs in its own
process, so each peak RSS is its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

TASKS = ["caption", "ocr", "reasoning"]
WORDS = ("the a cat dog street sign reads open closed red blue green person holding umbrella near window car "
         "parked building text says sale 50% off morning light shadow table cup coffee laptop screen shows").split()
ERRORS = ["not a decodable image (corrupt data or unsupported format)", "empty file (0 bytes)",
          "truncated video: stream ended before frame 40 of the 120 its header announces",
          "object not found (deleted after listing?)"]


def make_media(folder: Path) -> list[tuple[Path, str]]:
    from pipeline.corpus import image_bytes, video_bytes

    folder.mkdir(parents=True, exist_ok=True)
    pool = []
    for i in range(40):
        path = folder / f"pool_{i:02d}.jpg"
        path.write_bytes(image_bytes(320 + 40 * (i % 8), 240 + 30 * (i % 5), seed=i, ext="jpg"))
        pool.append((path, "image"))
    for i in range(4):
        path = folder / f"pool_{i}.mp4"
        path.write_bytes(video_bytes(48, fps=8, width=160, height=120, seed=90 + i))
        pool.append((path, "video"))
    return pool


def _text(rng, chars: int) -> str:
    n = max(1, int(rng.integers(chars // 12, chars // 4)))
    return " ".join(WORDS[k] for k in rng.integers(0, len(WORDS), n))


def make_output(out: Path, media: Path, rows: int, text_chars: int) -> None:
    rng = np.random.default_rng(0)
    pool = make_media(media / "pool")
    out.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    buffer, n_file = [], 0
    for item in range(-(-rows // len(TASKS))):
        src, kind = pool[item % len(pool)]
        link = media / f"{item // 1000:04d}" / f"item_{item:07d}{src.suffix}"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(src)
        uri = str(link)
        item_id = hashlib.sha256(uri.encode()).hexdigest()[:32]
        second = item >= rows // 6 // len(TASKS)   # a second (resumed) run, two hours later
        if buffer and second and item == rows // 6 // len(TASKS):
            _write(out / _name(1, n_file), buffer)
            buffer, n_file = [], n_file + 1
        at = start + timedelta(seconds=7200 * second + item * 0.05 + float(rng.random()))
        for task in TASKS:
            buffer.append(_row(rng, item_id, uri, kind, task, at, text_chars))
        if len(buffer) >= 512:
            _write(out / _name(1 + second, n_file), buffer)
            buffer, n_file = [], n_file + 1
    if buffer:
        _write(out / _name(2, n_file), buffer)


def _name(run: int, n: int) -> str:
    """Named as a run names its result files (`part-<date>-<time>-<8 hex>-<n>`): the report reads only those."""
    return f"part-20260101-000000-{run:08x}-{n:06d}.parquet"


def _write(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.output import SCHEMA

    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, compression="zstd")


def _row(rng, item_id, uri, kind, task, at, text_chars) -> dict:
    failed = rng.random() < 0.02
    answer = "" if failed else _text(rng, text_chars)
    thinking = "" if failed or task != "reasoning" else _text(rng, 2 * text_chars)
    n_boxes = 0 if failed or rng.random() > 0.1 else int(rng.integers(1, 4))
    boxes = []
    for _ in range(n_boxes):
        (x1, x2), (y1, y2) = np.sort(rng.uniform(0, 1000, 2)), np.sort(rng.uniform(0, 1000, 2))
        boxes.append({"x1": x1, "y1": y1, "x2": x2, "y2": y2})
    return {"id": item_id, "uri": uri, "media_type": kind, "task": task, "prompt": f"Do the {task} task.",
            "text": f"<think>{thinking}</think>{answer}" if thinking else answer, "thinking": thinking,
            "answer": answer, "boxes": boxes,
            "error": f"{uri}: {ERRORS[int(rng.integers(0, len(ERRORS)))]}" if failed else None,
            "num_input_tokens": int(rng.integers(200, 1600)),
            "num_output_tokens": 0 if failed else int(rng.integers(8, 512)),
            "finish_reason": "error" if failed else ("length" if rng.random() < 0.1 else "eos"),
            "width": 640, "height": 480, "duration_s": 6.0 if kind == "video" else None,
            "num_frames": 12 if kind == "video" else 1, "model": "bench", "run_config_hash": "0123abcd",
            "processed_at": at}


def measure(side: str, out: str, sample: int) -> dict:
    """One side in this process: seconds, peak RSS over the process's start, and what it produced."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if side == "report":
        from pipeline.report import write_report
        from pipeline.storage import StorageOptions

        where = write_report(out, StorageOptions(), sample=sample)
        result = {"bytes": os.path.getsize(where)}
    else:
        import pandas as pd

        result = {"rows": len(pd.read_parquet(out))}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**result, "seconds": seconds, "peak_mib": peak / 1024, "added_mib": (peak - before) / 1024}


# --- scale -------------------------------------------------------------------------------------------------------


def make_scaled(out: Path, media: Path, rows: int, rows_per_file: int, text_chars: int = 160) -> int:
    """A run's output of `rows` rows, written fast (columns built with numpy, texts from a pool): result files and
    the manifest as the writer and the ledger leave them. Returns the number of files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import manifest, output
    from pipeline.state import StateDir
    from pipeline.storage import StorageOptions

    rng = np.random.default_rng(1)
    pool = make_media(media / "pool")
    texts = [_text(rng, text_chars) for _ in range(256)]
    out.mkdir(parents=True, exist_ok=True)
    run = "20260101-000000-0000abcd"
    start = 1_767_225_600_000_000   # 2026-01-01, microseconds
    held = {}
    files = -(-rows // rows_per_file)
    for k in range(files):
        n = min(rows_per_file, rows - k * rows_per_file)
        first = k * rows_per_file
        row = np.arange(first, first + n)
        item = row // len(TASKS)
        failed = rng.random(n) < 0.02
        media_of = [pool[i % len(pool)] for i in item]
        ids = [hashlib.sha256(f"item-{i}".encode()).hexdigest()[:32] for i in item]
        text = [texts[i] for i in rng.integers(0, len(texts), n)]
        out_tokens = np.where(failed, 0, rng.integers(8, 512, n))
        table = pa.table({
            "id": ids, "uri": [str(p) for p, _ in media_of], "media_type": [m for _, m in media_of],
            "task": [TASKS[r % len(TASKS)] for r in row], "prompt": ["Do the task."] * n,
            "text": text, "thinking": [""] * n, "answer": text,
            "boxes": pa.array([[] for _ in range(n)], output.BOX_LIST if hasattr(output, "BOX_LIST")
                              else output.SCHEMA.field("boxes").type),
            "error": [f"{media_of[j][0]}: {ERRORS[j % len(ERRORS)]}" if failed[j] else None for j in range(n)],
            "num_input_tokens": rng.integers(200, 1600, n).astype(np.int32),
            "num_output_tokens": out_tokens.astype(np.int32),
            "finish_reason": np.where(failed, "error", np.where(rng.random(n) < 0.1, "length", "eos")),
            "width": np.full(n, 640, np.int32), "height": np.full(n, 480, np.int32),
            "duration_s": pa.nulls(n, pa.float64()), "num_frames": np.ones(n, np.int32),
            "model": ["bench"] * n, "run_config_hash": ["0123abcd"] * n,
            "processed_at": pa.array(start + row * 20_000, pa.timestamp("us", tz="UTC")),   # 50 rows/s
        }, schema=output.SCHEMA)
        name = f"part-{run}-{k:06d}.parquet"
        pq.write_table(table, out / name, compression="zstd")
        held[name] = output.manifest_row(table, (out / name).stat().st_size, [f"shard-{k // 8}"], run)
    manifest.write(StateDir(str(out), StorageOptions()), held)
    return files


def old_code(ref: str, where: Path) -> Path:
    """The pipeline package at git `ref`, extracted under `where` (to import the old report from)."""
    repo = Path(__file__).resolve().parent.parent
    where.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref, "pipeline"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where


def measure_scaled(side: str, out: str, sample: int) -> dict:
    """A report in this process: seconds (and of them, the statistics' part), peak RSS added while building."""
    import pipeline.report as report
    from pipeline.storage import StorageOptions

    import jinja2  # noqa: F401 - imported before the baseline, so that "added" is the report's data, not code
    import pyarrow.dataset  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    from PIL import Image  # noqa: F401

    before = _vm("VmRSS")
    parts = {}
    if side == "new":
        real = report.scan.collect

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                parts["stats_s"] = time.perf_counter() - t
        report.scan.collect = timed
    t0 = time.perf_counter()
    where = report.write_report(out, StorageOptions(), sample=sample, out=f"{out}-{side}.html")
    seconds = time.perf_counter() - t0
    peak = _vm("VmHWM")
    return {"seconds": seconds, "added_mib": (peak - before) / 1024, "peak_mib": peak / 1024,
            "bytes": os.path.getsize(where), "code": report.__file__, **parts}


def _vm(field: str) -> int:
    """KiB from /proc/self/status: VmHWM is this process image's peak RSS (ru_maxrss is not: it keeps the peak of
    the parent it was forked from, the bench that has just written a large output)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def scale(args) -> None:
    sizes = [int(float(x)) for x in args.scale.split(",")]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-report-"))
    old = old_code(args.old_ref, base / "old-code") if args.old_ref else None
    cases = [(n, args.rows_per_file) for n in sizes]
    if args.wide_files:
        cases.append((max(sizes), args.wide_files))
    results = []
    for rows, per_file in cases:
        out = base / f"out-{rows}-{per_file}"
        t0 = time.perf_counter()
        if not (out / "_state").exists():
            files = make_scaled(out, base / "media", rows, per_file)
        else:
            files = len(list(out.glob("*.parquet")))
        size = sum(f.stat().st_size for f in out.glob("*.parquet"))
        print(f"output: {rows:,} rows in {files:,} files of {per_file} rows, {size / 2**20:,.0f} MiB "
              f"(made in {time.perf_counter() - t0:.0f}s)", flush=True)
        line = {"rows": rows, "files": files}
        for side in ("new", "old") if old else ("new",):
            env = {**os.environ, "PYTHONPATH": str(old if side == "old" else Path(__file__).resolve().parent.parent)}
            cmd = [sys.executable, __file__, "--side-scaled", side, "--output", str(out), "--sample",
                   str(args.sample)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(base))
            if proc.returncode:
                print(f"  {side}: failed: {proc.stderr[-2000:]}")
                continue
            r = line[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            stats = f" (statistics {r['stats_s']:.2f}s)" if "stats_s" in r else ""
            print(f"  {side} report: {r['seconds']:.2f}s{stats}, driver peak RSS {r['peak_mib']:.0f} MiB "
                  f"(+{r['added_mib']:.0f} MiB while building)", flush=True)
        if "old" in line and "new" in line:
            print(f"  new / old: time {line['new']['seconds'] / line['old']['seconds']:.3f}x, added memory "
                  f"{line['new']['added_mib'] / max(line['old']['added_mib'], 1e-9):.3f}x", flush=True)
        results.append(line)
    news = [r for r, (_, per_file) in zip(results, cases) if "new" in r and per_file == args.rows_per_file]
    if len(news) >= 2:
        a, b = news[0], news[-1]
        per_file = (b["new"]["stats_s"] - a["new"]["stats_s"]) / max(1, b["files"] - a["files"])
        print(f"statistics: {per_file * 1e3:.3f} ms per file (from {a['files']:,} to {b['files']:,} files); at 1e8 "
              f"rows in files of {args.rows_per_file} rows ({-(-10**8 // args.rows_per_file):,} files) about "
              f"{per_file * 1e8 / args.rows_per_file:.0f}s")
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--text-chars", type=int, default=600)
    parser.add_argument("--sample", type=int, default=48)
    parser.add_argument("--keep", default="", help="build the output here (kept) instead of a temporary folder")
    parser.add_argument("--scale", default="", help="comma-separated row counts (e.g. 1e6,1e7): the scale bench")
    parser.add_argument("--rows-per-file", type=int, default=512)
    parser.add_argument("--wide-files", type=int, default=0, help="also the largest size in files of this many rows")
    parser.add_argument("--old-ref", default="b381935", help="git ref of the old report ('' to skip it)")
    parser.add_argument("--side", choices=["report", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--side-scaled", choices=["new", "old"], help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side_scaled:
        if args.side_scaled == "old":   # the old code from PYTHONPATH, not this checkout's (put first above)
            sys.path.remove(str(Path(__file__).resolve().parent.parent))
        print(json.dumps(measure_scaled(args.side_scaled, args.output, args.sample)))
        return
    if args.scale:
        scale(args)
        return
    if args.side:
        print(json.dumps(measure(args.side, args.output, args.sample)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        out = base / "out"
        t0 = time.perf_counter()
        make_output(out, base / "media", args.rows, args.text_chars)
        files = list(out.glob("*.parquet"))
        size = sum(f.stat().st_size for f in files)
        print(f"output: {args.rows:,} rows in {len(files)} files, {size / 2**20:.1f} MiB on disk "
              f"(made in {time.perf_counter() - t0:.1f}s)")
        res = {}
        for side in ("report", "pandas"):
            cmd = [sys.executable, __file__, "--side", side, "--output", str(out), "--sample", str(args.sample)]
            res[side] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        r, p = res["report"], res["pandas"]
        print(f"report: {r['bytes'] / 2**10:.0f} KiB, built in {r['seconds']:.2f}s, peak RSS {r['peak_mib']:.0f} MiB "
              f"(+{r['added_mib']:.0f} MiB while building)")
        print(f"pandas.read_parquet of the whole output: {p['seconds']:.2f}s, peak RSS {p['peak_mib']:.0f} MiB "
              f"(+{p['added_mib']:.0f} MiB)")
        print(f"ratio report / pandas: time {r['seconds'] / p['seconds']:.2f}x, added memory "
              f"{r['added_mib'] / max(p['added_mib'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
