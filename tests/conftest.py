from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import NodeProcess, Orthanc, write_config


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed; the README's test command installs it")


@pytest.fixture
def dcmtk() -> None:
    for tool in ("storescu", "echoscu", "storescp"):
        _require(tool)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[object]:
    started: list[NodeProcess] = []

    def make(**sections: object) -> NodeProcess:
        cfg = write_config(tmp_path / f"node{len(started)}", **sections)
        import tomllib
        port = tomllib.loads(cfg.read_text())["node"]["port"]
        node = NodeProcess(cfg, port)
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[object]:
    started: list[Orthanc] = []

    def make(**kwargs: object) -> Orthanc:
        _require("Orthanc")
        o = Orthanc(tmp_path / f"orthanc{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(o)
        return o

    yield make
    for o in started:
        o.stop()
