"""The outbox: each destination of a job with its own tries, backoff and dead letter;
``retry`` sends again only to the destinations not served. The destinations here are a
small recording Sender; tests/integration/test_delivery_orthanc.py does it with Orthanc."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from node.db import DeliveryRow, JobRow
from node.errors import ConfigError, DeliveryError
from node.forward import deliver
from node.jobs import JobSpec, JobStateValues, JobStore
from node.outbox import DeliveryStateValues, Outbox
from node.ports import SendReport
from node.settings import DestinationSettings, Settings, load_settings
from tests.unit.helpers import Rig

SETTINGS = Settings(destinations=(
    DestinationSettings(name="good", kind="dimse", ae_title="GOOD", host="h", port=104),
    DestinationSettings(name="bad", kind="dimse", ae_title="BAD", host="h", port=104)))


class _Destinations:
    """Accepts for every name in ``up``, else raises a retryable DeliveryError."""

    def __init__(self, up: set[str]) -> None:
        self.up = up
        self.calls: list[str] = []

    def send(self, destination: DestinationSettings, paths: Sequence[Path]) -> SendReport:
        self.calls.append(destination.name)
        if destination.name not in self.up:
            raise DeliveryError(f"{destination.name} did not answer", retryable=True)
        return SendReport(destination.name, len(paths))

    def echo(self, destination: DestinationSettings) -> float:
        return 0.0


def _job(store: JobStore, step: str | None = None) -> int:
    with Session(store.engine) as session, session.begin():
        store.add(session, JobSpec("k", "forward", "r", "1.2", "1.2.3", 1,
                                   {"destinations": ["good", "bad"]}))
        if step is not None:
            session.execute(update(JobRow).values(step=step))
    return store.list()[0].id


def _run(store: JobStore, sender: _Destinations) -> None:
    with Session(store.engine) as session, session.begin():     # everything due now
        session.execute(update(JobRow).values(not_before=None))
        session.execute(update(DeliveryRow).values(next_attempt_at=None))
    job = store.claim({"forward"})
    assert job is not None
    deliver(job, store, [Path("a.dcm"), Path("b.dcm")], SETTINGS, sender)


def test_each_destination_retries_and_dead_letters_on_its_own(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs              # max_attempts 3, retry_base_seconds 1
    outbox = Outbox(store.engine, store.settings)
    job_id = _job(store)
    sender = _Destinations(up={"good"})
    _run(store, sender)
    job = store.get(job_id)
    rows = {d.destination: d for d in outbox.list(job_id)}
    assert rows["good"].state is DeliveryStateValues.SENT and rows["good"].instances == 2
    assert rows["bad"].state is DeliveryStateValues.PENDING and rows["bad"].attempts == 1
    assert job.state is JobStateValues.PENDING and job.not_before == rows["bad"].next_attempt_at
    assert "bad" in (job.last_error or "") and job.step == "sent:good"
    _run(store, sender)
    _run(store, sender)
    assert sender.calls == ["good", "bad", "bad", "bad"]     # the good one was served once
    job = store.get(job_id)
    assert job.state is JobStateValues.DEAD and "did not answer" in (job.last_error or "")
    assert {d.destination: d.state for d in outbox.list(job_id)}["bad"] is \
        DeliveryStateValues.DEAD

    sender.up.add("bad")
    store.retry(job_id)
    rows = {d.destination: d for d in outbox.list(job_id)}
    assert rows["bad"].state is DeliveryStateValues.PENDING and rows["bad"].attempts == 0
    assert rows["good"].state is DeliveryStateValues.SENT
    _run(store, sender)
    assert sender.calls[-1:] == ["bad"] and sender.calls.count("good") == 1
    assert store.get(job_id).state is JobStateValues.DONE


def test_a_step_from_before_the_outbox_counts_as_sent(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    job_id = _job(store, step="sent:good")
    sender = _Destinations(up={"good", "bad"})
    _run(store, sender)
    assert sender.calls == ["bad"]
    assert store.get(job_id).step == "sent:bad,good"


def test_a_removed_destination_fails_without_retries(tmp_path: Path) -> None:
    store = Rig(tmp_path).jobs
    job_id = _job(store)
    job = store.claim({"forward"})
    assert job is not None
    only_good = Settings(destinations=SETTINGS.destinations[:1])
    deliver(job, store, [Path("a.dcm")], only_good, _Destinations(up={"good"}))
    assert store.get(job_id).state is JobStateValues.FAILED
    rows = {d.destination: d for d in Outbox(store.engine, store.settings).list(job_id)}
    assert rows["bad"].state is DeliveryStateValues.FAILED
    assert "no destination named 'bad'" in (rows["bad"].last_error or "")


def test_transfer_syntax_is_checked_at_load(tmp_path: Path) -> None:
    config = tmp_path / "pacsnode.toml"
    config.write_text('[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "P"\n'
                      'host = "h"\nport = 104\ntransfer_syntax = "1.2.840.10008.1.2.4.50"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    text = str(caught.value)
    assert "destinations[0].transfer_syntax" in text and "1.2.840.10008.1.2.4.50" in text
    assert '"as-is"' in text and "Deflated" in text
    config.write_text(config.read_text().replace("1.2.840.10008.1.2.4.50",
                                                 "1.2.840.10008.1.2"))
    assert load_settings(config).destinations[0].transfer_syntax == "1.2.840.10008.1.2"


def test_a_compressed_object_is_refused_not_sent_in_another_syntax(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEGBaseline8Bit

    from node.transcode import convert

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    with pytest.raises(DeliveryError, match="cannot be converted") as caught:
        convert(ds, "1.2.840.10008.1.2", "x.dcm")
    assert caught.value.retryable is False
    assert convert(ds, "as-is", "x.dcm") is ds


def test_a_database_from_before_the_outbox_gets_the_table(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, inspect

    from node.db import make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE deliveries")
    engine.dispose()
    assert "deliveries" not in inspect(create_engine(url)).get_table_names()
    again = make_engine(url)
    assert "deliveries" in inspect(again).get_table_names()
