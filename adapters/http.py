"""The admin HTTP API (stdlib http.server, 127.0.0.1 by default).

    GET  /healthz             liveness, no token
    GET  /readyz              200 when every readiness check passes, else 503; no token
    GET  /metrics             Prometheus text format             (token)
    GET  /jobs?state=&limit=  the job table as JSON               (token)
    POST /jobs/<id>/retry     re-queue a failed/dead/cancelled job (token)

The token travels as "Authorization: Bearer <token>" and is compared in constant time.
"""

from __future__ import annotations

import hmac
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

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], dict[str, tuple[bool, str]]]


class AdminServer:
    def __init__(self, host: str, port: int, *, token: str, ready: ReadyCheck,
                 metrics: Callable[[], str], jobs: JobStore) -> None:
        self.token = token
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

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if given and hmac.compare_digest(given.encode(), self.admin.token.encode()):
            return True
        self._json(401, {"error": "a valid 'Authorization: Bearer <token>' header is required"})
        return False

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
        parts = urlparse(self.path).path.strip("/").split("/")
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
