"""Pull mode: fetch new series from DICOMweb or DIMSE sources into the spool, each only once.

Every poll asks the source (through the :class:`node.ports.StudySource` port) for the
series of studies in the look-back window that match its filters, and fetches those it
has not fetched before, or that have grown since (``pulled_series`` remembers, per
source, every series fetched and how many instances it had; it survives restarts). A
study that gains a series later gets only the new series. Instances go through
:meth:`node.intake.Intake.store` like C-STORE ones; a pulled study counts as "released"
once its new series are fetched, which lets assembly's fast path complete it. A series
is recorded only when every instance of it was stored, so a failure is retried at the
next poll. Pulled instances carry the source's name as their CallingAETitle (first 16
characters), so routes can tell them apart; those a DIMSE source sends by C-MOVE come in
through the receiver, which tags them so too (adapters/dimse.py: Move Originator = our
AE title), and the fetch then checks that the index holds as many instances of the
series as the PACS says it sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from urllib.parse import urlparse

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from node.db import InstanceRow, PulledSeriesRow, StudyRow
from node.domain import AssociationInfo
from node.errors import IntakeError, SourceError, StorageFullError
from node.intake import Intake, utcnow
from node.metrics import Metrics
from node.ports import MovedInstances, RemoteSeries, StudySource
from node.settings import SourceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullReport:
    source: str
    offered: int = 0                # series the source listed
    fetched: int = 0                # series fetched (new or grown)
    instances: int = 0              # instances stored
    failed: int = 0                 # instances refused by intake
    error: str | None = None        # why the poll stopped early


class Puller:
    def __init__(self, intake: Intake, engine: Engine, client: StudySource, *,
                 on_released: Callable[[dict[str, int]], None] = lambda _: None,
                 metrics: Metrics | None = None, ae_title: str = "PACSNODE") -> None:
        self.intake = intake
        self.engine = engine
        self.client = client
        self.on_released = on_released
        self.metrics = metrics or Metrics()
        self.ae_title = ae_title

    def poll(self, source: SourceSettings) -> PullReport:
        """One poll of one source; safe to run twice (what is recorded is skipped)."""
        try:
            offered = self.client.find_series(source, since=window_start(source.lookback_hours))
        except SourceError as exc:
            log.warning("pull %s: query failed: %s", source.name, exc)
            return PullReport(source.name, error=str(exc))
        return self._fetch_all(source, self._new_or_grown(source, offered), len(offered))

    def fetch_priors(self, source: SourceSettings, study_instance_uid: str,
                     count: int) -> PullReport:
        """On demand: fetch the ``count`` most recent earlier studies of the same patient
        (QIDO-RS by PatientID, with the source's filters), series not fetched before."""
        with Session(self.engine) as session:
            study = session.get(StudyRow, study_instance_uid)
            patient_id = study.patient_id if study is not None else None
            study_date = (study.study_date if study is not None else None) or "99999999"
        if not patient_id:
            log.info("priors of study %s: no PatientID to search by", study_instance_uid)
            return PullReport(source.name)
        offered = self.client.find_series(source, since=None, extra={"PatientID": patient_id})
        earlier = sorted({(r.study_date or "", r.study_instance_uid) for r in offered
                          if r.study_instance_uid != study_instance_uid
                          and (r.study_date or "") <= study_date}, reverse=True)[:count]
        chosen = {uid for _, uid in earlier}
        others = {r.study_instance_uid for r in offered} - {study_instance_uid}
        log.info("priors of study %s: %d other studies at %s, fetching %d",
                 study_instance_uid, len(others), source.name, len(chosen))
        todo = self._new_or_grown(source, [r for r in offered if r.study_instance_uid in chosen])
        return self._fetch_all(source, todo, len(offered))

    def _fetch_all(self, source: SourceSettings, todo: list[RemoteSeries],
                   offered: int) -> PullReport:
        """Fetch ``todo`` study by study; each study's fetched series are then released."""
        by_study: dict[str, list[RemoteSeries]] = {}
        for remote in todo:
            by_study.setdefault(remote.study_instance_uid, []).append(remote)
        fetched = stored = failed = 0
        for study_uid, series in by_study.items():
            released: dict[str, int] = {}       # series UID -> instances fetched
            for remote in series:
                try:
                    ok, bad = self._fetch(source, remote)
                except (SourceError, StorageFullError) as exc:
                    log.warning("pull %s: series %s: %s", source.name,
                                remote.series_instance_uid, exc)
                    if released:
                        self.on_released(released)
                    return PullReport(source.name, offered, fetched, stored, failed, str(exc))
                stored += ok
                failed += bad
                if ok:
                    released[remote.series_instance_uid] = ok
                if not bad:
                    fetched += 1
            if released:
                log.info("pull %s: study %s: %d series fetched", source.name, study_uid,
                         len(released))
                self.on_released(released)
        if todo:
            log.info("pull %s: %d series offered, %d fetched, %d instances stored, %d refused",
                     source.name, offered, fetched, stored, failed)
        return PullReport(source.name, offered, fetched, stored, failed)

    def _new_or_grown(self, source: SourceSettings,
                      offered: list[RemoteSeries]) -> list[RemoteSeries]:
        with Session(self.engine) as session:
            known = {str(uid): int(count) for uid, count in session.execute(
                select(PulledSeriesRow.series_instance_uid, PulledSeriesRow.instances)
                .where(PulledSeriesRow.source == source.name))}
        return [r for r in offered if r.series_instance_uid not in known
                or (r.instances is not None and r.instances > known[r.series_instance_uid])]

    def _fetch(self, source: SourceSettings, remote: RemoteSeries) -> tuple[int, int]:
        """Fetch one series into intake; record it when nothing was refused."""
        address = source.host if source.kind == "dimse" else urlparse(str(source.url)).hostname
        peer = AssociationInfo(calling_ae_title=source.name[:16], called_ae_title=self.ae_title,
                               address=address or "")
        ok = bad = 0
        log.info("pull %s: fetching series %s", source.name, remote.series_instance_uid)
        for data in self.client.fetch_series(source, remote.study_instance_uid,
                                             remote.series_instance_uid):
            if isinstance(data, MovedInstances):
                ok += self._check_moved(source, remote, data.count)
                continue
            try:
                outcome = self.intake.store(data, peer=peer)
            except StorageFullError:
                raise
            except IntakeError as exc:
                bad += 1
                log.warning("pull %s: an instance of series %s refused: %s", source.name,
                            remote.series_instance_uid, exc)
                continue
            ok += 1
            self.metrics.inc("pacsnode_instances_pulled_total", source=source.name)
            self.metrics.inc("pacsnode_bytes_received_total", float(outcome.size))
        if not bad:
            self._record(source, remote, ok)
        return ok, bad

    def _check_moved(self, source: SourceSettings, remote: RemoteSeries, count: int) -> int:
        """After a C-MOVE: the receiver stored the instances; make sure they are here (a
        PACS that maps our AE title to another address reports success all the same)."""
        with Session(self.engine) as session:
            here = session.scalar(select(func.count()).select_from(InstanceRow).where(
                InstanceRow.series_instance_uid == remote.series_instance_uid)) or 0
        if here < count:
            raise SourceError(f"{source.name}: C-MOVE of series {remote.series_instance_uid} "
                              f"reported {count} instances sent, {here} are here; does the "
                              f"PACS know this node's AE title with this address and port?")
        self.metrics.inc("pacsnode_instances_pulled_total", float(count), source=source.name)
        return count

    def _record(self, source: SourceSettings, remote: RemoteSeries, count: int) -> None:
        now = utcnow()
        with Session(self.engine) as session, session.begin():
            row = session.get(PulledSeriesRow, (source.name, remote.series_instance_uid))
            instances = max(count, remote.instances or 0)
            if row is None:
                session.add(PulledSeriesRow(
                    source=source.name, series_instance_uid=remote.series_instance_uid,
                    study_instance_uid=remote.study_instance_uid, instances=instances,
                    fetched_at=now, last_seen_at=now))
            else:
                row.instances = max(row.instances, instances)
                row.fetched_at = row.last_seen_at = now


def window_start(lookback_hours: float) -> date | None:
    """The first StudyDate a poll asks for (None: no window)."""
    return (utcnow() - timedelta(hours=lookback_hours)).date() if lookback_hours else None
