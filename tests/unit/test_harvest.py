"""Harvest: which SEGs count as ground truth, and refusals with a reason."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from node import synth
from node.db import make_engine
from node.finetune.harvest import HarvestError, load_pair, survey
from node.settings import load_settings
from tests.support import write_config
from tests.unit.finetune_helpers import reference_seg, store_all

CODES = {("52988006", "SCT"): 1}


def _series(seed: int) -> synth.SyntheticSeries:
    spec = synth.SeriesSpec(slices=8, rows=32, columns=32, pixel_spacing_mm=2.0,
                            slice_thickness_mm=3.0, seed=seed)
    return synth.make_study(spec, seed=seed).series[0]


def test_only_human_segs_pair_and_bad_ones_are_refused_with_a_reason(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path / "cfg"))
    good, shifted, absent = _series(1), _series(2), _series(3)
    ok = reference_seg(good.datasets, good.present_mask(), algorithm="SEMIAUTOMATIC")
    ai = reference_seg(good.datasets, good.present_mask(), algorithm="AUTOMATIC")
    other_code = reference_seg(good.datasets, good.present_mask(), label="Liver",
                               property_type=hd.sr.CodedConcept("10200004", "SCT", "Liver"))
    off_plane = reference_seg(shifted.datasets, shifted.present_mask())
    for frame in off_plane.PerFrameFunctionalGroupsSequence:    # frames 4 mm off their slice
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        frame.PlanePositionSequence[0].ImagePositionPatient = [
            position[0], position[1], float(position[2]) + 4.0]
    orphan = reference_seg(absent.datasets, absent.present_mask())
    store_all(settings, [*good.datasets, *shifted.datasets, ok, ai, other_code, off_plane,
                         orphan])
    engine = make_engine(settings.storage.database)
    try:
        found = survey(engine, settings.storage.spool)
        assert found.automatic == (str(ai.SOPInstanceUID),)
        by_uid = {c.sop_instance_uid: c for c in found.candidates}
        assert set(by_uid) == {str(s.SOPInstanceUID) for s in (ok, other_code, off_plane,
                                                               orphan)}
        pair = load_pair(engine, settings.storage.spool, by_uid[ok.SOPInstanceUID], CODES)
        assert np.array_equal(pair.labels == 1, good.present_mask())
        assert pair.seg.patient_id == good.datasets[0].PatientID
        for seg, reason in ((other_code, "no segment made by a person has a property type"),
                            (off_plane, "off the plane of its source slice"),
                            (orphan, "is not in the store")):
            with pytest.raises(HarvestError, match=reason):
                load_pair(engine, settings.storage.spool, by_uid[seg.SOPInstanceUID], CODES)
    finally:
        engine.dispose()
