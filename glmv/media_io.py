"""Open media given as a local path, file:// / http(s):// / any fsspec URL (s3://...), raw bytes or a file object.

Everything here reports problems as `MediaError` naming the input by `describe(source)`, which never includes
credentials (URL user-info, query strings such as pre-signed signatures).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import pathlib
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any, Iterator

from glmv.errors import MediaError

HTTP_TIMEOUT_S = 30.0
MediaSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]


def describe(source: Any) -> str:
    """A short, credential-free name for an input, used in every error message."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes: {len(source)} bytes>"
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if source.startswith("data:"):
            return f"<data URI: {len(source)} chars>"
        if "://" in source:
            parts = urllib.parse.urlsplit(source)
            host = parts.hostname or ""
            if parts.port:
                host += f":{parts.port}"
            source = f"{parts.scheme}://{host}{parts.path}"
        return source if len(source) <= 300 else source[:150] + "..." + source[-100:]
    name = getattr(source, "path", None) or getattr(source, "name", None)
    if isinstance(name, str):
        return describe(name)
    return f"<{type(source).__name__}>"


def _is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _local_path(source: str) -> str:
    if source.startswith("file://"):
        return urllib.request.url2pathname(urllib.parse.urlsplit(source).path)
    return source


def _os_error(source: Any, exc: OSError) -> MediaError:
    if isinstance(exc, FileNotFoundError):
        return MediaError(describe(source), "file not found")
    if isinstance(exc, IsADirectoryError):
        return MediaError(describe(source), "is a directory, not a file")
    if isinstance(exc, PermissionError):
        return MediaError(describe(source), "permission denied")
    # strerror, not str(exc): the latter repeats the file name, which the message already names (shortened)
    return MediaError(describe(source), f"cannot read ({type(exc).__name__}: {exc.strerror or exc})")


def _http_get(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "glmv"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise MediaError(describe(url), f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MediaError(describe(url), f"download failed ({reason})") from None


@contextlib.contextmanager
def open_media(source: MediaSource, storage_options: dict | None = None) -> Iterator[IO[bytes]]:
    """Yield a seekable binary file object for `source`; caller-owned file objects are not closed."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(source))
        return
    if hasattr(source, "read"):
        yield source  # type: ignore[misc]
        return
    if isinstance(source, pathlib.PurePath):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise MediaError(describe(source), f"unsupported input type {type(source).__name__}")
    if source.startswith(("http://", "https://")):
        yield io.BytesIO(_http_get(source, HTTP_TIMEOUT_S))
        return
    if source.startswith("data:"):
        yield io.BytesIO(decode_data_uri(source))
        return
    if _is_url(source):
        import fsspec

        try:
            handle = fsspec.open(source, "rb", **(storage_options or {})).open()
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError):
                raise _os_error(source, exc) from None
            raise MediaError(describe(source), f"cannot open ({exc})") from None
        with handle:
            yield handle
        return
    try:
        handle = open(_local_path(source), "rb")
    except OSError as exc:
        raise _os_error(source, exc) from None
    with handle:
        yield handle


def decode_data_uri(uri: str) -> bytes:
    """The payload of a `data:[<mime>][;base64],<data>` URI."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise MediaError(describe(uri), "malformed data URI (no comma)")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(describe(uri), f"invalid base64 payload ({exc})") from None
    return urllib.parse.unquote_to_bytes(payload)


def read_bytes(source: MediaSource, storage_options: dict | None = None) -> bytes:
    """The whole content of `source` (images are small enough to read at once)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    with open_media(source, storage_options) as handle:
        try:
            return handle.read()
        except OSError as exc:
            raise _os_error(source, exc) from None
