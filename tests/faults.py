"""A fault-injecting HTTP proxy for tests: sits in front of an S3 endpoint (moto's server) on 127.0.0.1 and answers
a share of the requests with a fault instead of (or after) forwarding them.

Requests are sorted into four kinds, each with its own fault rates:
    read   GET of an object            list   GET of a bucket (?list-type=2, ?location, ...)
    head   HEAD                        write  PUT, POST, DELETE
Faults:
    slowdown    503 SlowDown (the S3 throttling answer)     internal    500 InternalError
    drop        the connection closed before the request reaches the store (nothing happened)
    lost_reply  the request reaches the store, then the connection is closed (it happened; the client cannot know)
    cut         the answer's headers promise the whole body, half of it is sent, then the connection is closed
    denied      403 AccessDenied (what a wrong credential or a missing permission gets)

    with FaultProxy(endpoint) as proxy:
        proxy.set("read", slowdown=0.2, internal=0.1, drop=0.05, cut=0.05)
        proxy.set("read", prefix="/media/", slowdown=1.0)   # only requests whose path starts with /media/
        proxy.burst("head", 2, "slowdown")                   # the next 2 HEADs, whatever the rates say
        proxy.burst("head", 1, "drop", after=1)              # the HEAD after the next one
        ... point the client at proxy.url ...
        proxy.injected()   # {("read", "slowdown"): 31, ...}
"""

from __future__ import annotations

import collections
import http.client
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("read", "list", "head", "write")
FAULTS = ("slowdown", "internal", "drop", "lost_reply", "cut", "denied")
_ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
           "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
           "denied": (403, "AccessDenied", "Access Denied")}
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}


def request_kind(method: str, path: str) -> str:
    if method == "HEAD":
        return "head"
    if method != "GET":
        return "write"
    url = urlsplit(path)
    key = url.path.lstrip("/").partition("/")[2]
    return "list" if not key or "list-type" in url.query else "read"


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0):
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.rates: dict[str, dict[str, float]] = {k: {} for k in KINDS}
        self.prefixes: dict[str, str] = {k: "" for k in KINDS}
        self.bursts: dict[str, list[str]] = {k: [] for k in KINDS}
        self.counts: collections.Counter = collections.Counter()     # (kind, fault) -> injected
        self.requests: collections.Counter = collections.Counter()   # kind -> requests seen
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fault-proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def set(self, kind: str, prefix: str = "", **rates: float) -> "FaultProxy":
        """Fault rates of one kind (a share of its requests each; unnamed faults 0), optionally only for request
        paths that start with `prefix` ("/bucket/key-prefix")."""
        assert kind in KINDS and set(rates) <= set(FAULTS) and sum(rates.values()) <= 1, (kind, rates)
        with self._lock:
            self.rates[kind], self.prefixes[kind] = dict(rates), prefix
        return self

    def burst(self, kind: str, n: int, fault: str, after: int = 0) -> "FaultProxy":
        """The next n requests of a kind get `fault` (after `after` more of them pass untouched)."""
        assert kind in KINDS and fault in FAULTS
        with self._lock:
            self.bursts[kind] += [None] * after + [fault] * n
        return self

    def heal(self) -> None:
        with self._lock:
            self.rates = {k: {} for k in KINDS}
            self.bursts = {k: [] for k in KINDS}

    def injected(self, kind: str | None = None) -> int | dict:
        with self._lock:
            if kind is None:
                return dict(self.counts)
            return sum(n for (k, _), n in self.counts.items() if k == kind)

    def _draw(self, kind: str, path: str) -> str | None:
        with self._lock:
            self.requests[kind] += 1
            if self.bursts[kind]:
                return self.bursts[kind].pop(0)
            if not path.startswith(self.prefixes[kind]):
                return None
            x, edge = self._random.random(), 0.0
            for fault, rate in self.rates[kind].items():
                edge += rate
                if x < edge:
                    return fault
        return None

    def _count(self, kind: str, fault: str) -> None:
        with self._lock:
            self.counts[(kind, fault)] += 1

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):   # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if not size:
                        while self.rfile.readline().strip():   # trailers
                            pass
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _hang_up(self) -> None:
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _forward(self, body: bytes):
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP], data

        def _send(self, status: int, headers, data: bytes, cut: bool = False) -> None:
            self.send_response(status)
            for k, v in headers:
                if k.lower() != "content-length":
                    self.send_header(k, v)
            length = dict((k.lower(), v) for k, v in headers).get("content-length", str(len(data)))
            self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data[: len(data) // 2] if cut else data)

        def _serve(self) -> None:
            kind = request_kind(self.command, self.path)
            body = self._body()
            fault = proxy._draw(kind, self.path)
            if fault == "cut" and self.command == "HEAD":
                fault = None   # no body to cut
            if fault:
                proxy._count(kind, fault)
            if fault == "drop":
                return self._hang_up()
            if fault in _ERRORS:
                status, code, message = _ERRORS[fault]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                       f'</Message><RequestId>fault-proxy</RequestId></Error>').encode()
                return self._send(status, [("Content-Type", "application/xml")], xml)
            status, headers, data = self._forward(body)
            if fault == "lost_reply":
                return self._hang_up()
            if fault == "cut":
                if len(data) < 2:   # an empty answer (a PUT's): lose it instead
                    return self._hang_up()
                self._send(status, headers, data, cut=True)
                return self._hang_up()
            self._send(status, headers, data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    return Handler
