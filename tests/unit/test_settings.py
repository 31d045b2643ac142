from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from node.cli import main
from node.errors import ConfigError
from node.settings import AUTO_LISTENERS_MAX, Settings, load_settings, usable_cpus

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str, name: str = "pacsnode.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_default_config_is_valid() -> None:
    settings = load_settings(ROOT / "config" / "pacsnode.toml")
    assert settings.node.ae_title == "PACSNODE"
    assert settings.storage.database.startswith("sqlite:///")
    assert settings.storage.spool.is_absolute()


def test_listener_processes_default_to_one_per_usable_cpu(tmp_path: Path) -> None:
    auto = min(usable_cpus(), AUTO_LISTENERS_MAX)
    assert load_settings(_write(tmp_path, "")).node.listener_processes == auto
    assert load_settings(ROOT / "config" / "pacsnode.toml").node.listener_processes == auto
    assert load_settings(_write(tmp_path, '[node]\nlistener_processes = "auto"\n')) \
        .node.listener_processes == auto
    assert load_settings(_write(tmp_path, "[node]\nlistener_processes = 3\n")) \
        .node.listener_processes == 3
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, '[node]\nlistener_processes = "all"\n'))
    (problem,) = err.value.problems
    assert "node.listener_processes" in problem and '"auto"' in problem and "'all'" in problem


def test_usable_cpus_follow_the_affinity_and_a_cgroup_quota(tmp_path: Path) -> None:
    import os
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == affinity                 # no cpu.max: no cgroup v2 quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")   # --cpus=1.5: two CPUs, partly
    assert usable_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("20000 100000\n")    # a fifth of one CPU
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert usable_cpus(tmp_path) == affinity


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    cfg = _write(tmp_path, '[storage]\nspool = "s"\ndatabase = "sqlite:///db/x.db"\n')
    settings = load_settings(cfg)
    assert settings.storage.spool == (tmp_path / "s").resolve()
    assert settings.storage.database == f"sqlite:///{(tmp_path / 'db/x.db').resolve()}"


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, ""))
    with pytest.raises(ValidationError, match="frozen"):
        settings.node.port = 1  # type: ignore[misc]


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    cfg = _write(tmp_path, '[node]\nae_titel = "X"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    (problem,) = err.value.problems
    assert str(cfg) in problem and "node.ae_titel" in problem and "'ae_title'" in problem


def test_error_names_file_key_value_and_expectation(tmp_path: Path) -> None:
    cfg = _write(tmp_path, '[node]\nport = 70000\n'
                 'allowed_callers = [{ ae_title = "A", host = "10.0.0.0/33" }]\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = "\n".join(err.value.problems)
    assert f"{cfg}: node.port" in text and "70000" in text and "65535" in text
    assert "node.allowed_callers[0].host" in text and "'10.0.0.0/33'" in text
    assert "CIDR" in text


def test_ae_title_too_long(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as err:
        load_settings(_write(tmp_path, '[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n'))
    assert "1 to 16 characters" in err.value.problems[0]


def test_route_must_name_known_model_and_destination(tmp_path: Path) -> None:
    cfg = _write(tmp_path, '[[destinations]]\nname = "pacs"\nkind = "dimse"\n'
                 'ae_title = "O"\nhost = "127.0.0.1"\nport = 4242\n'
                 '[[routes]]\nname = "r"\nmodels = ["nope"]\ndestinations = ["pac"]\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert "routes[0].models[0]: unknown model 'nope'" in text
    assert "routes[0].destinations[0]: unknown destination 'pac'" in text
    assert "['pacs']" in text


def test_dimse_destination_needs_address(tmp_path: Path) -> None:
    cfg = _write(tmp_path, '[[destinations]]\nname = "pacs"\nkind = "dimse"\nhost = "h"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert "destinations[0]" in err.value.problems[0]
    assert "ae_title, port" in err.value.problems[0]


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "[node\n")
    with pytest.raises(ConfigError, match=str(cfg)):
        load_settings(cfg)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


def test_includes_add_routes_and_reject_other_sections(tmp_path: Path) -> None:
    _write(tmp_path, '[[routes]]\nname = "inc"\nmatch = { Modality = "CT" }\n', "routes.toml")
    settings = load_settings(_write(tmp_path, 'include = ["routes.toml"]\n'))
    assert isinstance(settings, Settings) and [r.name for r in settings.routes] == ["inc"]
    _write(tmp_path, '[node]\nport = 1\n', "bad.toml")
    with pytest.raises(ConfigError, match="an included file may only hold"):
        load_settings(_write(tmp_path, 'include = ["bad.toml"]\n', "main2.toml"))


def test_config_check_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path, "")
    assert main(["config", "check", "-c", str(good)]) == 0
    bad = _write(tmp_path, "[node]\nport = 0\n", "bad.toml")
    assert main(["config", "check", "--json", "-c", str(bad)]) == 3
    out = capsys.readouterr().out
    assert '"valid": false' in out and "node.port" in out


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _write(tmp_path, '[node]\nae_title = "FROMENV"\n')
    monkeypatch.setenv("PACSNODE_CONFIG", str(cfg))
    assert load_settings().node.ae_title == "FROMENV"


def test_routing_rule_errors_name_the_path_inside_the_rule(tmp_path: Path) -> None:
    cfg = _write(tmp_path, '[[routes]]\nname = "r"\nmatch = { any = [{ Modality = "CT" }, '
                 '{ Modalty = "MR" }] }\n[[routes]]\nname = "q"\n'
                 'match = { SeriesDescription = { regex = "(" } }\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    first, second = err.value.problems
    assert first == (f"{cfg}: routes[0].match.any[1].Modalty: unknown DICOM keyword 'Modalty'; "
                     "did you mean 'Modality'?")
    assert second.startswith(f"{cfg}: routes[1].match.SeriesDescription.regex: "
                             "invalid regular expression '('")


def test_default_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, ""))
    assert settings.storage.spool == (tmp_path / "var" / "spool").resolve()
    assert settings.storage.database == f"sqlite:///{(tmp_path / 'var/pacsnode.db').resolve()}"


def test_the_example_routes_file_is_valid(tmp_path: Path) -> None:
    example = ROOT / "config" / "routes.example.toml"
    cfg = _write(tmp_path, f'include = ["{example}"]\n'
                 '[[models]]\nname = "lesion-ct"\npath = "m"\n'
                 '[[models]]\nname = "brain-mr"\npath = "m"\n'
                 '[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "P"\n'
                 'host = "127.0.0.1"\nport = 104\n'
                 '[[destinations]]\nname = "research"\nkind = "dimse"\nae_title = "R"\n'
                 'host = "127.0.0.1"\nport = 105\n')
    settings = load_settings(cfg)
    assert [r.name for r in settings.routes][:2] == ["skip-localizers", "ct-lesions-stat"]
    assert settings.routes[-1].fallback


def test_hierarchical_query_is_a_dimse_source_setting(tmp_path: Path) -> None:
    dimse = '[[sources]]\nname = "pacs"\nkind = "dimse"\nae_title = "P"\nhost = "h"\nport = 104\n'
    assert load_settings(_write(tmp_path, dimse)).sources[0].query == "series"
    assert load_settings(_write(tmp_path, dimse + 'query = "hierarchical"\n')
                         ).sources[0].query == "hierarchical"
    web = '[[sources]]\nname = "web"\nkind = "dicomweb"\nurl = "http://h/dicom-web"\n'
    with pytest.raises(ConfigError, match="is for kind"):
        load_settings(_write(tmp_path, web + 'query = "hierarchical"\n'))
    with pytest.raises(ConfigError, match="query"):
        load_settings(_write(tmp_path, dimse + 'query = "relational"\n'))
