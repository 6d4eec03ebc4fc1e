"""The fixed cost of a tiny job: what most pipeline tests pay once to three times each.

    PYTHONPATH=<repo> .venv/bin/python bench/bench_startup.py [--runs 3] [--items 6] [--tasks caption,ocr] [--against TREE]

Runs `jobs/caption.py` --runs times as a subprocess (its own local Ray: ray.address = "local") on a tiny
random-weight checkpoint and a few generated images, each run into a fresh output. Prints per run, then the median
over the runs: wall time; when each phase came, from the subprocess's start (Ray up at the "model actors:" line, the
first result (the summary's, moved from run()'s start to the process's), the end of the results at the summary;
end_s: from there to the exit, the report, Ray's shutdown, the interpreter's); and the CPU seconds of every process
of the run by kind (driver, Ray's daemons, each kind of Ray worker by its title), sampled every 0.1 s from /proc (bench_scale's `descendants_cpu`). This process is made the
subreaper of the run, so processes orphaned at shutdown stay its descendants, and each is sampled once more as a
zombie before it is reaped (its final CPU); a process reaped by its own parent (a worker by the raylet) loses at
most its last 0.1 s.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_scale import descendants_cpu  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36
SAMPLE_S = 0.1
# stdout lines whose first appearance marks a phase (seconds from the start of the subprocess)
PHASES = (("model actors:", "ray_up_s"), ("done:", "results_end_s"))


def make_inputs(root: Path, items: int) -> tuple[Path, Path]:
    from glmv.testing import make_tiny_checkpoint
    from pipeline.corpus import image_bytes

    ckpt = make_tiny_checkpoint(root / "tiny", preset="gqa", family="glm41v", seed=0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(items):
        (corpus / f"img_{i:02d}.png").write_bytes(image_bytes(64 + 8 * i, 48 + 4 * i, seed=i))
    return ckpt, corpus


class CpuSampler:
    """CPU seconds per process kind of every descendant of this process, charged as deltas between samples (a
    worker's title changes when it becomes an actor: its CPU goes to the kind it had when it was spent)."""

    def __init__(self):
        self.by_kind: dict[str, float] = {}
        self._seen: dict[int, float] = {}
        self._kind: dict[int, str] = {}   # a zombie has no cmdline: its CPU goes to the kind it last had
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def sample(self):
        with self._lock:
            for pid, (kind, cpu) in descendants_cpu(os.getpid()).items():
                kind = self._kind[pid] = kind if kind not in ("", "?") else self._kind.get(pid, "(unnamed)")
                self.by_kind[kind] = self.by_kind.get(kind, 0.0) + cpu - self._seen.get(pid, 0.0)
                self._seen[pid] = cpu

    def processes(self) -> dict[str, int]:
        """How many processes ended as each kind (a worker counts under its last title)."""
        counts: dict[str, int] = {}
        for kind in self._kind.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.by_kind


def reap_all(proc: subprocess.Popen, sampler: CpuSampler) -> int:
    """Wait for the driver and every orphan this subreaper took (Ray's workers and daemons outlive the driver by a
    moment), sampling each one's final CPU as a zombie first. Returns the driver's exit code."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            break
        if info is None:
            time.sleep(0.02)
            continue
        sampler.sample()
        if info.si_pid == proc.pid:
            proc.wait()
        else:
            os.waitpid(info.si_pid, 0)
    return proc.wait()


def one_run(tree: Path, cfg: Path, out_uri: Path) -> dict:
    """One job of the source tree `tree` (its jobs/caption.py, its packages first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    sampler = CpuSampler()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(tree / "jobs/caption.py"), "--config", str(cfg),
                             "--set", f"output.uri={str(out_uri)!r}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tree)
    row, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        for marker, name in PHASES:
            if line.startswith(marker) and name not in row:
                row[name] = time.monotonic() - t0
    while proc.poll() is None:   # the driver's exit, not yet reaped: its final CPU is sampled as a zombie first
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT) is not None:
                break
        except ChildProcessError:
            break
    row["wall_s"] = time.monotonic() - t0
    code = reap_all(proc, sampler)
    cpu = sampler.stop()
    if code != 0:
        sys.exit(f"the job failed (exit {code}):\n{''.join(lines[-40:])}")
    # "done: ... in {run's seconds}s (first result after {s}s)", both counted from run()'s start, which comes after
    # the driver's imports: from the process's start, the first result came at results_end - seconds + first
    done = next((re.search(r" in ([\d.]+)s \(first result after ([\d.]+)s", ln) for ln in lines
                 if ln.startswith("done:")), None)
    seconds, first = (float(done.group(1)), float(done.group(2))) if done else (float("nan"),) * 2
    row["first_result_s"] = row.get("results_end_s", float("nan")) - seconds + first
    row["cpu"] = {**cpu, "total": sum(cpu.values())}
    row["procs"] = sampler.processes()
    return row


def show(rows: list[dict]) -> None:
    for row in rows:   # from the summary to the exit: the report, Ray's shutdown, the interpreter's
        row["end_s"] = row["wall_s"] - row.get("results_end_s", float("nan"))
    times = ("wall_s", "ray_up_s", "first_result_s", "results_end_s", "end_s")
    print("run  " + "  ".join(f"{t:>15}" for t in times))
    for i, row in enumerate(rows):
        print(f"{i:<4} " + "  ".join(f"{row.get(t, float('nan')):15.2f}" for t in times))
    print("med  " + "  ".join(f"{statistics.median(r.get(t, float('nan')) for r in rows):15.2f}" for t in times))
    kinds = sorted({k for r in rows for k in r["cpu"]}, key=lambda k: (k == "total", k))
    print("\nCPU seconds by process kind (median over runs; a kind absent from a run counts 0); processes of that kind")
    for kind in kinds:
        values = [r["cpu"].get(kind, 0.0) for r in rows]
        procs = statistics.median(r["procs"].get(kind, 0) for r in rows) if kind != "total" else \
            statistics.median(sum(r["procs"].values()) for r in rows)
        print(f"  {kind:<48} {statistics.median(values):6.2f}  x{procs:<4g} runs: " +
              " ".join(f"{v:.2f}" for v in values))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--items", type=int, default=6, help="generated images")
    parser.add_argument("--tasks", default="caption,ocr")
    parser.add_argument("--keep", help="reuse this folder for the checkpoint and images (made on first use)")
    parser.add_argument("--against", metavar="TREE",
                        help="also run the job of another source tree (e.g. `git archive REV | tar -x -C TREE`), "
                             "interleaved with this one's runs: before / after on the same noisy machine")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.items < 1:
        parser.error("--runs and --items must be at least 1")
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-startup-"))
    if not (root / "corpus").exists():
        root.mkdir(parents=True, exist_ok=True)
        ckpt, corpus = make_inputs(root, args.items)
    else:
        ckpt, corpus = root / "tiny", root / "corpus"
    tasks = ", ".join(f'"{t}"' for t in args.tasks.split(","))
    cfg = root / "job.toml"
    cfg.write_text(f'[input]\nuri = "{corpus}"\n[model]\npath = "{ckpt}"\n[run]\ntasks = [{tasks}]\n'
                   f'batch_size = 4\nmax_new_tokens = 8\n[ray]\naddress = "local"\n')
    trees = [Path(args.against).resolve(), REPO] if args.against else [REPO]
    rows: dict[Path, list[dict]] = {tree: [] for tree in trees}
    try:
        for i in range(args.runs):
            for tree in trees:
                out_uri = root / f"out-{time.time_ns()}"
                rows[tree].append(one_run(tree, cfg, out_uri))
                shutil.rmtree(out_uri, ignore_errors=True)
                print(f"run {i} {tree}: wall {rows[tree][-1]['wall_s']:.2f}s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for tree in trees:
        print(f"\n== {tree}")
        show(rows[tree])
    return 0


if __name__ == "__main__":
    sys.exit(main())
