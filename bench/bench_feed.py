"""Does the job keep the model's slots fed? The whole job against glmv alone on long reasoning-like outputs, one run.

    .venv/bin/python bench/bench_feed.py [--items 96] [--tasks 3,1] [--batch-size 8] [--max-new-tokens 384] \\
        [--threads 1]

Work: `--items` images x the first N of the built-in tasks (caption, ocr, reasoning) for each N in `--tasks`, greedy,
up to `--max-new-tokens`, on the `bench-reasoning` random checkpoint, whose rows stop at long-tailed lengths like
reasoning traces (median ~200 of 384, ~40% at the limit). Sides, each in its own process, one run each:
- alone: glmv with nothing around it: load, then one `generate` over every sequence with `--batch-size` decode slots
  (an item's tasks share one loaded image object, so its media are encoded once and its prompt prefix shared);
- job: `jobs/caption.py` as a user runs it, start-up included (Ray, model load, listing, decoding, writing the
  Parquet and the run report), on the same corpus, model, slots and torch threads.
Prints per case the wall times and job / alone (goal <= 1.15, issue 22), the share of identical texts, the job
summary's engine figures (slot occupancy, goal >= 95%; decode steps/s, tokens/s, idle share, KV cache) beside the
occupancy a perfect feed of the same rows would reach (only the stream's end drains it), the output lengths and each
side's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_pipeline  # noqa: E402  (its corpus, job config, job runner and memory sampler)

TASKS = bench_pipeline.TASKS


def run_alone(args) -> dict:
    """glmv alone: load, then one generate over every (item, task) with --batch-size slots."""
    import torch

    from glmv.model import Glm4vForConditionalGeneration
    from glmv.processor import Glm4vProcessor

    torch.set_num_threads(args.threads)
    paths = sorted(Path(args.corpus).glob("*.jpg"))
    specs = bench_pipeline.task_specs(args)
    start = time.perf_counter()
    processor = Glm4vProcessor.from_pretrained(args.model)
    model = Glm4vForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32, device="cpu")
    loaded = time.perf_counter()
    images = [processor.load_image(p) for p in paths]   # one object per item: its tasks share it
    rows = bench_pipeline.generate_rows(processor, model, paths, images, specs, args)
    end = time.perf_counter()
    return {"seconds": end - start, "load_s": loaded - start, "peak_rss_mb": bench_pipeline.peak_rss_mb(),
            "rows": rows}


def run_side(side: str, args, workdir: Path) -> dict:
    workdir.mkdir(parents=True)
    args.out = str(workdir / "output")
    if side == "job":
        result = bench_pipeline.run_job(args, workdir)
        record = next((Path(args.out) / "_state" / "runs").glob("*.json"))
        result["engine"] = json.loads(record.read_text())["summary"].get("engine", {})
        return result
    argv = [sys.executable, __file__, "--side", side, "--items", str(args.items), "--batch-size",
            str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
            "--task-list", ",".join(args.tasks), "--model", args.model, "--corpus", args.corpus]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**bench_pipeline.BASE_ENV, **os.environ})
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ideal_occupancy(lengths: list[int], slots: int) -> float:
    """Slot occupancy of a feed that never lets a slot wait while rows are queued: these rows, in this order,
    each taking a free slot at once, each live for its tokens after the first (that one comes from its prefill).
    What is lost is only the end of the stream, where the last rows run beside empty slots."""
    import heapq

    free_at = [0] * slots   # the step at which each slot is free again
    for n in lengths:
        heapq.heappush(free_at, heapq.heappop(free_at) + max(0, n - 1))
    return sum(max(0, n - 1) for n in lengths) / max(1, max(free_at) * slots)


def report(args, alone: dict, job: dict) -> None:
    pairs = args.items * len(args.tasks)
    print(f"\n== {args.items} images x {len(args.tasks)} task(s) ({', '.join(args.tasks)}) = {pairs} sequences, "
          f"bench-reasoning model, {args.batch_size} slots, up to {args.max_new_tokens} new tokens, greedy, "
          f"{args.threads} torch thread(s), CPU float32, one run per side")
    lengths = sorted(r["output_tokens"] for r in alone["rows"].values())
    q = statistics.quantiles(lengths, n=4)
    print(f"output tokens (alone): median {q[1]:.0f}, quartiles {q[0]:.0f}/{q[2]:.0f}, "
          f"{sum(n >= args.max_new_tokens for n in lengths)} of {len(lengths)} at the limit, {sum(lengths)} in all")
    print(f"alone: {alone['seconds']:.1f}s (load {alone['load_s']:.1f}s), peak RSS {alone['peak_rss_mb']:.0f} MiB")
    print(f"job:   {job['seconds']:.1f}s (start-up included), peak RSS {job['peak_rss_mb']:.0f} MiB over its "
          f"processes (driver {job['driver_peak_rss_mb']:.0f}, model actor {job['actor_peak_rss_mb']:.0f})")
    print(f"ratio job / alone: {job['seconds'] / alone['seconds']:.3f} (goal <= 1.15)")
    same = sum(k in job["rows"] and job["rows"][k]["text"] == v["text"] for k, v in alone["rows"].items())
    print(f"texts identical job vs alone: {same}/{len(alone['rows'])}; job error rows {len(job['errors'])}")
    e = job.get("engine") or {}
    if e:
        print(f"job engine: slot occupancy {100 * e['occupancy']:.1f}% (goal >= 95%), {e['decode_steps']} decode "
              f"steps ({e['decode_steps_per_s']:.2f}/s), {e['tokens']} tokens ({e['tokens_per_s']:.1f}/s), idle "
              f"{100 * e['idle_share']:.1f}% of engine time, KV pool {e['kv_pool_bytes'] / 2**20:.1f} MiB (peak "
              f"{e['kv_used_peak_bytes'] / 2**20:.1f} MiB in use), {e['preempted']} rows preempted")
        ideal = ideal_occupancy([r["output_tokens"] for r in alone["rows"].values()], args.batch_size)
        print(f"a feed that never lets a slot wait reaches {100 * ideal:.1f}% on these rows in input order (the "
              f"stream's end drains the slots): the job reached {100 * e['occupancy'] / ideal:.1f}% of it")
        print(f"alone's decode rate for comparison: {sum(lengths) / (alone['seconds'] - alone['load_s']):.1f} "
              f"tokens/s after load")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=96, help="images (each runs every task of a case)")
    parser.add_argument("--tasks", default="3,1", help="task counts, one case each: the first N of " +
                        ", ".join(TASKS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model (both sides)")
    parser.add_argument("--side", choices=["alone"], help=argparse.SUPPRESS)
    parser.add_argument("--task-list", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sort_window = 0   # the job config's default window
    return args


def main() -> int:
    from glmv.testing import make_tiny_checkpoint

    args = parse_args()
    if args.side:
        args.tasks, args.out = args.task_list.split(","), args.corpus + "-unused"   # the config wants an output
        print(json.dumps(run_alone(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-feed-") as tmp:
        tmp = Path(tmp)
        args.model = str(make_tiny_checkpoint(tmp / "model", preset="bench-reasoning", seed=0))
        args.corpus = str(tmp / "corpus")
        bench_pipeline.make_corpus(Path(args.corpus), args.items)
        for count in [int(n) for n in args.tasks.split(",")]:
            case = argparse.Namespace(**vars(args))
            case.tasks = TASKS[:count]
            results = {}
            for side in ("alone", "job"):
                try:
                    results[side] = run_side(side, case, tmp / f"{count}-{side}")
                except RuntimeError as e:
                    print(e, file=sys.stderr)
                    return 1
                print(f"[{count} task(s), {side}: {results[side]['seconds']:.1f}s]", file=sys.stderr, flush=True)
            report(case, results["alone"], results["job"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
