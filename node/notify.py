"""systemd's notify protocol (sd_notify(3)), without libsystemd: READY, STOPPING,
STATUS and WATCHDOG datagrams to $NOTIFY_SOCKET. A no-op when not run by systemd."""

from __future__ import annotations

import os
import socket


def notify(*messages: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]          # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall("\n".join(messages).encode())
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for (WatchdogSec=), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
