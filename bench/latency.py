"""Latency and memory benchmark: how long a study waits, where the time of one study goes
from the PACS's push to the results in the PACS, and how much memory the node takes.

Three parts, each a table appended to RESULTS.md:

1. completion: last instance acknowledged → series complete → job claimed, for the fast
   path (association released, series provably complete) and for the quiet period
   (fast path off), with a forward-only route so that nothing but assembly is measured;
2. end to end: Orthanc pushes a CT to the node (C-STORE from Orthanc, started by its REST
   API); the node routes it to the shipped reference model and sends SEG + SR back to the
   same Orthanc; the clock stops when both are found in Orthanc. Stages come from the node's
   own records (index times, the audit log's ``inferred`` and ``delivered`` events);
3. memory: peak resident memory (VmHWM) of the receiver process and of the worker process
   over part 2, and over a larger study when --memory-slices is given.

    .venv/bin/python bench/latency.py [--slices 300] [--size 512] [--memory-slices 1000]

Needs dcmtk and Orthanc (Debian packages), like the test suite.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    AUTO, append_results, command_line, listener_count, listeners_arg, machine, revision)
from node import synth  # noqa: E402
from tests.support import (  # noqa: E402
    TCP_ENV, NodeProcess, Orthanc, free_port, proc_status_kib, storescu, wait_for,
    write_config)

BUNDLE = ROOT / "models" / "lesion_ct"


def _utc(value: str) -> float:
    """An index time (naive UTC, SQLite text) or an audit time (ISO with offset), as epoch."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


def _hwm_mib(pid: int) -> float:
    return proc_status_kib(pid, "VmHWM") / 1024


# -- part 1: completion -------------------------------------------------------------------

@dataclass
class Completion:
    mode: str
    complete_s: float   # last instance acknowledged (node's index) → series complete
    claimed_s: float    # last instance → job claimed (seen leaving pending; polled at 2 ms)


def completion_run(work: Path, files: Sequence[Path], *, fast_path: bool,
                   quiet: float, listeners: int | str = AUTO) -> Completion:
    sink = free_port()
    storescp = subprocess.Popen(["storescp", "--fork", "-od", str(work / "sink"), str(sink)],
                                env=TCP_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    (work / "sink").mkdir(parents=True, exist_ok=True)
    config = write_config(
        work / "node", node={"listener_processes": listeners},
        assembly={"fast_path": fast_path, "series_quiet_seconds": quiet,
                  "study_quiet_seconds": quiet + 1, "check_interval_seconds": 0.1},
        destinations=[{"name": "sink", "kind": "dimse", "ae_title": "SINK",
                       "host": "127.0.0.1", "port": sink}],
        routes=[{"name": "fwd", "match": {"Modality": "CT"}, "action": "forward",
                 "destinations": ["sink"]}])
    import tomllib
    node = NodeProcess(config, tomllib.loads(config.read_text())["node"]["port"]).start()
    db = config.parent / "index.db"
    try:
        result = storescu(node.port, files)
        if result.returncode != 0:
            raise SystemExit(f"storescu failed: {result.stderr[-500:]}")
        claimed_at = wait_for(lambda: next(
            (time.time() for (state,) in _query(db, "select state from jobs")
             if state != "pending"), None), timeout=quiet + 60, interval=0.002)
        ((last, done),) = _query(db, "select last_received_at, completed_at from series")
    finally:
        node.stop()
        storescp.terminate()
        storescp.wait(10)
    return Completion("fast path" if fast_path else f"quiet period {quiet:g} s",
                      _utc(done) - _utc(last), claimed_at - _utc(last))


# -- part 2 and 3: end to end and memory --------------------------------------------------

@dataclass
class EndToEnd:
    label: str
    stages: dict[str, float]
    total_s: float
    receiver_mib: float
    worker_mib: float


STAGES = ("receive", "wait", "queue", "volume", "predict", "encode", "send", "visible")


def _found(orthanc: Orthanc, study_uid: str) -> set[str]:
    found = orthanc.request("POST", "/tools/find", {
        "Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SEG\\SR"},
        "Expand": True})
    return {s["MainDicomTags"]["Modality"] for s in found}


def end_to_end(node: NodeProcess, orthanc: Orthanc, study: synth.SyntheticStudy,
               label: str) -> EndToEnd:
    assert node.proc is not None
    uid = study.study_instance_uid
    (orthanc_study,) = [s for s in orthanc.request("GET", "/studies?expand")
                        if s["MainDicomTags"]["StudyInstanceUID"] == uid]
    start = time.time()
    orthanc.request("POST", "/modalities/pacsnode/store",
                    {"Resources": [orthanc_study["ID"]], "Synchronous": True})
    wait_for(lambda: _found(orthanc, uid) >= {"SEG", "SR"}, timeout=3600, interval=0.05)
    end = time.time()
    spool = node.config.parent
    db = spool / "index.db"
    series_uid = study.series[0].series_instance_uid
    ((last, done),) = _query(db, "select last_received_at, completed_at from series "
                                 "where series_instance_uid = ?", series_uid)

    def event(name: str) -> dict[str, Any] | None:
        # Orthanc can list the results a moment before the worker writes its audit line
        lines = (spool / "var" / "audit.jsonl").read_text().splitlines()
        return next((e for e in map(json.loads, lines) if e["event"] == name
                     and e["study_instance_uid"] == uid and e.get("kind", "infer") == "infer"),
                    None)

    inferred = wait_for(lambda: event("inferred"), timeout=60)
    delivered = wait_for(lambda: event("delivered"), timeout=60)
    seconds = inferred["seconds"]
    stages = {
        "receive": _utc(last) - start,
        "wait": _utc(done) - _utc(last),
        "queue": _utc(inferred["started"]) - _utc(done),
        "volume": seconds["volume"], "predict": seconds["predict"],
        "encode": seconds["encode"],
        "send": _utc(delivered["time"]) - _utc(inferred["time"]),
        "visible": end - _utc(delivered["time"]),
    }
    status = json.loads((spool / "spool" / ".worker-status-cpu.json").read_text())
    return EndToEnd(label, stages, end - start, _hwm_mib(node.proc.pid),
                    _hwm_mib(int(status["pid"])))


def start_pair(work: Path, listeners: int | str = AUTO) -> tuple[NodeProcess, Orthanc]:
    node_port = free_port()
    orthanc = Orthanc(work / "orthanc", modalities={
        "pacsnode": ["PACSNODE", "127.0.0.1", node_port]}).start()
    config = write_config(
        work / "node", node={"port": node_port, "listener_processes": listeners},
        models=[{"name": "lesion-ct", "path": str(BUNDLE), "device": "cpu"}],
        destinations=[{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                       "host": "127.0.0.1", "port": orthanc.dicom_port}],
        routes=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["lesion-ct"],
                 "destinations": ["pacs"]}])
    node = NodeProcess(config, node_port).start()
    wait_for(lambda: (config.parent / "spool" / ".worker-status-cpu.json").exists(),
             timeout=120)
    return node, orthanc


def upload(orthanc: Orthanc, files: Sequence[Path]) -> None:
    import urllib.request
    for path in files:
        req = urllib.request.Request(orthanc.url + "/instances", data=path.read_bytes(),
                                     method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=60):
            pass


# -- report -------------------------------------------------------------------------------

def completion_table(rows: Sequence[Completion]) -> str:
    by_mode: dict[str, list[Completion]] = {}
    for row in rows:
        by_mode.setdefault(row.mode, []).append(row)
    lines = ["| completion | runs | last instance → complete, s | last instance → job "
             "claimed, s |", "|---|---:|---:|---:|"]
    for mode, runs in by_mode.items():
        lines.append(f"| {mode} | {len(runs)} | "
                     f"{statistics.median(r.complete_s for r in runs):.3f} | "
                     f"{statistics.median(r.claimed_s for r in runs):.3f} |")
    return "\n".join(lines)


def e2e_table(rows: Sequence[EndToEnd]) -> str:
    lines = ["| study | " + " | ".join(STAGES) + " | total | total − predict | receiver "
             "peak MiB | worker peak MiB |",
             "|---|" + "---:|" * (len(STAGES) + 4)]
    for r in rows:
        lines.append(f"| {r.label} | " + " | ".join(f"{r.stages[s]:.2f}" for s in STAGES)
                     + f" | {r.total_s:.2f} | {r.total_s - r.stages['predict']:.2f} | "
                     f"{r.receiver_mib:.0f} | {r.worker_mib:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--completion-slices", type=int, default=100)
    parser.add_argument("--quiet", type=float, default=2.0,
                        help="series quiet period for the fast-path-off runs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-slices", type=int, default=0,
                        help="also push a study this deep and record peak memory")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--listeners", type=listeners_arg, default=AUTO, metavar="N",
                        help='[node] listener_processes: "auto" (the default) or a number')
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    listeners: int | str = args.listeners
    listeners_text = (f'"auto" (the default: {listener_count(AUTO)} here)'
                      if listeners == AUTO else str(listeners))
    header = (f"- command: `{command_line('bench/latency.py')}`\n- machine: {machine()}\n"
              f"- revision: {revision()}\n- node: listener_processes = {listeners_text}\n")
    sections = []
    with tempfile.TemporaryDirectory(prefix="pacsnode-latency-") as tmp:
        work = Path(tmp)
        small = synth.write_study(synth.make_study(synth.SeriesSpec(
            slices=args.completion_slices, rows=256, columns=256), seed=7101), work / "small")
        rows = []
        for i in range(args.repeat):
            rows.append(completion_run(work / f"fast{i}", small, fast_path=True,
                                       quiet=args.quiet, listeners=listeners))
            rows.append(completion_run(work / f"quiet{i}", small, fast_path=False,
                                       quiet=args.quiet, listeners=listeners))
        table = completion_table(rows)
        print(table)
        sections.append(
            f"## {now}: completion latency, {args.completion_slices} × 256×256 CT, "
            f"one storescu association, median of {args.repeat}\n\n{header}"
            f"- route: forward only (no model), job claimed as seen by polling the index "
            f"every 2 ms\n- target (issue 9): fast path under 1 s\n\n{table}\n")
        if not args.skip_e2e:
            node, orthanc = start_pair(work / "pair", listeners)
            try:
                results = []
                studies = [("first", 7201, args.slices), ("second", 7202, args.slices)]
                if args.memory_slices:
                    studies.append(("memory", 7203, args.memory_slices))
                for label, seed, slices in studies:
                    study = synth.make_study(synth.SeriesSpec(
                        slices=slices, rows=args.size, columns=args.size), seed=seed)
                    upload(orthanc, synth.write_study(study, work / f"s{seed}"))
                    results.append(end_to_end(node, orthanc, study,
                                              f"{label}: {slices} × {args.size}²"))
                    print(e2e_table(results[-1:]))
            finally:
                node.stop()
                orthanc.stop()
            table = e2e_table(results)
            sections.append(
                f"## {now}: end to end, Orthanc push → SEG + SR in Orthanc, reference "
                f"model on CPU\n\n{header}"
                f"- stages (seconds): receive = push start → last instance indexed; wait = "
                f"→ series complete (fast path); queue = → worker starts the job; volume, "
                f"predict, encode = the worker's own timings; send = → delivered to "
                f"Orthanc; visible = → both found by Orthanc's /tools/find (polled every "
                f"50 ms)\n- peak memory: VmHWM of the receiver and the worker process so "
                f"far (cumulative over the rows)\n- target (issue 9): total − predict "
                f"under 3 s for a 300-slice CT\n\n{table}\n")
    text = "\n".join(sections)
    if not args.no_append:
        append_results(text, ROOT / "bench" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
