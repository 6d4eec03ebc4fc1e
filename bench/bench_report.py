"""The run report on a large synthetic output: build time, report size and peak memory, against reading the whole
output with pandas (what a user's notebook would do) measured in the same run.

    .venv/bin/python bench/bench_report.py [--rows 100000] [--text-chars 600] [--sample 48] [--keep DIR]

The output: `--rows` rows in result files of 512 rows (the default `output.rows_per_file`), three tasks per item,
2% error rows of a few kinds, boxes on some rows, model text of about `--text-chars` characters (plus thinking),
processed_at over two runs. Items point at symbolic links to a pool of real images and videos, so that the
report's thumbnails decode real media. Each side runs in its own process, so each peak RSS is its own.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--text-chars", type=int, default=600)
    parser.add_argument("--sample", type=int, default=48)
    parser.add_argument("--keep", default="", help="build the output here (kept) instead of a temporary folder")
    parser.add_argument("--side", choices=["report", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
