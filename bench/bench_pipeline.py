"""The whole job vs glmv called directly vs transformers' documented way, on the same work, in one run.

    .venv/bin/python bench/bench_pipeline.py [--items 48] [--batch-size 8] [--max-new-tokens 256] [--threads 1] \\
        [--repeats 2] [--sides transformers,direct,job]

Work: `--items` images x the built-in tasks caption, ocr and reasoning (prompts and template switches from
pipeline/config.py, as the job's model actor builds them), greedy, up to `--max-new-tokens`, on the mid-size
`bench-longtail` random checkpoint, whose rows stop at scattered, long-tailed lengths like real captions. Sides:
- transformers: the seed's plain way, transformers' processor + `Glm4vForConditionalGeneration.generate`, one task
  at a time in batches of `--batch-size` images (float32 CPU);
- direct: glmv called in one process the way the job's model actor calls it: windows of the same items, one
  `generate` per window (template switches mixed) streaming its rows through `--batch-size` decode slots;
- job: `jobs/caption.py` as a subprocess on the same corpus and model, start-up included (Ray, model load,
  listing, decoding, writing the Parquet and the run report).
Every side loads the model inside its timed span and runs with the same torch thread count. Each side runs in its
own process so its peak memory is its own; the sides alternate and the best run of each counts, so that the load of
a shared machine hits all alike. Prints items/s and (image, task) pairs/s per side, the ratios job/transformers
(goal >= 2.5, issue 11) and job/direct (goal >= 0.9, issue 9), peak RSS per side (the job: every process of its
tree together, its driver and its model actor), the output lengths, and the share of (image, task) texts that are
identical between the job's Parquet and transformers (goal >= 90%).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIDES = ("transformers", "direct", "job")
TASKS = ["caption", "ocr", "reasoning"]
# Ray starts its workers at nice 15 so that its own daemons stay responsive. On a shared machine that lets every
# other process starve the model actor, while the in-process sides run at nice 0: give the job's workers the same
# priority so that every side competes for the CPU alike.
SIDE_ENV = {"transformers": {}, "direct": {}, "job": {"RAY_worker_niceness": "0"}}
# Every side with its weights in huge pages, as glmv sets for itself at import; a value set by the caller wins.
BASE_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def make_checkpoint(path: Path) -> Path:
    """glmv's mid-size benchmark model (the real architecture's proportions, so model time dominates on a CPU),
    with eos logits scaled so that greedy rows stop at scattered lengths."""
    from glmv.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(path, preset="bench-longtail", seed=0)


def make_corpus(folder: Path, items: int) -> list[Path]:
    from pipeline.corpus import image_bytes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(items):
        path = folder / f"img_{i:04d}.jpg"
        path.write_bytes(image_bytes(448 + 28 * (i % 3), 336, seed=i, ext="jpg"))
        paths.append(path)
    return paths


def job_config(args) -> dict:
    """The job's run config; the in-process sides take their tasks and window size from the same."""
    return {
        "input": {"uri": args.corpus}, "output": {"uri": args.out, "rows_per_file": 64},
        "model": {"path": args.model, "dtype": "float32", "device": "cpu"},
        "run": {"tasks": getattr(args, "tasks", TASKS), "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens},
        # the direct side makes the calls the actor makes in this mode
        "batching": {"mode": "refill", **({"sort_window": args.sort_window} if args.sort_window else {})},
        "actors": {"count": 1, "num_gpus": 0, "num_cpus": args.threads},
        "ray": {"address": "local", "num_cpus": args.threads + 1},
    }


def to_toml(config: dict) -> str:
    # the values are strings, numbers and lists of strings, which JSON writes as TOML does
    return "".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()) + "\n"
                   for section, keys in config.items())


def conversation(path: Path, prompt: str) -> list[dict]:
    """One (image, task) as both libraries' chat templates take it."""
    return [{"role": "user", "content": [{"type": "image", "url": str(path)}, {"type": "text", "text": prompt}]}]


def task_specs(args):
    """(name, prompt, thinking) of each task, exactly as the job's model actor builds them for an image."""
    from pipeline import config

    specs = config.from_dict(job_config(args)).task_specs()
    return [(s.name, s.prompt.replace("{media}", "image"), s.thinking) for s in specs]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generated_count(new_tokens, eos_ids: set[int]) -> int:
    """Tokens a row generated, its eos included (what glmv's rows count): the padding after it is not."""
    for i, token in enumerate(new_tokens):
        if token in eos_ids:
            return i + 1
    return len(new_tokens)


def run_transformers(args) -> dict:
    """The seed's plain way: transformers' processor + generate, one task at a time, batch after batch."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    paths = sorted(Path(args.corpus).glob("*.jpg"))
    start = time.perf_counter()
    processor = transformers.AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"   # decoder-only generation pads on the left
    model = transformers.Glm4vForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    loaded = time.perf_counter()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = {}
    for task, prompt, thinking in task_specs(args):
        for i in range(0, len(paths), args.batch_size):
            chunk = paths[i:i + args.batch_size]
            inputs = processor.apply_chat_template([conversation(p, prompt) for p in chunk],
                                                   add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   return_tensors="pt", processor_kwargs={"padding": True},
                                                   enable_thinking=thinking)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
            texts = processor.batch_decode(new, skip_special_tokens=True)
            for path, text, ids, mask in zip(chunk, texts, new.tolist(), inputs["attention_mask"]):
                rows[f"{path.name}\t{task}"] = {"text": text, "prompt_tokens": int(mask.sum()),
                                                "output_tokens": generated_count(ids, eos)}
    end = time.perf_counter()
    return {"seconds": end - start, "load_s": loaded - start, "peak_rss_mb": peak_rss_mb(), "rows": rows}


def windows(paths: list, args) -> list[list]:
    """The job's model-actor calls: `run.batch_size * batching.sort_window` sequences' worth of items each (as
    pipeline/run.py sizes them)."""
    from pipeline import config

    cfg = config.from_dict(job_config(args))
    per_call = max(1, cfg.run.batch_size * cfg.batching.sort_window // len(cfg.run.tasks))
    return [paths[i:i + per_call] for i in range(0, len(paths), per_call)]


def generate_rows(processor, model, paths: list[Path], images: list, specs, args) -> dict:
    """One glmv generate over every (item, task) of these items, through `--batch-size` slots: rows by
    "<file>\t<task>". An item's tasks share its image object, as the job's decode stage hands them over."""
    import torch

    work = [(p, img, task, prompt, thinking) for p, img in zip(paths, images) for task, prompt, thinking in specs]
    convs = [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": prompt}]}]
             for _, img, _, prompt, _ in work]
    prompts = [processor.apply_chat_template(conv, add_generation_prompt=True, enable_thinking=thinking)
               for conv, (*_, thinking) in zip(convs, work)]
    inputs = processor.encode_rendered(prompts, convs, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             max_batch_size=args.batch_size, return_dict_in_generate=True)
    texts = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return {f"{path.name}\t{task}": {"text": text, "prompt_tokens": int(info.num_prompt_tokens),
                                      "output_tokens": int(info.num_generated_tokens)}
            for (path, _, task, _, _), text, info in zip(work, texts, out.rows)}


def run_direct(args) -> dict:
    """glmv in one process, called as the job's model actor calls it: per window of items, one generate whose rows
    (item by item, task by task, template switches mixed) stream through `--batch-size` decode slots."""
    import torch

    from glmv.model import Glm4vForConditionalGeneration
    from glmv.processor import Glm4vProcessor

    torch.set_num_threads(args.threads)
    paths = sorted(Path(args.corpus).glob("*.jpg"))
    specs = task_specs(args)
    start = time.perf_counter()
    processor = Glm4vProcessor.from_pretrained(args.model)
    model = Glm4vForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32, device="cpu")
    loaded = time.perf_counter()
    rows = {}
    for window in windows(paths, args):
        images = [processor.load_image(p) for p in window]   # decoded once per item, as the job's decode stage does
        rows.update(generate_rows(processor, model, window, images, specs, args))
    end = time.perf_counter()
    return {"seconds": end - start, "load_s": loaded - start, "peak_rss_mb": peak_rss_mb(), "rows": rows}


class TreeMemory:
    """Peak RSS of a process tree (the job: its driver, Ray's daemons and workers), sampled from /proc while it
    runs, with the driver's and the model actor's own peaks (VmHWM)."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.total_kb = self.driver_kb = self.actor_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _status(pid: str) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
        return out

    def _tree(self) -> list[str]:
        children: dict[str, list[str]] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:   # the parent is the 4th field, after the command name in parentheses
                ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(pid)
        tree, todo = [], [str(self.root)]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._round()

    def _round(self):
        total = 0
        for pid in self._tree():
            try:
                status = self._status(pid)
                total += status.get("VmRSS", 0)
                if pid == str(self.root):
                    self.driver_kb = max(self.driver_kb, status.get("VmHWM", 0))
                else:
                    self._worker(pid, status)
            except OSError:
                continue
        self.total_kb = max(self.total_kb, total)

    def _worker(self, pid: str, status: dict[str, int]) -> None:
        if b"Predictor" in Path(f"/proc/{pid}/cmdline").read_bytes():
            self.actor_kb = max(self.actor_kb, status.get("VmHWM", 0))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mb": self.total_kb / 1024, "driver_peak_rss_mb": self.driver_kb / 1024,
                "actor_peak_rss_mb": self.actor_kb / 1024}


def launch_job(config: dict, workdir: Path, memory=TreeMemory) -> dict:
    """jobs/caption.py with this config as a user runs it, timed from launch to exit, its process tree's memory
    followed by `memory`; raises RuntimeError with its log's end when it fails."""
    path = workdir / "job.toml"
    path.write_text(to_toml(config))
    env = {**BASE_ENV, **os.environ, **SIDE_ENV["job"], "PYTHONPATH": str(REPO)}
    with open(workdir / "job.log", "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "caption.py"), "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        watch = memory(proc.pid)
        code = proc.wait()
        end = time.perf_counter()
    result = {"seconds": end - start, **watch.stop()}
    if code != 0:
        raise RuntimeError(f"jobs/caption.py exited {code}:\n{(workdir / 'job.log').read_text()[-3000:]}")
    return result


def run_job(args, workdir: Path) -> dict:
    """The job on the bench's work; its rows read back from the output Parquet."""
    import pyarrow.dataset as pads

    result = launch_job(job_config(args), workdir)
    table = pads.dataset(args.out, format="parquet").to_table(
        columns=["uri", "task", "text", "error", "num_input_tokens", "num_output_tokens"])
    result["errors"] = table["error"].drop_null().to_pylist()
    result["rows"] = {f"{r['uri'].rsplit('/', 1)[-1]}\t{r['task']}": {
        "text": r["text"], "prompt_tokens": r["num_input_tokens"], "output_tokens": r["num_output_tokens"]}
        for r in table.to_pylist() if r["error"] is None}
    return result


def run_side(side: str, args, tmp: Path, repeat: int) -> dict:
    workdir = tmp / f"{side}-{repeat}"
    workdir.mkdir()
    side_args = ["--items", str(args.items), "--batch-size", str(args.batch_size), "--max-new-tokens",
                 str(args.max_new_tokens), "--threads", str(args.threads), "--sort-window", str(args.sort_window),
                 "--model", str(args.model), "--corpus", str(args.corpus), "--out", str(workdir / "output")]
    if side == "job":
        return run_job(parse_args(side_args), workdir)
    proc = subprocess.run([sys.executable, __file__, *side_args, "--side", side], capture_output=True, text=True,
                          env={**BASE_ENV, **os.environ, **SIDE_ENV[side]})
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_sides(args, runs: dict[str, list[dict]], best: dict[str, dict]) -> None:
    pairs = args.items * len(TASKS)
    calls = windows(list(range(args.items)), args)
    print(f"work: {args.items} images x {len(TASKS)} tasks ({', '.join(TASKS)}) = {pairs} pairs, bench-longtail "
          f"model, batch {args.batch_size}, up to {args.max_new_tokens} new tokens, greedy, {args.threads} torch "
          f"thread(s), CPU float32, {len(calls)} model call(s) of at most {len(calls[0])} images; best of "
          f"{args.repeats} alternating runs per side")
    print("all runs (s): " + "; ".join(f"{side} " + ", ".join(f"{r['seconds']:.1f}" for r in rs)
                                       for side, rs in runs.items()))
    print(f"{'side':>13} {'items/s':>8} {'pairs/s':>8} {'wall s':>7} {'load s':>7} {'peak RSS MiB':>13}")
    for side, r in best.items():
        memory = f"{r['peak_rss_mb']:13.0f}"
        if side == "job":
            memory += (f"  (sum over its processes; driver {r['driver_peak_rss_mb']:.0f}, "
                       f"model actor {r['actor_peak_rss_mb']:.0f})")
        load = f"{r['load_s']:7.1f}" if "load_s" in r else f"{'-':>7}"
        print(f"{side:>13} {args.items / r['seconds']:8.3f} {pairs / r['seconds']:8.3f} {r['seconds']:7.1f} {load} "
              f"{memory}")


def print_lengths(args, job: dict) -> None:
    """The workload's shape as the job wrote it: long-tailed output lengths."""
    lengths = sorted(r["output_tokens"] for r in job["rows"].values())
    if len(lengths) > 1:
        q = statistics.quantiles(lengths, n=4)
        print(f"job output tokens: median {q[1]:.0f}, quartiles {q[0]:.0f}/{q[2]:.0f}, "
              f"{sum(n >= args.max_new_tokens for n in lengths)} of {len(lengths)} at the limit; "
              f"error rows {len(job['errors'])}")


def print_texts(side: str, ref: str, rows: dict, ref_rows: dict, goal: str) -> None:
    """Share of (image, task) texts identical between two sides, and where the first few that differ part."""
    same = [k for k in ref_rows if k in rows and rows[k]["text"] == ref_rows[k]["text"]]
    prompts = sum(k in rows and rows[k]["prompt_tokens"] == v["prompt_tokens"] for k, v in ref_rows.items())
    print(f"texts identical {side} vs {ref}: {len(same)}/{len(ref_rows)} = {100 * len(same) / len(ref_rows):.1f}%"
          f"{goal}; prompt token counts equal {prompts}/{len(ref_rows)}")
    for key in [k for k in ref_rows if k not in same][:3]:
        mine, theirs = rows.get(key, {"text": "", "output_tokens": 0}), ref_rows[key]
        at = next((i for i, (a, b) in enumerate(zip(mine["text"], theirs["text"])) if a != b),
                  min(len(mine["text"]), len(theirs["text"])))
        print(f"  differs: {key.replace(chr(9), ' ')}: {side} {mine['output_tokens']} tokens, {ref} "
              f"{theirs['output_tokens']} tokens, first difference at character {at}")


def report(args, runs: dict[str, list[dict]]) -> None:
    best = {side: min(rs, key=lambda r: r["seconds"]) for side, rs in runs.items()}
    print_sides(args, runs, best)
    if "job" in best:
        print_lengths(args, best["job"])
    for num, den, goal in (("job", "transformers", 2.5), ("job", "direct", 0.9), ("direct", "transformers", None)):
        if num in best and den in best:
            goal_text = f" (goal >= {goal})" if goal else ""
            print(f"ratio {num}/{den}: {best[den]['seconds'] / best[num]['seconds']:.3f}{goal_text}")
    for side, ref in (("job", "transformers"), ("direct", "transformers"), ("job", "direct")):
        if side in best and ref in best:
            goal = " (goal >= 90%)" if (side, ref) == ("job", "transformers") else ""
            print_texts(side, ref, best[side]["rows"], best[ref]["rows"], goal)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=48, help="images (each runs every task)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model (every side)")
    parser.add_argument("--sort-window", type=int, default=0, help="batching.sort_window (default: the config's)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--side", choices=["transformers", "direct"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.side:   # one in-process side, in its own process
        print(json.dumps(run_transformers(args) if args.side == "transformers" else run_direct(args)))
        return 0
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - set(SIDES)
    if unknown or not sides:
        print(f"--sides: expected some of {', '.join(SIDES)}, got {args.sides!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        tmp = Path(tmp)
        args.model = str(make_checkpoint(tmp / "model"))
        args.corpus, args.out = str(tmp / "corpus"), str(tmp / "output")   # the config's paths (each side its own)
        make_corpus(Path(args.corpus), args.items)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        # alternate the sides so that a change in the machine's load hits all alike; keep each side's best
        for repeat in range(args.repeats):
            for side in sides:
                try:
                    runs[side].append(run_side(side, args, tmp, repeat))
                except RuntimeError as e:
                    print(e, file=sys.stderr)
                    return 1
                print(f"[{side} run {repeat + 1}: {runs[side][-1]['seconds']:.1f}s]", file=sys.stderr, flush=True)
    report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
