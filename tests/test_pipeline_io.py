"""Storage retries and the driver's stall watchdog, without Ray or a store."""

import errno
import time

import pytest

from pipeline import storage
from pipeline.errors import StorageUnavailable
from pipeline.storage import StorageOptions

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)


@pytest.mark.parametrize("error, attempts", [
    (ConnectionResetError(errno.ECONNRESET, "connection reset by peer"), 5),   # transient: retried, then raised
    (TimeoutError("read timed out"), 5),
    (FileNotFoundError("s3://b/k"), 1),                                         # a missing object is not retried
    (OSError("HTTP 503 Service Unavailable"), 5),
    (RuntimeError("503, message='Service Unavailable', url='http://h/k.jpg'"), 5),
    (OSError(errno.EINVAL, "cannot decode photos/2500.jpg at offset 5000"), 1),  # digits in a key are no status
])
def test_retries_only_transient_errors(error, attempts):
    calls = []

    def failing():
        calls.append(1)
        raise error

    # spent retries on a transient error: the store is unavailable; an error about the object is raised as it is
    with pytest.raises(StorageUnavailable if attempts > 1 else type(error)):
        storage.with_retries(failing, "s3://b/k", StorageOptions(retries=4), sleep=lambda s: None)
    assert len(calls) == attempts


def test_backoff_grows_and_a_recovered_call_returns():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        return b"ok"

    opts = StorageOptions(retries=4, retry_backoff_s=0.1)
    assert storage.with_retries(flaky, "s3://b/k", opts, sleep=sleeps.append) == b"ok"
    assert len(calls) == 3 and len(sleeps) == 2 and 0.05 <= sleeps[0] <= 0.1 <= sleeps[1] <= 0.2




def test_a_run_that_gets_no_result_says_what_the_cluster_has_free(monkeypatch, caplog):
    from pipeline import run as run_mod

    monkeypatch.setattr(run_mod.ray, "available_resources", lambda: {"CPU": 0.0})
    monkeypatch.setattr(run_mod.ray, "cluster_resources", lambda: {"CPU": 2.0})
    with caplog.at_level("WARNING", logger="pipeline"):
        watchdog = run_mod.Watchdog(0.2)
        time.sleep(0.7)
        watchdog.stop()
    assert "no result for" in caplog.text and "0 of 2 CPU free" in caplog.text
    caplog.clear()
    watchdog = run_mod.Watchdog(5.0)   # results keep coming: nothing to say
    watchdog.progress()
    watchdog.stop()
    assert "no result" not in caplog.text
