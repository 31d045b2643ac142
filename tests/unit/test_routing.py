from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from node.domain import CompletedUnit, CompletionReasonValues
from node.routing import CompiledRoute, decide, job_specs
from node.settings import RouteSettings

CT = {"SeriesInstanceUID": "1.1", "SeriesNumber": 1, "Modality": "CT", "SliceThickness": "1.0",
      "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "NumberOfInstances": 300}
CT_THICK = {**CT, "SeriesInstanceUID": "1.2", "SeriesNumber": 2, "SliceThickness": "5.0",
            "NumberOfInstances": 60}
SCOUT = {**CT, "SeriesInstanceUID": "1.3", "SeriesNumber": 3,
         "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "NumberOfInstances": 2}
MR = {"SeriesInstanceUID": "2.1", "SeriesNumber": 1, "Modality": "MR",
      "SeriesDescription": "T1 BRAIN", "NumberOfInstances": 40}


def routes(*specs: dict[str, Any]) -> list[CompiledRoute]:
    return [CompiledRoute.of(RouteSettings(**s)) for s in specs]


def unit(level: str, series: str | None) -> CompletedUnit:
    return CompletedUnit(level, "9.9", series, 1, CompletionReasonValues.FAST_PATH,
                         datetime(2026, 1, 1))


def test_every_matching_route_fires_in_order() -> None:
    rs = routes({"name": "a", "match": {"Modality": "CT"}, "destinations": ["x"]},
                {"name": "b", "match": {"SliceThickness": {"le": 3}}, "destinations": ["y"]},
                {"name": "c", "match": {"Modality": "MR"}, "destinations": ["z"]})
    decisions = decide(rs, "series", [CT], focus=CT)
    assert [(d.route, d.fires) for d in decisions] == [("a", True), ("b", True), ("c", False)]
    assert "Modality = 'CT', expected 'MR'" in decisions[2].reason


def test_stop_prevents_later_routes_and_says_so() -> None:
    rs = routes({"name": "skip-scouts", "match": {"ImageType": {"contains": "LOCALIZER"}},
                 "action": "ignore", "stop": True},
                {"name": "ct", "match": {"Modality": "CT"}, "destinations": ["x"]})
    decisions = decide(rs, "series", [SCOUT], focus=SCOUT)
    assert decisions[0].fires and decisions[0].action == "ignore"
    assert not decisions[1].fires and "skip-scouts" in (decisions[1].skipped or "")
    assert job_specs(decisions, unit("series", "1.3")) == []
    # a series the ignore route does not match goes on to the next route
    decisions = decide(rs, "series", [CT], focus=CT)
    assert [d.fires for d in decisions] == [False, True]


def test_fallback_fires_only_when_nothing_matched() -> None:
    rs = routes({"name": "ct", "match": {"Modality": "CT"}, "destinations": ["x"]},
                {"name": "rest", "fallback": True, "destinations": ["archive"]})
    assert [d.fires for d in decide(rs, "series", [CT], focus=CT)] == [True, False]
    assert [d.fires for d in decide(rs, "series", [MR], focus=MR)] == [False, True]


def test_study_level_select_picks_thinnest_axial_deterministically() -> None:
    spec = {"name": "thin", "level": "study", "models": ["m"],
            "match": {"has_series": {"Modality": "CT"}, "no_series": {"Modality": "PT"}},
            "select": {"where": {"Modality": "CT", "ImageType": {"contains": "AXIAL"}},
                       "min_instances": 10, "prefer": ["SliceThickness"]}}
    rs = routes(spec)
    for order in ([CT, CT_THICK, SCOUT, MR], [MR, SCOUT, CT_THICK, CT]):
        (d,) = decide(rs, "study", order)
        assert d.fires and d.series_instance_uid == "1.1"
        assert "selected series #1 CT" in d.reason
    (d,) = decide(rs, "study", [CT_THICK, {**CT, "Modality": "PT"}])
    assert not d.matched and "should not exist" in d.reason


def test_study_level_without_select_targets_the_study_and_explains_misses() -> None:
    rs = routes({"name": "mr-study", "level": "study", "match": {"Modality": "MR"},
                 "destinations": ["x"]})
    (d,) = decide(rs, "study", [CT, CT_THICK])
    assert not d.matched
    assert "series 1 (CT): Modality = 'CT', expected 'MR'" in d.reason
    (d,) = decide(rs, "study", [CT, MR])
    specs = job_specs([d], unit("study", None))
    assert [(s.kind, s.series_instance_uid) for s in specs] == [("forward", None)]


def test_jobs_carry_model_destinations_and_priority() -> None:
    rs = routes({"name": "stat-ct", "match": {"Modality": "CT"}, "models": ["a", "b"],
                 "destinations": ["pacs"], "priority": 100})
    specs = job_specs(decide(rs, "series", [CT], focus=CT), unit("series", "1.1"))
    assert [(s.kind, s.payload["model"], s.priority) for s in specs] == [
        ("infer", "a", 100), ("infer", "b", 100)]
    assert specs[0].payload["destinations"] == ["pacs"]
    assert specs[0].key == "stat-ct:series:1.1:g1:infer:a"


def test_route_validation_errors() -> None:
    with pytest.raises(ValueError, match="did you mean 'Modality'"):
        RouteSettings(name="r", match={"Modalty": "CT"})
    with pytest.raises(ValueError, match=r"invalid regular expression '\['"):
        RouteSettings(name="r", match={"SeriesDescription": {"regex": "["}})
    with pytest.raises(ValueError, match='only a level = "study" route selects'):
        RouteSettings(name="r", select={"min_instances": 2}, destinations=["x"])
    with pytest.raises(ValueError, match="needs at least one model"):
        RouteSettings(name="r", action="run")


def test_infer_jobs_carry_their_model_device_queue() -> None:
    rs = routes({"name": "both", "match": {"Modality": "CT"}, "models": ["a", "b"]})
    specs = job_specs(decide(rs, "series", [CT], focus=CT), unit("series", "1.1"),
                      {"a": "cuda:0", "b": "cpu"})
    assert [(s.payload["model"], s.queue) for s in specs] == [("a", "cuda:0"), ("b", "cpu")]
