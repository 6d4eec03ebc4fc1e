"""Node loss at random moments: a two-node Ray cluster on this machine (tests.cluster_helpers), jobs/caption.py
against it, the worker node's raylet killed with SIGKILL after a random share of the run's rows has landed. Each
trial must end with exit 0, every (item, task) exactly once and no traceback; prints one line per trial and a total.

    python bench/soak_node_loss.py --trials 10 [--items 64] [--seed 0] [--model path/to/tiny-checkpoint]

Where the worker hosts a model actor (count 2, one GPU per node) or only decode tasks (the model actor needs the
head's only GPU) alternates between trials.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glmv.testing import make_tiny_checkpoint  # noqa: E402
from tests.cluster_helpers import Cluster  # noqa: E402
from tests.pipeline_helpers import config_text, good_media, read_output, wait_for, write_local  # noqa: E402
from tests.test_pipeline_node_loss import SMALL_CALLS, TASKS, Job, _rows_landed  # noqa: E402

LAYOUTS = {"model_actor": ({"cpus": 3, "gpus": 1}, {"cpus": 3, "gpus": 1}, "count = 2\nnum_gpus = 1"),
           "decode_tasks": ({"cpus": 3, "gpus": 1}, {"cpus": 3, "gpus": 0}, "count = 1\nnum_gpus = 1")}


def trial(root: Path, corpus: Path, model: Path, items: int, layout: str, share: float) -> dict:
    head, worker, actors = LAYOUTS[layout]
    cluster = Cluster(root / "cluster")
    (root / "cluster").mkdir(parents=True)
    out = root / "out"
    try:
        cluster.start(head, worker)
        extra = f"[actors]\n{actors}\n[ray]\naddress = \"{cluster.address}\"\n"
        text = config_text(str(corpus), str(out), str(model), tasks=TASKS, extra=extra, run={"max_new_tokens": 48},
                           batching=SMALL_CALLS)
        (root / "run.toml").write_text(text)
        job = Job(root / "run.toml", cluster, root)
        at = max(1, int(share * items * len(TASKS)))
        wait_for(lambda: _rows_landed(out) >= at or job.proc.poll() is not None, timeout=300)
        killed_at = _rows_landed(out) if job.proc.poll() is None else None
        if killed_at is not None:
            cluster.kill_node("worker")
        stdout, stderr = job.wait(timeout=600)
        table = read_output(str(out))
        pairs = list(zip(table["id"].to_pylist(), table["task"].to_pylist()))
        restarts = next((line for line in stdout.splitlines() if line.startswith("restarts after")), "")
        return {"layout": layout, "killed_at_rows": killed_at, "exit": job.proc.returncode, "rows": len(pairs),
                "unique": len(set(pairs)), "expected": items * len(TASKS), "traceback": "Traceback" in stderr,
                "restarts": restarts}
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-node-loss-"))
    corpus = work / "corpus"
    write_local(corpus, good_media(num_images=args.items, num_videos=0))
    model = Path(args.model) if args.model else make_tiny_checkpoint(work / "tiny", preset="gqa", family="glm41v",
                                                                     seed=0)
    rng, failed = random.Random(args.seed), 0
    for i in range(args.trials):
        layout, share = list(LAYOUTS)[i % 2], rng.uniform(0.05, 0.8)
        start = time.monotonic()
        r = trial(work / f"trial{i}", corpus, Path(model), args.items, layout, share)
        ok = (r["exit"] == 0 and r["rows"] == r["unique"] == r["expected"] and not r["traceback"]
              and r["killed_at_rows"] is not None)
        failed += not ok
        print(f"trial {i}: {layout:12s} kill after {r['killed_at_rows']} of {r['expected']} rows -> exit {r['exit']}, "
              f"{r['unique']} unique of {r['rows']} rows, traceback {r['traceback']}, {r['restarts'] or 'no restart'}"
              f", {time.monotonic() - start:.0f}s: {'ok' if ok else 'FAILED'}", flush=True)
    print(f"{args.trials - failed} of {args.trials} trials exact (exit 0, every pair once, no traceback)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
