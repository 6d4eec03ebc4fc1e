"""Throughput of the full pipeline vs the same model called directly in one process, on the same items, in one run.

    .venv/bin/python bench/bench_pipeline.py [--items 96] [--batch-size 4] [--max-new-tokens 32] [--threads 1] \\
        [--repeats 2]

Both sides use a mid-size random-weight GLM-V (so model time dominates), the same images, batch size, token budget
and torch thread count, and both load the model inside the timed span. Each side runs in its own subprocess so its
peak memory is its own; the sides alternate and the best run of each counts, so that the load of a shared machine
hits both alike. The pipeline side is `pipeline.run.run` on a local Ray started before the timer (a cluster
is normally up already): listing, CPU decode tasks, one model actor, the Parquet writer. Prints items/s of each,
the ratio (goal >= 0.9) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# Ray starts its workers at nice 15 so that its own daemons stay responsive. On a shared machine that lets every
# other process starve the model actor, while the direct side runs at nice 0: give the pipeline's workers the same
# priority as the direct side so that both compete for the CPU alike.
SIDE_ENV = {"direct": {}, "pipeline": {"RAY_worker_niceness": "0"}}


def make_checkpoint(path: Path) -> Path:
    """glmv's mid-size benchmark model (the real architecture's proportions): model time dominates on a CPU."""
    from glmv.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(path, preset="bench", seed=0)


def make_corpus(folder: Path, items: int) -> list[Path]:
    from pipeline.corpus import image_bytes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(items):
        path = folder / f"img_{i:04d}.jpg"
        path.write_bytes(image_bytes(448 + 28 * (i % 3), 336, seed=i, ext="jpg"))
        paths.append(path)
    return paths


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def run_direct(args) -> dict:
    """The reference: one process, decode + preprocess + generate batch after batch."""
    import torch

    from glmv.model import Glm4vForConditionalGeneration
    from glmv.processor import Glm4vProcessor

    torch.set_num_threads(args.threads)
    paths = sorted(Path(args.corpus).glob("*.jpg"))
    start = time.perf_counter()
    processor = Glm4vProcessor.from_pretrained(args.model)
    model = Glm4vForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32, device="cpu")
    loaded = time.perf_counter()
    tokens = 0
    for i in range(0, len(paths), args.batch_size):
        convs = [[{"role": "user", "content": [{"type": "image", "image": str(p)},
                                               {"type": "text", "text": "Describe this image in detail."}]}]
                 for p in paths[i:i + args.batch_size]]
        inputs = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", padding=True, enable_thinking=False)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
        processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        tokens += sum(r.num_generated_tokens for r in out.rows)
    end = time.perf_counter()
    return {"items": len(paths), "seconds": end - start, "load_s": loaded - start, "tokens": tokens,
            "peak_rss_mb": peak_rss_mb()}


class ActorMemory:
    """Peak RSS (VmHWM) of the model actor, sampled from /proc while the run goes (it is not our child)."""

    def __init__(self):
        import threading

        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.5):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if b"MapBatches(Predictor)" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except OSError:
                    continue

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def run_pipeline(args) -> dict:
    import io

    import ray

    from pipeline import config
    from pipeline.run import run

    cfg = config.from_dict({
        "input": {"uri": args.corpus}, "output": {"uri": args.out, "rows_per_file": 64},
        "model": {"path": args.model, "dtype": "float32", "device": "cpu"},
        "run": {"tasks": ["caption"], "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens},
        "actors": {"count": 1, "num_gpus": 0, "num_cpus": args.threads},
        "ray": {"address": "local", "num_cpus": args.threads + 1},
    })
    ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
    memory = ActorMemory()
    start = time.perf_counter()
    summary = run(cfg, out=io.StringIO())
    end = time.perf_counter()
    actor_mb = memory.stop()
    ray.shutdown()
    return {"items": summary.items, "seconds": end - start, "tokens": summary.generated_tokens,
            "first_result_s": summary.first_result_s, "peak_rss_mb": peak_rss_mb(), "actor_peak_rss_mb": actor_mb}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model (both sides)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    parser.add_argument("--side", choices=["direct", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:   # one side, in its own process
        print(json.dumps(run_direct(args) if args.side == "direct" else run_pipeline(args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        tmp = Path(tmp)
        model = make_checkpoint(tmp / "model")
        make_corpus(tmp / "corpus", args.items)
        common = [sys.executable, __file__, "--items", str(args.items), "--batch-size", str(args.batch_size),
                  "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
                  "--model", str(model), "--corpus", str(tmp / "corpus")]
        runs = {"direct": [], "pipeline": []}
        # alternate the sides so that a change in the machine's load hits both alike; keep each side's best
        for repeat in range(args.repeats):
            for side in runs:
                out = tmp / f"out-{repeat}"
                proc = subprocess.run(common + ["--side", side, "--out", str(out)], capture_output=True, text=True,
                                      env={**os.environ, **SIDE_ENV[side]})
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    direct = min(runs["direct"], key=lambda r: r["seconds"])
    pipe = min(runs["pipeline"], key=lambda r: r["seconds"])
    d_rate, p_rate = direct["items"] / direct["seconds"], pipe["items"] / pipe["seconds"]
    print(f"items: {args.items} images, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"{args.threads} torch thread(s), CPU float32, best of {args.repeats} alternating runs per side")
    print("all runs (s): direct " + ", ".join(f"{r['seconds']:.1f}" for r in runs["direct"])
          + "; pipeline " + ", ".join(f"{r['seconds']:.1f}" for r in runs["pipeline"]))
    print(f"direct   : {d_rate:.3f} items/s ({direct['seconds']:.1f}s incl. {direct['load_s']:.1f}s load, "
          f"{direct['tokens'] / direct['seconds']:.1f} tok/s), peak RSS {direct['peak_rss_mb']:.0f} MiB")
    print(f"pipeline : {p_rate:.3f} items/s ({pipe['seconds']:.1f}s, first result after {pipe['first_result_s']:.1f}s, "
          f"{pipe['tokens'] / pipe['seconds']:.1f} tok/s), peak RSS driver {pipe['peak_rss_mb']:.0f} MiB, "
          f"model actor {pipe['actor_peak_rss_mb']:.0f} MiB")
    print(f"ratio pipeline/direct: {p_rate / d_rate:.3f} (goal >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
