"""Test support: free ports, node and peer processes on loopback."""

from __future__ import annotations

import json
import tomllib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from node.spool import SPARE_SUFFIX

ROOT = Path(__file__).resolve().parent.parent
TCP_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout} s")


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(directory: Path, **sections: Any) -> Path:
    """Write a node config; ``sections`` maps table name to dict (or list of dicts)."""
    base: dict[str, Any] = {
        # one process: the default ("auto") would start listener children in every test
        # with a node; tests/integration/test_listeners.py covers them
        "node": {"ae_title": "PACSNODE", "host": "127.0.0.1", "port": free_port(),
                 "listener_processes": 1},
        "storage": {"spool": "spool", "database": "sqlite:///index.db", "min_free_mb": 0},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "assembly": {"series_quiet_seconds": 3.0, "study_quiet_seconds": 4.0,
                     "check_interval_seconds": 0.1},
    }
    for name, table in sections.items():
        if isinstance(table, dict) and isinstance(base.get(name), dict):
            base[name] = {**base[name], **table}
        else:
            base[name] = table
    lines: list[str] = []
    for name, table in base.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        lines.append("")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pacsnode.toml"
    path.write_text("\n".join(lines))
    return path


class NodeProcess:
    """``pacsnode serve`` as a child process, with its log in a file."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.log_path = config.parent / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "-c", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, env=TCP_ENV, cwd=ROOT)
        wait_port(self.port, proc=self.proc)
        # the admin API opens just after the DICOM listener; a test may use it at once
        http = tomllib.loads(self.config.read_text()).get("http", {})
        if http.get("port"):
            wait_port(int(http["port"]), proc=self.proc)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@contextmanager
def tmpfs_mount(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's -o size=) at ``mount``, for disk-full tests (root only)."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs for a disk-full test (needs root): "
                           f"{result.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def half_written(tmp_dir: Path) -> list[Path]:
    """Files in a spool's ``.tmp/`` other than the empty spare it keeps ready."""
    return [p for p in tmp_dir.iterdir()
            if not (p.name.endswith(SPARE_SUFFIX) and p.stat().st_size == 0)]


def storescu(port: int, files: Sequence[Path | str], *, aec: str = "PACSNODE",
             aet: str = "STORESCU", extra: Sequence[str] = (),
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, env=TCP_ENV, timeout=timeout)


def proc_status_kib(pid: int, field: str) -> int:
    """A memory figure of a live process from /proc/PID/status (VmRSS, VmHWM...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


class Orthanc:
    """A real Orthanc (Debian package) with the DICOMweb plugin, on free loopback ports."""

    PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(self, directory: Path, *, modalities: dict[str, list[Any]] | None = None,
                 aet: str = "ORTHANC", users: dict[str, str] | None = None,
                 verbose: bool = False, options: dict[str, Any] | None = None) -> None:
        """``verbose``: Orthanc logs every association and C-STORE (see
        :meth:`associations`); ``options`` override keys of its configuration."""
        self.verbose = verbose
        self.options = options or {}
        self.users = users or {}
        self.directory = directory
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.aet = aet
        self.modalities = modalities or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test-orthanc",
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": self.aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users), "RegisteredUsers": self.users,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "DicomModalities": self.modalities,
            "Plugins": [self.PLUGIN] if Path(self.PLUGIN).exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpServerEnabled": True, "StableAge": 60,
            **self.options,
        }
        path = self.directory / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.directory / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(["Orthanc", *(["--verbose"] if self.verbose else []),
                                      str(path)], stdout=log,
                                     stderr=subprocess.STDOUT, env=TCP_ENV)
        wait_port(self.http_port, proc=self.proc, timeout=30)
        wait_port(self.dicom_port, proc=self.proc, timeout=30)
        return self

    def request(self, method: str, path: str, body: Any = None, timeout: float = 600) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.users:
            import base64
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def log(self) -> str:
        return (self.directory / "orthanc.log").read_text(errors="replace")

    def associations(self, calling: str) -> int:
        """Associations Orthanc accepted from ``calling`` (needs ``verbose``)."""
        return sum(1 for line in self.log().splitlines()
                   if "Association Acknowledged" in line and f"to AET {calling} " in line)

    def store_requests(self, calling: str) -> int:
        """C-STORE requests Orthanc received from ``calling`` (needs ``verbose``)."""
        return sum(1 for line in self.log().splitlines()
                   if f"Incoming Store request from AET {calling} " in line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
