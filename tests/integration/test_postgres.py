"""PostgreSQL as the shared index and job table: several receivers on one database and one
spool, concurrent claimers, and recovery after kill -9 — against a real PostgreSQL server
the test starts on a free loopback port."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from node import synth
from node.db import make_engine
from node.jobs import JobSpec, JobStateValues, JobStore
from node.settings import JobSettings
from sqlalchemy.orm import Session
from tests.integration.pgserver import (
    PgView,
    PostgresServer,
    _bindir,
    fresh_database,
    without_password,
)
from tests.support import ROOT, TCP_ENV, storescu, wait_for

pytestmark = pytest.mark.integration


def _storage(pg: PostgresServer, tmp_path: Path, name: str, spool: Path) -> dict[str, Any]:
    """A node's [storage] on the shared database: the password comes from a file."""
    return {"spool": str(spool), "min_free_mb": 0,
            "database": without_password(fresh_database(pg, name)),
            "database_password_file": str(pg.password_file(tmp_path))}


def _orthanc_instances(orthanc: Any, study_uid: str) -> list[str]:
    found = orthanc.request("POST", "/tools/find", {
        "Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
    return list(found)


def test_two_receivers_share_one_database_and_spool_and_process_each_series_once(
        dcmtk: None, postgres: PostgresServer, node_factory: Any, orthanc_factory: Any,
        tmp_path: Path) -> None:
    orthanc = orthanc_factory().start()
    spool = tmp_path / "shared-spool"
    storage = _storage(postgres, tmp_path, "receivers", spool)
    common: dict[str, Any] = {
        "storage": storage,
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                          "host": "127.0.0.1", "port": orthanc.dicom_port}],
        "routes": [{"name": "fwd", "match": {"Modality": "CT"}, "destinations": ["pacs"]}],
    }
    a = node_factory(**common).start()
    b = node_factory(**common).start()
    studies = [synth.make_study(synth.SeriesSpec(slices=12, rows=32, columns=32),
                                seed=700 + i) for i in range(3)]
    files = [synth.write_study(s, tmp_path / f"study{i}") for i, s in enumerate(studies)]
    # study 0 to A, study 1 to B, and study 2 to both at once: every instance of it is
    # inserted by one receiver and a duplicate at the other
    senders = [subprocess.Popen(
        ["storescu", "-aec", "PACSNODE", "127.0.0.1", str(port), *map(str, f)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TCP_ENV)
        for port, f in ((a.port, files[0]), (b.port, files[1]), (a.port, files[2]),
                        (b.port, files[2]))]
    outputs = [p.communicate(timeout=120)[0] for p in senders]
    assert [p.returncode for p in senders] == [0] * 4, outputs
    view = PgView(postgres.url.rsplit("/", 1)[0] + "/receivers")
    try:
        wait_for(lambda: len(view.jobs()) >= 3
                 and all(j["state"] == "done" for j in view.jobs()), timeout=90, interval=0.2)
        jobs = view.jobs()
        assert len(view.sop_uids()) == 36
        # files are referenced relative to the spool root, so every host may mount it
        # at its own path
        assert all(not p.startswith("/") and (spool / p).is_file() for p in view.paths())
    finally:
        view.close()
    per_series = Counter(j["series_instance_uid"] for j in jobs)
    assert sorted(per_series.values()) == [1, 1, 1], jobs
    assert {j["generation"] for j in jobs} == {1}
    assert {j["owner"].rsplit(":", 1)[1] for j in jobs} <= {f"receiver-{a.port}",
                                                            f"receiver-{b.port}"}
    for study in studies:
        assert len(_orthanc_instances(orthanc, study.study_instance_uid)) == 12


_CLAIMER = """
import json, sys, threading
from node.db import make_engine
from node.jobs import JobStateValues, JobStore
from node.settings import JobSettings
store = JobStore(make_engine(sys.argv[1]), JobSettings(), owner="child")
got = []
def work():
    while (job := store.claim({"infer"})) is not None:
        got.append(job.id)
        store.advance(job.id, JobStateValues.DONE)
threads = [threading.Thread(target=work) for _ in range(4)]
print("ready", flush=True)
sys.stdin.readline()
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(got))
"""


def test_concurrent_claimers_in_threads_and_processes_never_take_one_job_twice(
        postgres: PostgresServer) -> None:
    url = fresh_database(postgres, "claims")
    stores = [JobStore(make_engine(url), JobSettings(), owner=f"parent-{i}") for i in range(2)]
    with Session(stores[0].engine) as session, session.begin():
        for i in range(240):
            stores[0].add(session, JobSpec(key=f"job-{i}", kind="infer", route="r",
                                           study_instance_uid=f"1.2.{i}",
                                           series_instance_uid=None, generation=1,
                                           payload={}, priority=i % 3 * 10))
    claimed: list[int] = []
    lock = threading.Lock()

    def work(store: JobStore) -> None:
        while (job := store.claim({"infer"})) is not None:
            with lock:
                claimed.append(job.id)
            store.advance(job.id, JobStateValues.DONE)

    child = subprocess.Popen([sys.executable, "-c", _CLAIMER, url], stdout=subprocess.PIPE,
                             stdin=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "ready"
    threads = [threading.Thread(target=work, args=(stores[i % 2],)) for i in range(6)]
    child.stdin.write("go\n")
    child.stdin.flush()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    out, _ = child.communicate(timeout=120)
    by_child = json.loads(out)
    everything = claimed + by_child
    assert len(everything) == 240
    assert len(set(everything)) == 240, Counter(everything).most_common(3)
    assert by_child and claimed, "both the child process and the threads took jobs"
    assert {j.state for j in stores[0].list(limit=300)} == {JobStateValues.DONE}
    for store in stores:
        store.engine.dispose()


def test_owner_scoped_recovery_takes_back_only_its_own_jobs(postgres: PostgresServer) -> None:
    url = fresh_database(postgres, "owners")
    first = JobStore(make_engine(url), JobSettings(), owner="host-a:worker")
    other = JobStore(make_engine(url), JobSettings(), owner="host-b:worker")
    with Session(first.engine) as session, session.begin():
        for i in range(2):
            first.add(session, JobSpec(key=f"k{i}", kind="infer", route="r",
                                       study_instance_uid="1.2", series_instance_uid=f"1.2.{i}",
                                       generation=1, payload={}))
    mine, theirs = first.claim({"infer"}), other.claim({"infer"})
    assert mine is not None and theirs is not None and mine.id != theirs.id
    # host-a restarts after a crash: it resumes its own job, not the one host-b still runs
    restarted = JobStore(make_engine(url), JobSettings(), owner="host-a:worker")
    assert restarted.recover(kinds={"infer"}) == 1
    assert restarted.get(mine.id).state is JobStateValues.PENDING
    assert restarted.get(theirs.id).state is JobStateValues.RUNNING
    assert restarted.get(theirs.id).owner == "host-b:worker"
    # host-b is gone for good: the admin releases its job (pacsnode jobs release)
    assert restarted.release_owner("host-b:worker") == 1
    assert restarted.get(theirs.id).state is JobStateValues.PENDING
    for store in (first, other, restarted):
        store.engine.dispose()


def test_kill_9_with_a_job_in_flight_resumes_it_on_postgresql(
        dcmtk: None, postgres: PostgresServer, node_factory: Any, orthanc_factory: Any,
        tmp_path: Path) -> None:
    orthanc = orthanc_factory()             # not started: its DICOM port first hangs
    hang = socket.socket()
    hang.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hang.bind(("127.0.0.1", orthanc.dicom_port))
    hang.listen(8)                           # accepts, never answers: the job stays in flight
    node = node_factory(
        storage=_storage(postgres, tmp_path, "recovery", tmp_path / "spool"),
        destinations=[{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                       "host": "127.0.0.1", "port": orthanc.dicom_port,
                       "timeout_seconds": 60.0}],
        routes=[{"name": "fwd", "match": {"Modality": "CT"}, "destinations": ["pacs"]}]).start()
    study = synth.make_study(synth.SeriesSpec(slices=6, rows=32, columns=32), seed=900)
    files = synth.write_study(study, tmp_path / "study")
    assert storescu(node.port, files).returncode == 0
    view = PgView(postgres.url.rsplit("/", 1)[0] + "/recovery")
    try:
        job = wait_for(lambda: next((j for j in view.jobs()
                                     if j["state"] in ("running", "delivering")), None),
                       timeout=60, interval=0.05)
        assert job["owner"].endswith(f":receiver-{node.port}")
        node.kill9()
        hang.close()
        orthanc.start()
        node.start()
        done = wait_for(lambda: next((j for j in view.jobs() if j["state"] == "done"), None),
                        timeout=90, interval=0.2)
        assert done["id"] == job["id"] and done["attempts"] == job["attempts"] + 1
        assert len(view.jobs()) == 1
    finally:
        view.close()
    assert len(_orthanc_instances(orthanc, study.study_instance_uid)) == 6
    assert "resumed 1 job(s)" in node.log()


def test_a_database_outage_refuses_c_store_and_heals_when_it_is_back(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    bindir = _bindir()
    assert bindir is not None
    own = Path(tempfile.mkdtemp(prefix="pacsnode-pg-"))
    own.chmod(0o755)
    server = PostgresServer(own / "pg", bindir).start()   # its own server: it goes down
    try:
        node = node_factory(storage=_storage(server, tmp_path, "outage",
                                             tmp_path / "spool")).start()
        study = synth.make_study(synth.SeriesSpec(slices=4, rows=32, columns=32), seed=950)
        files = synth.write_study(study, tmp_path / "study")
        assert storescu(node.port, files[:2]).returncode == 0
        server.pause()
        refused = storescu(node.port, files[2:], extra=["-v"])
        # nothing is acknowledged that is not indexed: the sender is told to retry later
        assert "Refused: OutOfResources" in refused.stderr, refused.stderr[-1500:]
        assert "Received Store Response (Success)" not in refused.stderr
        server.resume()
        again = storescu(node.port, files[2:])
        assert again.returncode == 0, again.stderr
        view = PgView(server.url.rsplit("/", 1)[0] + "/outage")
        try:
            assert len(view.sop_uids()) == 4
        finally:
            view.close()
        assert "A700" in node.log()
    finally:
        server.stop()
        shutil.rmtree(own, ignore_errors=True)
