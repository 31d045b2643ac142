"""Configuration: TOML files parsed once into frozen pydantic models.

Nothing here reads a file at import time; :func:`load_settings` is called by the
composition root and the result is passed explicitly to every component.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydicom.datadict import tag_for_keyword
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from node.errors import ConfigError
from node.transcode import AS_IS, check_transfer_syntax

DEFAULT_CONFIG = Path("config/pacsnode.toml")
CONFIG_ENV = "PACSNODE_CONFIG"
# listener_processes = "auto": one per CPU this process may use, at most this many (one
# process stores several hundred CT instances a second; each costs ~100 MB of memory).
AUTO_LISTENERS_MAX = 4
_LIST_SECTIONS = ("destinations", "sources", "models", "routes")


def _check_ae_title(value: str) -> str:
    """PS3.5 Table 6.2-1: AE is 1-16 characters, no backslash or control characters."""
    stripped = value.strip()
    if not stripped or len(value) > 16:
        raise ValueError("an AE title of 1 to 16 characters")
    if any(c == "\\" or ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError("an AE title of printable ASCII without backslash")
    return stripped


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("an IP address or CIDR block such as 10.0.0.0/24") from None
    return value


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity mask, lowered to a cgroup v2 CPU quota
    (``cpu.max``, as a container's ``--cpus`` sets it) where there is one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def auto_listener_processes() -> int:
    """What ``listener_processes = "auto"`` gives on this machine."""
    return min(usable_cpus(), AUTO_LISTENERS_MAX)


def _listener_count(value: Any) -> Any:
    if value == "auto":
        return auto_listener_processes()
    if isinstance(value, str):
        raise ValueError('a number of processes or "auto"')
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Network = Annotated[str, AfterValidator(_check_network)]
Port = Annotated[int, Field(ge=1, le=65535)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AllowedCaller(_Section):
    """One entry of the calling-AE allow-list; ``host`` may be an address or a CIDR block."""

    ae_title: AETitle
    host: Network | None = None


class TlsSettings(_Section):
    """DICOM TLS for the listener (PS3.15 Annex B): with ``ca_file`` the peer must present
    a certificate signed by it (mutual TLS). A TLS listener refuses plain associations."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None


class NodeSettings(_Section):
    ae_title: AETitle = "PACSNODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    require_called_ae: bool = True
    allowed_callers: tuple[AllowedCaller, ...] = ()
    max_pdu_bytes: Annotated[int, Field(ge=0)] = 262144
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    dimse_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    tls: TlsSettings | None = None
    # Processes accepting associations on the port (one listening socket): the receiver plus
    # listener_processes - 1 intake-only children (node/listener.py). "auto" (the default)
    # is resolved when the file is loaded: one per usable CPU, at most AUTO_LISTENERS_MAX.
    listener_processes: Annotated[int, BeforeValidator(_listener_count), Field(ge=1, le=64)] \
        = Field(default="auto", validate_default=True)


class StorageSettings(_Section):
    spool: Path = Path("var/spool")
    database: str = "sqlite:///var/pacsnode.db"
    database_password_file: Path | None = None      # PostgreSQL password, kept out of the URL
    fsync: bool = True
    # write instances with O_DIRECT (not through the page cache) where the filesystem can
    direct_io: bool = True
    min_free_mb: Annotated[int, Field(ge=0)] = 256
    audit_log: Path = Path("var/audit.jsonl")


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    token_file: Path | None = None
    stow: bool = True                       # STOW-RS receive at /dicom-web/studies
    stow_token_file: Path | None = None     # a token for STOW-RS only (the admin token works too)


class AssemblySettings(_Section):
    """When a series or study counts as complete (see node/assembly.py)."""

    series_quiet_seconds: Annotated[float, Field(gt=0)] = 10.0
    study_quiet_seconds: Annotated[float, Field(gt=0)] = 30.0
    hard_deadline_seconds: Annotated[float, Field(gt=0)] = 900.0
    fast_path: bool = True
    slice_spacing_tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.05
    check_interval_seconds: Annotated[float, Field(gt=0)] = 0.25


class JobSettings(_Section):
    max_attempts: Annotated[int, Field(ge=1)] = 5
    retry_base_seconds: Annotated[float, Field(gt=0)] = 5.0
    retry_max_seconds: Annotated[float, Field(gt=0)] = 600.0
    workers: Annotated[int, Field(ge=1, le=64)] = 2


class ExecutorSettings(_Section):
    """Where ``infer`` jobs run: ``local`` worker processes (one per device queue) or the
    model actors of a Ray cluster (node/inference/ray_executor.py)."""

    kind: Literal["local", "ray"] = "local"
    address: str = "auto"               # Ray: "host:port" of the head, or "auto"
    namespace: Name = "pacsnode"
    task_timeout_seconds: Annotated[float, Field(gt=0)] = 900.0
    max_in_flight: Annotated[int, Field(ge=1, le=256)] = 8


def _require_dimse_peer(section: BaseModel) -> None:
    """A DIMSE destination or source names its peer: AE title, host and port."""
    missing = [k for k in ("ae_title", "host", "port") if getattr(section, k) is None]
    if missing:
        raise ValueError(f"the keys {', '.join(missing)} for kind = \"dimse\"")


def _check_http_auth(username: str | None, password_file: Path | None,
                     token_file: Path | None) -> None:
    if (username is None) != (password_file is None):
        raise ValueError("username and password_file together (HTTP basic auth)")
    if username is not None and token_file is not None:
        raise ValueError("either token_file or username/password_file, not both")


class DestinationSettings(_Section):
    name: Name
    kind: Literal["dimse", "dicomweb"]
    ae_title: AETitle | None = None
    host: str | None = None
    port: Port | None = None
    url: str | None = None
    token_file: Path | None = None          # bearer token (dicomweb)
    username: str | None = None             # HTTP basic auth (dicomweb), with password_file
    password_file: Path | None = None
    ca_file: Path | None = None             # CA for https, or for DICOM TLS (tls = true)
    tls: bool = False                       # dimse: DICOM TLS; the peer is always verified
    cert_file: Path | None = None           # our client certificate (mutual TLS)
    key_file: Path | None = None
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # "as-is", or a transfer syntax UID objects are converted to (node/transcode.py)
    transfer_syntax: Annotated[str, AfterValidator(check_transfer_syntax)] = AS_IS

    @model_validator(mode="after")
    def _fields_for_kind(self) -> DestinationSettings:
        if self.kind == "dimse":
            _require_dimse_peer(self)
        elif self.url is None:
            raise ValueError("the key url for kind = \"dicomweb\"")
        _check_http_auth(self.username, self.password_file, self.token_file)
        return self


class SourceSettings(_Section):
    """An archive the node pulls from (see node/pull.py): QIDO-RS + WADO-RS (kind
    "dicomweb"), or C-FIND + C-GET/C-MOVE (kind "dimse", adapters/dimse_source.py)."""

    name: Name
    kind: Literal["dicomweb", "dimse"]
    url: str | None = None                  # dicomweb
    interval_seconds: Annotated[float, Field(gt=0)] = 60.0
    lookback_hours: Annotated[float, Field(ge=0)] = 24.0   # StudyDate window; 0 = no window
    filters: dict[str, str] = Field(default_factory=dict)  # QIDO-RS / C-FIND query keys
    token_file: Path | None = None          # bearer token (dicomweb)
    username: str | None = None             # HTTP basic auth, with password_file (dicomweb)
    password_file: Path | None = None
    ca_file: Path | None = None             # CA for https, or for DICOM TLS (tls = true)
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    ae_title: AETitle | None = None         # dimse: the PACS's AE title
    host: str | None = None                 # dimse
    port: Port | None = None                # dimse
    retrieve: Literal["get", "move"] = "get"   # dimse: C-GET, or C-MOVE to our own SCP
    # dimse: one SERIES-level C-FIND (relational), or STUDY level then each study's series
    # (hierarchical, for a PACS that refuses series queries without the study's UID)
    query: Literal["series", "hierarchical"] = "series"
    move_destination: AETitle | None = None    # dimse, move: our AE title at the PACS
    tls: bool = False                       # dimse: DICOM TLS; the peer is always verified
    cert_file: Path | None = None           # dimse: our client certificate (mutual TLS)
    key_file: Path | None = None

    @model_validator(mode="after")
    def _fields_for_kind(self) -> SourceSettings:
        if self.kind == "dimse":
            _require_dimse_peer(self)
            http = [k for k in ("url", "token_file", "username", "password_file")
                    if getattr(self, k) is not None]
            if http:
                raise ValueError(f"no {', '.join(http)} for kind = \"dimse\" (DICOMweb keys)")
            unknown = [k for k in self.filters if not _is_keyword(k)]
            if unknown:
                raise ValueError(f"filters: DICOM keywords such as Modality for kind = "
                                 f"\"dimse\", got {', '.join(map(repr, unknown))}")
        elif self.url is None:
            raise ValueError("the key url for kind = \"dicomweb\"")
        elif self.query != "series":
            raise ValueError("query = \"hierarchical\" is for kind = \"dimse\" (QIDO-RS "
                             "searches series directly)")
        _check_http_auth(self.username, self.password_file, self.token_file)
        return self


def _is_keyword(name: str) -> bool:
    return tag_for_keyword(name) is not None


class ScheduleSettings(_Section):
    """Periodic work (node/schedule.py); the job store lives in the node's database."""

    misfire_grace_seconds: Annotated[float, Field(ge=1)] = 300.0
    retry_sweep_seconds: Annotated[float, Field(gt=0)] = 30.0
    stale_check_seconds: Annotated[float, Field(gt=0)] = 60.0
    stale_after_seconds: Annotated[float, Field(ge=60)] = 600.0   # >= 2 x the 30 s heartbeat
    finetune_cron: str = ""                 # crontab line, e.g. "0 2 * * *"; "" = disabled

    @model_validator(mode="after")
    def _cron_shape(self) -> ScheduleSettings:
        if self.finetune_cron and len(self.finetune_cron.split()) != 5:
            raise ValueError('a crontab line of 5 fields such as "0 2 * * *", or "" (disabled)')
        return self


class RetentionSettings(_Section):
    """Spool housekeeping (node/retention.py). Data a live job needs is never removed."""

    check_interval_minutes: Annotated[float, Field(gt=0)] = 60.0
    max_age_days: Annotated[float, Field(ge=0)] = 0.0          # 0 = keep for ever
    high_water_percent: Annotated[float, Field(ge=0, le=100)] = 0.0   # 0 = off
    low_water_percent: Annotated[float, Field(ge=0, le=100)] = 0.0    # 0 = high water - 5

    @model_validator(mode="after")
    def _order(self) -> RetentionSettings:
        if self.low_water_percent and self.low_water_percent >= self.high_water_percent:
            raise ValueError("low_water_percent below high_water_percent")
        return self


class CodeSettings(_Section):
    """A coded concept: (code value, coding scheme designator, code meaning)."""

    value: Annotated[str, Field(min_length=1, max_length=64)]
    scheme: Annotated[str, Field(min_length=1, max_length=16)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]


class ClassSettings(_Section):
    """One output class of a classification model, in the network's output order."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    finding: CodeSettings


class ModelSettings(_Section):
    """A model the node can run. Unset inference settings come from the bundle's
    ``configs/metadata.json`` (its "pacsnode" section)."""

    name: Name
    path: Path
    format: Literal["monai_bundle", "torchscript", "plugin"] = "monai_bundle"
    plugin: str | None = None           # entry point in group "pacsnode.runners"
    version: str | None = None          # default: the bundle's version
    description: str = ""
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:[0-9]+)$")] = "auto"
    window: tuple[float, float] | None = None
    target_spacing: tuple[float, float, float] | None = None
    roi_size: tuple[int, int, int] | None = None
    overlap: Annotated[float, Field(ge=0, lt=1)] | None = None
    sw_batch_size: Annotated[int, Field(ge=1, le=64)] = 4
    mixed_precision: bool = True
    max_concurrency: Annotated[int, Field(ge=1, le=16)] = 1
    seg_type: Literal["binary", "fractional"] = "binary"   # fractional: probabilities
    classes: tuple[ClassSettings, ...] = ()     # a classifier's outputs (default: bundle's)
    input_size: tuple[int, int, int] | None = None   # classifier input grid (resized to)
    # executor = "ray": what each model actor requests, and how many actors serve the model
    num_gpus: Annotated[float, Field(ge=0)] | None = None     # default: 1 on cuda, else 0
    num_cpus: Annotated[float, Field(ge=0)] = 1.0
    replicas: Annotated[int, Field(ge=1, le=64)] = 1

    @model_validator(mode="after")
    def _plugin_named(self) -> ModelSettings:
        if self.format == "plugin" and not self.plugin:
            raise ValueError('the key plugin (an entry point name) for format = "plugin"')
        return self


class RouteSettings(_Section):
    """One routing rule; ``match`` and ``select`` use the language in node/rules.py."""

    name: Name
    match: dict[str, Any] = Field(default_factory=dict)
    select: dict[str, Any] | None = None
    action: Literal["run", "forward", "ignore", "fetch_priors"] | None = None
    models: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    source: str | None = None               # fetch_priors: the [[sources]] entry to ask
    priors: Annotated[int, Field(ge=1, le=20)] = 1   # fetch_priors: how many earlier studies
    priority: Annotated[int, Field(ge=0, le=100)] = 50
    level: Literal["series", "study"] = "series"
    wait_seconds: Annotated[float, Field(ge=0)] = 0.0
    stop: bool = False
    fallback: bool = False

    @model_validator(mode="after")
    def _rules_compile(self) -> RouteSettings:
        from node.rules import RuleError, compile_condition, compile_selector

        try:
            compile_condition(self.match, "match")
            if self.select is not None:
                if self.level != "study":
                    raise RuleError('select: only a level = "study" route selects a series')
                compile_selector(self.select, "select")
        except RuleError as exc:
            raise ValueError(str(exc)) from None
        action = self.effective_action
        if action == "run" and not self.models:
            raise ValueError('action = "run" needs at least one model in models')
        if action == "forward" and not self.destinations:
            raise ValueError('action = "forward" needs at least one destination')
        if action == "fetch_priors" and not self.source:
            raise ValueError('action = "fetch_priors" needs source (a [[sources]] name)')
        return self

    @property
    def effective_action(self) -> str:
        if self.action is not None:
            return self.action
        return "run" if self.models else "forward" if self.destinations else "ignore"


class FinetuneSettings(_Section):
    """Fine-tuning on local labelled studies (node/finetune); see README "Fine-tuning"."""

    store: Path | None = None              # de-identified training store; default var/training
    registry: Path | None = None           # model versions; default var/models
    secret_file: Path | None = None        # HMAC key for pseudonyms; default var/deid.key
    retain_dates: bool = True              # PS3.15 Retain Longitudinal ... Modified Dates
    min_new_pairs: Annotated[int, Field(ge=1)] = 5
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1e-3
    epochs: Annotated[int, Field(ge=1, le=10000)] = 20
    steps_per_epoch: Annotated[int, Field(ge=1)] = 50
    batch_size: Annotated[int, Field(ge=1, le=64)] = 2
    patch_size: tuple[int, int, int] = (32, 64, 64)
    patience: Annotated[int, Field(ge=1)] = 5
    trainable: Literal["all", "head"] = "all"
    augment: bool = True
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:[0-9]+)$")] = "auto"
    threads: Annotated[int, Field(ge=0, le=256)] = 0   # CPU threads for torch; 0 = default
    seed: Annotated[int, Field(ge=0)] = 0
    min_improvement: Annotated[float, Field(ge=0, le=1)] = 0.02
    regression_margin: Annotated[float, Field(ge=0, le=1)] = 0.02
    regression_phantoms: Annotated[int, Field(ge=1, le=100)] = 4
    replay_phantoms: Annotated[int, Field(ge=0, le=100)] = 2   # original domain in training
    regression_shape: tuple[int, int, int] = (48, 96, 96)


class Settings(_Section):
    include: tuple[Path, ...] = ()
    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    http: HttpSettings = HttpSettings()
    assembly: AssemblySettings = AssemblySettings()
    jobs: JobSettings = JobSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    retention: RetentionSettings = RetentionSettings()
    executor: ExecutorSettings = ExecutorSettings()
    destinations: tuple[DestinationSettings, ...] = ()
    sources: tuple[SourceSettings, ...] = ()
    models: tuple[ModelSettings, ...] = ()
    routes: tuple[RouteSettings, ...] = ()
    finetune: FinetuneSettings = FinetuneSettings()
    source_file: Path | None = None

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        problems: list[str] = []
        for section in _LIST_SECTIONS:
            seen: set[str] = set()
            for i, item in enumerate(getattr(self, section)):
                if item.name in seen:
                    problems.append(f"{section}[{i}].name: duplicate name {item.name!r}")
                seen.add(item.name)
        models = {m.name for m in self.models}
        dests = {d.name for d in self.destinations}
        sources = {s.name for s in self.sources}
        for i, route in enumerate(self.routes):
            if route.source is not None and route.source not in sources:
                problems.append(f"routes[{i}].source: unknown source {route.source!r}, "
                                f"expected one of {sorted(sources)}")
            for j, name in enumerate(route.models):
                if name not in models:
                    problems.append(
                        f"routes[{i}].models[{j}]: unknown model {name!r}, "
                        f"expected one of {sorted(models)}"
                    )
            for j, name in enumerate(route.destinations):
                if name not in dests:
                    problems.append(
                        f"routes[{i}].destinations[{j}]: unknown destination {name!r}, "
                        f"expected one of {sorted(dests)}"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def destination(self, name: str) -> DestinationSettings:
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"no destination named {name!r}; configured: "
                          f"{[d.name for d in self.destinations]}")


def default_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``-c FILE`` wins, then ``$PACSNODE_CONFIG``, then ``config/pacsnode.toml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"function-after", "function-before"} or "[" in part:
            continue
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _format_error(path: Path, err: Any) -> str:
    where = _loc(tuple(err["loc"]))
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, _known_keys(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{path}: {where}: unknown key{hint}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error" and msg.startswith(("match", "select")):
        return f"{path}: {where}.{msg}"       # a routing rule error carries its own path
    if err["type"] == "value_error" and not msg.startswith("action"):
        msg = "expected " + msg
    found = err.get("input")
    shown = repr(found) if not isinstance(found, dict) else "a table"
    return f"{path}: {where}: {msg}; found {shown}"


def _known_keys() -> list[str]:
    sections: list[type[BaseModel]] = [
        Settings, NodeSettings, StorageSettings, HttpSettings, AssemblySettings, JobSettings,
        AllowedCaller, DestinationSettings, SourceSettings, ModelSettings, RouteSettings,
        TlsSettings, ClassSettings, CodeSettings, ScheduleSettings, RetentionSettings,
        FinetuneSettings, ExecutorSettings,
    ]
    return sorted({key for model in sections for key in model.model_fields})


def _resolve(base: Path, value: Any) -> Any:
    return str((base / value).resolve()) if isinstance(value, str) else value


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative paths relative to the file that names them (DESIGN: config shape)."""
    storage = raw.get("storage")
    if isinstance(storage, dict):
        for key in ("spool", "audit_log", "database_password_file"):
            if key in storage:
                storage[key] = _resolve(base, storage[key])
        db = storage.get("database")
        if isinstance(db, str) and db.startswith("sqlite:///") and not db.startswith("sqlite:////"):
            rel = db.removeprefix("sqlite:///")
            if rel and rel != ":memory:":
                storage["database"] = "sqlite:///" + str((base / rel).resolve())
    for section, keys in (("http", ("token_file", "stow_token_file")),
                          ("finetune", ("store", "registry", "secret_file"))):
        table = raw.get(section)
        if isinstance(table, dict):
            for key in keys:
                if key in table:
                    table[key] = _resolve(base, table[key])
    node = raw.get("node")
    tls = node.get("tls") if isinstance(node, dict) else None
    if isinstance(tls, dict):
        for key in ("cert_file", "key_file", "ca_file"):
            if key in tls:
                tls[key] = _resolve(base, tls[key])
    for section in _LIST_SECTIONS:
        for item in raw.get(section, []) if isinstance(raw.get(section), list) else []:
            if isinstance(item, dict):
                for key in ("path", "token_file", "password_file", "ca_file", "cert_file",
                            "key_file"):
                    if key in item:
                        item[key] = _resolve(base, item[key])


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read, merge includes, resolve relative paths and validate. Raises ConfigError."""
    main = default_config_path(path).resolve() if path is None else Path(path).resolve()
    raw = _read_toml(main)
    storage = raw.setdefault("storage", {})
    if isinstance(storage, dict):       # defaults, too, are relative to the file
        storage.setdefault("spool", str(StorageSettings().spool))
        storage.setdefault("audit_log", str(StorageSettings().audit_log))
        storage.setdefault("database", StorageSettings().database)
    _resolve_paths(raw, main.parent)
    includes = raw.get("include", [])
    if not isinstance(includes, list):
        raise ConfigError(f"{main}: include: expected a list of file names; found {includes!r}")
    problems: list[str] = []
    for name in includes:
        inc = (main.parent / str(name)).resolve()
        extra = _read_toml(inc)
        _resolve_paths(extra, inc.parent)
        for key, value in extra.items():
            if key not in _LIST_SECTIONS or not isinstance(value, list):
                problems.append(f"{inc}: {key}: an included file may only hold "
                                f"{', '.join('[[' + s + ']]' for s in _LIST_SECTIONS)}")
                continue
            raw.setdefault(key, []).extend(value)
    if problems:
        raise ConfigError(f"{main}: invalid configuration", tuple(problems))
    raw["source_file"] = str(main)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        lines = tuple(_format_error(main, e) for e in exc.errors())
        message = f"{main}: invalid configuration ({len(lines)} problem(s))"
        raise ConfigError(message, lines) from None
