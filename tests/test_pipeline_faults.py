"""The real job against S3 (moto) behind the fault-injecting proxy: throttling, 5xx, dropped connections, lost
replies and cut bodies on 30-50% of requests end with every (item, task) once and no error row; an outage of all
media reads stops the run without recording anything, and a plain rerun completes it; jobs started at the same
instant on one output never both run."""

import subprocess

import pytest

from tests.faults import FaultProxy
from tests.pipeline_helpers import PY, REPO, config_text, good_media, moto_s3, read_output, run_job, s3fs_for

TASKS = ("caption", "ocr")
NUM_IMAGES = 16
FAST = ["ray.num_cpus=2", "run.max_new_tokens=4", "storage.retry_backoff_s=0.02"]


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        fs = s3fs_for(endpoint)
        fs.mkdir("fault-corpus")
        fs.mkdir("fault-results")
        for rel, data in good_media(num_images=NUM_IMAGES, num_videos=1).items():
            fs.pipe(f"fault-corpus/media/{rel}", data)
        for rel, data in good_media(num_images=2, num_videos=0).items():
            fs.pipe(f"fault-corpus/small/{rel}", data)
        yield endpoint


def _job(tmp_path, endpoint, output, model, *overrides):
    path = tmp_path / "faults.toml"
    path.write_text(config_text("s3://fault-corpus/media/", output, str(model), endpoint=endpoint, tasks=TASKS))
    return run_job(path, *FAST, *overrides, timeout=240)


def _check_once(output, endpoint, items=NUM_IMAGES + 1) -> int:
    """Every (item, task) of the corpus exactly once, none an error; returns the row count."""
    table = read_output(output, endpoint)
    pairs = list(zip(table["id"].to_pylist(), table["task"].to_pylist()))
    assert len(pairs) == len(set(pairs)) == items * len(TASKS), sorted(pairs)
    errors = [e for e in table["error"].to_pylist() if e is not None]
    assert not errors, errors[:5]
    return len(pairs)


def _faulty(proxy, kinds, rate):
    """`rate` of the requests of each kind fail, spread over every fault that kind can have."""
    for kind in kinds:
        share = {"slowdown": 0.35, "internal": 0.25, "drop": 0.15, "lost_reply": 0.15, "cut": 0.1}
        if kind in ("head", "write"):
            share.pop("cut")   # no body to cut
        proxy.set(kind, **{f: rate * s / sum(share.values()) for f, s in share.items()})


def test_reads_and_writes_at_40_percent_faults_end_with_every_pair_once(s3, tiny_gqa, tmp_path):
    with FaultProxy(s3, seed=11) as proxy:
        _faulty(proxy, ("read", "write"), 0.4)
        proxy.burst("write", 1, "lost_reply")   # the lease's create goes through, its answer is lost
        proxy.burst("read", 1, "cut")
        result = _job(tmp_path, proxy.url, "s3://fault-results/rw", tiny_gqa, "storage.retries=12")
        injected = proxy.injected()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _check_once("s3://fault-results/rw", s3)
    retried = result.stderr.count("transient error on")
    print(f"\nreads+writes at 40%: injected {injected} ({sum(injected.values())} faults), {retried} retries logged "
          f"by the driver, requests {dict(proxy.requests)}, {rows} rows")
    assert injected[("write", "lost_reply")] >= 1 and injected[("read", "cut")] >= 1
    assert sum(n for (kind, _), n in injected.items() if kind == "read") >= 5


def test_every_kind_of_request_at_30_percent_faults_ends_with_every_pair_once(s3, tiny_gqa, tmp_path):
    with FaultProxy(s3, seed=12) as proxy:
        _faulty(proxy, ("read", "write", "head", "list"), 0.3)
        for kind in ("head", "list"):
            proxy.burst(kind, 2, "slowdown")    # the first HEAD and listing of the run are throttled, always
        result = _job(tmp_path, proxy.url, "s3://fault-results/all", tiny_gqa, "storage.retries=12")
        injected = proxy.injected()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _check_once("s3://fault-results/all", s3)
    print(f"\nevery kind at 30%: injected {injected} ({sum(injected.values())} faults), {rows} rows")


def test_all_media_reads_failing_stops_the_run_and_a_plain_rerun_completes(s3, tiny_gqa, tmp_path):
    with FaultProxy(s3, seed=13) as proxy:
        proxy.set("read", prefix="/fault-corpus/", slowdown=1.0)
        first = _job(tmp_path, proxy.url, "s3://fault-results/outage", tiny_gqa, "storage.retries=2")
        proxy.heal()
        lines = [line for line in first.stderr.splitlines() if line.strip()]
        assert first.returncode == 4, first.stdout[-3000:] + first.stderr[-3000:]
        assert lines[-1].startswith("run stopped: ") and "SlowDown" in lines[-1], lines[-1:]
        assert "Traceback" not in first.stderr
        fs = s3fs_for(s3)
        results = [p for p in fs.ls("fault-results/outage") if p.endswith(".parquet")]
        if results:   # what reached the output before the stop holds no error row recorded as done
            table = read_output("s3://fault-results/outage", s3)
            assert table["error"].null_count == len(table)
        second = _job(tmp_path, proxy.url, "s3://fault-results/outage", tiny_gqa)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    _check_once("s3://fault-results/outage", s3)


def test_jobs_started_at_the_same_instant_never_both_run(s3, tiny_gqa, tmp_path):
    """Two jobs on one output at once (a local output: O_EXCL; an S3 one: If-None-Match): one runs, one stops."""
    for trial, output in enumerate((str(tmp_path / "out"), "s3://fault-results/race")):
        path = tmp_path / f"race{trial}.toml"
        path.write_text(config_text("s3://fault-corpus/small/", output, str(tiny_gqa), endpoint=s3, tasks=TASKS))
        cmd = [PY, str(REPO / "jobs" / "caption.py"), "--config", str(path)] + \
            [arg for o in FAST for arg in ("--set", o)]
        jobs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        results = [(job.wait(240), job.stderr.read()) for job in jobs]
        for job in jobs:
            job.stdout.close()
            job.stderr.close()
        codes = sorted(code for code, _ in results)
        assert codes == [0, 5], [(code, err[-1500:]) for code, err in results]
        for code, err in results:
            if code == 5:
                assert err.strip().splitlines()[-1].startswith("output in use: output ")
        _check_once(output, s3, items=2)
