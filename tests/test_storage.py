"""Storage: the error classifier on real botocore/s3fs exceptions (moto behind the fault proxy), retries that ride
out 50% faults, one clear StorageUnavailable line when they cannot, keys and file names that fsspec would misread,
and durable atomic writes."""

import errno
import os

import pytest

from pipeline import storage
from pipeline.errors import StorageUnavailable
from pipeline.storage import Fault, StorageOptions
from tests.faults import FaultProxy
from tests.pipeline_helpers import moto_s3, s3fs_for

ODD_NAMES = ["weird::name.png", "a b[1]?x.png", "#hash&amp;+%20.png", "ünïcode*.png", "s3:in-a-name.png"]


@pytest.fixture(scope="module")
def proxied():
    with moto_s3() as endpoint, FaultProxy(endpoint, seed=1) as proxy:
        fs = s3fs_for(endpoint)
        fs.mkdir("data")
        for i in range(30):
            fs.pipe(f"data/obj{i}.bin", bytes([i]) * 5000)
        yield endpoint, proxy


def _s3(proxy, retries=0):
    return StorageOptions(endpoint_url=proxy.url, retries=retries, retry_backoff_s=0.01)


OPS = {
    "read": lambda fs: fs.cat_file("data/obj0.bin"),
    "head": lambda fs: fs.info("data/obj0.bin"),
    "list": lambda fs: fs.call_s3("list_objects_v2", Bucket="data", Prefix="obj"),
    "write": lambda fs: fs.pipe_file("data/new.bin", b"new"),
}


EXPECTED = {"slowdown": Fault.TRANSIENT, "internal": Fault.TRANSIENT, "drop": Fault.TRANSIENT,
            "lost_reply": Fault.TRANSIENT, "cut": Fault.TRANSIENT, "denied": Fault.OUTAGE}
CASES = [(kind, fault, expected) for kind in OPS for fault, expected in EXPECTED.items()
         if not (fault == "cut" and kind in ("head", "write"))]   # HEAD and PUT answers have no body to cut


@pytest.mark.parametrize("kind, fault, expected", CASES)
def test_classifier_on_real_exceptions(proxied, kind, fault, expected):
    _, proxy = proxied
    proxy.heal()
    proxy.set(kind, **{fault: 1.0})
    try:
        fs, _ = storage.filesystem("s3://data/obj0.bin", _s3(proxy))
        with pytest.raises(Exception) as info:
            OPS[kind](fs)
    finally:
        proxy.heal()
    assert storage.classify(info.value) is expected, (type(info.value), info.value)
    # with retries, what reaches the caller is one line naming the object and the cause
    proxy.set(kind, **{fault: 1.0})
    try:
        fs, _ = storage.filesystem("s3://data/obj0.bin", _s3(proxy, retries=2))
        with pytest.raises(StorageUnavailable) as info:
            storage.with_retries(lambda: OPS[kind](fs), "s3://data/obj0.bin?X-Amz-Signature=secret", _s3(proxy, 2))
    finally:
        proxy.heal()
    message = str(info.value)
    assert "\n" not in message and "s3://data/obj0.bin" in message and "secret" not in message
    cause = {"slowdown": "503", "internal": "500", "denied": "403"}.get(fault, "")
    assert cause in message
    assert ("after 3 attempts" in message) == (expected is Fault.TRANSIENT)   # an outage is not retried


def test_objects_missing_bucket_missing_and_endpoint_down(proxied):
    endpoint, proxy = proxied
    opts = _s3(proxy, retries=2)
    with pytest.raises(FileNotFoundError):                         # one object: raised as it is, not retried
        storage.read_bytes("s3://data/missing.bin", opts)
    with pytest.raises(StorageUnavailable, match=r"s3://nobucket/x.bin: NoSuchBucket \(HTTP 404\)"):
        storage.read_bytes("s3://nobucket/x.bin", opts)
    down = StorageOptions(endpoint_url="http://127.0.0.1:9", retries=1, retry_backoff_s=0.01)
    with pytest.raises(StorageUnavailable, match=r"after 2 attempts: s3://data/obj0.bin: EndpointConnectionError"):
        storage.read_bytes("s3://data/obj0.bin", down)


def test_missing_credentials_are_an_outage(proxied, monkeypatch, tmp_path):
    endpoint, _ = proxied
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    opts = StorageOptions(endpoint_url=endpoint + "/", retries=3, retry_backoff_s=0.01)   # a fresh client
    with pytest.raises(StorageUnavailable, match="NoCredentialsError") as info:
        storage.read_bytes("s3://data/obj0.bin", opts)
    assert info.value.attempts == 1


def test_reads_ride_out_half_of_all_requests_failing(proxied):
    _, proxy = proxied
    proxy.set("read", slowdown=0.2, internal=0.1, drop=0.05, lost_reply=0.05, cut=0.1)
    before = proxy.injected("read")
    try:
        got = [storage.read_bytes(f"s3://data/obj{i}.bin", _s3(proxy, retries=10)) for i in range(30)]
    finally:
        proxy.heal()
    assert got == [bytes([i]) * 5000 for i in range(30)]
    assert proxy.injected("read") - before >= 15   # about half of the (at least 30) requests were faults


def test_scrub_keeps_credentials_and_signatures_out(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    exc = OSError(errno.EIO, "failed: https://h/b/k.jpg?X-Amz-Signature=abc&X-Amz-Credential=AKIA "
                             "wJalrXUtnFEMI/K7MDENG")
    text = storage.describe(exc)
    assert "wJalrXUtnFEMI" not in text and "abc" not in text and "AKIA" not in text
    assert "https://h/b/k.jpg?..." in text


def test_backoff_is_jittered_exponential_and_capped():
    opts = StorageOptions(retries=20, retry_backoff_s=1.0)
    delays = [storage.backoff_s(opts, a) for a in range(12)]
    assert 0.5 <= delays[0] <= 1 and 2 <= delays[2] <= 4 and max(delays) <= storage.MAX_BACKOFF_S
    assert len({round(storage.backoff_s(opts, 3), 6) for _ in range(10)}) > 1   # jitter


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_local_file_names(tmp_path, name):
    path = tmp_path / "dir::x" / name
    path.parent.mkdir()
    path.write_bytes(b"local " + name.encode())
    for uri in (str(path), f"file://{path}"):
        fs, p = storage.filesystem(uri, StorageOptions())
        assert storage.is_local(fs) and p == str(path)
        assert storage.read_bytes(uri, StorageOptions()) == b"local " + name.encode()
        assert storage.full_uri(fs, p) == str(path)


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_s3_keys(proxied, name):
    endpoint, proxy = proxied
    s3fs_for(endpoint).pipe(f"data/odd::dir/{name}", b"s3 " + name.encode())
    uri = f"s3://data/odd::dir/{name}"
    fs, path = storage.filesystem(uri, _s3(proxy))
    assert path == f"data/odd::dir/{name}" and not storage.is_local(fs)
    assert storage.read_bytes(uri, _s3(proxy)) == b"s3 " + name.encode()
    assert storage.full_uri(fs, path) == uri


def test_chained_urls_still_chain(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"chained")
    fs, path = storage.filesystem(f"simplecache::file://{tmp_path}/a.bin", StorageOptions())
    assert type(fs).__name__ == "SimpleCacheFileSystem" and fs.cat_file(path) == b"chained"


def test_write_atomic_fsyncs_file_and_directory_and_never_tears(tmp_path, monkeypatch):
    fs, root = storage.filesystem(str(tmp_path / "out"), StorageOptions())
    staging = f"{root}/_state/staging"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    storage.write_atomic(fs, f"{root}/part.parquet", b"first", staging)
    assert (tmp_path / "out" / "part.parquet").read_bytes() == b"first"
    assert synced[0].startswith(staging) and synced[0].endswith(".tmp")      # the data, before the rename
    assert str(tmp_path / "out") in synced[1:]                                # the directory, after it
    assert not os.listdir(staging)

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "disk error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk error"):
        storage.write_atomic(fs, f"{root}/part.parquet", b"second", staging)
    assert (tmp_path / "out" / "part.parquet").read_bytes() == b"first"    # old content whole, no staged leftovers
    assert not os.listdir(staging)


def test_an_archived_object_is_about_that_object():
    from botocore.exceptions import ClientError

    archived = ClientError({"Error": {"Code": "InvalidObjectState", "Message": "The operation is not valid for the "
                                      "object's storage class"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                           "GetObject")
    assert storage.classify(archived) is Fault.ITEM
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    assert storage.classify(denied) is Fault.OUTAGE


def test_disk_full_is_an_outage_and_a_local_permission_error_is_about_the_file():
    assert storage.classify(OSError(errno.ENOSPC, "No space left on device")) is Fault.OUTAGE
    assert storage.classify(PermissionError(errno.EACCES, "denied", "/data/x.png")) is Fault.ITEM
    assert storage.classify(OSError(errno.EBUSY, "Please reduce your request rate.")) is Fault.TRANSIENT
    assert storage.classify(ValueError("cannot identify image file")) is Fault.ITEM


def test_web_answers_are_about_their_object_but_no_answer_stops_the_run():
    """From a web URL, an HTTP answer (403, 410, a 503 past the retries) is that object's: each web host answers
    for its own objects. No answer at all may be this machine's network: that still stops the run."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Site(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            for status in (403, 410, 503):
                if self.path == f"/{status}":
                    self.send_error(status)
                    return None
            return super().send_head()

    with __import__("tempfile").TemporaryDirectory() as root:
        (__import__("pathlib").Path(root) / "ok.bin").write_bytes(b"fine")
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Site, directory=root))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        site = f"http://127.0.0.1:{server.server_address[1]}"
        opts = StorageOptions(retries=1, retry_backoff_s=0.01)
        try:
            assert storage.read_bytes(f"{site}/ok.bin", opts) == b"fine"
            for status, reason in ((403, "Forbidden"), (410, "Gone"), (503, "Service Unavailable after 2 attempts")):
                with pytest.raises(storage.WebObjectError, match=f"answered HTTP {status} {reason}") as info:
                    storage.read_bytes(f"{site}/{status}", opts)
                assert storage.classify(info.value) is Fault.ITEM
        finally:
            server.shutdown()
            server.server_close()
        with pytest.raises(StorageUnavailable):   # connection refused: nobody answered
            storage.read_bytes(f"{site}/ok.bin", opts)


def test_a_web_host_that_dns_says_does_not_exist_is_a_dead_link_unless_most_are():
    """A web manifest holds dead domains (img2dataset's corpora: a few percent): DNS answering 'no such name' is
    that item's error row, at once, not an outage that stops every rerun at the same link. DNS that cannot be
    asked (EAI_AGAIN) still stops the run; and when dead hosts pass the breaker's rate, this machine's DNS is the
    likelier cause: the run stops and says so."""
    import socket

    import pyarrow as pa

    from pipeline.breaker import Breaker
    from pipeline.errors import RunStopped

    opts = StorageOptions(retries=3, retry_backoff_s=5.0)   # a retry would take seconds: there must be none
    with pytest.raises(storage.WebObjectError, match=r"^the host name dead-host\.invalid does not resolve"):
        storage.read_bytes("http://user:pw@dead-host.invalid/a.jpg", opts)   # .invalid never resolves (RFC 6761)
    assert storage.unresolved_host(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert not storage.unresolved_host(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    dead = f"http://dead-host.invalid/a.jpg: the host name dead-host.invalid {storage.UNRESOLVED_HOST}"

    def rows(errors):
        return pa.table({"error": pa.array(errors, pa.string()), "_outage": [False] * len(errors)})

    breaker = Breaker(rate=0.5, window=10)
    assert breaker.admit(rows([dead, None, None, dead, None])).num_rows == 5   # dead links: written
    with pytest.raises(RunStopped, match=r"5 of the last 10 .* 5 of them because a web host name did not resolve "
                                         r".*is this machine's DNS working.*run\.retry_errors=true"):
        breaker.admit(rows([dead, dead, dead, None, "http://x/b.jpg: corrupt image"]))   # the corrupt one: not
    assert breaker.total == 0   # nothing held back: every row was an error row of its item
    # a run shorter than the window: judged at its end on the pairs it saw
    for errors, stops in (([dead, None, None, None, None], False), ([dead, dead, None], True)):
        short = Breaker(rate=0.5, window=100)
        short.admit(rows(errors))
        if stops:
            with pytest.raises(RunStopped, match="is this machine's DNS working"):
                short.check_finished()
        else:
            short.check_finished()


def test_url_credentials_are_masked_and_the_rest_of_the_url_kept():
    import pyarrow as pa

    url = "https://bob:hunter22@cdn.example/p/a.jpg?w=100&X-Amz-Signature=abc123&sig=s1g&Token=t0k#frag"
    expected = "https://***@cdn.example/p/a.jpg?w=100&X-Amz-Signature=***&sig=***&Token=***#frag"
    assert storage.redact(url) == expected
    assert storage.redact_column(pa.chunked_array([[url, None, "s3://b/k.jpg?versionId=3"]])).to_pylist() == [
        expected, None, "s3://b/k.jpg?versionId=3"]
    assert "hunter22" not in storage.scrub(f"failed: {url}")


@pytest.mark.parametrize("fault", ["slowdown", "drop", "internal"])
def test_a_failed_head_never_makes_a_result_file_read_as_missing(proxied, tmp_path, fault):
    """pyarrow's fsspec handler asks fs.isfile() before opening (the second HEAD of a read: the first asks what the
    path is), and fsspec's isfile() answers False for any error: one throttled HEAD made a result file's rows read
    as never written, and a resumed run wrote them again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.output import reopen_errors
    from pipeline.progress import read_keys
    from pipeline.state import StateDir

    endpoint, proxy = proxied
    proxy.heal()
    fs = s3fs_for(endpoint)
    fs.makedirs("results", exist_ok=True)
    table = pa.table({"id": ["a", "b"], "task": ["caption", "caption"], "error": [None, "x: corrupt"]})
    with fs.open(f"results/{fault}/part-1.parquet", "wb") as f:
        pq.write_table(table, f)
    state = StateDir(f"s3://results/{fault}", _s3(proxy, retries=3))
    try:
        proxy.burst("head", 1, fault, after=1)
        assert len(read_keys(state, ["part-1.parquet"])) == 2
        proxy.burst("head", 1, fault, after=1)
        assert reopen_errors(f"s3://results/{fault}", _s3(proxy, retries=3), str(tmp_path)) == 1
    finally:
        proxy.heal()
    assert fs.cat_file(f"results/{fault}/part-1.parquet") and len(read_keys(state, ["part-1.parquet"])) == 1


def test_quarantine_move_whose_delete_answer_is_lost_counts_as_done(proxied):
    """The move is a copy then a delete: when the delete happened but its answer was lost, the retried move finds
    the source gone. That is the move done, not an error that ends the run."""
    from pipeline.progress import read_keys
    from pipeline.state import StateDir

    endpoint, proxy = proxied
    proxy.heal()
    fs = s3fs_for(endpoint)
    fs.makedirs("results", exist_ok=True)
    fs.pipe("results/torn/part-1.parquet", b"PAR1 cut short")
    state = StateDir("s3://results/torn", _s3(proxy, retries=3))
    try:
        proxy.set("write", prefix="/results?delete", lost_reply=1.0)
        assert len(read_keys(state, ["part-1.parquet"])) == 0
        assert proxy.injected("write") >= 1
    finally:
        proxy.heal()
    assert fs.find("results/torn") == ["results/torn/_state/quarantine/part-1.parquet.quarantined"]
