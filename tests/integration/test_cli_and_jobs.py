"""The CLI against a running node, and the forward job to a real dcmtk storescp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node import synth
from tests.integration.dbview import IndexView
from tests.support import ROOT, TCP_ENV, free_port, storescu, wait_for, wait_port

pytestmark = pytest.mark.integration


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "-c", str(config)],
                          capture_output=True, text=True, cwd=ROOT, env=TCP_ENV, timeout=60)


class StoreSCP:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(self.directory),
                                      str(self.port)], env=TCP_ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def received(self) -> int:
        return sum(1 for p in self.directory.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path: Path) -> Any:
    scp = StoreSCP(tmp_path / "scp")
    yield scp
    scp.stop()


def _config(scp: StoreSCP) -> dict[str, Any]:
    return {
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": "PACS",
                          "host": "127.0.0.1", "port": scp.port, "timeout_seconds": 5.0}],
        "routes": [{"name": "ct-copy", "match": {"Modality": "CT"}, "destinations": ["pacs"]},
                   {"name": "mr-only", "match": {"Modality": ["MR"]}, "destinations": ["pacs"]}],
        "jobs": {"retry_base_seconds": 0.2, "retry_max_seconds": 0.5, "max_attempts": 2},
    }


def test_forward_job_echo_studies_and_jobs_commands(
        dcmtk: None, node_factory: Any, storescp: StoreSCP, tmp_path: Path) -> None:
    node = node_factory(**_config(storescp))
    config = node.config
    # echo: destination down -> exit 1; up -> exit 0
    down = cli(config, "echo", "pacs", "--json")
    assert down.returncode == 1 and json.loads(down.stdout)["ok"] is False
    storescp.start()
    up = cli(config, "echo", "pacs")
    assert up.returncode == 0 and "ok in" in up.stdout
    assert cli(config, "echo", "nowhere").returncode == 3

    node.start()
    study = synth.make_study(synth.SeriesSpec(slices=12, rows=64, columns=64), seed=31)
    files = synth.write_study(study, tmp_path / "ct")
    assert storescu(node.port, files).returncode == 0
    index = IndexView(config.parent / "index.db")
    job = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=20)[0]
    assert job["kind"] == "forward" and job["step"] == "sent:pacs"
    assert storescp.received() == 12
    assert len(index.jobs()) == 1                 # the MR route did not fire

    studies = json.loads(cli(config, "studies", "list", "--json").stdout)
    assert [s["instances"] for s in studies] == [12]
    shown = cli(config, "studies", "show", study.study_instance_uid, "--json")
    detail = json.loads(shown.stdout)
    assert detail["series"][0]["completion_reason"] == "fast_path"
    assert cli(config, "studies", "show", "1.2.3.4").returncode == 4

    jobs = json.loads(cli(config, "jobs", "list", "--json").stdout)
    assert jobs[0]["state"] == "done"
    assert "forward" in cli(config, "jobs", "list").stdout
    assert cli(config, "jobs", "show", "999").returncode == 4
    assert cli(config, "jobs", "retry", str(job["id"])).returncode == 1   # done: nothing to retry


def test_destination_down_dead_letters_then_retry_delivers(
        dcmtk: None, node_factory: Any, storescp: StoreSCP, tmp_path: Path) -> None:
    node = node_factory(**_config(storescp)).start()
    study = synth.make_study(synth.SeriesSpec(slices=5, rows=32, columns=32), seed=32)
    assert storescu(node.port, synth.write_study(study, tmp_path / "ct")).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    dead = wait_for(lambda: [j for j in index.jobs() if j["state"] == "dead"], timeout=30)[0]
    assert dead["attempts"] == 2 and "did not answer" in dead["last_error"]
    storescp.start()
    retried = cli(node.config, "jobs", "retry", str(dead["id"]), "--json")
    assert retried.returncode == 0 and json.loads(retried.stdout)["state"] == "pending"
    wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=20)
    assert storescp.received() == 5


def test_cancel(node_factory: Any, tmp_path: Path, dcmtk: None) -> None:
    scp_port = free_port()
    node = node_factory(
        destinations=[{"name": "pacs", "kind": "dimse", "ae_title": "PACS",
                       "host": "127.0.0.1", "port": scp_port, "timeout_seconds": 2.0}],
        routes=[{"name": "all", "destinations": ["pacs"]}],
        jobs={"retry_base_seconds": 60.0, "max_attempts": 5}).start()
    study = synth.make_study(synth.SeriesSpec(slices=3, rows=32, columns=32), seed=33)
    assert storescu(node.port, synth.write_study(study, tmp_path / "ct")).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    job = wait_for(lambda: [j for j in index.jobs() if j["attempts"] >= 1
                            and j["state"] == "pending"], timeout=20)[0]
    out = cli(node.config, "jobs", "cancel", str(job["id"]), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "cancelled"
    assert cli(node.config, "jobs", "cancel", str(job["id"])).returncode == 1
