"""[node] listener_processes = 2: a listener child shares the receiver's listening
socket; both store, the child's releases reach the fast path, its counters
reach /metrics, a killed child is restarted, and SIGTERM stops both."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node import synth
from tests.integration.dbview import IndexView
from tests.integration.test_tls import pki as pki  # a fixture
from tests.support import TCP_ENV, storescu, wait_for

pytestmark = pytest.mark.integration

SERIES_PER_ROUND = 8


def _status(node: Any) -> dict[str, Any] | None:
    files = list((node.config.parent / "spool").glob(".listener-status-*-1.json"))
    if len(files) != 1:
        return None
    try:
        data: dict[str, Any] = json.loads(files[0].read_text())
    except (OSError, ValueError):
        return None
    return data


def _child_instances(node: Any) -> float:
    status = _status(node) or {"counters": []}
    return sum(float(v) for name, _, v in status["counters"]
               if name == "pacsnode_instances_received_total")


def _metric(node: Any, name: str) -> float:
    cfg = node.config.parent
    token = (cfg / "spool" / ".admin-token").read_text().strip()
    port = int(tomllib.loads(node.config.read_text())["http"]["port"])
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def _send_round(node: Any, out: Path, seed: int) -> tuple[set[str], set[str]]:
    """One study of SERIES_PER_ROUND small series, each on its own association, all at
    once. Returns the SOP Instance UIDs and the Series Instance UIDs sent."""
    study = synth.make_study(*(synth.SeriesSpec(slices=5, rows=32, columns=32,
                                                series_number=i + 1, lesions=())
                               for i in range(SERIES_PER_ROUND)), seed=seed)
    files = synth.write_study(study, out / f"round{seed}")
    procs = [subprocess.Popen(
        ["storescu", "-aet", "STORESCU", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
         *map(str, sorted((out / f"round{seed}" / str(s.spec.series_number)).iterdir()))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TCP_ENV)
        for s in study.series]
    for proc in procs:
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0 and "Failed" not in output, output
    assert len(files) == 5 * SERIES_PER_ROUND
    sops = {str(ds.SOPInstanceUID) for s in study.series for ds in s.datasets}
    return sops, {s.series_instance_uid for s in study.series}


def _wait_stored(node: Any, index: IndexView, sops: frozenset[str], already: int) -> None:
    wait_for(lambda: index.sop_uids() >= sops, timeout=20)
    # /metrics adds the child's status file (rewritten every second) to the receiver's
    # own counters: once the sum is right, the file is current
    wait_for(lambda: _metric(node, "pacsnode_instances_received_total")
             == already + len(sops) or None, timeout=10)


def _send_until_both_served(node: Any, out: Path, first_seed: int, index: IndexView,
                            already: int) -> tuple[set[str], set[str]]:
    """Rounds of parallel associations until the child and the receiver each stored
    some of one round (one process may be free for all of a round).
    ``already``: instances the node holds before."""
    sops: set[str] = set()
    series: set[str] = set()
    for seed in range(first_seed, first_seed + 4):
        child_before = _child_instances(node)
        more_sops, more_series = _send_round(node, out, seed)
        sops |= more_sops
        series |= more_series
        _wait_stored(node, index, frozenset(sops), already)
        by_child = _child_instances(node) - child_before
        if 0 < by_child < len(more_sops):
            return sops, series
    raise AssertionError("four rounds of parallel associations all went to one process")


def _fast_path_done(index: IndexView, series: set[str]) -> bool:
    rows = [index.series(uid) for uid in series]
    return all(r is not None and r["state"] == "complete" for r in rows)


def test_two_listener_processes_share_the_port(dcmtk: None, node_factory: Any,
                                               tmp_path: Path) -> None:
    node = node_factory(node={"listener_processes": 2},
                        assembly={"series_quiet_seconds": 60.0, "study_quiet_seconds": 90.0})
    node.start()
    status = wait_for(lambda: _status(node), timeout=20)
    wait_for(lambda: "listener 1 (pid" in node.log(), timeout=20)
    index = IndexView(node.config.parent / "index.db")

    sops, series = _send_until_both_served(node, tmp_path, 1, index, 0)
    # every instance indexed exactly once (primary key), one file each in the spool
    assert index.sop_uids() == sops
    files = [p for p in (node.config.parent / "spool").rglob("*.dcm") if ".tmp" not in p.parts]
    assert len(files) == len(sops)
    # the quiet period is 60 s: only the fast path completes a series this soon, for
    # those the child served too (it reports its releases to the receiver)
    wait_for(lambda: _fast_path_done(index, series), timeout=15)
    assert {(index.series(uid) or {}).get("completion_reason") for uid in series} \
        == {"fast_path"}
    # the child's counters are part of /metrics (the sum was checked while sending)
    assert _metric(node, "pacsnode_associations_total") >= len(series)

    # kill -9 of the child: restarted, and intake goes on through both processes
    old_pid = int(status["pid"])
    os.kill(old_pid, signal.SIGKILL)
    new = wait_for(lambda: (s := _status(node)) is not None and s["pid"] != old_pid and s,
                   timeout=20)
    # (its status file is written once it listens) the counters continue from there
    more_sops, more_series = _send_until_both_served(node, tmp_path, 10, index, len(sops))
    assert index.sop_uids() == sops | more_sops
    wait_for(lambda: _fast_path_done(index, more_series), timeout=15)
    assert {(index.series(uid) or {}).get("completion_reason") for uid in more_series} \
        == {"fast_path"}

    # SIGTERM stops the receiver and its child
    child = int(new["pid"])
    assert node.stop() == 0
    wait_for(lambda: not Path(f"/proc/{child}").exists(), timeout=10)
    log = node.log()
    assert "listener 1 stopped" in log and "Traceback" not in log


def test_the_default_starts_one_listener_process_per_usable_cpu(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    """listener_processes = "auto" (the shipped default): the receiver plus one child per
    further usable CPU, at most AUTO_LISTENERS_MAX in all; a C-STORE and a C-ECHO work."""
    from node.settings import AUTO_LISTENERS_MAX, usable_cpus

    processes = min(usable_cpus(), AUTO_LISTENERS_MAX)
    node = node_factory(node={"listener_processes": "auto"}).start()
    spool = node.config.parent / "spool"
    wait_for(lambda: len(list(spool.glob(".listener-status-*.json"))) == processes - 1,
             timeout=30)
    wait_for(lambda: all(f"listener {i} (pid" in node.log() for i in range(1, processes)),
             timeout=20)
    assert f"listener {processes} (pid" not in node.log()
    study = synth.make_study(synth.SeriesSpec(slices=3, rows=16, columns=16), seed=44)
    files = synth.write_study(study, tmp_path / "ct")
    assert storescu(node.port, files).returncode == 0
    echo = subprocess.run(["echoscu", "-aec", "PACSNODE", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, env=TCP_ENV, timeout=30)
    assert echo.returncode == 0, echo.stderr
    index = IndexView(node.config.parent / "index.db")
    assert index.counts() == (1, 1, 3)
    assert node.stop() == 0 and "Traceback" not in node.log()


def _server_pids(port: int) -> set[int]:
    """Processes holding the node's side of established connections to ``port``."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def test_kill_9_of_a_listener_child_loses_no_acknowledged_instance(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    from tests.integration.test_faults import _acknowledged, _assert_whole

    study = synth.make_study(synth.SeriesSpec(slices=120, rows=256, columns=256), seed=23)
    files = synth.write_study(study, tmp_path / "ct")
    node = node_factory(node={"listener_processes": 2}).start()
    child = int(wait_for(lambda: _status(node), timeout=20)["pid"])
    index = IndexView(node.config.parent / "index.db")
    spool = node.config.parent / "spool"
    log = tmp_path / "storescu.log"
    for _ in range(8):          # until the kernel gives an association to the child
        with log.open("w") as out:
            sender = subprocess.Popen(
                ["storescu", "-v", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
                 *map(str, files)], stdout=out, stderr=subprocess.STDOUT, env=TCP_ENV)
        serving = wait_for(lambda: _server_pids(node.port), timeout=20, interval=0.01)
        if child in serving:
            break
        sender.kill()           # the receiver has it: try again
        sender.wait(10)
    else:
        pytest.fail("eight associations in a row went to the receiver, none to the child")
    # kill it in the middle of the transfer
    wait_for(lambda: log.read_text().count("Received Store Response (Success)") >= 10,
             timeout=60, interval=0.01)
    os.kill(child, signal.SIGKILL)
    assert sender.wait(60) != 0                # the sender saw its association die
    output = log.read_text()
    acked = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
             for p in _acknowledged(output)}
    assert 10 <= len(acked) < len(files)       # it really was mid-transfer
    assert acked <= index.sop_uids()
    paths = index.paths()
    for uid in acked:
        _assert_whole(spool / paths[uid])
    # restarted; its staging folder (where the killed child's half-written file may
    # lie) is emptied, and nothing half-written is visible in the spool
    wait_for(lambda: (s := _status(node)) is not None and s["pid"] != child, timeout=20)
    staging = [d for d in (spool / ".tmp").iterdir() if d.is_dir()]
    assert staging and all(list(d.iterdir()) == [] for d in staging)
    for file in spool.rglob("*.dcm"):
        _assert_whole(file)
    assert storescu(node.port, files).returncode == 0     # the sender's retry completes it
    assert index.counts() == (1, 1, len(files))


def test_a_listener_child_serves_tls_like_the_receiver(
        dcmtk: None, node_factory: Any, pki: Path, tmp_path: Path) -> None:
    """The child builds the same TLS listener: mutual TLS works whichever process gets
    the association, plain TCP is refused by both."""
    node = node_factory(node={"listener_processes": 2,
                              "tls": {"cert_file": str(pki / "server.crt"),
                                      "key_file": str(pki / "server.key"),
                                      "ca_file": str(pki / "ca.crt")}}).start()
    wait_for(lambda: _status(node), timeout=20)
    index = IndexView(node.config.parent / "index.db")
    tls = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
    sent = 0
    for seed in range(30, 42):          # until the child and the receiver have stored some
        study = synth.make_study(synth.SeriesSpec(slices=2, rows=16, columns=16), seed=seed)
        files = synth.write_study(study, tmp_path / f"ct{seed}")
        result = storescu(node.port, files, extra=tls)
        assert result.returncode == 0, result.stderr
        assert storescu(node.port, files).returncode != 0           # plain TCP refused
        sops = frozenset(str(ds.SOPInstanceUID) for s in study.series for ds in s.datasets)
        _wait_stored(node, index, sops, sent)
        sent += len(sops)
        if 0 < _child_instances(node) < sent:
            break
    assert 0 < _child_instances(node) < sent, "TLS associations reached only one process"
