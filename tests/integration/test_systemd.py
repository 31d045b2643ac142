"""systemd: the units verify cleanly; the node speaks the notify protocol (READY,
WATCHDOG, STOPPING) the way Type=notify and WatchdogSec= expect."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support import ROOT, TCP_ENV, write_config

pytestmark = pytest.mark.integration
UNITS = sorted((ROOT / "systemd").glob("*.service"))


def test_units_verify_without_any_warning(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing; the README's test command installs systemd")
    assert {u.name for u in UNITS} == {"pacsnode.service", "pacsnode-receiver.service",
                                       "pacsnode-worker@.service"}
    exe = Path(sys.executable).parent / "pacsnode"
    paths = []
    for unit in UNITS:
        text = unit.read_text().replace("/opt/pacsnode/.venv/bin/pacsnode", str(exe))
        name = unit.name.replace("@.service", "@cpu.service")
        (tmp_path / name).write_text(text.replace("file:///opt/pacsnode/",
                                                  f"file://{ROOT}/"))
        paths.append(str(tmp_path / name))
    out = subprocess.run([tool, "verify", *paths], capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
    for unit in UNITS:
        text = unit.read_text()
        for key in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict",
                    "PrivateTmp=yes", "RestrictAddressFamilies=", "User=pacsnode"):
            assert key in text, (unit.name, key)
    receiver = (ROOT / "systemd" / "pacsnode-receiver.service").read_text()
    worker = (ROOT / "systemd" / "pacsnode-worker@.service").read_text()
    assert "PrivateDevices=yes" in receiver and "PrivateDevices=yes" not in worker


def test_notify_protocol(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(30)
    config = write_config(tmp_path / "cfg")
    port = tomllib.loads(config.read_text())["node"]["port"]
    env = {**TCP_ENV, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "-c", str(config)],
                            env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        env["WATCHDOG_PID"] = str(proc.pid)
        messages = []
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(server.recv(4096).decode())
        assert messages[0].startswith("READY=1") and f"port {port}" in messages[0]
        os.kill(proc.pid, signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(server.recv(4096).decode())
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
