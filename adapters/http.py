"""The admin HTTP API (stdlib http.server, 127.0.0.1 by default).

    GET  /healthz             liveness, no token
    GET  /readyz              200 when every readiness check passes, else 503; no token
    GET  /metrics             Prometheus text format             (token)
    GET  /jobs?state=&limit=  the job table as JSON               (token)
    POST /jobs/<id>/retry     re-queue a failed/dead/cancelled job (token)
    POST /dicom-web/studies[/<study>]  STOW-RS receive (node/stow.py)  (STOW token)

The token travels as "Authorization: Bearer <token>" and is compared in constant time.
STOW-RS takes the STOW token (``http.stow_token_file``), or the admin token when none
is configured; the admin token is always accepted there too.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from node.errors import JobError
from node.jobs import JobStore
from node.queries import job_dict
from node.multipart import Read
from node.stow import DICOM_JSON, StowReceiver, StowRequestError

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], dict[str, tuple[bool, str]]]
STOW_PREFIX = "/dicom-web/studies"
_MAX_WARNINGS = 20          # Warning header fields carrying failure details
REQUEST_TIMEOUT = 120.0     # seconds a connection may stay silent (socket timeout)
DRAIN_LIMIT = 64 << 20      # bytes of a refused body read (and dropped) before answering


class AdminServer:
    def __init__(self, host: str, port: int, *, token: str, ready: ReadyCheck,
                 metrics: Callable[[], str], jobs: JobStore,
                 stow: StowReceiver | None = None, stow_token: str | None = None) -> None:
        self.token = token
        self.stow = stow
        self.stow_token = stow_token
        self.ready = ready
        self.metrics = metrics
        self.jobs = jobs
        handler = type("Handler", (_Handler,), {"admin": self})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="admin-http",
                                        daemon=True)
        self._thread.start()
        log.info("admin API on http://%s:%d", self._server.server_address[0], self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    admin: AdminServer
    server_version = "pacsnode"
    timeout = REQUEST_TIMEOUT      # a sender silent this long mid-request is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (stdlib name)
        log.debug("admin %s %s", self.address_string(), format % args)

    def _send(self, status: int, body: str, content_type: str = "application/json") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload, indent=1, default=str) + "\n")

    def _authorised(self, *extra_tokens: str | None) -> bool:
        header = self.headers.get("Authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        accepted = [t for t in (self.admin.token, *extra_tokens) if t]
        # compare with every token, always, so the time taken says nothing
        if given and sum(hmac.compare_digest(given.encode(), t.encode()) for t in accepted):
            return True
        self._json(401, {"error": "a valid 'Authorization: Bearer <token>' header is required"})
        return False

    def _body(self) -> Read:
        """A ``read(n)`` for the request body, by Content-Length or chunked transfer
        coding (RFC 9112 §7.1): it is read as it is used, never held whole."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _Chunked(self.rfile).read
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise StowRequestError(411, "a Content-Length or chunked transfer coding is "
                                        "required")
        return _Sized(self.rfile, int(length)).read

    def _stow(self, path: str) -> None:
        study = path.removeprefix(STOW_PREFIX).strip("/") or None
        if study is not None and "/" in study:
            self._json(404, {"error": f"no such resource: {path}"})
            return
        if self.admin.stow is None:
            self._json(404, {"error": "STOW-RS is not enabled on this node"})
            return
        if not self._authorised(self.admin.stow_token):
            return
        read: Read | None = None
        try:
            read = self._body()
            result = self.admin.stow.receive(
                self.headers.get("Content-Type", ""), read, study_instance_uid=study,
                address=self.client_address[0], port=int(self.client_address[1]))
        except StowRequestError as exc:
            log.warning("STOW-RS from %s refused (%d): %s", self.client_address[0],
                        exc.status, exc)
            if read is not None:
                _drain(read)        # so that the sender, still sending, reads the answer
            self._json(exc.status, {"error": str(exc)})
            return
        data = json.dumps(result.body).encode()
        self.send_response(result.status)
        self.send_header("Content-Type", DICOM_JSON)
        self.send_header("Content-Length", str(len(data)))
        for failure in result.failures[:_MAX_WARNINGS]:
            text = "".join(c if " " <= c <= "~" and c not in '"\\' else "?"
                           for c in failure.detail[:300])
            self.send_header("Warning", f'299 pacsnode "{text}"')
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        url = urlparse(self.path)
        if url.path == "/healthz":
            self._json(200, {"status": "ok"})
        elif url.path == "/readyz":
            checks = self.admin.ready()
            ok = all(passed for passed, _ in checks.values())
            self._json(200 if ok else 503, {"ready": ok, "checks": {
                name: {"ok": passed, "detail": detail} for name, (passed, detail) in
                checks.items()}})
        elif url.path == "/metrics":
            if self._authorised():
                self._send(200, self.admin.metrics(), "text/plain; version=0.0.4")
        elif url.path == "/jobs":
            if self._authorised():
                query = parse_qs(url.query)
                state = query.get("state", [None])[0]
                limit = int(query.get("limit", ["100"])[0])
                self._json(200, [job_dict(j) for j in self.admin.jobs.list(state=state,
                                                                           limit=limit)])
        else:
            self._json(404, {"error": f"no such resource: {url.path}"})

    def do_POST(self) -> None:  # noqa: N802
        path = urlparse(self.path).path
        if path == STOW_PREFIX or path.startswith(STOW_PREFIX + "/"):
            self._stow(path)
            return
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "jobs" and parts[2] == "retry" and parts[1].isdigit():
            if not self._authorised():
                return
            try:
                job = self.admin.jobs.retry(int(parts[1]))
            except JobError as exc:
                self._json(404 if "no job" in str(exc) else 409, {"error": str(exc)})
                return
            self._json(200, job_dict(job))
        else:
            self._json(404, {"error": f"no such resource: {self.path}"})


class _Sized:
    """A body of ``Content-Length`` bytes, read as it arrives (``read1``: what one receive
    gives, so a part is handled once it is in, not once a megabyte is)."""

    def __init__(self, stream: io.BufferedIOBase, length: int) -> None:
        self._stream = stream
        self._left = length
        self._length = length

    def read(self, size: int) -> bytes:
        if self._left <= 0:
            return b""
        data = self._stream.read1(min(size, self._left))
        if not data:
            raise ConnectionError(f"the connection closed after {self._length - self._left} "
                                  f"of {self._length} bytes of the body")
        self._left -= len(data)
        return bytes(data)


class _Chunked:
    """A body in chunked transfer coding (RFC 9112 §7.1), read as it arrives."""

    def __init__(self, stream: io.BufferedIOBase) -> None:
        self._stream = stream
        self._left = 0          # bytes of the current chunk not read yet
        self._ended = False

    def read(self, size: int) -> bytes:
        if self._ended:
            return b""
        if self._left == 0:
            line = self._stream.readline(1024)
            try:
                self._left = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                # the framing is broken: like a connection lost (parts before it are kept)
                raise ConnectionError(f"bad chunk size line {line[:40]!r}") from None
            if self._left == 0:
                while self._stream.readline(1024).strip():
                    pass                # trailer fields
                self._ended = True
                return b""
        data = self._stream.read1(min(size, self._left))
        if not data:
            raise ConnectionError("the connection closed inside a chunk of the body")
        self._left -= len(data)
        if self._left == 0:
            self._stream.readline(8)    # the CRLF after the chunk
        return bytes(data)


def _drain(read: Read) -> None:
    """Read and drop what is left of a refused body, up to :data:`DRAIN_LIMIT` bytes."""
    left = DRAIN_LIMIT
    try:
        while left > 0:
            data = read(min(left, 1 << 20))
            if not data:
                return
            left -= len(data)
    except OSError:
        return
