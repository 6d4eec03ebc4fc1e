"""Storage access through fsspec: local folders, s3:// (custom endpoints) and any other fsspec URL.

Credentials are never part of the config: s3fs reads them from the environment (AWS_ACCESS_KEY_ID, ...), so
nothing here can print them.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Callable, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class StorageOptions:
    """What a worker needs to open a URL; picklable, holds no secrets."""
    endpoint_url: str = ""
    region: str = ""
    anon: bool = False
    retries: int = 4
    retry_backoff_s: float = 0.5

    @classmethod
    def from_config(cls, storage) -> "StorageOptions":
        return cls(storage.endpoint_url, storage.region, storage.anon, storage.retries, storage.retry_backoff_s)


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem(uri: str, opts: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or local path."""
    protocol = protocol_of(uri)
    kwargs = {}
    if protocol in ("s3", "s3a"):
        client_kwargs = {}
        if opts.endpoint_url:
            client_kwargs["endpoint_url"] = opts.endpoint_url
        if opts.region:
            client_kwargs["region_name"] = opts.region
        # Retries are ours (`storage.retries`, with back-off); botocore keeps one quick retry of its own and s3fs
        # none, so a dead endpoint fails in seconds instead of after three nested retry loops.
        kwargs = {"anon": opts.anon, "client_kwargs": client_kwargs, "use_listings_cache": False,
                  "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 10,
                                    "read_timeout": 60}}
    fs, path = fsspec.core.url_to_fs(uri, **kwargs)
    if protocol in ("s3", "s3a"):
        fs.retries = 1   # s3fs's own retry loop (a class attribute, not a constructor argument)
    return fs, path


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The canonical URI of a path on fs (file:// paths become absolute local paths)."""
    if is_local(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network trouble, throttling, server-side 5xx. Missing objects and bad data are not."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientPayloadError",
                "ServerDisconnectedError", "ClientOSError", "IncompleteReadError", "ResponseStreamingError"):
        return True
    text = str(exc)
    if any(code in text for code in ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable")):
        return True
    # an HTTP 5xx status, not any digits that happen to be in a key such as photos/2500.jpg
    if re.search(r"(?:^|status(?: code)?|HTTP|\()\W{0,3}5(?:00|02|03|04)\b", text, flags=re.IGNORECASE):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EAGAIN, errno.EPIPE):
        return True
    return False


def with_retries(fn: Callable[[], T], what: str, opts: StorageOptions, sleep=time.sleep) -> T:
    """Call fn, retrying transient storage errors with jittered exponential back-off."""
    for attempt in range(opts.retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if attempt == opts.retries or not is_transient(e):
                raise
            delay = opts.retry_backoff_s * (2 ** attempt) * (0.5 + random.random() / 2)
            log.warning("transient error on %s (%s: %s); retry %d/%d in %.2fs", what, type(e).__name__, e,
                        attempt + 1, opts.retries, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(uri: str, opts: StorageOptions) -> bytes:
    """Whole object, with retries for transient errors."""
    fs, path = filesystem(uri, opts)
    return with_retries(lambda: fs.cat_file(path), uri, opts)


def is_object_store(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return not is_local(fs) and protocol_of(fs.unstrip_protocol(path)) in ("s3", "s3a", "gs", "gcs", "az", "abfs")


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, staging_dir: str) -> None:
    """Make `path` appear only whole. Object stores publish an object when its upload completes, so a direct
    write is already atomic there; elsewhere write to a staging file in `staging_dir` and rename it into place."""
    if is_object_store(fs, path):
        fs.pipe_file(path, data)
        return
    fs.makedirs(staging_dir, exist_ok=True)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{staging_dir.rstrip('/')}/{uuid.uuid4().hex}.tmp"
    fs.pipe_file(tmp, data)
    if is_local(fs):
        os.replace(tmp, path)   # atomic on one filesystem
    else:
        fs.mv(tmp, path)
