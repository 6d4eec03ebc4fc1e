"""Storage access through fsspec: local folders, s3:// (custom endpoints) and any other fsspec URL, with retries
classified by error code.

Credentials are never part of the config: s3fs reads them from the environment (AWS_ACCESS_KEY_ID, ...), so
nothing here can print them; error descriptions are also scrubbed of query strings (presigned signatures).

Every failure of a storage call is one of three kinds (`classify`):
- TRANSIENT: throttling (SlowDown, Throttling*, 503), server errors (500/502/504, InternalError), timeouts, dropped
  connections, cut bodies. Retried with jittered exponential back-off, `storage.retries` times.
- OUTAGE: not about one object and not going away by retrying: access denied, bad or missing credentials, a
  missing bucket, a full or read-only disk.
- ITEM: about one object: it does not exist, or its data is bad. Raised as it is, for the caller to record.
`with_retries` raises `StorageUnavailable(uri, cause)` for an outage and for a transient error whose retries are
spent, so a caller tells "this object" from "the store" by the exception type alone.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import random
import re
import socket
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Callable, TypeVar

import fsspec
import pyarrow
import pyarrow.fs

from pipeline.errors import StorageUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BACKOFF_S = 30.0   # one back-off never waits longer than this, however many retries are configured


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


# --- opening URLs ------------------------------------------------------------------------------------------------

# Protocols whose URLs are opened as they are: fsspec's URL parser would read `::` in a key or file name
# (`s3://b/weird::name.png`) as a chain of file systems. Other protocols (zip://, simplecache::s3://, ...) are real
# chains and go through fsspec's parser.
_PLAIN_PROTOCOLS = ("file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "memory")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_CHAIN = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*::.*://")


def protocol_of(uri: str) -> str:
    """The URL scheme ("s3", "https", ...); "file" for a plain local path (which may hold `:` or `::`)."""
    m = _SCHEME.match(uri)
    if m:
        return m.group(1).lower()
    return "chain" if _CHAIN.match(uri) else "file"


def _storage_kwargs(protocol: str, opts: StorageOptions) -> dict:
    if protocol not in ("s3", "s3a"):
        return {}
    client_kwargs = {}
    if opts.endpoint_url:
        client_kwargs["endpoint_url"] = opts.endpoint_url
    if opts.region:
        client_kwargs["region_name"] = opts.region
    # Retries are ours alone (`storage.retries`, classified, with jittered back-off): botocore's and s3fs's loops
    # are off, so the configured number is the number of attempts and a dead endpoint fails in seconds instead of
    # after three nested retry loops.
    # max_concurrency 1: a whole-object read is one GET (s3fs asks for the size with a HEAD first otherwise)
    return {"anon": opts.anon, "client_kwargs": client_kwargs, "use_listings_cache": False, "max_concurrency": 1,
            "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}, "connect_timeout": 10,
                              "read_timeout": 60}}


def filesystem(uri: str, opts: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or local path. Keys and file names may hold `::`, `?`, `#`, `[`."""
    protocol = protocol_of(uri)
    if protocol == "chain":
        return fsspec.core.url_to_fs(uri)
    if protocol in ("file", "local"):
        fs = fsspec.filesystem("file")
        return fs, fs._strip_protocol(uri.split("://", 1)[1] if "://" in uri else uri)   # absolute, as it is
    if protocol not in _PLAIN_PROTOCOLS:
        return fsspec.core.url_to_fs(uri, **_storage_kwargs(protocol, opts))
    cls = fsspec.get_filesystem_class(protocol)
    fs = cls(**_storage_kwargs(protocol, opts))
    if protocol in ("s3", "s3a"):
        fs.retries = 1   # s3fs's own retry loop (a class attribute, not a constructor argument)
    return fs, cls._strip_protocol(uri)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The canonical URI of a path on fs (file:// paths become absolute local paths)."""
    if is_local(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def file_stamp(info: dict) -> str:
    """"<size>:<version>" of a file from its listing or info entry, the version being the store's content tag (the
    ETag on S3) or else the modification time: a file appended to or rewritten gets another stamp."""
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            return f"{info.get('size')}:{info[key]}"
    return f"{info.get('size')}:"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def is_object_store(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return not is_local(fs) and protocol_of(fs.unstrip_protocol(path)) in ("s3", "s3a", "gs", "gcs", "az", "abfs")


class _OpenWithoutAsking(pyarrow.fs.FSSpecHandler):
    """pyarrow's view of an fsspec filesystem, minus the fs.isfile() it asks before opening a file: fsspec's
    isfile() answers False for any error, so a throttled or dropped HEAD made a result file that exists read as
    missing (its rows as never written: they ran again). fs.open raises the real error, which is classified."""

    def open_input_file(self, path):
        return pyarrow.PythonFile(self.fs.open(path, mode="rb"), mode="r")

    open_input_stream = open_input_file


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """fs for pyarrow's readers (`pq.read_table(path, filesystem=...)`, datasets)."""
    return pyarrow.fs.LocalFileSystem() if is_local(fs) else pyarrow.fs.PyFileSystem(_OpenWithoutAsking(fs))


# --- classifying failures ----------------------------------------------------------------------------------------


class Fault(enum.Enum):
    TRANSIENT = "transient"   # retry it
    OUTAGE = "outage"         # the store, not the object: stop the run rather than record items as failed
    ITEM = "item"             # this object: missing or bad data


# S3 error codes (botocore's throttled and transient lists, plus S3's 5xx codes and conditional-write conflicts)
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "EC2ThrottledException",
    "TransactionInProgressException", "PriorRequestNotComplete", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "ServerBusy", "OperationAborted", "ConditionalRequestConflict",
    "IncompleteBody", "XAmzContentSHA256Mismatch", "BadDigest",
})
OUTAGE_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "RequestTimeTooSkewed", "NotSignedUp", "InvalidSecurity",
    "NoSuchBucket", "PermanentRedirect", "AuthorizationHeaderMalformed", "InvalidBucketName",
})
ITEM_CODES = frozenset({   # about one object, whatever their HTTP status says (an archived object answers 403)
    "NoSuchKey", "NoSuchVersion", "InvalidObjectState", "InvalidRange", "EntityTooLarge", "KeyTooLongError",
    "PreconditionFailed",
})
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
OUTAGE_STATUS = frozenset({401, 403})
# What s3fs turns those codes into (s3fs/errors.py): SlowDown, ServiceUnavailable, 409, 503 -> EBUSY;
# InternalError, 500 -> EREMOTEIO. Their messages no longer hold the code, so the errno is what is left.
TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ECONNRESET,
                              errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EAGAIN, errno.EPIPE,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET})
OUTAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)})
# Exception classes by name, anywhere in the MRO (botocore, aiohttp, urllib3, fsspec), so that classifying needs no
# import of libraries a local run never loads.
TRANSIENT_CLASSES = frozenset({
    "HTTPClientError", "ConnectionClosedError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError", "ResponseParserError",
    "ClientPayloadError", "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError", "ClientOSError",
    "IncompleteRead", "ProtocolError", "FSTimeoutError", "ChecksumError",
})
OUTAGE_CLASSES = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                            "NoAuthTokenError", "TokenRetrievalError", "UnauthorizedSSOTokenError",
                            "NoRegionError"})


def _chain(exc: BaseException):
    """exc, then its causes (s3fs keeps botocore's ClientError as __cause__ of the OSError it raises)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def error_code(exc: BaseException) -> tuple[str, int | None]:
    """(S3 error code, HTTP status) of the first botocore ClientError in exc's chain; ("", None) if none.
    aiohttp / HTTP errors give ("", status)."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(response["Error"].get("Code") or ""), status
        # an HTTP answer's status: aiohttp's ClientResponseError.status, gcsfs's HttpError.code (not the `code` of
        # aiohttp's parser errors, which says "bad message" about a cut body)
        status = getattr(e, "status", None) if "ClientResponseError" in _class_names(e) else \
            getattr(e, "code", None) if type(e).__name__ == "HttpError" else None
        if isinstance(status, int) and not isinstance(status, bool) and 100 <= status < 600:
            return "", status
    return "", None


def _class_names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


UNRESOLVED_HOST = "does not resolve (DNS: no such name)"   # the end of a dead web host's error message


class WebObjectError(OSError):
    """A web server's HTTP answer about one of its objects (403, 410, 5xx past the retries ...). Unlike an object
    store's, such an answer says nothing about the rest of the corpus (a manifest of web URLs spans thousands of
    hosts, each with its own hotlink rules): that item's error row, never an outage of the run."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause

    def __reduce__(self):
        return (type(self), (self.cause,))


def classify(exc: BaseException) -> Fault:
    """TRANSIENT (retry), OUTAGE (the store: denied, credentials, no bucket, disk full) or ITEM (this object)."""
    if isinstance(exc, StorageUnavailable):
        return Fault.OUTAGE
    if isinstance(exc, WebObjectError):
        return Fault.ITEM
    code, status = error_code(exc)
    if code in TRANSIENT_CODES or (not code and status in TRANSIENT_STATUS):
        return Fault.TRANSIENT
    if code in ITEM_CODES:
        return Fault.ITEM
    if code in OUTAGE_CODES or status in OUTAGE_STATUS:
        return Fault.OUTAGE
    if code or status:   # any other answer of the server (NoSuchKey, InvalidRange, 404, ...) is about the object
        return Fault.TRANSIENT if status and status >= 500 else Fault.ITEM
    for e in _chain(exc):
        names = _class_names(e)
        if names & OUTAGE_CLASSES:
            return Fault.OUTAGE
        if names & TRANSIENT_CLASSES:
            return Fault.TRANSIENT
        if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
            return Fault.ITEM   # local: one file (an S3 AccessDenied carries its code and is an outage above)
        if isinstance(e, (ConnectionError, TimeoutError)):
            return Fault.TRANSIENT
        if isinstance(e, OSError) and e.errno in OUTAGE_ERRNOS:
            return Fault.OUTAGE
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return Fault.TRANSIENT
    # last resort, for stores whose errors carry neither a code nor a status: the text of a throttling or 5xx answer
    # (an HTTP status, not any digits that happen to be in a key such as photos/2500.jpg)
    text = str(exc)
    if any(c in text for c in ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable")) or \
            re.search(r"(?:^|status(?: code)?|HTTP|\()\W{0,3}5(?:00|02|03|04)\b", text, flags=re.IGNORECASE):
        return Fault.TRANSIENT
    return Fault.ITEM


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network trouble, throttling, server-side 5xx. Missing objects and bad data are not."""
    return classify(exc) is Fault.TRANSIENT


_QUERY = re.compile(r"(\w+://[^\s?'\"]*)\?[^\s'\"]*")
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# Credentials a URL itself can carry: a user:password@ before the host, and signature or token query parameters
# (presigned S3/GCS URLs, Azure SAS). Written in the syntax both Python's re and Arrow's RE2 read.
_USERINFO = (r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#]+@", r"\1***@")
_SECRET_PARAMS = (r"([?&](?i:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
                  r"x-goog-credential|signature|sig|token|access_token|api_key|apikey)=)[^&\s#'\"]*", r"\1***")


def redact(text: str) -> str:
    """`text` with the credentials of the URLs in it masked; the rest of each URL (its query too) kept."""
    for pattern, replacement in (_USERINFO, _SECRET_PARAMS):
        text = re.sub(pattern, replacement, text)
    return text


def redact_column(column):
    """`redact` over an Arrow string column (what the result files hold: their uri and error columns)."""
    import pyarrow.compute as pc

    for pattern, replacement in (_USERINFO, _SECRET_PARAMS):
        column = pc.replace_substring_regex(column, pattern, replacement)
    return column


def scrub(text: str) -> str:
    """One line, no URL query strings (presigned signatures) or passwords, no credential from the environment."""
    text = redact(" ".join(str(text).split()))
    text = _QUERY.sub(r"\1?...", text)
    for var in _SECRET_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text if len(text) <= 300 else text[:297] + "..."


def describe(exc: BaseException) -> str:
    """A short, credential-free cause: "SlowDown (HTTP 503): Please reduce your request rate." or
    "ConnectionClosedError: Connection was closed before we received a valid response from ..."."""
    code, status = error_code(exc)
    if code:
        message = ""
        for e in _chain(exc):
            response = getattr(e, "response", None)
            if isinstance(response, dict) and "Error" in response:
                message = response["Error"].get("Message") or ""
                break
        return scrub(f"{code}" + (f" (HTTP {status})" if status else "") + (f": {message}" if message else ""))
    text = str(exc) or type(exc).__name__
    return scrub(text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}")


# --- retrying ----------------------------------------------------------------------------------------------------


def backoff_s(opts: StorageOptions, attempt: int) -> float:
    """Exponential back-off with jitter in [50%, 100%], so workers throttled together do not retry together."""
    return min(MAX_BACKOFF_S, opts.retry_backoff_s * (2 ** attempt)) * (0.5 + random.random() / 2)


def with_retries(fn: Callable[[], T], what: str, opts: StorageOptions, sleep=time.sleep) -> T:
    """Call fn, retrying transient storage errors with jittered exponential back-off (`opts.retries` times).

    Raises `StorageUnavailable(what, cause)` when the retries are spent or at once on an outage (denied, bad
    credentials, no bucket, disk full); an error about the object itself (missing, bad data) is raised as it is."""
    for attempt in range(opts.retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified by retry_delay
            delay = retry_delay(e, what, opts, attempt)
            log.warning("transient error on %s (%s); retry %d/%d in %.2fs", scrub(what), describe(e), attempt + 1,
                        opts.retries, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def retry_delay(exc: Exception, what: str, opts: StorageOptions, attempt: int) -> float:
    """The back-off before retrying a storage call that failed with `exc` on its `attempt`-th retry (0: the first
    call). Raises instead when a retry is not the answer: `exc` itself when it is about the object, and
    StorageUnavailable on an outage or when the retries are spent. Called inside the `except` that caught exc."""
    if isinstance(exc, StorageUnavailable):
        raise exc
    fault = classify(exc)
    if fault is Fault.ITEM:
        raise exc
    if fault is Fault.OUTAGE or attempt == opts.retries:
        raise StorageUnavailable(scrub(what), describe(exc), attempt + 1) from exc
    return backoff_s(opts, attempt)


def unresolved_host(exc: BaseException) -> bool:
    """Whether DNS answered that the host name does not exist (EAI_NONAME: an NXDOMAIN answer), not that it could
    not be asked (EAI_AGAIN, timeouts)."""
    return any(isinstance(e, OSError) and e.errno == socket.EAI_NONAME for e in _chain(exc))


def fetch_with_retries(fn: Callable[[], T], uri: str, opts: StorageOptions) -> T:
    """`with_retries` for reading one item's object. From a web URL, an HTTP answer that would stop the run
    (401/403, or 429/5xx past the retries) is a WebObjectError: about that object only, and so is a host name
    that DNS says does not exist (dead domains are common in web manifests; the circuit breaker stops the run when
    most hosts fail so, as when this machine's DNS is broken). No answer at all (DNS unreachable, refused,
    timeouts) still stops the run: it may be this machine's own network."""
    web = protocol_of(uri) in ("http", "https")

    def fetch():
        try:
            return fn()
        except Exception as e:
            if web and unresolved_host(e):
                host = urllib.parse.urlsplit(uri).hostname
                raise WebObjectError(f"the host name {host} {UNRESOLVED_HOST}") from None
            raise

    try:
        return with_retries(fetch, uri, opts)
    except Exception as e:
        answer = e.__cause__ if isinstance(e, StorageUnavailable) else e
        _, status = error_code(answer) if answer is not None else ("", None)
        if not web or status is None:
            raise
        reason = getattr(answer, "message", "")  # aiohttp's reason phrase ("Forbidden")
        answered = f"HTTP {status} {reason}" if isinstance(reason, str) and reason else f"HTTP {status}"
        tries = f" after {e.attempts} attempts" if isinstance(e, StorageUnavailable) and e.attempts > 1 else ""
        raise WebObjectError(f"the web server answered {answered}{tries}") from answer


def read_bytes(uri: str, opts: StorageOptions) -> bytes:
    """Whole object, with retries for transient errors."""
    fs, path = filesystem(uri, opts)
    return fetch_with_retries(lambda: fs.cat_file(path), uri, opts)


def bucket_exists(fs: fsspec.AbstractFileSystem, bucket: str, opts: StorageOptions) -> bool:
    """Whether an S3 bucket exists: False only on the store's 404. Throttling and 5xx are retried and a denial
    raises StorageUnavailable, where s3fs's `exists` would say False for all of them."""
    try:
        with_retries(lambda: fs.call_s3("head_bucket", Bucket=bucket), f"s3://{bucket}", opts)
    except FileNotFoundError:
        return False
    return True


# --- writing -----------------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    """Make a rename or a new entry in `path` durable (a crash after the rename could lose it otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return   # platforms that cannot open a directory have nothing to sync
    try:
        os.fsync(fd)
    except OSError:
        pass     # some file systems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def write_local_atomic(path: str, data: bytes, staging_dir: str) -> None:
    """Write `data` to a staging file, fsync it, rename it over `path`, fsync the directories: after a crash at
    any moment `path` holds either the old content or all of the new, never a torn file."""
    os.makedirs(staging_dir, exist_ok=True)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(staging_dir, f"{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)   # atomic on one file system
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(path) or ".")
    if os.path.abspath(staging_dir) != os.path.abspath(os.path.dirname(path) or "."):
        _fsync_dir(staging_dir)


def put_file_atomic(fs: fsspec.AbstractFileSystem, local_path: str, path: str, staging_dir: str) -> None:
    """`write_atomic` for a file on this machine's disk (too big to hold in memory): an object store publishes the
    upload (multipart for a big file) only when it completes; a local file in the staging folder is renamed into
    place, anything else is copied to the staging folder first."""
    if is_object_store(fs, path):
        fs.put_file(local_path, path)
        return
    if is_local(fs) and os.path.dirname(os.path.abspath(local_path)) == os.path.abspath(staging_dir):
        with open(local_path, "rb") as f:
            os.fsync(f.fileno())
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.replace(local_path, path)
        _fsync_dir(os.path.dirname(path) or ".")
        return
    fs.makedirs(staging_dir, exist_ok=True)
    tmp = f"{staging_dir.rstrip('/')}/{uuid.uuid4().hex}.tmp"
    fs.put_file(local_path, tmp)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.mv(tmp, path)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, staging_dir: str) -> None:
    """Make `path` appear only whole. Object stores publish an object when its upload completes, so a direct
    write is already atomic there; elsewhere write to a staging file in `staging_dir` and rename it into place
    (fsynced first on local file systems)."""
    if is_object_store(fs, path):
        fs.pipe_file(path, data)
        return
    if is_local(fs):
        write_local_atomic(path, data, staging_dir)
        return
    fs.makedirs(staging_dir, exist_ok=True)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{staging_dir.rstrip('/')}/{uuid.uuid4().hex}.tmp"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)
