"""Pull logic against a folder source (the StudySource port's offline implementation)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import date
from pathlib import Path

from node.errors import SourceError
from node.domain import AssociationInfo
from node.intake import Intake
from node.ports import MovedInstances, RemoteSeries
from node.pull import Puller
from node.settings import SourceSettings
from tests.unit.helpers import Rig, encode, small_series

SOURCE = SourceSettings(name="archive", kind="dicomweb", url="http://archive.example/dw",
                        lookback_hours=0)


class FolderSource:
    """Series as lists of Part 10 byte strings; counts what was fetched."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], list[bytes]] = {}
        self.fetches: list[str] = []
        self.down = False

    def add(self, seed: int, slices: int = 4) -> tuple[str, str, list[bytes]]:
        s = small_series(slices, seed=seed)
        data = [encode(ds) for ds in s.datasets]
        study = str(s.datasets[0].StudyInstanceUID)
        self.series[(study, s.series_instance_uid)] = data
        return study, s.series_instance_uid, data

    def find_series(self, source: SourceSettings, *, since: date | None,
                    extra: Mapping[str, str] | None = None) -> list[RemoteSeries]:
        if self.down:
            raise SourceError(f"{source.name}: HTTP 503 from {source.url}")
        return [RemoteSeries(study, series, len(data))
                for (study, series), data in self.series.items()]

    def fetch_series(self, source: SourceSettings, study_instance_uid: str,
                     series_instance_uid: str) -> Iterator[bytes]:
        self.fetches.append(series_instance_uid)
        yield from self.series[(study_instance_uid, series_instance_uid)]


def test_each_series_is_fetched_once_and_again_only_when_it_grows(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    folder = FolderSource()
    released: list[dict[str, int]] = []
    puller = Puller(rig.intake, rig.engine, folder, on_released=released.append)
    _, first, _ = folder.add(1)
    report = puller.poll(SOURCE)
    assert (report.offered, report.fetched, report.instances) == (1, 1, 4)
    assert released == [{first: 4}]         # the series and the instances fetched of it
    assert puller.poll(SOURCE).fetched == 0
    # a restart is a new Puller on the same database: still nothing to fetch
    again = Puller(rig.intake, rig.engine, folder)
    assert again.poll(SOURCE).fetched == 0
    assert folder.fetches == [first]
    # an instance more on the source: the series is fetched again (the rest are duplicates)
    data = next(iter(folder.series.values()))
    extra = small_series(5, seed=1).datasets[4]
    data.append(encode(extra))
    assert again.poll(SOURCE).fetched == 1
    assert folder.fetches == [first, first]


def test_refused_instance_leaves_the_series_unrecorded_and_source_errors_are_reported(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    folder = FolderSource()
    puller = Puller(rig.intake, rig.engine, folder)
    _, series, data = folder.add(2)
    data.append(b"not DICOM")
    report = puller.poll(SOURCE)
    assert (report.instances, report.failed, report.fetched) == (4, 1, 0)
    data.pop()
    assert puller.poll(SOURCE).fetched == 1            # retried at the next poll
    assert folder.fetches == [series, series]
    folder.down = True
    report = puller.poll(SOURCE)
    assert report.error is not None and "HTTP 503" in report.error


def test_fetch_priors_routes_name_a_configured_source() -> None:
    import pytest
    from pydantic import ValidationError

    from node.settings import Settings

    route = {"name": "p", "level": "study", "action": "fetch_priors", "match": {}}
    with pytest.raises(ValidationError, match="needs source"):
        Settings.model_validate({"routes": [route]})
    with pytest.raises(ValidationError, match=r"routes\[0\].source: unknown source 'nope'"):
        Settings.model_validate({"routes": [{**route, "source": "nope"}]})
    ok = Settings.model_validate({"routes": [{**route, "source": "archive", "priors": 2}],
                                  "sources": [SOURCE.model_dump()]})
    assert ok.routes[0].priors == 2


class MovingSource(FolderSource):
    """C-MOVE as the Puller sees it: the instances go to the node's receiver (here the
    intake directly, when ``deliver``), and the fetch yields only how many were sent."""

    def __init__(self, intake: Intake) -> None:
        super().__init__()
        self.intake = intake
        self.deliver = True

    def fetch_series(self, source: SourceSettings, study_instance_uid: str,
                     series_instance_uid: str) -> Iterator[bytes | MovedInstances]:
        self.fetches.append(series_instance_uid)
        data = self.series[(study_instance_uid, series_instance_uid)]
        if self.deliver:
            for item in data:
                self.intake.store(item, peer=AssociationInfo("ORTHANC", "PACSNODE", "::1"))
        yield MovedInstances(len(data))


def test_a_move_counts_as_fetched_only_when_the_instances_are_in_the_index(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    moving = MovingSource(rig.intake)
    puller = Puller(rig.intake, rig.engine, moving)
    _, series, _ = moving.add(3)
    moving.deliver = False               # the PACS sent them to some other address
    report = puller.poll(SOURCE)
    assert report.fetched == 0 and report.error is not None
    assert "reported 4 instances sent, 0 are here" in report.error
    moving.deliver = True
    report = puller.poll(SOURCE)         # retried, and now they arrive
    assert (report.fetched, report.instances, report.error) == (1, 4, None)
    assert puller.poll(SOURCE).fetched == 0
    assert moving.fetches == [series, series]
