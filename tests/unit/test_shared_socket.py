"""adapters/dimse.py SharedSocketServer: processes sharing one listening socket; a new
association goes to one that serves nothing first."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from adapters import dimse
from adapters.dimse import SharedSocketServer


def _server(listen_fd: int | None, opened: list[str], name: str) -> Any:
    ae = AE("SHARED")
    ae.add_supported_context(Verification)
    server = ae.make_server(("127.0.0.1", 0), server_class=SharedSocketServer,
                            listen_fd=listen_fd,
                            evt_handlers=[(evt.EVT_CONN_OPEN, lambda _: opened.append(name))])
    ae._servers.append(server)          # as start_server does (shutdown() removes it)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_busy_process_leaves_a_new_association_to_a_free_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dimse, "ACCEPT_DEFERRAL", 1.0)   # a wide margin on a busy machine
    opened: list[str] = []
    first = _server(None, opened, "first")             # binds and listens
    second = _server(os.dup(first.socket.fileno()), opened, "second")  # inherits it
    try:
        port = first.server_address[1]
        assert second.server_address[1] == port and first.socket.getblocking() is False
        for busy, free in ((first, "second"), (second, "first")):
            busy._last_accept = dimse.time.monotonic() + 5   # "accepted a moment ago"
            opened.clear()
            assoc = AE("CALLER")
            assoc.add_requested_context(Verification)
            a = assoc.associate("127.0.0.1", port, ae_title="SHARED")
            assert a.is_established
            a.release()
            assert opened == [free]                        # the free one took it
            busy._last_accept = -1.0
    finally:
        second.shutdown()
        first.shutdown()


def test_closing_one_server_leaves_the_shared_socket_listening() -> None:
    opened: list[str] = []
    first = _server(None, opened, "first")
    second = _server(os.dup(first.socket.fileno()), opened, "second")
    port = first.server_address[1]
    second.shutdown()                                      # a child stops: no shutdown()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass                                           # still accepted
        assoc = AE("CALLER")
        assoc.add_requested_context(Verification)
        a = assoc.associate("127.0.0.1", port, ae_title="SHARED")
        assert a.is_established
        a.release()
        assert "first" in opened
    finally:
        first.shutdown()
