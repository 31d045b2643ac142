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
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from node import synth
from node.db import make_engine
from node.jobs import JobSpec, JobStateValues, JobStore
from node.schedule import Scheduler, Task, every, table_for
from node.settings import JobSettings, ScheduleSettings
from sqlalchemy import text as sql_text
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


def test_receivers_sharing_a_database_keep_their_own_schedules_and_run_shared_tasks_once(
        postgres: PostgresServer) -> None:
    url = fresh_database(postgres, "schedules")
    runs: Counter[str] = Counter()
    spans: list[tuple[float, float]] = []          # each run of the once task

    def poll() -> None:
        runs["poll"] += 1

    def retention() -> None:                        # longer than its interval
        start = time.monotonic()
        time.sleep(1.5)
        spans.append((start, time.monotonic()))

    a = Scheduler(make_engine(url), ScheduleSettings(), owner="host-a:receiver-104")
    b = Scheduler(make_engine(url), ScheduleSettings(), owner="host-b:receiver-104")
    a.start([Task("poll:pacs", poll, every(1), once=True),
             Task("retention", retention, every(1), once=True)])
    b.start([Task("retention", retention, every(1), once=True)])   # no source configured
    try:
        time.sleep(5)
        # neither removed the other's tasks: receiver a still polls the source it has
        assert a.job_ids() == ["poll:pacs", "retention"] and b.job_ids() == ["retention"]
        assert runs["poll"] >= 3
    finally:
        a.stop()
        b.stop()
    # both tried the shared task every second; it never ran on both at once
    assert len(spans) >= 2
    ordered = sorted(spans)
    assert all(later[0] >= earlier[1] for earlier, later in zip(ordered, ordered[1:]))
    with make_engine(url).connect() as conn:       # each receiver's jobs in its own table
        tables = {t: conn.execute(sql_text(f"SELECT id FROM {t} ORDER BY id")).scalars().all()
                  for t in (table_for("host-a:receiver-104"), table_for("host-b:receiver-104"))}
    assert list(tables.values()) == [["poll:pacs", "retention"], ["retention"]]


def test_table_names_per_owner_are_distinct_valid_identifiers() -> None:
    long = "a-very-long-host-name.example.hospital.org:receiver-11112"
    names = {table_for(o) for o in ("h:receiver-1", "h:receiver-2", long, long + "x")}
    assert len(names) == 4
    assert all(len(n) <= 63 and n.replace("_", "").isalnum() for n in names)
    assert table_for(None) == "scheduled_jobs"
