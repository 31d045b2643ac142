"""The labelling loop through the node: the node's AI SEG goes to the PACS (Orthanc), a
person's corrected copy (MANUAL) comes back by C-STORE, and the harvest pairs it with the
source series, ignoring the AI SEG that was sent back too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from node.db import make_engine
from node.finetune.harvest import load_pair, survey
from node.settings import load_settings
from tests.integration.dbview import IndexView
from tests.integration.test_results_orthanc import _node, _phantom
from tests.support import storescu, wait_for
from tests.unit.finetune_helpers import reference_seg

pytestmark = pytest.mark.integration


def test_corrected_seg_comes_back_and_is_harvested(
        dcmtk: None, node_factory: Any, orthanc_factory: Any, tmp_path: Path) -> None:
    orthanc = orthanc_factory().start()
    destination = {"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                   "host": "127.0.0.1", "port": orthanc.dicom_port}
    node = _node(node_factory, orthanc, destination)
    study, files = _phantom(tmp_path, 9103)
    assert storescu(node.port, files).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=300)
    found = orthanc.request("POST", "/tools/find", {"Level": "Instance", "Query": {
        "StudyInstanceUID": study.study_instance_uid, "Modality": "SEG"}})
    assert len(found) == 1
    ai_path = tmp_path / "ai-seg.dcm"
    req = orthanc.url + f"/instances/{found[0]}/file"
    import urllib.request
    with urllib.request.urlopen(req, timeout=60) as resp:
        ai_path.write_bytes(resp.read())
    ai_seg = pydicom.dcmread(ai_path)
    assert ai_seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    # the radiologist's correction: the true lesions, minus the first lesion slice
    series = study.series[0]
    corrected = series.present_mask().copy()
    first = int(np.flatnonzero(corrected.any(axis=(1, 2)))[0])
    corrected[first] = False
    manual = reference_seg(series.datasets, corrected, label="corrected lesion")
    manual_path = tmp_path / "manual-seg.dcm"
    manual.save_as(manual_path, enforce_file_format=True)
    sent = storescu(node.port, [manual_path, ai_path], extra=["-R"])   # propose SEG
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: {str(manual.SOPInstanceUID), str(ai_seg.SOPInstanceUID)}
             <= index.sop_uids(), timeout=60)

    settings = load_settings(node.config)
    engine = make_engine(settings.storage.database)
    try:
        found_pairs = survey(engine, settings.storage.spool)
        assert [c.sop_instance_uid for c in found_pairs.candidates] == [manual.SOPInstanceUID]
        assert found_pairs.automatic == (str(ai_seg.SOPInstanceUID),)
        (candidate,) = found_pairs.candidates
        assert candidate.source_series_uid == series.series_instance_uid
        pair = load_pair(engine, settings.storage.spool, candidate, {("52988006", "SCT"): 1})
    finally:
        engine.dispose()
    order = {str(ds.SOPInstanceUID): k for k, ds in enumerate(series.datasets)}
    expected = corrected[[order[u] for u in pair.volume.sop_instance_uids]]
    assert np.array_equal(pair.labels == 1, expected)
    assert pair.label_voxels == {1: int(corrected.sum())}
