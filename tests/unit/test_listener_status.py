"""Listener children's counters: written atomically, read back, added into /metrics."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from node.db import make_engine
from node.listener import listener_counters, read_counters, remove_statuses, status_path, \
    write_status
from node.metrics import Metrics, exposition
from node.app import Node
from node.settings import HttpSettings, NodeSettings, Settings, StorageSettings, load_settings
from tests.support import free_port, write_config


def test_child_counters_are_added_to_the_receivers_metrics(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path / "cfg", node={"listener_processes": 3}))
    settings.storage.spool.mkdir(parents=True)
    for index, instances in ((1, 7), (2, 5)):
        child = Metrics()
        child.inc("pacsnode_instances_received_total", instances)
        child.inc("pacsnode_instances_refused_total", status="A900")
        write_status(status_path(settings, index), pid=100 + index, index=index, metrics=child)
    # a half-written or foreign file counts as nothing, and breaks nothing
    status_path(settings, 3).write_text('{"counters": [["x", ')
    assert read_counters(status_path(settings, 3)) == {}
    assert read_counters(status_path(settings, 1)) == {
        ("pacsnode_instances_received_total", ()): 7.0,
        ("pacsnode_instances_refused_total", (("status", "A900"),)): 1.0}
    own = Metrics()
    own.inc("pacsnode_instances_received_total", 10)
    engine = make_engine(settings.storage.database)
    text = exposition(own, engine, settings.storage.spool, listener_counters(settings))
    assert "pacsnode_instances_received_total 22" in text.splitlines()
    assert 'pacsnode_instances_refused_total{status="A900"} 2' in text.splitlines()
    remove_statuses(settings)            # the receiver's start: no carry-over
    assert list(listener_counters(settings)) == []
    assert not list(settings.storage.spool.glob(".listener-status-*"))


def test_settings_made_in_code_run_one_listener_process(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The children read the settings from their file: without one (settings made in
    code) the receiver says so and listens alone instead of failing to start."""
    settings = Settings(
        node=NodeSettings(host="127.0.0.1", port=free_port(), listener_processes=2),
        http=HttpSettings(host="127.0.0.1", port=free_port()),
        storage=StorageSettings(spool=tmp_path / "spool", database=f"sqlite:///{tmp_path}/i.db",
                                audit_log=tmp_path / "audit.jsonl", min_free_mb=0))
    node = Node(settings, spawn_worker=False)
    with caplog.at_level(logging.WARNING, logger="node.app"):
        node.start()
    try:
        assert node.listeners is None
        assert "this process listens alone" in caplog.text
        with socket.create_connection(("127.0.0.1", settings.node.port), timeout=5):
            pass                        # the receiver itself listens
    finally:
        node.stop()


def test_a_childs_release_line_carries_instance_counts() -> None:
    from node.listener import read_release

    assert read_release(b'{"1.2.3": 75, "1.2.4": 1}\n') == {"1.2.3": 75, "1.2.4": 1}
    # a child of the version before (during an upgrade) sent bare series UIDs: counts not
    # known, so only ImagesInAcquisition can complete those series at release
    assert read_release(b'["1.2.3"]') == {"1.2.3": 0}
    with pytest.raises(TypeError):
        read_release(b'"1.2.3"')
    with pytest.raises(ValueError):
        read_release(b'{"1.2.3": "many"}')
    with pytest.raises(ValueError):
        read_release(b'{"1.2.3": ')
