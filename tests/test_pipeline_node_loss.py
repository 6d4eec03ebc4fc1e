"""A run survives the loss of a node: a real two-node Ray cluster on this machine (tests.cluster_helpers), the job
against it, the worker node's raylet killed with SIGKILL mid-run, as a spot preemption does. Each run must end with
exit 0 in one process, every (item, task) exactly once; and a SIGTERM mid-run drains, writes and exits 143. A
fault that Ray Data gives up on is injected in-process too, to see the run restart its dataset (and stop past
actors.max_restarts).

Logical GPUs steer where things run: a model actor asks for one GPU, so a node's GPU count decides whether it hosts
one (the actors still run on the CPU)."""

import io
import os
import re
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from ray.exceptions import ActorDiedError

from pipeline import config
from pipeline import run as run_mod
from pipeline.errors import RunStopped
from pipeline.run import run
from tests.cluster_helpers import WORKER_IP, Cluster
from tests.pipeline_helpers import PY, REPO, config_text, good_media, read_output, wait_for, write_local

TASKS = ("caption", "ocr")
ITEMS = 64


@pytest.fixture
def cluster(request, tmp_path_factory):
    head, worker = request.param
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c.start(head, worker)
    finally:
        c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_local(root, good_media(num_images=ITEMS, num_videos=0))
    return root


SMALL_CALLS = {"sort_window": 1, "decode_batch_size": 4}   # a model call per 4 items: rows land while nodes die


def _config(tmp_path, corpus, model, cluster, actors: str, drain_s: float = 30.0, manifest: str = ""):
    extra = f"[actors]\n{actors}\n[ray]\naddress = \"{cluster.address}\"\n"
    text = config_text(str(corpus), str(tmp_path / "out"), str(model), tasks=TASKS, extra=extra,
                       run={"max_new_tokens": 48, "drain_s": drain_s}, batching=SMALL_CALLS)
    if manifest:   # the corpus named by manifests instead of listed
        text = text.replace(f'[input]\nuri = "{corpus}"', f'[input]\nmanifest = "{manifest}"')
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


class Job:
    """jobs/caption.py against the cluster, its output in files that the test can read while it runs."""

    def __init__(self, config, cluster, tmp_path):
        self.out_path, self.err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([PY, str(REPO / "jobs" / "caption.py"), "--config", str(config)],
                                         cwd=REPO, env=cluster.env, stdout=out, stderr=err, start_new_session=True)

    def text(self) -> str:
        return self.out_path.read_text() + self.err_path.read_text()

    def wait(self, timeout: float) -> tuple[str, str]:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.out_path.read_text(), self.err_path.read_text()


def _rows_landed(out) -> int:
    rows = 0
    for path in out.glob("part-*.parquet"):
        try:
            rows += pq.ParquetFile(path).metadata.num_rows
        except OSError:
            pass
    return rows


def _assert_exactly_once(out):
    table = read_output(str(out))
    pairs = list(zip(table["id"].to_pylist(), table["task"].to_pylist()))
    assert len(pairs) == len(set(pairs)), "a pair was written twice"
    assert len(pairs) == ITEMS * len(TASKS), f"{len(pairs)} rows for {ITEMS * len(TASKS)} pairs"
    assert table["error"].null_count == len(pairs), table.filter(table["error"].is_valid())["error"].to_pylist()[:3]


def _kill_worker_mid_run(cluster, job, out, after_rows: int, worker_hosts_model: bool, before_kill=None):
    def ready():
        # a model actor says at load that it sees no CUDA device; from the worker node the line carries its IP
        loaded = not worker_hosts_model or re.search(r"Predictor\)\) pid=\d+, ip=127\.0\.0\.2\)", job.text())
        return (loaded and _rows_landed(out) >= after_rows) or job.proc.poll() is not None

    assert wait_for(ready, timeout=240), "no rows landed"
    if before_kill is not None:
        before_kill()
    assert job.proc.poll() is None, "the run ended before the node could be lost"
    cluster.kill_node("worker")


def _finished_without_the_worker(cluster, job, out) -> str:
    """The run, after its worker node was lost, ends well with every pair exactly once; its stdout."""
    stdout, stderr = job.wait(timeout=420)
    print("\n".join(line for line in (stdout + stderr).splitlines()
                    if any(w in line for w in ("cluster fault", "restarts", "done:", "model actors", "Error"))))
    assert job.proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert cluster.procs["worker"][0].poll() is not None and cluster.nodes() == 1, "the worker node was not lost"
    assert "Traceback" not in stderr, stderr[-5000:]
    _assert_exactly_once(out)
    return stdout


# (head resources, worker resources), the actors' settings, whether the worker hosts a model actor
SCENARIOS = {
    # the model actor needs the head's only GPU: the worker runs decode tasks (and whatever else Ray put there)
    "decode_tasks": (({"cpus": 3, "gpus": 1}, {"cpus": 3, "gpus": 0}), "count = 1\nnum_gpus = 1", False),
    # one model actor per node: the worker's goes with it, and the run goes on with the head's
    "model_actor": (({"cpus": 3, "gpus": 1}, {"cpus": 3, "gpus": 1}), "count = 2\nnum_gpus = 1", True),
}


@pytest.mark.parametrize("cluster,actors,worker_hosts_model", list(SCENARIOS.values()), ids=list(SCENARIOS),
                         indirect=["cluster"])
def test_a_lost_worker_node_costs_its_work_not_the_run(cluster, actors, worker_hosts_model, corpus, tiny_gqa,
                                                       tmp_path):
    out = tmp_path / "out"
    job = Job(_config(tmp_path, corpus, tiny_gqa, cluster, actors), cluster, tmp_path)
    _kill_worker_mid_run(cluster, job, out, after_rows=8, worker_hosts_model=worker_hosts_model)
    stdout = _finished_without_the_worker(cluster, job, out)
    if "restarts after cluster faults" in stdout:   # Ray Data could not recover by itself: the run restarted it
        assert "restarting the dataset from the completion records" in stdout


# Ray Data's actor pool runs each model actor as one of these; every other actor is a non-model actor
MODEL_ACTOR_CLASSES = {"MapWorker(MapBatches(Predictor))"}


# The worker has the most room (4 CPUs and a GPU to the head's 2 and 1): whatever Ray may place where it likes would
# likely go there. The input is two manifests, so that the run has its duplicate counter besides its tracker.
@pytest.mark.parametrize("cluster", [({"cpus": 2, "gpus": 1}, {"cpus": 4, "gpus": 1})], indirect=True)
def test_the_worker_hosts_no_non_model_actor_so_its_loss_takes_none(cluster, corpus, tiny_gqa, tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    media = sorted(str(p) for p in corpus.rglob("*") if p.is_file())
    for name, part in (("a.csv", media[::2]), ("b.csv", media[1::2])):
        (manifests / name).write_text("uri\n" + "".join(f"{uri}\n" for uri in part))
    out = tmp_path / "out"
    config = _config(tmp_path, corpus, tiny_gqa, cluster, "count = 2\nnum_gpus = 1", manifest=f"{manifests}/*.csv")
    job = Job(config, cluster, tmp_path)
    seen = []

    def list_actors():   # mid-run, rows landing, the worker's model actor up: every actor not dead by then
        def worker_model_listed():
            seen[:] = cluster.actors()
            return any(a["ip"] == WORKER_IP and a["class"] in MODEL_ACTOR_CLASSES for a in seen)

        assert wait_for(worker_model_listed, timeout=30, interval=0.5), seen

    _kill_worker_mid_run(cluster, job, out, after_rows=8, worker_hosts_model=True, before_kill=list_actors)
    where = sorted((a["ip"], a["class"], a["name"], a["state"]) for a in seen)
    print("actors alive mid-run:", *where, sep="\n  ")
    on_worker = [a for a in seen if a["ip"] == WORKER_IP]
    assert [a for a in on_worker if a["class"] not in MODEL_ACTOR_CLASSES] == [], where
    on_head = {a["class"] for a in seen if a["ip"] not in (WORKER_IP, "?")}   # (Ray names the head by its own IP)
    assert {"Tracker", "Repeats"} <= on_head, where   # the run's own, pinned to the driver's node
    # Ray Data's own (its stats actor and the like) exist too, all of them on the driver's node
    assert on_head - MODEL_ACTOR_CLASSES - {"Tracker", "Repeats"}, where

    stdout = _finished_without_the_worker(cluster, job, out)
    if "restarts after cluster faults" in stdout:
        assert re.search(r"restarts after cluster faults: \d+ \(\d+ \(item, task\) pairs redone\)", stdout)


@pytest.mark.parametrize("cluster", [SCENARIOS["decode_tasks"][0]], indirect=True)
def test_sigterm_drains_writes_and_exits_143_then_a_rerun_finishes(cluster, corpus, tiny_gqa, tmp_path):
    out = tmp_path / "out"
    config = _config(tmp_path, corpus, tiny_gqa, cluster, "count = 1\nnum_gpus = 1", drain_s=20)
    job = Job(config, cluster, tmp_path)
    assert wait_for(lambda: _rows_landed(out) >= 8 or job.proc.poll() is not None, timeout=240)
    assert job.proc.poll() is None, "the run ended before it could be stopped"
    sent = time.monotonic()
    os.kill(job.proc.pid, signal.SIGTERM)
    stdout, stderr = job.wait(timeout=120)
    took = time.monotonic() - sent
    assert job.proc.returncode == 143, stdout[-3000:] + stderr[-3000:]
    assert took < 20 + 15, took
    said = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert len(said) == 1 and said[0].startswith("stopped: SIGTERM received; in-flight work drained"), stderr[-3000:]
    assert "Traceback" not in stderr and "*** SIG" not in stderr, stderr[-5000:]
    written = _rows_landed(out)
    assert 8 <= written < ITEMS * len(TASKS)
    rerun = subprocess.run([PY, str(REPO / "jobs" / "caption.py"), "--config", str(config)], cwd=REPO,
                           env=cluster.env, capture_output=True, text=True, timeout=420)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    _assert_exactly_once(out)

# --- a fault Ray Data does not recover from by itself: the run restarts its dataset in the same process ------------




class DiesOnce:
    """build_dataset, whose first dataset ends after `after` result blocks with the ActorDiedError Ray Data raises
    when a model actor's node is gone and its retries are spent (injected in the driver: Ray cannot ship an
    ActorDiedError raised inside a task back to the driver)."""

    def __init__(self, build, after: int):
        self.build, self.after, self.datasets = build, after, 0

    def __call__(self, *args, **kwargs):
        ds, self.datasets = self.build(*args, **kwargs), self.datasets + 1
        return self._Failing(ds, self.after) if self.datasets == 1 else ds

    class _Failing:
        def __init__(self, ds, after):
            self.ds, self.after = ds, after

        def iter_batches(self, **kwargs):
            for n, batch in enumerate(self.ds.iter_batches(**kwargs)):
                if n == self.after:
                    raise ActorDiedError()
                yield batch


def _run_dying_once(monkeypatch, path, after: int):
    dies = DiesOnce(run_mod.build_dataset, after)
    printed = io.StringIO()
    with monkeypatch.context() as patched:
        patched.setattr(run_mod, "build_dataset", dies)
        return run(config.load(path), out=printed), printed.getvalue(), dies


def _small_run(tmp_path, tiny, extra=""):
    corpus = tmp_path / "corpus"
    write_local(corpus, good_media(num_images=16, num_videos=0))
    path = tmp_path / "run.toml"
    path.write_text(config_text(str(corpus), str(tmp_path / "out"), str(tiny), tasks=TASKS, extra=extra,
                                batching={"decode_batch_size": 2, "sort_window": 1}))
    return path


def _pairs(out) -> list:
    table = read_output(str(out))
    return list(zip(table["id"].to_pylist(), table["task"].to_pylist()))


def test_a_fault_ray_data_gives_up_on_restarts_the_dataset_and_every_pair_lands_once(local_ray, tiny_gqa, tmp_path,
                                                                                      monkeypatch):
    summary, printed, dies = _run_dying_once(monkeypatch, _small_run(tmp_path, tiny_gqa), after=3)
    assert dies.datasets == 2 and summary.restarts == 1, printed
    assert "cluster fault: ActorDiedError: The actor died unexpectedly" in printed
    assert "restarting the dataset from the completion records (restart 1 of at most 8)" in printed
    # rows landed before the fault are not redone, nor counted as 'skipped as already done'
    assert (summary.done, summary.skipped, summary.errors) == (16 * len(TASKS), 0, 0), printed
    assert "restarts after cluster faults: 1" in printed
    # the windows in flight at the fault ran again in the new dataset: the model's work redone is said
    assert summary.admitted >= summary.items == 16
    assert ("redone: " in printed) == (summary.admitted > summary.items), printed
    pairs = _pairs(tmp_path / "out")
    assert len(pairs) == len(set(pairs)) == 16 * len(TASKS)


def test_past_max_restarts_the_run_stops_with_exit_4_keeping_what_landed(local_ray, tiny_gqa, tmp_path, monkeypatch):
    path = _small_run(tmp_path, tiny_gqa, extra="[actors]\nmax_restarts = 0")
    with pytest.raises(RunStopped, match=r"the cluster failed 1 times \(last: ActorDiedError.*actors.max_restarts "
                                         r"= 0; what finished is written: rerun"):
        _run_dying_once(monkeypatch, path, after=3)
    kept = len(_pairs(tmp_path / "out"))
    assert kept > 0 and RunStopped.exit_code == 4
    again = run(config.load(path), out=io.StringIO())
    pairs = _pairs(tmp_path / "out")
    assert len(pairs) == len(set(pairs)) == 16 * len(TASKS)
    assert (again.done, again.skipped, again.restarts) == (16 * len(TASKS) - kept, kept, 0)
