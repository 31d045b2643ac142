"""The receiver's nudge to worker processes (node/app.py wake_workers)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from node.app import wake_workers

WAITER = ("import signal, sys, time\n"
          "signal.signal(signal.SIGUSR1, lambda *_: (print('woken', flush=True), sys.exit(0)))\n"
          "print('ready', flush=True)\n"
          "time.sleep(30)\n")


def _start(*argv: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", WAITER, *argv], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_only_live_pacsnode_workers_are_nudged(tmp_path: Path) -> None:
    worker = _start("node.cli", "serve", "--role", "worker")
    stranger = _start("something-else")          # SIGUSR1 would kill it: must not get one
    try:
        (tmp_path / ".worker-status-cpu.json").write_text(json.dumps({"pid": worker.pid}))
        (tmp_path / ".worker-status-other.json").write_text(json.dumps({"pid": stranger.pid}))
        (tmp_path / ".worker-status-gone.json").write_text(json.dumps({"pid": 2 ** 22 + 7}))
        (tmp_path / ".worker-status-bad.json").write_text("{not json")
        wake_workers(tmp_path)
        out, _ = worker.communicate(timeout=10)
        assert out.strip() == "woken" and worker.returncode == 0
        time.sleep(0.2)
        assert stranger.poll() is None
    finally:
        for proc in (worker, stranger):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_worker_environment_turns_numpy_hugepage_advice_off_unless_set() -> None:
    from node.app import worker_environment

    env = worker_environment({"PATH": "/usr/bin"}, 42)
    assert env == {"PATH": "/usr/bin", "NUMPY_MADVISE_HUGEPAGE": "0",
                   "PACSNODE_PARENT_PID": "42"}
    assert worker_environment({"NUMPY_MADVISE_HUGEPAGE": "1"}, 1)["NUMPY_MADVISE_HUGEPAGE"] == "1"
    # and numpy reads it: a process started with it has the advice off
    out = subprocess.run([sys.executable, "-c",
                          "import numpy._core.multiarray as m; print(m._get_madvise_hugepage())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
