"""What every benchmark script records with its table: machine, revision, command, file.

Imported by the scripts in this folder after they put the repository root on
``sys.path``; nothing here measures anything.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from node.settings import auto_listener_processes

ROOT = Path(__file__).resolve().parent.parent
AUTO = "auto"  # [node] listener_processes = "auto", the shipped default
RESULTS = ROOT / "bench" / "RESULTS.md"
RESULTS_HEADER = """\
# Benchmark results

Figures below are appended by the scripts in this folder (see README.md), one section
per run, with the machine, the date (UTC) and the exact command. Do not edit them by
hand; compare only figures measured in the same run.
"""


def listeners_arg(text: str) -> int | str:
    """A ``--listeners`` value: "auto" or a number of processes."""
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: a number or "auto"') from None


def listener_count(listeners: int | str) -> int:
    """The processes ``listener_processes = listeners`` gives on this machine."""
    return auto_listener_processes() if listeners == AUTO else int(listeners)


def first_line(cmd: Sequence[str]) -> str:
    """The first line a command prints (stdout, else stderr), or "?" if it cannot run."""
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")), platform.processor() or "?")
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal"))
    return (f"nproc {os.cpu_count()}, CPU {model}, memory {mem_kb / 1024 ** 2:.1f} GiB, "
            f"kernel {platform.release()}")


def revision() -> str:
    """``pacsnode <short hash>``, marked when the working tree has uncommitted changes."""
    rev = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    # The results file itself does not count: every run before this one appended to it.
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", ".",
                            ":!bench/RESULTS.md"],
                           check=False, capture_output=True, text=True).stdout.strip()
    return f"pacsnode {rev}{' (uncommitted changes)' if dirty else ''}"


def command_line(script: str) -> str:
    """The command as typed from the current folder (``script`` is the caller's __file__)."""
    exe = os.path.relpath(sys.executable, Path.cwd())
    path = os.path.relpath(Path(script).resolve(), Path.cwd())
    return " ".join(shlex.quote(a) for a in [exe, path, *sys.argv[1:]])


def append_results(text: str, path: Path) -> None:
    """Append one section to the results file (created with its header if missing)."""
    if not path.exists() or not path.read_text().strip():
        path.write_text(RESULTS_HEADER)
    with path.open("a") as f:
        f.write("\n" + text)
