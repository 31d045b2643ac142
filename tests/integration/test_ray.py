"""Inference on a real Ray cluster (a head and a second node on loopback, CPU only), the job
table on a real PostgreSQL, results delivered to a real Orthanc: a stream of studies runs
on both Ray nodes, and killing the second node mid-stream still delivers every study once."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from node import synth
from tests.integration.pgserver import PgView, PostgresServer, fresh_database, without_password
from tests.integration.test_faults_pipeline import _results_in_orthanc
from tests.support import ROOT, TCP_ENV, free_port, wait_for
from tests.unit.test_runner import make_bundle

pytestmark = pytest.mark.integration

RAY = Path(sys.executable).parent / "ray"


class RayCluster:
    """``ray start`` a head and one more node on this machine (separate raylets, as two
    hosts would have), each with one CPU and no GPU."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="pnray"))   # short: socket paths
        self.port = free_port()
        self.second_node_port = free_port()
        # a dead node is noticed in about two seconds rather than the default half minute
        self.env = {**TCP_ENV, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_health_check_period_ms": "500",
                    "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_timeout_ms": "1000"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, *args: str, node_manager_port: int) -> None:
        ports = [f"--{name}={free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port")]
        result = subprocess.run(
            [str(RAY), "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--num-gpus=0", "--disable-usage-stats", f"--node-manager-port={node_manager_port}",
             *ports], capture_output=True, text=True, env=self.env, timeout=180,
            start_new_session=True)     # the node's processes get a group of their own
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    def start(self) -> RayCluster:
        self._start("--head", f"--port={self.port}", "--include-dashboard=false",
                    f"--temp-dir={self.directory}", node_manager_port=free_port())
        self._start(f"--address={self.address}", node_manager_port=self.second_node_port)
        return self

    def second_node_raylet(self) -> psutil.Process:
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if cmd and cmd[0].endswith("raylet") and \
                    f"--node_manager_port={self.second_node_port}" in cmd:
                return proc
        raise AssertionError("the second node's raylet is not running")

    def kill_second_node(self) -> list[int]:
        """kill -9 the second node as a power cut would: its raylet's process group and
        every process the raylet started (the workers that host its actors)."""
        raylet = self.second_node_raylet()
        victims = [raylet, *raylet.children(recursive=True)]
        pgid = os.getpgid(raylet.pid)
        assert pgid != os.getpgrp(), "the raylet shares the test's process group"
        os.killpg(pgid, signal.SIGKILL)
        for victim in victims:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
        return [v.pid for v in victims]

    def stop(self) -> None:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120,
                       env=self.env)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def ray_cluster() -> Iterator[RayCluster]:
    if not RAY.exists():
        pytest.fail("ray is not installed; the README's test command installs it")
    cluster = RayCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _ran_on(audit_log: Path) -> dict[str, str]:
    """study UID -> where its inference ran, from the audit log."""
    if not audit_log.exists():
        return {}
    runs = [json.loads(line) for line in audit_log.read_text().splitlines() if line.strip()]
    return {r["study_instance_uid"]: r["ran_on"] for r in runs
            if r.get("event") == "inferred" and "ran_on" in r}


def _second_node_id(log: str, cluster: RayCluster) -> str:
    """The Ray node ID of the second node: the one whose actor process the second raylet
    started (from the dispatcher's "resident ... on node N (pid P)" lines)."""
    children = {p.pid for p in cluster.second_node_raylet().children(recursive=True)}
    found = {int(m.group(2)): m.group(1) for m in re.finditer(
        r"resident in a Ray actor on node (\w+) \(pid (\d+)\)", log)}
    ids = {node_id for pid, node_id in found.items() if pid in children}
    assert len(ids) == 1, (found, children)
    return ids.pop()


def test_a_stream_of_studies_runs_on_both_ray_nodes_and_survives_losing_one(
        dcmtk: None, postgres: PostgresServer, ray_cluster: RayCluster, node_factory: Any,
        orthanc_factory: Any, tmp_path: Path) -> None:
    orthanc = orthanc_factory().start()
    database = fresh_database(postgres, "ray")
    node = node_factory(
        storage={"spool": "spool", "min_free_mb": 0, "database": without_password(database),
                 "database_password_file": str(postgres.password_file(tmp_path))},
        executor={"kind": "ray", "address": ray_cluster.address,
                  "task_timeout_seconds": 120.0},
        jobs={"retry_base_seconds": 0.5, "retry_max_seconds": 2.0},
        # a dense sliding window makes one run last seconds, so the node dies mid-run
        models=[{"name": "tiny", "path": str(make_bundle(tmp_path / "bundle")),
                 "device": "cpu", "num_cpus": 1.0, "replicas": 2, "overlap": 0.9,
                 "sw_batch_size": 1}],
        destinations=[{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                       "host": "127.0.0.1", "port": orthanc.dicom_port}],
        routes=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["tiny"],
                 "destinations": ["pacs"]}]).start()
    audit_log = node.config.parent / "var" / "audit.jsonl"
    view = PgView(database)
    # both actors resident (one per node: each node has one CPU) before the stream starts
    wait_for(lambda: node.log().count("resident in a Ray actor") >= 2, timeout=180,
             interval=0.5)
    studies = [synth.make_study(synth.SeriesSpec(slices=12, rows=32, columns=32),
                                seed=800 + i) for i in range(4)]
    files = [synth.write_study(s, tmp_path / f"study{i}") for i, s in enumerate(studies)]

    def send(batch: list[int]) -> None:
        senders = [subprocess.Popen(
            ["storescu", "-aec", "PACSNODE", "127.0.0.1", str(node.port), *map(str, files[i])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TCP_ENV)
            for i in batch]
        outputs = [p.communicate(timeout=120)[0] for p in senders]
        assert [p.returncode for p in senders] == [0] * len(batch), outputs

    def infer_jobs() -> list[dict[str, Any]]:
        return [j for j in view.jobs() if j["kind"] == "infer"]

    def done(count: int) -> bool:
        jobs = infer_jobs()
        return len(jobs) >= count and all(j["state"] == "done" for j in jobs)

    try:
        # two studies at once: one runs on each node's actor
        send([0, 1])
        wait_for(lambda: done(2), timeout=120, interval=0.2)
        before = _ran_on(audit_log)
        assert len(set(before.values())) == 2, before       # both Ray nodes ran a model
        status = json.loads((node.config.parent / "spool" / ".worker-status-ray.json")
                            .read_text())
        assert status["loaded"] == {"tiny": True} and status["runs"] == {"tiny": 2}
        assert {f"ray node {n}" for n in status["ray_nodes"]["tiny"]} == set(before.values())
        # two more; as soon as one is dispatched to the second node's actor, kill that node
        second = _second_node_id(node.log(), ray_cluster)
        send([2, 3])
        wait_for(lambda: node.log().count(f"on Ray node {second}") >= 2, timeout=90,
                 interval=0.01)
        ray_cluster.kill_second_node()
        wait_for(lambda: done(4), timeout=180, interval=0.2)
        jobs = infer_jobs()
    finally:
        view.close()
    assert len(jobs) == 4 and {j["state"] for j in jobs} == {"done"}
    for study in studies:
        results = _results_in_orthanc(orthanc, study.study_instance_uid)
        assert len(results.get("SR", [])) == 1, (study.study_instance_uid, results)
        assert len(results.get("SEG", [])) <= 1, results
    after = _ran_on(audit_log)
    assert set(after) == {s.study_instance_uid for s in studies}
    # the job that was on the lost node went back to the table and ran again elsewhere
    retried = [j for j in jobs if j["attempts"] == 2]
    assert len(retried) == 1, jobs
    assert "actor or Ray node was lost" in node.log()
    # it ran again on the surviving node, where the other study of the batch ran
    survivor = {after[s.study_instance_uid] for s in studies[2:]} - {
        after[retried[0]["study_instance_uid"]]}
    assert survivor == set(), (after, retried)
    print(f"job {retried[0]['id']} retried after the node loss; ran on: "
          f"{sorted(set(after.values()))}")
