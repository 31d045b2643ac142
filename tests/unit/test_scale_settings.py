"""Settings of the scale-out: the executor table, per-model Ray resources, and the
database password read from a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.db import make_engine
from node.errors import ConfigError
from node.inference.ray_executor import gpus_for
from node.settings import ModelSettings, load_settings


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacsnode.toml"
    path.write_text(text)
    return path


def test_executor_defaults_to_local_worker_processes(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, ""))
    assert settings.executor.kind == "local"
    assert settings.storage.database_password_file is None


def test_ray_executor_and_model_resources_parse_and_paths_resolve(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, '''
[storage]
database = "postgresql+psycopg://pacsnode@db/pacsnode"
database_password_file = "secrets/db-password"
[executor]
kind = "ray"
address = "10.0.0.5:6379"
task_timeout_seconds = 120
[[models]]
name = "m"
path = "models/m"
device = "cuda"
replicas = 3
num_cpus = 2
'''))
    assert settings.executor.kind == "ray" and settings.executor.address == "10.0.0.5:6379"
    assert settings.storage.database_password_file == (tmp_path / "secrets" / "db-password")
    model = settings.models[0]
    assert (model.replicas, model.num_cpus, gpus_for(model)) == (3, 2.0, 1.0)
    assert gpus_for(ModelSettings(name="c", path=Path("x"), device="cpu")) == 0.0
    assert gpus_for(ModelSettings(name="h", path=Path("x"), device="cuda", num_gpus=0.5)) == 0.5


def test_unknown_executor_kind_is_refused_with_the_key_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, '[executor]\nkind = "dask"\n'))
    assert "executor.kind" in str(info.value) and "'dask'" in str(info.value)


def test_an_unreadable_password_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="database_password_file .*missing"):
        make_engine("postgresql+psycopg://u@127.0.0.1:1/db",
                    password_file=tmp_path / "missing")
