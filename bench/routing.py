"""Routing benchmark: what the routing engine costs per completed series, with 50 routes.

A realistic study (4 series from node/synth.py: CT thin axial, CT thick axial, CT coronal
reformat, MR axial) is turned into routing attributes the way the node does it
(``attributes_of`` of the first instance, plus NumberOfInstances, CallingAETitle,
CalledAETitle and SourceAddress), and 50 varied routes are compiled. Timed with
``time.perf_counter``, one sample per call, after a warm-up:

- ``decide`` at series level for one series (the whole list of 50 routes is passed; the
  series-level ones are evaluated), per series of the study and all series together;
- ``decide`` at study level for the whole study (the study-level routes);
- the one-off compile of the 50 routes (``CompiledRoute.of``, regex cache purged first),
  and the pydantic validation of 50 ``RouteSettings`` (which compiles them too);
- ``attributes_of`` for one data set: a header freshly read with ``dcmread``
  (``stop_before_pixels``, as the node reads it; the raw elements are converted on first
  access) and an in-memory synthetic data set; the ``dcmread`` itself for context.

The table (median and p95 per call) goes to stdout and is appended to bench/RESULTS.md
with the machine, the date (UTC) and the command. Target: below 1 ms per series.

    .venv/bin/python bench/routing.py [--iterations 2000] [--no-append]
"""

from __future__ import annotations

import argparse
import gc
import io
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pydicom
from pydicom.dataset import Dataset

from bench.common import RESULTS, append_results, command_line, machine, revision
from node.routing import CompiledRoute, Decision, attributes_of, decide
from node.settings import RouteSettings
from node.synth import SeriesSpec, SyntheticSeries, make_study

TARGET_S = 1e-3  # per series

# How each series of the study arrived (the pseudo-keywords of node/rules.py).
ARRIVAL = {
    "CT": {"CallingAETitle": "CT_SOMATOM2", "CalledAETitle": "PACSNODE",
           "SourceAddress": "10.20.3.14"},
    "MR": {"CallingAETitle": "MR_AERA1", "CalledAETitle": "PACSNODE",
           "SourceAddress": "10.20.5.21"},
}


def study_specs(size: int) -> tuple[SeriesSpec, ...]:
    return (
        SeriesSpec(modality="CT", slices=80, rows=size, columns=size, slice_thickness_mm=1.0,
                   series_description="Thorax-Abdomen 1.0 Br40", series_number=2, seed=1),
        SeriesSpec(modality="CT", slices=30, rows=size, columns=size, slice_thickness_mm=5.0,
                   series_description="Abdomen 5.0 Br36", series_number=3, seed=2),
        SeriesSpec(modality="CT", slices=40, rows=size, columns=size, slice_thickness_mm=2.0,
                   series_description="COR MPR 2.0", series_number=4, orientation="coronal",
                   seed=3),
        SeriesSpec(modality="MR", slices=24, rows=size, columns=size, slice_thickness_mm=4.0,
                   series_description="t1_tse_tra", series_number=5, seed=4),
    )


def route_specs() -> list[dict[str, Any]]:
    """50 routes as a config would hold them: most do not match this study, a few do."""
    r: list[dict[str, Any]] = [
        # series level: the kinds of rules a site writes by hand
        {"name": "ct-chest-nodules", "models": ["lung-nodules"], "priority": 70,
         "match": {"Modality": "CT", "SliceThickness": {"le": 1.5},
                   "SeriesDescription": {"regex": "thorax|chest|lung", "ignore_case": True},
                   "ImageType": {"contains": ["ORIGINAL", "PRIMARY", "AXIAL"]}}},
        {"name": "ct-liver-seg", "models": ["liver-seg"],
         "match": {"Modality": "CT", "SliceThickness": {"ge": 0.5, "le": 3},
                   "BodyPartExamined": {"in": ["ABDOMEN", "CHESTABDOMEN", "ABDOMENPELVIS"],
                                        "if_missing": True},
                   "ContrastBolusAgent": {"exists": False},
                   "NumberOfInstances": {"ge": 50}}},
        {"name": "ct-head-bleed", "models": ["ich-detect"], "priority": 90, "stop": True,
         "match": {"Modality": "CT", "BodyPartExamined": ["HEAD", "BRAIN"],
                   "SeriesDescription": {"regex": "^(head|brain|cch)", "ignore_case": True}}},
        {"name": "ct-spine-fracture", "models": ["spine-fx"],
         "match": {"Modality": "CT", "BodyPartExamined": {"regex": "SPINE$"},
                   "SliceThickness": {"le": 2}}},
        {"name": "ct-low-dose-screening", "models": ["lung-rads"],
         "match": {"Modality": "CT", "CTDIvol": {"lt": 3.0},
                   "SeriesDescription": {"regex": "low.?dose|ldct", "ignore_case": True}}},
        {"name": "ct-cardiac-calcium", "models": ["cac-score"],
         "match": {"Modality": "CT", "SliceThickness": {"equals": 3},
                   "any": [{"SeriesDescription": {"regex": "calc|cardiac|ca.?score",
                                                  "ignore_case": True}},
                           {"ProtocolName": {"regex": "cardiac", "ignore_case": True}}]}},
        {"name": "ct-recon-reformats-ignore", "action": "ignore",
         "match": {"Modality": "CT", "ImageType": {"contains": "DERIVED"},
                   "DerivationDescription": {"exists": True}}},
        {"name": "ct-kidney-stones", "models": ["urolith"],
         "match": {"Modality": "CT", "ContrastBolusAgent": {"exists": False},
                   "SeriesDescription": {"regex": "kub|stone|uro", "ignore_case": True}}},
        {"name": "ct-body-composition", "models": ["body-comp"], "priority": 20,
         "match": {"Modality": "CT", "KVP": {"ge": 100, "le": 140},
                   "SliceThickness": {"gt": 3, "le": 5},
                   "ImageType": {"contains": ["ORIGINAL", "AXIAL"]},
                   "not": {"SeriesDescription": {"regex": "mip|mpr|vrt", "ignore_case": True}}}},
        {"name": "ct-pe-detect", "models": ["pe-detect"], "priority": 85,
         "match": {"Modality": "CT",
                   "all": [{"SeriesDescription": {"regex": "angio|cta|pulm|pe",
                                                  "ignore_case": True}},
                           {"ContrastBolusAgent": {"exists": True}},
                           {"SliceThickness": {"le": 1.25}}]}},
        {"name": "mr-brain-lesions", "models": ["ms-lesions"],
         "match": {"Modality": "MR", "BodyPartExamined": ["HEAD", "BRAIN"],
                   "SeriesDescription": {"regex": "flair", "ignore_case": True}}},
        {"name": "mr-prostate", "models": ["pi-rads"],
         "match": {"Modality": "MR", "BodyPartExamined": "PROSTATE",
                   "any": [{"SeriesDescription": {"regex": "t2.*tra", "ignore_case": True}},
                           {"SeriesDescription": {"regex": "adc|dwi", "ignore_case": True}}]}},
        {"name": "mr-liver-t1", "models": ["liver-mr"],
         "match": {"Modality": "MR", "MagneticFieldStrength": {"ge": 1.4, "le": 3.1},
                   "SeriesDescription": {"regex": "^t1", "ignore_case": True},
                   "RepetitionTime": {"lt": 1000}, "EchoTime": {"lt": 30}}},
        {"name": "mr-knee-cartilage", "models": ["knee-seg"],
         "match": {"Modality": "MR", "BodyPartExamined": "KNEE",
                   "MRAcquisitionType": "3D"}},
        {"name": "mr-cardiac-function", "models": ["cmr-lv"],
         "match": {"Modality": "MR", "SeriesDescription": {"regex": "cine|sa_|4ch",
                                                           "ignore_case": True},
                   "NumberOfInstances": {"ge": 100}}},
        {"name": "mr-angio", "models": ["aneurysm"],
         "match": {"Modality": "MR", "AngioFlag": "Y", "MRAcquisitionType": "3D"}},
        {"name": "pet-ct-suv", "models": ["pet-lesions"],
         "match": {"Modality": ["PT", "NM"], "Units": ["BQML", "CNTS"],
                   "DecayCorrection": {"exists": True}}},
        {"name": "mammo-density", "models": ["breast-density"],
         "match": {"Modality": "MG", "ViewPosition": ["CC", "MLO"],
                   "ImageType": {"contains": "ORIGINAL"}}},
        {"name": "cxr-triage", "models": ["cxr-triage"], "priority": 80,
         "match": {"Modality": ["CR", "DX"], "BodyPartExamined": "CHEST",
                   "ViewPosition": {"in": ["PA", "AP"], "if_missing": True}}},
        {"name": "us-thyroid", "models": ["ti-rads"],
         "match": {"Modality": "US", "BodyPartExamined": {"regex": "thyroid|neck",
                                                          "ignore_case": True}}},
        {"name": "pediatric-bone-age", "models": ["bone-age"],
         "match": {"Modality": ["CR", "DX"], "BodyPartExamined": "HAND",
                   "PatientAge": {"regex": "^0(0|1)[0-9]Y$"}}},
        {"name": "research-trial-forward", "destinations": ["research-pacs"],
         "match": {"ClinicalTrialProtocolID": {"exists": True},
                   "not": {"PatientIdentityRemoved": "NO"}}},
        {"name": "ignore-localizers", "action": "ignore", "stop": True,
         "match": {"any": [{"ImageType": {"contains": "LOCALIZER"}},
                           {"SeriesDescription": {"regex": "scout|topogram|localizer|survey",
                                                  "ignore_case": True}},
                           {"NumberOfInstances": {"lt": 3}}]}},
        {"name": "ignore-dose-reports", "action": "ignore",
         "match": {"Modality": ["SR", "KO", "PR", "OT"]}},
        {"name": "ignore-secondary-capture", "action": "ignore",
         "match": {"SOPClassUID": {"regex": r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.7"}}},
        {"name": "ignore-burned-in", "action": "ignore",
         "match": {"BurnedInAnnotation": "YES"}},
        {"name": "archive-ct-originals", "destinations": ["archive"], "priority": 10,
         "match": {"Modality": "CT", "ImageType": {"contains": ["ORIGINAL", "PRIMARY"]},
                   "SourceAddress": {"network": "10.20.0.0/16"}}},
        {"name": "archive-mr", "destinations": ["archive"], "priority": 10,
         "match": {"Modality": "MR", "CallingAETitle": {"regex": "^MR_"}}},
        {"name": "teleradiology-night", "destinations": ["telerad"],
         "match": {"InstitutionName": {"regex": "night|remote", "ignore_case": True},
                   "SeriesTime": {"ge": 200000}}},
        {"name": "external-source-quarantine", "destinations": ["quarantine"], "stop": True,
         "match": {"not": {"SourceAddress": {"network": "10.0.0.0/8"}},
                   "CallingAETitle": {"exists": True}}},
        {"name": "vendor-phantom-qa", "destinations": ["qa"],
         "match": {"PatientName": {"regex": "phantom|^qa\\^", "ignore_case": True},
                   "Manufacturer": {"in": ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips"]}}},
    ]
    # Per-site forwarding, one route per modality device: the repetitive bulk of a
    # real config (only the CT scanner of this study matches its own).
    sites = [("CT_SOMATOM1", "10.20.3.13", "CT"), ("CT_SOMATOM2", "10.20.3.14", "CT"),
             ("CT_REVOLUTION", "10.21.3.40", "CT"), ("MR_PRISMA", "10.20.5.20", "MR"),
             ("MR_SKYRA", "10.21.5.30", "MR"), ("PT_BIOGRAPH", "10.20.7.10", "PT"),
             ("MG_REVELATION", "10.22.9.2", "MG"), ("DX_YSIO1", "10.20.8.11", "DX"),
             ("DX_YSIO2", "10.20.8.12", "DX"), ("US_LOGIQ", "10.23.1.5", "US"),
             ("CR_FCR1", "10.24.2.3", "CR"), ("NM_SYMBIA", "10.20.7.20", "NM"),
             ("XA_ARTIS", "10.20.6.1", "XA")]
    for aet, address, modality in sites:
        r.append({"name": f"site-{aet.lower().replace('_', '-')}",
                  "destinations": [f"viewer-{modality.lower()}"], "priority": 30,
                  "match": {"CallingAETitle": aet, "SourceAddress": {"network": f"{address}/32"},
                            "Modality": {"in": [modality]}}})
    # study level: has_series / no_series, select with prefer
    r += [
        {"name": "study-liver-ct-mr", "level": "study", "models": ["liver-fusion"],
         "match": {"Modality": "CT", "has_series": {"Modality": "MR",
                                                    "SeriesDescription": {"regex": "t1",
                                                                          "ignore_case": True}}},
         "select": {"where": {"Modality": "CT", "ImageType": {"contains": "ORIGINAL"}},
                    "min_instances": 20, "prefer": ["SliceThickness", "-NumberOfInstances"]}},
        {"name": "study-thin-ct-only", "level": "study", "models": ["organ-seg"],
         "match": {"Modality": "CT", "SliceThickness": {"le": 1.0},
                   "no_series": {"ImageType": {"contains": "LOCALIZER"}}},
         "select": {"where": {"Modality": "CT", "SliceThickness": {"le": 1.5}},
                    "prefer": ["SliceThickness", "-NumberOfInstances", "SeriesNumber"]}},
        {"name": "study-pet-ct", "level": "study", "models": ["pet-ct-fusion"],
         "match": {"Modality": "PT", "has_series": {"Modality": "CT"}},
         "select": {"where": {"Modality": "PT"}, "prefer": ["-NumberOfInstances"]}},
        {"name": "study-mr-prostate-mpmri", "level": "study", "models": ["pi-rads-study"],
         "match": {"Modality": "MR", "BodyPartExamined": "PROSTATE",
                   "has_series": {"SeriesDescription": {"regex": "adc", "ignore_case": True}}}},
        {"name": "study-forward-complete", "level": "study", "destinations": ["archive"],
         "match": {"all": [{"StudyDescription": {"exists": True}},
                           {"no_series": {"BurnedInAnnotation": "YES"}}]}},
        # the fallback: only when no other series-level route matched
        {"name": "fallback-archive", "destinations": ["archive"], "fallback": True,
         "priority": 5, "match": {}},
    ]
    return r


@dataclass(frozen=True)
class Row:
    what: str
    samples: tuple[float, ...]  # seconds per call

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sample(fn: Callable[[], object], iterations: int, *, warmup: int = 50,
           setup: Callable[[], object] | None = None) -> tuple[float, ...]:
    """One perf_counter sample per call; ``setup`` runs before each call, untimed."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    out = []
    clock = time.perf_counter
    for _ in range(iterations):
        if setup is not None:
            setup()
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return tuple(out)


def series_attributes(series: SyntheticSeries) -> dict[str, Any]:
    """What read_series_attributes builds: the first instance's header plus the arrival."""
    first = min(series.datasets, key=lambda ds: int(ds.InstanceNumber))
    return attributes_of(first, NumberOfInstances=len(series.datasets),
                         **ARRIVAL[series.spec.modality])


def header_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def read_header(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)


def versions() -> str:
    import pydantic
    return (f"{revision()}, Python {platform.python_version()}, pydicom {pydicom.__version__}, "
            f"pydantic {pydantic.VERSION}")


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def table(rows: Sequence[Row]) -> str:
    lines = ["| what | calls | median µs | p95 µs | p95 vs 1 ms |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.what} | {len(row.samples)} | {_us(row.quantile(0.5))} | "
                     f"{_us(row.quantile(0.95))} | {row.quantile(0.95) / TARGET_S:.3f} |")
    return "\n".join(lines)


def _label(attrs: dict[str, Any]) -> str:
    return f"#{attrs['SeriesNumber']} {attrs['Modality']} {attrs['SeriesDescription']!r}"


def outcome(decisions: Sequence[Decision]) -> str:
    matched = [d.route for d in decisions if d.matched]
    fired = [d.route for d in decisions if d.fires]
    return (f"{len(decisions)} evaluated, {len(matched)} matched, {len(fired)} fire "
            f"({', '.join(fired) or 'none'})")


def report(args: argparse.Namespace, rows: Sequence[Row], notes: Sequence[str],
           counts: str) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    per_series = next(r for r in rows if r.what.startswith("decide, series level, all"))
    p95 = per_series.quantile(0.95)
    verdict = "met" if p95 < TARGET_S else "NOT met"
    return "\n".join([
        f"## {now}: routing, 50 routes, {args.iterations} calls per row",
        "",
        f"- command: `{command_line(__file__)}`",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        f"- routes: {counts}",
        *(f"- {n}" for n in notes),
        (f"- target below 1 ms per series: {verdict} (series-level decide, all series: "
         f"median {_us(per_series.quantile(0.5))} µs, p95 {_us(p95)} µs = "
         f"{p95 / TARGET_S:.0%} of the budget)"),
        "",
        table(rows),
        "",
    ])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=2000,
                   help="timed calls per row (compile and validation rows: a tenth)")
    p.add_argument("--size", type=int, default=256,
                   help="rows = columns of the synthetic series (only Rows/Columns change)")
    p.add_argument("--results", type=Path, default=RESULTS, help="file the table is appended to")
    p.add_argument("--no-append", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.iterations < 10 or args.size < 16:
        p.error("--iterations must be >= 10 and --size >= 16")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.iterations
    t0 = time.perf_counter()
    study = make_study(*study_specs(args.size), seed=7)
    series = [series_attributes(s) for s in study.series]
    print(f"generated {len(study.series)} series, "
          f"{sum(len(s.datasets) for s in study.series)} instances in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)

    specs = route_specs()
    settings = [RouteSettings(**s) for s in specs]
    if len(settings) != 50:
        raise SystemExit(f"route_specs() gives {len(settings)} routes, expected 50")
    routes = tuple(CompiledRoute.of(s) for s in settings)
    by_level = {lvl: sum(1 for s in settings if s.level == lvl and not s.fallback)
                for lvl in ("series", "study")}
    counts = (f"{len(settings)} in all: {by_level['series']} series level, "
              f"{by_level['study']} study level, "
              f"{sum(1 for s in settings if s.fallback)} fallback (series level)")

    notes = []
    for attrs in series:
        notes.append(f"series {_label(attrs)} ({attrs['NumberOfInstances']} instances): "
                     + outcome(decide(routes, "series", series, focus=attrs)))
    notes.append("study level, whole study: " + outcome(decide(routes, "study", series)))

    rows: list[Row] = []
    pooled: list[float] = []
    for attrs in series:
        samples = sample(lambda a=attrs: decide(routes, "series", series, focus=a), n)
        pooled += samples
        rows.append(Row(f"decide, series level, series {_label(attrs)}", samples))
    rows.append(Row(f"decide, series level, all {len(series)} series (per series)",
                    tuple(pooled)))
    rows.append(Row(f"decide, study level, whole study ({len(series)} series)",
                    sample(lambda: decide(routes, "study", series), n)))

    few = max(10, n // 10)
    rows.append(Row("compile 50 routes (CompiledRoute.of × 50, regex cache purged)",
                    sample(lambda: [CompiledRoute.of(s) for s in settings], few, warmup=5,
                           setup=re.purge)))
    rows.append(Row("validate 50 RouteSettings (pydantic, compiles too, regex cache purged)",
                    sample(lambda: [RouteSettings(**s) for s in specs], few, warmup=5,
                           setup=re.purge)))

    first = study.series[0].datasets[0]
    data = header_bytes(first)
    fresh: list[Dataset] = []

    def next_header() -> None:
        fresh.clear()
        fresh.append(read_header(data))

    rows.append(Row("dcmread one header (stop_before_pixels, from memory; context)",
                    sample(lambda: read_header(data), n)))
    rows.append(Row("attributes_of one header, freshly read (raw elements converted)",
                    sample(lambda: attributes_of(fresh[0]), n, setup=next_header)))
    rows.append(Row("attributes_of one data set, in memory (values already parsed)",
                    sample(lambda: attributes_of(first), n)))
    notes.append(f"data: node/synth.py study of {len(series)} series, {args.size}×{args.size}; "
                 f"attributes per series {min(len(a) for a in series)}-"
                 f"{max(len(a) for a in series)} (first instance + NumberOfInstances, "
                 f"CallingAETitle, CalledAETitle, SourceAddress); header "
                 f"{len(data) - len(first.PixelData)} bytes without pixels")
    notes.append(f"timing: time.perf_counter per call after a warm-up, garbage collector "
                 f"{'on' if gc.isenabled() else 'off'}; compile/validation rows {few} calls")

    text = report(args, rows, notes, counts)
    print(text)
    if not args.no_append:
        append_results(text, args.results)
        print(f"appended to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
