"""`ray job submit` as the README says, against a two-node Ray cluster on this machine whose worker node has no
project venv: only `ray[default]` (the version of .venv's Ray) in a bare venv of its own. The job's packages reach
the worker through the runtime environment the README documents (read from the README here, so the two cannot
drift). Not part of the test suite: Ray builds the job's environment on each node first, which takes minutes.

    python bench/job_submit_cluster.py [--venv /tmp/glmv-bare-worker] [--items 12]

- the worker's venv: `python3.11 -m venv` + `pip install ray[default]==<.venv's version>`, made once and reused;
  checked to lack torch, pyarrow and this repo before and after the run (the job installs into Ray's per-job env);
- the head (`ray start --head` from .venv, with the dashboard's job server) has 1 CPU and 1 logical GPU, the worker
  (from the bare venv, on 127.0.0.2) 3 CPUs and 1 GPU; the job asks for two model actors of one GPU each, so one
  runs on the worker, and the head's CPU goes to its own model actor, so every decode task runs on the worker;
- the README's `ray job submit --working-dir . --runtime-env-json '...' -- python jobs/caption.py --config ...`
  with the demo config pointed at a generated corpus and a tiny checkpoint (RAY_ADDRESS names the cluster);
- checks: the job SUCCEEDED, every (item, task) is in the output exactly once without errors, and the worker ran
  the job's code (a log line of the job from ip=127.0.0.2).

Prints the timings and exits 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.dataset as pads  # noqa: E402

from glmv.testing import make_tiny_checkpoint  # noqa: E402
from tests.cluster_helpers import RAY, WORKER_IP, Cluster, ray_env  # noqa: E402
from tests.pipeline_helpers import PY, REPO, good_media, wait_for, write_local  # noqa: E402

TASKS = ("caption", "ocr")


def readme_runtime_env() -> dict:
    """The runtime environment of the README's `ray job submit` line for a cluster without the project's packages."""
    text = (REPO / "README.md").read_text()
    found = re.search(r"ray job submit --working-dir \. --runtime-env-json '(.*?)' -- python\s+jobs/caption\.py",
                      text, re.S)
    assert found, "the README has no `ray job submit --working-dir . --runtime-env-json '...'` line"
    return json.loads(found.group(1))


def ray_version() -> str:
    return subprocess.run([PY, "-c", "import ray; print(ray.__version__)"], capture_output=True, text=True,
                          check=True).stdout.strip()


def bare_venv(path: Path) -> Path:
    """A venv with only ray[default] (of .venv's version): a node set up without this project."""
    python = path / "bin" / "python"
    version = ray_version()
    have = subprocess.run([str(python), "-c", "import ray; print(ray.__version__)"], capture_output=True,
                          text=True) if python.exists() else None
    if have is None or have.returncode or have.stdout.strip() != version:
        base = "python3.11" if subprocess.run(["which", "python3.11"], capture_output=True).returncode == 0 \
            else "python3"
        subprocess.run([base, "-m", "venv", "--clear", str(path)], check=True)
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", f"ray[default]=={version}"], check=True)
    return path


def lacks_project(venv: Path) -> list[str]:
    """The project's modules that venv's Python can import (none, for a node without the project)."""
    probe = ("import importlib.util as u\n"
             "print(' '.join(m for m in ('torch', 'pyarrow', 'safetensors', 'av', 'glmv', 'pipeline') "
             "if u.find_spec(m)))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd="/",
                         env={"PATH": "/usr/bin:/bin"}, check=True)
    return out.stdout.split()


def setup_seconds(temp: Path) -> float:
    """How long the node's runtime-env agent spent building the job's environment: the longest of its setup logs,
    first line to last (later ones only reuse what it built)."""
    longest = float("nan")
    for log in temp.glob("session_latest/logs/runtime_env_setup-*.log"):
        stamps = [time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
                  for line in log.read_text(errors="replace").splitlines()
                  if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", line)]
        if stamps and not max(stamps) - min(stamps) <= longest:
            longest = max(stamps) - min(stamps)
    return longest


def worker_env(venv: Path) -> dict:
    """ray_env() as a node without .venv sees it: the bare venv first on PATH, no PYTHONPATH to this repo."""
    env = ray_env()
    venv_bin = str(Path(PY).parent)
    path = [p for p in env["PATH"].split(":") if p and p != venv_bin]
    env["PATH"] = ":".join([str(venv / "bin"), *path])
    for var in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(var, None)
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default="/tmp/glmv-bare-worker", help="the worker's bare venv (made if missing)")
    parser.add_argument("--items", type=int, default=12, help="images in the corpus (plus one video)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the job, its env set-up included")
    args = parser.parse_args()
    t0 = time.monotonic()
    venv = bare_venv(Path(args.venv))
    t_venv = time.monotonic() - t0
    assert lacks_project(venv) == [], f"the worker's venv has {lacks_project(venv)}: not a bare node"
    runtime_env = readme_runtime_env()
    print(f"worker venv {venv}: ray[default]=={ray_version()} only ({t_venv:.0f}s); the README's runtime env: "
          f"{json.dumps(runtime_env)}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="job-submit-cluster-"))
    corpus, out = work / "corpus", work / "out"
    write_local(corpus, good_media(num_images=args.items, num_videos=1))
    model = make_tiny_checkpoint(work / "tiny", preset="gqa", family="glm41v", seed=0)
    (work / "cluster").mkdir()
    cluster = Cluster(work / "cluster")
    failures: list[str] = []
    try:
        t1 = time.monotonic()
        cluster.start({"cpus": 1, "gpus": 1},
                      {"cpus": 3, "gpus": 1, "ray": str(venv / "bin" / "ray"), "env": worker_env(venv)},
                      dashboard=True)
        env = {**ray_env(), "RAY_ADDRESS": cluster.dashboard_address}
        assert wait_for(lambda: subprocess.run([RAY, "job", "list"], env=env, capture_output=True).returncode == 0,
                        timeout=120, interval=1.0), cluster.logs()
        t_cluster = time.monotonic() - t1
        print(f"cluster up in {t_cluster:.0f}s: head {cluster.address} (.venv), worker {WORKER_IP} ({venv})",
              flush=True)

        submit = [RAY, "job", "submit", "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
                  "python", "jobs/caption.py", "--config", "configs/demo.toml",
                  "--set", f"input.uri={corpus}", "--set", f"output.uri={out}", "--set", f"model.path={model}",
                  "--set", "demo.generate=false", "--set", f"run.tasks={json.dumps(list(TASKS))}",
                  "--set", "run.max_new_tokens=8", "--set", "actors.count=2", "--set", "actors.num_gpus=1"]
        print("$ RAY_ADDRESS=" + cluster.dashboard_address + " " + " ".join(
            f"'{a}'" if any(c in a for c in " {\"[") else a for a in submit), flush=True)
        t2 = time.monotonic()
        log_path = work / "submit.log"
        with open(log_path, "w") as log:
            result = subprocess.run(submit, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=args.timeout)
        t_job = time.monotonic() - t2
        said = log_path.read_text()
        print("\n".join(line for line in said.splitlines()
                        if any(w in line for w in ("model actors:", "done:", "errors:", "succeeded", "failed",
                                                   "Error", "Job '")))[-3000:], flush=True)
        job_id = re.search(r"Job '(raysubmit_\w+)'", said)
        asked = subprocess.run([RAY, "job", "status", job_id.group(1)], env=env, capture_output=True,
                               text=True).stdout if job_id else ""
        status = next(iter(re.findall(r"Job '\S+' (succeeded|failed|was stopped)|: (SUCCEEDED|FAILED|STOPPED)\b",
                                      asked)), ("", ""))
        status = (status[0] or status[1] or "unknown").upper()
        if result.returncode != 0 or status != "SUCCEEDED":
            failures.append(f"ray job submit exit {result.returncode}, status {status}: {asked.strip()[-300:]}")
        if f"ip={WORKER_IP})" not in said:
            failures.append("no log line of the job from the worker node: it did not run there")
        table = pads.dataset(str(out), format="parquet").to_table() if out.exists() else None
        pairs = list(zip(table["id"].to_pylist(), table["task"].to_pylist())) if table is not None else []
        expected = (args.items + 1) * len(TASKS)
        if not (len(pairs) == len(set(pairs)) == expected):
            failures.append(f"{len(pairs)} rows, {len(set(pairs))} distinct, for {expected} (item, task) pairs")
        elif table["error"].null_count != len(pairs):
            failures.append(f"error rows: {table.filter(table['error'].is_valid())['error'].to_pylist()[:3]}")
        setup = {"head": setup_seconds(cluster.temp), "worker": setup_seconds(cluster.node_temps[0])}
        print(f"job: exit {result.returncode}, {status}, {len(set(pairs))} of {expected} (item, task) pairs once, "
              f"in {t_job:.0f}s, of which building the job's runtime env took " +
              ", ".join(f"{s:.0f}s on the {node}" for node, s in setup.items()), flush=True)
        if failures:
            print(said[-6000:] + f"\n(the whole log: {log_path})")
    finally:
        cluster.stop()
        # the head's copy of .venv for the job is several GB
        for folder in cluster.temp.glob("session_*/runtime_resources"):
            shutil.rmtree(folder, ignore_errors=True)
        if not failures:
            shutil.rmtree(work, ignore_errors=True)
    left = lacks_project(venv)
    if left:
        failures.append(f"the worker's venv gained {left}: the job installed into the node's own Python")
    print(f"total {time.monotonic() - t0:.0f}s: " + ("OK" if not failures else "FAILED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
