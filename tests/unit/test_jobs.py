from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from node.db import JobRow
from node.errors import DeliveryError, JobError
from node.jobs import Job, JobRunner, JobSpec, JobStateValues, JobStore
from tests.unit.helpers import Rig


def _spec(key: str, priority: int = 50, kind: str = "forward") -> JobSpec:
    return JobSpec(key, kind, "r", "1.2.3", "1.2.3.4", 1, {"destinations": ["pacs"]}, priority)


def _add(store: JobStore, *specs: JobSpec) -> None:
    with Session(store.engine) as session, session.begin():
        for spec in specs:
            store.add(session, spec)


def test_same_key_is_added_once(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    _add(store, _spec("a"))
    with Session(store.engine) as session, session.begin():
        assert store.add(session, _spec("a")) is False
    assert len(store.list()) == 1


def test_claim_takes_highest_priority_first_and_only_known_kinds(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    _add(store, _spec("low", 10), _spec("stat", 90), _spec("infer", 100, kind="infer"))
    first = store.claim({"forward"})
    assert first is not None and first.key == "stat" and first.state is JobStateValues.RUNNING
    assert first.attempts == 1
    second = store.claim({"forward"})
    assert second is not None and second.key == "low"
    assert store.claim({"forward"}) is None
    assert store.list(state="pending")[0].kind == "infer"


def test_failure_backs_off_exponentially_then_dead_letters(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs     # max_attempts 3, base 1 s
    _add(store, _spec("a"))
    delays = []
    for attempt in range(1, 4):
        with Session(store.engine) as s, s.begin():   # let it be claimable now
            s.execute(update(JobRow).values(not_before=None))
        job = store.claim({"forward"})
        assert job is not None and job.attempts == attempt
        state = store.fail(job.id, "pacs down", retryable=True)
        after = store.get(job.id)
        if attempt < 3:
            assert state is JobStateValues.PENDING and after.not_before is not None
            delays.append((after.not_before - after.updated_at).total_seconds())
        else:
            assert state is JobStateValues.DEAD
    assert delays[0] == pytest.approx(1, abs=0.1) and delays[1] == pytest.approx(2, abs=0.1)
    assert store.get(job.id).last_error == "pacs down"
    revived = store.retry(job.id)
    assert revived.state is JobStateValues.PENDING and revived.attempts == 0


def test_backoff_is_capped(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    from node.settings import JobSettings
    store = JobStore(rig.engine, JobSettings(retry_base_seconds=100, retry_max_seconds=150,
                                             max_attempts=10))
    _add(store, _spec("a"))
    for _ in range(3):
        with Session(store.engine) as s, s.begin():
            s.execute(update(JobRow).values(not_before=None))
        job = store.claim({"forward"})
        assert job is not None
        store.fail(job.id, "x", retryable=True)
    after = store.get(job.id)
    assert after.not_before is not None
    assert after.not_before - after.updated_at <= timedelta(seconds=150.5)


def test_not_retryable_fails_at_once_and_cancel_rules(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    _add(store, _spec("a"), _spec("b"))
    job = store.claim({"forward"})
    assert job is not None
    assert store.fail(job.id, "bad", retryable=False) is JobStateValues.FAILED
    with pytest.raises(JobError, match="already failed"):
        store.cancel(job.id)
    other = store.list(state="pending")[0]
    assert store.cancel(other.id).state is JobStateValues.CANCELLED
    _add(store, _spec("c"))
    done = store.claim({"forward"})
    assert done is not None
    store.advance(done.id, JobStateValues.DONE)
    with pytest.raises(JobError, match="only failed, dead or cancelled"):
        store.retry(done.id)
    with pytest.raises(JobError, match="no job with id 999"):
        store.get(999)


def test_recover_resumes_in_flight_jobs_with_their_step(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    _add(store, _spec("a"))
    job = store.claim({"forward"})
    assert job is not None
    store.advance(job.id, JobStateValues.DELIVERING, step="sent:pacs")
    # a kill -9 here; on restart:
    assert store.recover() == 1
    again = store.claim({"forward"})
    assert again is not None and again.id == job.id and again.step == "sent:pacs"


def test_runner_maps_errors_to_states(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    _add(store, _spec("ok"), _spec("retry"), _spec("bug"))
    seen: list[str] = []

    def handler(job: Job, s: JobStore) -> None:
        seen.append(job.key)
        if job.key == "retry":
            raise DeliveryError("down", retryable=True)
        if job.key == "bug":
            raise RuntimeError("oops")
        s.advance(job.id, JobStateValues.DONE)

    runner = JobRunner(store, {"forward": handler})
    while runner.run_once():
        pass
    states = {j.key: (j.state, j.last_error) for j in store.list()}
    assert states["ok"][0] is JobStateValues.DONE
    assert states["retry"] == (JobStateValues.PENDING, "down")
    assert states["bug"][0] is JobStateValues.PENDING and "oops" in (states["bug"][1] or "")
    assert sorted(seen) == ["bug", "ok", "retry"]


def test_follow_up_supersedes_an_unstarted_job_of_the_same_route(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    g1 = JobSpec("r:g1", "infer", "r", "1.2.3", "1.2.3.4", 1, {"model": "m"})
    started = JobSpec("s:g1", "infer", "s", "1.2.3", "1.2.3.4", 1, {"model": "m"})
    _add(store, g1, started)
    running = store.claim({"infer"})             # takes one of them
    assert running is not None
    _add(store, JobSpec("r:g2", "infer", "r", "1.2.3", "1.2.3.4", 2, {"model": "m"}),
         JobSpec("s:g2", "infer", "s", "1.2.3", "1.2.3.4", 2, {"model": "m"}))
    states = {j.key: (j.state, j.last_error) for j in store.list()}
    unstarted = "s:g1" if running.key == "r:g1" else "r:g1"
    assert states[unstarted] == (JobStateValues.CANCELLED, "superseded by generation 2")
    assert states[running.key][0] is JobStateValues.RUNNING      # already started: left alone
    assert states["r:g2"][0] is states["s:g2"][0] is JobStateValues.PENDING


def test_wait_seconds_delays_the_job(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    _add(store, JobSpec("w", "forward", "r", "1.2.3", None, 1, {}, 50, delay_seconds=120))
    assert store.claim({"forward"}) is None
    job = store.list()[0]
    assert job.not_before is not None
    assert timedelta(seconds=119) < job.not_before - job.created_at <= timedelta(seconds=121)


def test_device_queues_are_claimed_only_by_their_worker(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    _add(store, JobSpec("a", "infer", "r", "1", "1.1", 1, {"model": "ct"}, 50, queue="cuda:0"),
         JobSpec("b", "infer", "r", "1", "1.2", 1, {"model": "mr"}, 90, queue="cuda:1"))
    first = store.claim({"infer"}, {"cuda:0"})
    assert first is not None and first.key == "a"       # not b, though b is more urgent
    assert store.claim({"infer"}, {"cuda:0"}) is None
    assert store.recover(kinds={"infer"}, queues={"cuda:1"}) == 0   # a is not cuda:1's
    assert store.get(first.id).state is JobStateValues.RUNNING
    second = store.claim({"infer"})
    assert second is not None and second.key == "b"


def test_running_job_without_heartbeat_is_requeued_with_its_step(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    _add(store, _spec("hung"), _spec("alive"))
    hung = store.claim({"forward"})
    alive = store.claim({"forward"})
    assert hung is not None and alive is not None
    store.advance(hung.id, JobStateValues.DELIVERING, step="sent:a")
    with Session(store.engine) as session, session.begin():
        session.execute(update(JobRow).where(JobRow.id.in_([hung.id, alive.id]))
                        .values(updated_at=JobRow.updated_at - timedelta(seconds=700)))
    store.heartbeat({alive.id})                 # its runner is still beating
    assert store.requeue_stale(600) == 1
    back = store.get(hung.id)
    assert back.state is JobStateValues.PENDING and back.step == "sent:a"
    assert "lease expired" in (back.last_error or "")
    assert store.get(alive.id).state is JobStateValues.RUNNING
    assert store.requeue_stale(600) == 0        # safe to run twice


def test_runner_beats_while_a_job_runs(tmp_path: Path) -> None:
    import threading

    store = Rig(tmp_path).jobs
    _add(store, _spec("slow"))
    release = threading.Event()
    seen: list[Job] = []

    def slow(job: Job, s: JobStore) -> None:
        seen.append(job)
        release.wait(5)
        s.advance(job.id, JobStateValues.DONE)

    runner = JobRunner(store, {"forward": slow}, heartbeat_seconds=0.05)
    runner.start()
    try:
        for _ in range(100):
            if seen:
                break
            threading.Event().wait(0.05)
        first = store.get(seen[0].id).updated_at
        threading.Event().wait(0.3)
        assert store.get(seen[0].id).updated_at > first
        assert store.requeue_stale(60) == 0
    finally:
        release.set()
        runner.stop()
    assert store.get(seen[0].id).state is JobStateValues.DONE
