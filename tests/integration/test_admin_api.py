"""The admin HTTP API: health, readiness, Prometheus metrics, jobs; token-protected."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from node import synth
from tests.integration.dbview import IndexView
from tests.support import free_port, storescu, wait_for

pytestmark = pytest.mark.integration


def _get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(f"{name}{{{inner}}}" if labels else name) + r" (\S+)$"
    for line in text.splitlines():
        if m := re.match(pattern, line):
            return float(m.group(1))
    return 0.0


def test_health_readiness_metrics_and_jobs(dcmtk: None, node_factory: Any,
                                           tmp_path: Path) -> None:
    http_port = free_port()
    node = node_factory(
        http={"host": "127.0.0.1", "port": http_port},
        destinations=[{"name": "down", "kind": "dimse", "ae_title": "X", "host": "127.0.0.1",
                       "port": free_port(), "timeout_seconds": 2.0}],
        routes=[{"name": "copy", "match": {"Modality": "CT"}, "destinations": ["down"]}],
        jobs={"max_attempts": 1}).start()
    base = f"http://127.0.0.1:{http_port}"
    token = (node.config.parent / "spool" / ".admin-token").read_text().strip()
    assert _get(f"{base}/healthz") == (200, '{\n "status": "ok"\n}\n')
    status, body = _get(f"{base}/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    assert _get(f"{base}/metrics")[0] == 401
    assert _get(f"{base}/metrics", "not-the-token")[0] == 401
    status, before = _get(f"{base}/metrics", token)
    assert status == 200 and "# TYPE pacsnode_spool_free_bytes gauge" in before

    study = synth.make_study(synth.SeriesSpec(slices=10, rows=64, columns=64), seed=81)
    files = synth.write_study(study, tmp_path / "ct")
    assert storescu(node.port, files).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    dead = wait_for(lambda: [j for j in index.jobs() if j["state"] == "dead"], timeout=30)[0]
    after = _get(f"{base}/metrics", token)[1]
    received = (_metric(after, "pacsnode_instances_received_total")
                - _metric(before, "pacsnode_instances_received_total"))
    assert received == 10
    size = sum(p.stat().st_size for p in files)
    assert _metric(after, "pacsnode_bytes_received_total") >= size * 0.99
    assert _metric(after, "pacsnode_associations_total", result="accepted") >= 1
    assert _metric(after, "pacsnode_jobs", kind="forward", state="dead") == 1
    assert _metric(after, "pacsnode_delivery_failures", state="dead") == 1

    status, body = _get(f"{base}/jobs?state=dead", token)
    assert status == 200 and [j["id"] for j in json.loads(body)] == [dead["id"]]
    status, body = _get(f"{base}/jobs/{dead['id']}/retry", token, method="POST")
    assert status == 200 and json.loads(body)["state"] == "pending"
    assert _get(f"{base}/jobs/999/retry", token, method="POST")[0] == 404

    # the spool stops being writable: not ready, and says why
    tmp_dir = node.config.parent / "spool" / ".tmp"
    tmp_dir.rename(tmp_dir.with_name(".tmp-away"))
    tmp_dir.write_text("in the way")
    status, body = _get(f"{base}/readyz")
    checks = json.loads(body)["checks"]
    assert status == 503 and checks["spool"]["ok"] is False and "not writable" in \
        checks["spool"]["detail"]
    tmp_dir.unlink()
    tmp_dir.with_name(".tmp-away").rename(tmp_dir)
    assert _get(f"{base}/readyz")[0] == 200
