"""The output lease: one run at a time per output prefix, on a local folder and on S3 (moto, also behind the fault
proxy). Contenders started at the same instant (threads and processes, many trials) never both hold it."""

import json
import logging
import os
import socket
import subprocess
import threading
import time

import pytest

from pipeline.errors import LeaseHeld, LeaseLost, StorageUnavailable
from pipeline.lease import Lease
from pipeline.storage import StorageOptions
from tests.faults import FaultProxy
from tests.pipeline_helpers import PY, REPO, moto_s3, s3fs_for

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)
DEAD_PID = 2**22 + 12345   # above any pid_max: never a live process


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        s3fs_for(endpoint).mkdir("leases")
        yield endpoint


class Place:
    """An output prefix and a way to write its lease.json directly (as a crashed or foreign run left it)."""

    def __init__(self, kind, tmp_path, s3, name):
        if kind == "local":
            self.uri, self.opts, self.fs = str(tmp_path / name), OPTS, None
        else:
            self.uri, self.opts = f"s3://leases/{name}", StorageOptions(endpoint_url=s3, retries=2, retry_backoff_s=0)
            self.fs = s3fs_for(s3)

    def write(self, data: bytes) -> None:
        if self.fs is None:
            path = os.path.join(self.uri, "_state", "lease.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        else:
            self.fs.pipe(f"{self.uri[5:]}/_state/lease.json", data)

    def raw(self) -> bytes | None:
        try:
            if self.fs is None:
                with open(os.path.join(self.uri, "_state", "lease.json"), "rb") as f:
                    return f.read()
            return self.fs.cat(f"{self.uri[5:]}/_state/lease.json")
        except FileNotFoundError:
            return None

    def read(self) -> dict | None:
        data = self.raw()
        return None if data is None else json.loads(data)


def stale_lease(run="killed-run", **fields) -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": DEAD_PID, "run": run, "heartbeat": time.time(),
                       **fields}).encode()


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path, s3):
    return lambda name: Place(request.param, tmp_path, s3, name)


def test_one_run_at_a_time_and_takeover_rules(place):
    p = place("rules")
    first = Lease(p.uri, p.opts, "run-1")
    assert p.read()["run"] == "run-1"
    with pytest.raises(LeaseHeld, match=r"is in use by run run-1 .*pass --set output.takeover=true"):
        Lease(p.uri, p.opts, "run-2")                       # the holder is alive on this host
    first.release()
    assert p.read() is None                                 # a normal exit leaves no lease
    Lease(p.uri, p.opts, "run-2").release()                 # free again

    p.write(stale_lease())
    with Lease(p.uri, p.opts, "run-3"):                     # a killed run on this host is taken over at once
        assert p.read()["run"] == "run-3"
    p.write(stale_lease(host="other-host", pid=1))
    with pytest.raises(LeaseHeld, match=r"run killed-run \(host other-host"):
        Lease(p.uri, p.opts, "run-4")                       # another host's fresh heartbeat counts as alive
    Lease(p.uri, p.opts, "run-4", takeover=True).release()
    p.write(stale_lease(host="other-host", pid=1, heartbeat=time.time() - 600))
    Lease(p.uri, p.opts, "run-5").release()                 # a stale heartbeat from elsewhere is taken over
    # same host name, other pid namespace (another container): its pid says nothing here, its heartbeat does
    p.write(stale_lease(pidns="other-boot:1"))
    with pytest.raises(LeaseHeld, match="killed-run"):
        Lease(p.uri, p.opts, "run-6")


def test_a_lease_whose_pid_was_reused_on_this_host_does_not_block_forever(place, caplog):
    """A run that died long ago left its lease; its pid now belongs to another live process (here: this test's).
    The pid alone said "alive" forever; a heartbeat older than the TTL says the run is gone."""
    p = place("reused-pid")
    p.write(stale_lease(pid=os.getpid()))                  # alive and beating: held, and the message says what to do
    with pytest.raises(LeaseHeld, match=r"pid \d+, heartbeat \d+s ago\).*If that run is gone, wait 90s or pass "
                                        r"--set output.takeover=true"):
        Lease(p.uri, p.opts, "run-1")
    p.write(stale_lease(pid=os.getpid(), heartbeat=time.time() - 600))
    with caplog.at_level(logging.WARNING, "pipeline.lease"), Lease(p.uri, p.opts, "run-2"):
        assert p.read()["run"] == "run-2"
    assert "heartbeat is 600s old (over 90s): taken as a dead run whose pid was reused" in caplog.text
    p.write(stale_lease(pid=0))                             # kill(0, 0) asks about a process group: not a holder
    Lease(p.uri, p.opts, "run-3").release()


def test_an_unreadable_lease_is_an_error_not_absent(place):
    p = place("unreadable")
    p.write(b'{"host": "h", "pid": 1, "ru')                  # torn by another tool
    with pytest.raises(LeaseHeld, match="lease is unreadable .*output.takeover=true"):
        Lease(p.uri, p.opts, "run-1")
    assert p.raw() == b'{"host": "h", "pid": 1, "ru'   # left as it was
    with Lease(p.uri, p.opts, "run-1", takeover=True):
        assert p.read()["run"] == "run-1"


def test_heartbeat_refreshes_and_a_taken_over_lease_is_lost(place, monkeypatch):
    p = place("heartbeat")
    a = Lease(p.uri, p.opts, "run-a", heartbeat_s=0.1)
    first = p.read()["heartbeat"]
    assert _wait(lambda: p.read()["heartbeat"] > first, 5)
    a.check()
    b = Lease(p.uri, p.opts, "run-b", takeover=True)        # as if a's heartbeat had gone stale
    assert _wait(lambda: a.lost, 5)
    with pytest.raises(LeaseLost, match="another run took over"):
        a.check()
    a.release()                                             # must not remove b's lease
    assert p.read()["run"] == "run-b"
    # the run that lost its lease must not write its buffered rows on the way out: b may be running the same pairs
    from pipeline.store import OutputStore, flush_what_is_done

    class Buffered:
        buffered, flushed = 3, False

        def flush(self):
            self.flushed = True

    writer = Buffered()
    flush_what_is_done(writer, a)
    assert not writer.flushed
    # nor at the end of a stream that ran out after the takeover
    import types

    from pipeline import run as run_mod

    class NoMoreBlocks:
        def iter_batches(self, **kwargs):
            return (batch for batch in ())   # a generator, as Ray Data's iterator is

    monkeypatch.setattr(run_mod, "build_dataset", lambda *args, **kwargs: NoMoreBlocks())
    store = OutputStore.__new__(OutputStore)   # the store of the run that lost its lease, past its open()
    store.writer, store.lease, store.run_tag = writer, a, "run-a"
    with pytest.raises(LeaseLost):
        run_mod._stream(None, None, types.SimpleNamespace(store=store, stop=None), ())
    assert not writer.flushed
    flush_what_is_done(writer, b)
    assert writer.flushed
    b.release()
    assert p.read() is None


def _wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _contend(p, n: int, trial: int) -> tuple[int, int]:
    """n threads ask for the lease at the same instant and hold it a moment. Returns (winners, most holders at
    once): a slow loser may take the lease after the winner released it, never while it is held."""
    barrier, lock = threading.Barrier(n), threading.Lock()
    state = {"holding": 0, "most": 0, "winners": 0}

    def contender(i):
        barrier.wait()
        try:
            lease = Lease(p.uri, p.opts, f"t{trial}-{i}")
        except LeaseHeld:
            return
        with lock:
            state["holding"] += 1
            state["winners"] += 1
            state["most"] = max(state["most"], state["holding"])
        time.sleep(0.05)
        with lock:
            state["holding"] -= 1
        lease.release()

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return state["winners"], state["most"]


def test_contenders_started_together_never_both_hold_it_threads(place):
    p = place("race-threads")
    for trial in range(30):
        if trial % 2:
            p.write(stale_lease())          # all contenders go for the takeover's compare-and-swap at once
        winners, most = _contend(p, 4, trial)
        assert winners >= 1 and most == 1, (trial, winners, most)
        assert p.read() is None


WORKER = r"""
import os, sys, time
from pipeline.errors import LeaseHeld
from pipeline.lease import Lease
from pipeline.storage import StorageOptions
uri, endpoint, name, marker = sys.argv[1:5]
opts = StorageOptions(endpoint_url=endpoint, retries=2, retry_backoff_s=0)
print("ready", flush=True)
for line in sys.stdin:
    trial, start, hold_s = line.split()
    while time.time() < float(start):
        pass                                   # spin: all workers leave this loop within microseconds
    try:
        lease = Lease(uri, opts, f"{name}-{trial}")
    except LeaseHeld:
        print(trial, "held", flush=True)
        continue
    try:                                       # a holder at the same time as another one would find the marker
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        print(trial, "OVERLAP", flush=True)
        continue
    time.sleep(float(hold_s))
    os.unlink(marker)
    lease.release()
    print(trial, "won", flush=True)
"""


def test_contenders_started_together_never_both_hold_it_processes(place, tmp_path):
    p = place("race-procs")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    marker = str(tmp_path / "holding")
    procs = [subprocess.Popen([PY, "-c", WORKER, p.uri, p.opts.endpoint_url, f"p{i}", marker], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, cwd=REPO) for i in range(3)]
    outcomes = []
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for trial in range(12):
            if trial % 2:
                p.write(stale_lease())          # all contenders go for the takeover's compare-and-swap at once
            start = time.time() + 0.3
            for proc in procs:
                proc.stdin.write(f"{trial} {start} 0.3\n")
                proc.stdin.flush()
            answers = [proc.stdout.readline().split() for proc in procs]
            assert all(a[0] == str(trial) for a in answers), answers
            outcomes += [a[1] for a in answers]
            assert "OVERLAP" not in outcomes and "won" in outcomes[-3:], (trial, answers)
            assert p.read() is None
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(30)
    assert outcomes.count("held") >= 12     # the contenders did meet a held lease, most trials


def test_lease_through_faults_and_an_outage(s3, caplog):
    fs = s3fs_for(s3)
    with FaultProxy(s3, seed=3) as proxy:
        opts = StorageOptions(endpoint_url=proxy.url, retries=12, retry_backoff_s=0.01)
        for kind in ("read", "head", "list", "write"):
            proxy.set(kind, slowdown=0.15, internal=0.1, drop=0.05, lost_reply=0.1, cut=0.05)
        for trial in range(4):     # lost replies on the create and the release: both are recognised as ours
            with Lease("s3://leases/faulty", opts, f"run-{trial}", heartbeat_s=0.05):
                time.sleep(0.3)
            assert not fs.exists("leases/faulty/_state/lease.json")
        assert proxy.injected("write") > 0 and proxy.injected("read") > 0

        proxy.heal()
        opts = StorageOptions(endpoint_url=proxy.url, retries=2, retry_backoff_s=0.01)
        lease = Lease("s3://leases/outage", opts, "run-1")
        proxy.set("read", slowdown=1.0)
        with pytest.raises(StorageUnavailable, match=r"leases/outage/_state/lease.json: SlowDown \(HTTP 503\)"):
            Lease("s3://leases/outage", opts, "run-2")        # unreadable is never "absent"
        proxy.heal()
        proxy.set("write", denied=1.0)
        with caplog.at_level(logging.WARNING, logger="pipeline.lease"):
            lease.release()                                   # a failed release is a warning, not a crash
        assert "could not remove the lease" in caplog.text and "AccessDenied" in caplog.text
        assert fs.exists("leases/outage/_state/lease.json")


def test_stores_without_conditional_writes_write_and_read_back(monkeypatch, caplog):
    from pipeline import lease as lease_mod

    monkeypatch.setattr(lease_mod._PlainStore, "SETTLE_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"):
        first = Lease("memory://leases/plain", OPTS, "run-1")
    assert "no conditional writes" in caplog.text
    with pytest.raises(LeaseHeld, match="in use by run run-1"):
        Lease("memory://leases/plain", OPTS, "run-2")
    first.release()
    Lease("memory://leases/plain", OPTS, "run-2").release()
