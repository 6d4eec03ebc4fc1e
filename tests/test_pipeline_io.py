"""Listing (local and S3 with a real endpoint), manifests, stable ids, the done-set, whole-file output, retries.
No Ray here: these are the parts the graph is built from."""

import errno
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import listing, output, storage
from pipeline.config import ConfigError
from pipeline.errors import StorageUnavailable
from pipeline.storage import StorageOptions
from tests.pipeline_helpers import good_media, moto_s3, read_output, s3fs_for, write_local

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


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


