"""One run at a time per output prefix: two runs would each miss the other's rows in their done-sets and write
pairs twice (and the second would clear the first's staging files).

`<output>/_state/lease.json` names the holder (host, pid, run) and a heartbeat refreshed every `heartbeat_s`. A
lease is alive when its heartbeat is younger than `ttl_s` and, on this host, its holder's pid is a live process.
So a run killed with -9 is taken over at once from the same machine, and after `ttl_s` from another (also from the
same machine when its pid was reused by another process since); `takeover=True` overrides a lease that only looks
alive.

Every change is atomic, so two runs started at the same instant never both hold it:
- taking a free lease is an exclusive create: `O_CREAT | O_EXCL` locally, a PUT with `If-None-Match: *` on S3;
- taking over a dead run's lease, a heartbeat and the release are compare-and-swaps against the version read:
  `If-Match: <ETag>` on S3; locally the compare and the rename happen under an exclusive `flock` on
  `_state/lease.lock`, which every reader and writer of the lease takes (shared to read).
A lease that cannot be read (bad JSON, or storage errors past the retries) is an error, never "absent".
Other fsspec stores (gcs, az, ...) have no conditional write through fsspec: there the lease is written, then read
back after a pause, which narrows the race without closing it (a warning says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time

import fsspec.asyn

from pipeline import storage
from pipeline.errors import LeaseHeld, LeaseLost, StorageUnavailable
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

STATE_DIR = "_state"


def _pid_namespace() -> str:
    """Boot and pid namespace of this process: pids are comparable only between processes that share both (two
    containers may share a host name but not their pids)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _pid_alive(pid) -> bool:
    try:
        pid = int(pid)
        if pid <= 0:   # kill(0 or -1, 0) asks about a group or every process, not one run
            return False
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, ValueError, OverflowError, TypeError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True


def _age(held: dict) -> float:
    """Seconds since the holder's last heartbeat (infinite when the record has none that can be read)."""
    try:
        return time.time() - float(held.get("heartbeat"))
    except (TypeError, ValueError):
        return float("inf")


# --- where the lease lives: one atomic create, read, compare-and-swap and compare-and-delete per kind of store ---


class _LocalStore:
    """A local (or NFS) file; `token` is the content that was read, compared under the lock."""

    def __init__(self, path: str):
        self.path = path
        self.dir = os.path.dirname(path)
        self.lock_path = os.path.join(self.dir, "lease.lock")   # never deleted: deleting a lock file races

    @contextlib.contextmanager
    def _locked(self, exclusive: bool):
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)   # closing releases the lock

    def _read_unlocked(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[bytes, bytes] | None:
        with self._locked(exclusive=False):
            data = self._read_unlocked()
        return None if data is None else (data, data)

    def create(self, data: bytes) -> bytes | None:
        with self._locked(exclusive=True):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            storage._fsync_dir(self.dir)
        return data

    def replace(self, data: bytes, token: bytes) -> bytes | None:
        with self._locked(exclusive=True):
            if self._read_unlocked() != token:
                return None
            storage.write_local_atomic(self.path, data, self.dir)
        return data

    def delete(self, token: bytes) -> bool:
        with self._locked(exclusive=True):
            current = self._read_unlocked()
            if current is None:
                return True
            if current != token:
                return False
            os.unlink(self.path)
            storage._fsync_dir(self.dir)
        return True


def _precondition_failed(exc: BaseException) -> bool:
    code, status = storage.error_code(exc)
    return code == "PreconditionFailed" or status == 412 or isinstance(exc, FileExistsError)


class _S3Store:
    """An S3 object; `token` is its ETag. Conditional writes: If-None-Match: * and If-Match: <ETag>."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes, str] | None:
        async def get():
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> str | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")["ETag"]
        except Exception as e:  # noqa: BLE001 - only a failed precondition means "someone else has it"
            if _precondition_failed(e):
                return None
            raise

    def replace(self, data: bytes, token: str) -> str | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfMatch=token)["ETag"]
        except FileNotFoundError:   # deleted since it was read
            return None
        except Exception as e:  # noqa: BLE001
            if _precondition_failed(e):
                return None
            raise

    def delete(self, token: str) -> bool:
        current = self.read()
        if current is None:
            return True    # gone already (a retried delete whose first answer was lost)
        if current[1] != token:
            return False
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except FileNotFoundError:
            return True
        except Exception as e:  # noqa: BLE001
            if _precondition_failed(e):
                return False
            raise
        return True


class _PlainStore:
    """Any other fsspec store: write, pause, read back (not atomic: see the module docstring)."""

    SETTLE_S = 2.0

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        log.warning("%s: this store has no conditional writes through fsspec; the output lease is written and read "
                    "back, which narrows but does not close the race between two runs started together",
                    fs.unstrip_protocol(path))

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def _write_verified(self, data: bytes) -> bytes | None:
        self.fs.pipe_file(self.path, data)
        time.sleep(self.SETTLE_S)
        current = self.read()
        return data if current is not None and current[0] == data else None

    def create(self, data: bytes) -> bytes | None:
        return None if self.fs.exists(self.path) else self._write_verified(data)

    def replace(self, data: bytes, token: bytes) -> bytes | None:
        current = self.read()
        return self._write_verified(data) if current is not None and current[0] == token else None

    def delete(self, token: bytes) -> bool:
        current = self.read()
        if current is None:
            return True
        if current[0] != token:
            return False
        self.fs.rm_file(self.path)
        return True


def _store_for(fs, path: str):
    if storage.is_local(fs):
        return _LocalStore(path)
    if storage.protocol_of(fs.unstrip_protocol(path)) in ("s3", "s3a"):
        return _S3Store(fs, path)
    return _PlainStore(fs, path)


# --- the lease ---------------------------------------------------------------------------------------------------


class Lease:
    """Hold `<uri>/_state/lease.json` from construction until `release()`; raises `LeaseHeld` when another live run
    holds it, `StorageUnavailable` when it cannot be read or written after retries. While held, a daemon thread
    refreshes the heartbeat; `lost` turns true (and `check()` raises `LeaseLost`) if another run took it over."""

    HEARTBEAT_S = 20.0
    TTL_S = 90.0
    ACQUIRE_ATTEMPTS = 5

    def __init__(self, uri: str, opts: StorageOptions, run: str, takeover: bool = False,
                 heartbeat_s: float | None = None, ttl_s: float | None = None):
        self.uri, self.opts, self.takeover = uri, opts, takeover
        self.heartbeat_s = self.HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.ttl_s = self.TTL_S if ttl_s is None else ttl_s
        fs, root = storage.filesystem(uri, opts)
        self.path = f"{root.rstrip('/')}/{STATE_DIR}/lease.json"
        self.where = storage.full_uri(fs, self.path)
        self.store = _store_for(fs, self.path)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "run": run, "pidns": _pid_namespace()}
        self.lost = False
        self.body = self._body()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="output-lease")
        self.token = self._acquire()
        try:
            self._thread.start()
        except BaseException:   # a signal (SystemExit) between taking the lease and handing it over
            self._stop.set()
            self._call(self.store.delete, self.token)
            raise

    def _body(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": time.time()}).encode()

    def _call(self, fn, *args):
        return storage.with_retries(lambda: fn(*args), self.where, self.opts)

    def _read(self) -> tuple[dict, object] | None:
        """(holder, token) or None when there is no lease; an unreadable lease raises."""
        found = self._call(self.store.read)
        if found is None:
            return None
        data, token = found
        try:
            held = json.loads(data)
            if not isinstance(held, dict) or "run" not in held:
                raise ValueError("not a lease record")
        except ValueError as e:
            if self.takeover:
                log.warning("%s: replacing an unreadable lease (%s) because of output.takeover", self.where, e)
                return {"run": "?", "unreadable": True}, token
            raise LeaseHeld(f"{self.where}: the output's lease is unreadable ({storage.scrub(e)}); if no other run "
                            f"uses this output, pass --set output.takeover=true") from None
        return held, token

    def _alive(self, held: dict) -> bool:
        if held.get("unreadable"):
            return False
        fresh = _age(held) < self.ttl_s
        # same host and pid namespace (a record without one, from an older version, is taken as the same)
        if held.get("host") == self.me["host"] and held.get("pidns") in ("", None, self.me["pidns"]):
            if not _pid_alive(held.get("pid")):
                return False
            if not fresh:   # a live run beats every heartbeat_s: that pid is another process now (reused)
                log.warning("%s: pid %s of run %s is alive on this host, but the lease's heartbeat is %.0fs old "
                            "(over %.0fs): taken as a dead run whose pid was reused", self.where, held.get("pid"),
                            held.get("run"), _age(held), self.ttl_s)
        return fresh

    def _acquire(self):
        for _ in range(self.ACQUIRE_ATTEMPTS):
            token = self._call(self.store.create, self.body)
            if token is not None:
                return token
            found = self._read()
            if found is None:
                continue   # released since: create again
            held, token = found
            if held.get("run") == self.me["run"]:
                return token   # our own create, whose answer was lost and retried
            if self._alive(held) and not self.takeover:
                raise LeaseHeld(
                    f"output {self.uri} is in use by run {held.get('run')} (host {held.get('host')}, pid "
                    f"{held.get('pid')}, heartbeat {_age(held):.0f}s ago); two runs on one output would write pairs "
                    f"twice. If that run is gone, wait {self.ttl_s:.0f}s or pass --set output.takeover=true")
            log.warning("%s: taking over the lease of run %s (host %s, pid %s)", self.where, held.get("run"),
                        held.get("host"), held.get("pid"))
            token = self._call(self.store.replace, self.body, token)
            if token is not None:
                return token
            # it changed since we read it (another run took it, or its holder's heartbeat): look again
        raise LeaseHeld(f"output {self.uri}: could not take the lease in {self.ACQUIRE_ATTEMPTS} attempts; other "
                        f"runs are starting on this output at the same time")

    def _beat(self) -> None:
        body = self._body()
        token = self._call(self.store.replace, body, self.token)
        if token is None:
            found = self._read()
            if found is not None and found[0].get("run") == self.me["run"]:
                token = found[1]   # our write went through; its answer was lost and the retry saw a new version
            else:
                self.lost = True
                holder = found[0].get("run") if found else "nobody"
                log.error("%s: this run's lease was taken over (now held by %s); stop this run: two runs on one "
                          "output write pairs twice", self.where, holder)
                return
        self.body, self.token = body, token

    def _heartbeat(self) -> None:
        while not self.lost and not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
            except Exception as e:  # noqa: BLE001 - a missed beat must not kill the run; ttl_s allows a few
                log.warning("could not refresh %s: %s", self.where, storage.scrub(e))

    def check(self) -> None:
        """Raise LeaseLost if another run took the lease over (the driver calls this before writing results)."""
        if self.lost:
            raise LeaseLost(f"output {self.uri}: another run took over this run's lease ({self.where}); stopped so "
                            f"that no (item, task) is written twice")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours; a failure is a warning (the lease then goes
        stale: taken over at once from this host, after ttl_s from another)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.lost:
            return
        try:
            if not self._call(self.store.delete, self.token):
                log.warning("%s: not removed: another run holds it now", self.where)
        except (StorageUnavailable, OSError) as e:
            log.warning("could not remove the lease %s (%s); the next run takes it over at once from this host, "
                        "after %.0fs from another", self.where, storage.scrub(e), self.ttl_s)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
