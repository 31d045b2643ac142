"""The ``pacsnode`` command line: one entry point, subcommands.

Exit codes: 0 success; 1 the operation failed (a peer refused, a job is in the wrong
state); 2 bad usage; 3 invalid configuration; 4 not found.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from node.errors import ConfigError, DeliveryError, JobError, PacsnodeError
from node.settings import Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG, EXIT_NOT_FOUND = 0, 1, 2, 3, 4

Command = Callable[[argparse.Namespace], int]


def _emit(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        human()


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    summary = {
        "file": str(settings.source_file),
        "ae_title": settings.node.ae_title,
        "port": settings.node.port,
        "spool": str(settings.storage.spool),
        "database": settings.storage.database,
        "destinations": [d.name for d in settings.destinations],
        "models": [m.name for m in settings.models],
        "routes": [r.name for r in settings.routes],
    }
    _emit(args, {"valid": True, **summary}, lambda: print(
        f"{settings.source_file}: valid\n"
        f"  listener {settings.node.ae_title} on port {settings.node.port}\n"
        f"  spool {settings.storage.spool}\n"
        f"  {len(settings.destinations)} destination(s), {len(settings.models)} model(s), "
        f"{len(settings.routes)} route(s)"))
    return EXIT_OK


def cmd_config_reload(args: argparse.Namespace) -> int:
    """Validate the file, then ask the running node to load it (SIGHUP)."""
    import os
    import signal

    from node.app import pid_file

    settings = _settings(args)
    path = pid_file(settings)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"config reload: no running node found through {path} ({exc})", file=sys.stderr)
        return EXIT_FAILED
    _emit(args, {"reloaded": True, "pid": pid, "routes": [r.name for r in settings.routes]},
          lambda: print(f"{settings.source_file}: valid; node (pid {pid}) asked to reload "
                        f"{len(settings.routes)} route(s)"))
    return EXIT_OK


def cmd_route_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from node.explain import explain, format_explain, studies_from_folder, study_from_index

    settings = _settings(args)
    target = Path(args.target)
    skipped: list[str] = []
    if target.is_dir():
        studies, skipped = studies_from_folder(target)
    else:
        view = study_from_index(settings, args.target)
        studies = [view] if view is not None else []
    if not studies:
        print(f"route explain: no DICOM study found for {args.target!r} (neither a folder of "
              f"DICOM files nor a study UID in the index)", file=sys.stderr)
        return EXIT_NOT_FOUND
    reports = [explain(settings, study) for study in studies]
    _emit(args, {"studies": reports, "skipped_files": skipped}, lambda: print(
        "\n\n".join(format_explain(r) for r in reports)
        + (f"\n({len(skipped)} file(s) skipped: not readable as DICOM)" if skipped else "")))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from node.app import Node
    from node.log import setup_logging

    settings = _settings(args)
    setup_logging(args.log_level)
    if args.role == "worker":
        # The receiver nudges workers with SIGUSR1 when it queues work; until the worker's
        # runner installs its handler, a nudge must not kill it (the default action).
        import signal
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        from adapters.senders import AnySender
        from node.inference.service import WorkerNode

        sender = AnySender(ae_title=settings.node.ae_title)
        if settings.executor.kind == "ray":
            from node.inference.ray_executor import RayWorker

            RayWorker(settings, sender=sender).serve_forever()
        else:
            WorkerNode(settings, sender=sender, device=args.device).serve_forever()
    elif args.role == "listener":
        import os
        from node.listener import ListenerNode

        fd = os.environ.get("PACSNODE_RELEASE_FD")
        listen_fd = os.environ.get("PACSNODE_LISTEN_FD")
        if not listen_fd:
            raise ConfigError("a listener process is started by its receiver (pacsnode "
                              "serve with [node] listener_processes > 1), which passes it "
                              "the listening socket")
        ListenerNode(settings, index=args.listener_index,
                     release_fd=int(fd) if fd else None,
                     listen_fd=int(listen_fd)).serve_forever()
    else:
        Node(settings, spawn_worker=args.role == "all").serve_forever()
    return EXIT_OK


def cmd_infer(args: argparse.Namespace) -> int:
    """One-off inference on a folder of one series, or a series of a study in the index."""
    from pathlib import Path

    from node.inference.runner import ModelPool
    from node.inference.service import save_prediction
    from node.inference.volume import load_volume

    from node.finetune.registry import active_model_settings

    settings = _settings(args)
    models = {m.name: m for m in active_model_settings(settings)}
    if args.model not in models:
        print(f"infer: no model named {args.model!r}; configured: {sorted(models)}",
              file=sys.stderr)
        return EXIT_NOT_FOUND
    files = _series_files(settings, args.target, args.series)
    if not files:
        print(f"infer: no series found for {args.target!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    volume = load_volume(files)
    prediction = ModelPool(models).predict(args.model, volume)
    saved = save_prediction(Path(args.out), prediction, volume)
    info = {"series_instance_uid": volume.series_instance_uid, "output": str(saved.path),
            "model": prediction.model, "version": prediction.version,
            "device": prediction.device, "seconds": round(prediction.seconds, 3),
            "voxels": saved.voxels,
            "volume_mm3": {k: round(v, 1) for k, v in saved.volume_mm3.items()}}
    _emit(args, info, lambda: print(
        f"{prediction.model} {prediction.version} on {prediction.device}: "
        f"{prediction.seconds:.2f} s; " + (", ".join(
            f"label {k}: {v:.0f} mm3" for k, v in saved.volume_mm3.items()) or "nothing found")
        + f"\nwrote {saved.path}"))
    return EXIT_OK


def _series_files(settings: Settings, target: str, series: str | None) -> list[Any]:
    from pathlib import Path

    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(target)
    if path.is_dir():
        groups: dict[str, list[Path]] = {}
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            try:
                uid = str(pydicom.dcmread(file, stop_before_pixels=True).SeriesInstanceUID)
            except (InvalidDicomError, AttributeError, OSError, ValueError):
                continue
            groups.setdefault(uid, []).append(file)
    else:
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from node.db import InstanceRow, SeriesRow, open_database

        engine = open_database(settings.storage)
        with Session(engine) as session:
            rows = session.execute(select(InstanceRow.series_instance_uid, InstanceRow.path)
                                   .join(SeriesRow)
                                   .where(SeriesRow.study_instance_uid == target)).all()
        engine.dispose()
        groups = {}
        for uid, rel in rows:
            groups.setdefault(uid, []).append(settings.storage.spool / rel)
    if series is not None:
        return groups.get(series, [])
    if len(groups) > 1:
        raise PacsnodeError(f"{target} holds {len(groups)} series; choose one with --series "
                            f"({', '.join(sorted(groups))})")
    return next(iter(groups.values()), [])


def cmd_models_list(args: argparse.Namespace) -> int:
    from node.inference.runner import pick_device, read_info
    from node.spool import worker_statuses

    settings = _settings(args)
    loaded: dict[str, bool] = {}
    for status in worker_statuses(settings.storage.spool):
        for name, is_loaded in status.get("loaded", {}).items():
            loaded[name] = loaded.get(name, False) or bool(is_loaded)
    from node.finetune.registry import Registry, active_model_settings, registry_root

    rows = []
    for m in active_model_settings(settings):
        registry = Registry(registry_root(settings), m.name)
        active = registry.active()
        row: dict[str, Any] = {"name": m.name, "format": m.format, "path": str(m.path),
                               "loaded": bool(loaded.get(m.name, False)),
                               "active_version": active.number if active else None,
                               "versions": [{"number": v.number, "version": v.version,
                                             "parent": v.meta.get("parent"),
                                             "date": v.meta.get("date")}
                                            for v in registry.versions()]}
        try:
            info = read_info(m)
            row.update(version=info.version, weights_sha256=info.weights_sha256,
                       device=pick_device(m.device), ok=True, error=None)
        except PacsnodeError as exc:
            row.update(version=m.version, weights_sha256=None, device=m.device, ok=False,
                       error=str(exc))
        rows.append(row)
    _emit(args, rows, lambda: print("\n".join(
        f"{r['name']:<16} {r['version'] or '?':<8} {r['format']:<13} "
        f"sha256 {(r['weights_sha256'] or '-')[:12]:<12} {r['device']:<6} "
        f"{'loaded' if r['loaded'] else 'not loaded'}"
        + (f"  ERROR: {r['error']}" if r["error"] else "")
        + "".join(f"\n  {'*' if v['number'] == r['active_version'] else ' '} version "
                  f"{v['number']}: {v['version']} (parent {v['parent']}, {v['date']})"
                  for v in r["versions"]) for r in rows) or "(no models)"))
    return EXIT_OK if all(r["ok"] for r in rows) else EXIT_FAILED


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from node.finetune.registry import Registry, registry_root

    settings = _settings(args)
    if args.name not in {m.name for m in settings.models}:
        print(f"models rollback: no model named {args.name!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    registry = Registry(registry_root(settings), args.name)
    before = registry.active()
    now = registry.rollback(args.to)
    _emit(args, {"model": args.name, "from": before.number if before else None,
                 "active_version": now.number, "version": now.version},
          lambda: print(f"{args.name}: active version {now.number} ({now.version}), was "
                        f"{before.number if before else 'none'}; running workers pick it up "
                        f"at their next job"))
    return EXIT_OK


def _progress_bar(done: int, total: int, text: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text}   ")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def cmd_finetune(args: argparse.Namespace) -> int:
    """harvest -> de-identify -> split -> train -> evaluate -> gate -> promote."""
    from node.finetune.pipeline import run_finetune
    from node.log import setup_logging

    settings = _settings(args)
    setup_logging("WARNING" if args.json else "INFO")
    if args.model not in {m.name for m in settings.models}:
        print(f"finetune: no model named {args.model!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    outcome = run_finetune(settings, args.model, rebuild_test_set=args.rebuild_test_set,
                           progress=None if args.json else _progress_bar)
    data = outcome.as_dict()

    def human() -> None:
        print(f"{outcome.model}: {outcome.status.upper()}; active version "
              f"{outcome.active_version} ({outcome.active_version_name})")
        for reason in outcome.reasons:
            print(f"  {reason}")
        print(f"  pairs: {outcome.split}; {outcome.new_pairs} not trained on before; "
              f"{outcome.ignored_automatic} AI-made SEG(s) ignored")
        for uid, reason in outcome.refused:
            print(f"  refused {uid}: {reason}")

    _emit(args, data, human)
    return EXIT_OK if outcome.status != "kept" else EXIT_FAILED


def cmd_echo(args: argparse.Namespace) -> int:
    from adapters.senders import AnySender

    settings = _settings(args)
    dest = settings.destination(args.destination)
    try:
        seconds = AnySender(ae_title=settings.node.ae_title).echo(dest)
    except DeliveryError as exc:
        error = str(exc)
        _emit(args, {"destination": dest.name, "ok": False, "error": error},
              lambda: print(f"echo {dest.name}: FAILED: {error}", file=sys.stderr))
        return EXIT_FAILED
    where = dest.url or f"{dest.ae_title}@{dest.host}:{dest.port}"
    _emit(args, {"destination": dest.name, "ok": True, "seconds": round(seconds, 4)},
          lambda: print(f"echo {dest.name} ({where}): "
                        f"ok in {seconds * 1000:.1f} ms"))
    return EXIT_OK


def cmd_studies(args: argparse.Namespace) -> int:
    from node import queries

    settings = _settings(args)
    if args.action == "show":
        study = queries.study_detail(settings, args.uid)
        if study is None:
            print(f"no study {args.uid}", file=sys.stderr)
            return EXIT_NOT_FOUND
        _emit(args, study, lambda: print(queries.format_study(study)))
        return EXIT_OK
    studies = queries.list_studies(settings, limit=args.limit)
    _emit(args, studies, lambda: print(queries.format_studies(studies)))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    from node import queries
    from node.db import open_database
    from node.jobs import JobStore
    from node.outbox import Outbox

    settings = _settings(args)
    engine = open_database(settings.storage)
    store = JobStore(engine, settings.jobs)
    if args.action == "list":
        jobs = [queries.job_dict(j) for j in store.list(state=args.state, limit=args.limit)]
        _emit(args, jobs, lambda: print(queries.format_jobs(jobs)))
        return EXIT_OK
    if args.action == "release":
        count = store.release_owner(args.owner)
        _emit(args, {"owner": args.owner, "released": count},
              lambda: print(f"{count} in-flight job(s) of {args.owner} back in the queue"))
        return EXIT_OK
    try:
        if args.action == "show":
            job = store.get(args.id)
        elif args.action == "retry":
            job = store.retry(args.id)
        else:
            job = store.cancel(args.id)
    except JobError as exc:
        print(f"jobs {args.action}: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND if "no job" in str(exc) else EXIT_FAILED
    data = queries.job_dict(job)
    data["deliveries"] = [d.as_dict() for d in Outbox(engine, settings.jobs).list(job.id)]
    _emit(args, data, lambda: print(queries.format_job(data)))
    return EXIT_OK


def cmd_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from node import synth

    try:
        lesions = tuple(synth.parse_lesion(t) for t in args.lesion) or None
        spec = synth.SeriesSpec(
            modality=args.modality, slices=args.slices, rows=args.size, columns=args.size,
            slice_thickness_mm=args.thickness, lesions=lesions, seed=args.seed,
            omit_instance_numbers=tuple(args.omit),
        )
        study = synth.make_study(spec, seed=args.seed)
        paths = synth.write_study(study, Path(args.out), transfer_syntax=args.transfer_syntax)
    except ValueError as exc:
        print(f"pacsnode synth: {exc}", file=sys.stderr)
        return EXIT_USAGE
    info = {"study_instance_uid": study.study_instance_uid, "files": len(paths),
            "out": args.out,
            "series": [{"series_instance_uid": s.series_instance_uid,
                        "lesion_volume_mm3": round(s.lesion_volume_mm3, 1)} for s in study.series]}
    _emit(args, info, lambda: print(
        f"wrote {len(paths)} file(s) of study {study.study_instance_uid} to {args.out}"))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacsnode", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="config file (default: $PACSNODE_CONFIG, "
                        "then config/pacsnode.toml)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the node")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--role", choices=["all", "receiver", "worker", "listener"], default="all",
                   help="all: receiver plus a worker process (default); receiver: DICOM, "
                   "assembly, routing, delivery (never imports torch); worker: inference; "
                   "listener: C-STORE intake only (started by the receiver when "
                   "[node] listener_processes > 1)")
    p.add_argument("--listener-index", type=int, default=1,
                   help="listener role: which child this is (names its status file)")
    p.add_argument("--device", help="worker role: serve only the models configured with "
                   "this device (one worker per device queue)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("check", parents=[common], help="validate the configuration")
    c.set_defaults(func=cmd_config_check)
    c = csub.add_parser("reload", parents=[common],
                        help="validate, then make the running node load routes (SIGHUP)")
    c.set_defaults(func=cmd_config_reload)

    p = sub.add_parser("route", help="routing tools")
    rsub = p.add_subparsers(dest="action", required=True)
    r = rsub.add_parser("explain", parents=[common],
                        help="show what every route decides for a study, and why")
    r.add_argument("target", help="a study instance UID in the index, or a folder of DICOM files")
    r.set_defaults(func=cmd_route_explain)

    p = sub.add_parser("echo", parents=[common], help="C-ECHO a configured destination")
    p.add_argument("destination")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("studies", help="studies in the index")
    ssub = p.add_subparsers(dest="action", required=True)
    s = ssub.add_parser("list", parents=[common])
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=cmd_studies)
    s = ssub.add_parser("show", parents=[common])
    s.add_argument("uid")
    s.set_defaults(func=cmd_studies)

    p = sub.add_parser("jobs", help="the job table")
    jsub = p.add_subparsers(dest="action", required=True)
    j = jsub.add_parser("list", parents=[common])
    j.add_argument("--state")
    j.add_argument("--limit", type=int, default=50)
    j.set_defaults(func=cmd_jobs)
    for action in ("show", "retry", "cancel"):
        j = jsub.add_parser(action, parents=[common])
        j.add_argument("id", type=int)
        j.set_defaults(func=cmd_jobs)
    j = jsub.add_parser("release", parents=[common],
                        help="put back the in-flight jobs of a receiver or worker that is "
                             "gone for good (shared PostgreSQL database)")
    j.add_argument("--owner", required=True, help="as in `jobs list --json`, e.g. "
                   "host:worker-ray or host:receiver-11112")
    j.set_defaults(func=cmd_jobs)

    p = sub.add_parser("infer", parents=[common], help="run a model once on one series")
    p.add_argument("--model", required=True)
    p.add_argument("--series", help="series UID, when the target holds several")
    p.add_argument("--out", required=True, help="folder for the prediction (.npz)")
    p.add_argument("target", help="a folder of DICOM files, or a study UID in the index")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("models", help="the configured models")
    msub = p.add_subparsers(dest="action", required=True)
    m = msub.add_parser("list", parents=[common])
    m.set_defaults(func=cmd_models_list)
    m = msub.add_parser("rollback", parents=[common],
                        help="make the active version's parent (or --to N) active again")
    m.add_argument("name")
    m.add_argument("--to", type=int, help="version number to activate")
    m.set_defaults(func=cmd_models_rollback)

    p = sub.add_parser("finetune", parents=[common],
                       help="fine-tune a model on labelled local studies, promote if better")
    p.add_argument("--model", required=True)
    p.add_argument("--rebuild-test-set", action="store_true",
                   help="draw a new locked test set (metrics are then not comparable with "
                   "earlier versions')")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("synth", parents=[common], help="write a synthetic study")
    p.add_argument("--modality", choices=["CT", "MR"], default="CT")
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--size", type=int, default=256, help="rows = columns")
    p.add_argument("--thickness", type=float, default=1.5, help="slice thickness in mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lesion", action="append", default=[], metavar="X,Y,Z,R,VALUE")
    p.add_argument("--omit", type=int, action="append", default=[], metavar="INSTANCE_NUMBER",
                   help="leave out a slice (simulates an incomplete series)")
    p.add_argument("--transfer-syntax", help="re-encode with this transfer syntax UID")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except ConfigError as exc:
        if getattr(args, "json", False):
            json.dump({"valid": False, "error": exc.args[0], "problems": list(exc.problems)},
                      sys.stdout, indent=2)
            sys.stdout.write("\n")
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except PacsnodeError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
