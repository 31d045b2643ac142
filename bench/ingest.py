"""Ingest benchmark: C-STORE throughput of pacsnode against dcmtk storescp and Orthanc.

One synthetic CT series is generated once, then sent with dcmtk ``storescu`` (one
association per storescu process; ``--parallel N`` splits the files across N processes)
to each receiver in turn, every receiver on 127.0.0.1 with fresh, empty storage:

- ``storescp``: dcmtk's storage SCP, ``+B`` (bit-preserving: the received bytes go
  straight to the file, no parse and re-encode) into a temp folder; it never fsyncs;
- ``orthanc``: the Debian Orthanc with its default settings (``SyncStorageArea`` true:
  fsync per file) and fresh temp storage and index;
- ``pacsnode``: ``pacsnode serve`` with a default config (fsync of file and directory;
  ``listener_processes = "auto"``: one process per usable CPU, at most 4);
  ``--listeners auto 1 4`` runs it once per value of ``[node] listener_processes`` (named
  ``pacsnode``, ``pacsnode-l1``, ``pacsnode-l4``), its CPU column counting the listener
  children too; ``--baseline REV`` adds pacsnode as of REV, with
  ``--baseline-listeners N`` processes (a number: older revisions know no "auto").

The clock runs from the start of storescu until the last storescu exits. Each receiver
must then hold all N instances, or the run fails. ``--warmup K`` first sends K instances
per association of another series the same way, untimed, so that the timed send meets
a receiver that has served associations before (a running node) rather than one that
has just started; without it the timed send is the receiver's first. The table goes to
stdout and is appended to bench/RESULTS.md with the machine, the date (UTC) and the
command.

    .venv/bin/python bench/ingest.py [--slices 300] [--size 512] [--repeat 1] [--parallel 1]
                                     [--listeners auto 1 4] [--baseline REV]
                                     [--baseline-listeners 1] [--warmup 0]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (
    AUTO,
    RESULTS,
    append_results,
    command_line,
    first_line,
    listener_count,
    listeners_arg,
    machine,
    revision,
)
from node.synth import SeriesSpec, make_study, write_study
from tests.support import (
    TCP_ENV,
    Orthanc,
    free_port,
    wait_port,
    write_config,
)

RECEIVERS = ("storescp", "orthanc", "pacsnode")


@dataclass(frozen=True)
class Run:
    receiver: str
    seconds: float
    instances: int
    nbytes: int
    cpu_seconds: float  # the receiver's user + system time during the send
    by_children: int | None = None  # instances pacsnode's listener children stored


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, of its children it has reaped and of those
    still running (pacsnode's listener children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children |= {int(c) for c in (task / "children").read_text().split()}
    for child in children:
        with contextlib.suppress(OSError):
            own += cpu_seconds(child)
    return own


class Receiver:
    """A started receiver: where to send, and how many instances it holds."""

    def __init__(self, name: str, aet: str, port: int, count: Callable[[], int],
                 stop: Callable[[], None], pid: int) -> None:
        self.name, self.aet, self.port = name, aet, port
        self.count, self.stop, self.pid = count, stop, pid


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start_storescp(work: Path, *, bit_preserving: bool) -> Receiver:
    out = work / "out"
    out.mkdir(parents=True)
    port = free_port()
    # --fork: one child per association, so parallel senders are served in parallel
    # (without it storescp serves one association at a time).
    cmd = ["storescp", "--fork", "-aet", "STORESCP", "-od", str(out)]
    cmd += ["+B"] if bit_preserving else []
    log = (work / "storescp.log").open("ab")
    proc = subprocess.Popen([*cmd, str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=TCP_ENV, start_new_session=True)

    def stop() -> None:
        _terminate(proc)
        log.close()

    try:
        wait_port(port, proc=proc)
    except BaseException:
        stop()
        raise
    return Receiver("storescp", "STORESCP", port,
                    lambda: sum(1 for p in out.iterdir() if p.is_file()), stop, proc.pid)


def start_orthanc(work: Path) -> Receiver:
    orthanc = Orthanc(work)
    try:
        orthanc.start()
    except BaseException:
        orthanc.stop()
        raise
    assert orthanc.proc is not None

    def count() -> int:
        return int(orthanc.request("GET", "/statistics")["CountInstances"])

    return Receiver("orthanc", orthanc.aet, orthanc.dicom_port, count, orthanc.stop,
                    orthanc.proc.pid)


def pacsnode_name(listeners: int | str) -> str:
    return "pacsnode" if listeners == AUTO else f"pacsnode-l{listeners}"


def start_pacsnode(work: Path, tree: Path = ROOT, name: str = "pacsnode", *,
                   listeners: int | str = AUTO) -> Receiver:
    """``pacsnode serve`` from the source tree ``tree`` (this checkout, or --baseline's),
    with ``[node] listener_processes = listeners`` (a number, or "auto")."""
    config = write_config(work, node={"listener_processes": listeners})
    port = int(tomllib.loads(config.read_text())["node"]["port"])
    env = {**TCP_ENV, "PYTHONPATH": str(tree)}
    log = (work / "node.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tree)

    def stop() -> None:
        _terminate(proc)
        log.close()

    try:
        wait_port(port, proc=proc)
        # the children listen once they have written their first status file
        deadline = time.monotonic() + 60
        while len(list((work / "spool").glob(".listener-status-*.json"))) \
                < listener_count(listeners) - 1:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{name}: listener children did not start; see {work}")
            time.sleep(0.1)
    except BaseException:
        stop()
        raise

    def count() -> int:
        out = subprocess.run(
            [sys.executable, "-m", "node.cli", "studies", "list", "--json", "-c", str(config)],
            capture_output=True, text=True, cwd=tree, env=env, check=True, timeout=120)
        return sum(int(s["instances"]) for s in json.loads(out.stdout))

    return Receiver(name, "PACSNODE", port, count, stop, proc.pid)


def export_revision(rev: str, dest: Path) -> str:
    """Write the files of git revision ``rev`` to ``dest``; returns its short hash."""
    short = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                           check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", short],
                             check=True, capture_output=True).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return short


def send(receiver: Receiver, files: Sequence[Path], parallel: int, work: Path) -> float:
    """Run storescu (``parallel`` processes, contiguous chunks); seconds until all exit."""
    size = -(-len(files) // parallel)
    chunks = [files[i:i + size] for i in range(0, len(files), size)]
    logs = [(work / f"storescu{i}.log").open("w") for i in range(len(chunks))]
    procs: list[subprocess.Popen[str]] = []
    try:
        start = time.perf_counter()
        for chunk, log in zip(chunks, logs):
            procs.append(subprocess.Popen(
                ["storescu", "-aet", "BENCH", "-aec", receiver.aet, "127.0.0.1",
                 str(receiver.port), *map(str, chunk)],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=TCP_ENV))
        codes = [p.wait(timeout=1800) for p in procs]
        seconds = time.perf_counter() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    output = "".join((work / f"storescu{i}.log").read_text() for i in range(len(chunks)))
    if any(codes) or "Failed" in output or "Error" in output:
        raise RuntimeError(f"storescu to {receiver.name} failed (exit {codes}):\n{output[-2000:]}")
    return seconds


def measure(name: str, files: Sequence[Path], nbytes: int, args: argparse.Namespace,
            work: Path) -> Run:
    work.mkdir(parents=True)
    starters: dict[str, Callable[[Path], Receiver]] = {
        "storescp": lambda w: start_storescp(w, bit_preserving=not args.storescp_normal),
        "orthanc": start_orthanc,
    }
    for n in args.listeners:
        starters[pacsnode_name(n)] = functools.partial(start_pacsnode, name=pacsnode_name(n),
                                                       listeners=n)
    if args.baseline_tree is not None:
        starters[args.baseline_name] = lambda w: start_pacsnode(
            w, args.baseline_tree, args.baseline_name, listeners=args.baseline_listeners)
    receiver = starters[name](work)
    try:
        if args.warmup_files:
            (work / "warmup").mkdir()
            send(receiver, args.warmup_files, args.parallel, work / "warmup")
        os.sync()  # start every receiver with no dirty pages left by the previous one
        cpu = cpu_seconds(receiver.pid)
        seconds = send(receiver, files, args.parallel, work)
        cpu = cpu_seconds(receiver.pid) - cpu
        held, expected = receiver.count(), len(files) + len(args.warmup_files)
        if held != expected:
            raise RuntimeError(f"{name} holds {held} instance(s) after the send, "
                               f"expected {expected}; see {work}")
    finally:
        receiver.stop()
    return Run(name, seconds, len(files), nbytes, cpu, children_stored(work / "spool"))


def children_stored(spool: Path) -> int | None:
    """Instances the listener children stored, from their final status files."""
    total = None
    for path in spool.glob(".listener-status-*.json"):
        counters = json.loads(path.read_text())["counters"]
        total = (total or 0) + int(sum(v for n, _, v in counters
                                       if n == "pacsnode_instances_received_total"))
    return total


def table(runs: Sequence[Run], receivers: Sequence[str]) -> str:
    best: dict[str, Run] = {}
    for name in receivers:
        mine = sorted((r for r in runs if r.receiver == name), key=lambda r: r.seconds)
        best[name] = mine[len(mine) // 2]  # the median run (upper median for even counts)
    rate = {n: r.instances / r.seconds for n, r in best.items()}

    def ratio(name: str, ref: str) -> str:
        return f"{rate[name] / rate[ref]:.2f}" if ref in rate else "—"

    lines = ["| receiver | seconds | instances/s | MB/s | × Orthanc | × Orthanc by round "
             "| × storescp | receiver CPU ms/instance |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in best.items():
        cpu = statistics.median(x.cpu_seconds for x in runs if x.receiver == name)
        lines.append(f"| {name} | {r.seconds:.2f} | {rate[name]:.1f} | "
                     f"{r.nbytes / r.seconds / 1e6:.1f} | {ratio(name, 'orthanc')} | "
                     f"{round_ratios(runs, name, 'orthanc')} | "
                     f"{ratio(name, 'storescp')} | {cpu / r.instances * 1e3:.2f} |")
    return "\n".join(lines)


def round_ratios(runs: Sequence[Run], name: str, ref: str) -> str:
    """The lowest and highest rate ratio of ``name`` to ``ref`` within one round (the
    receivers run one after the other in each round, so a round's two runs saw the
    machine in the same state): how far the median ratio can be trusted."""
    mine = [r for r in runs if r.receiver == name]
    theirs = [r for r in runs if r.receiver == ref]
    ratios = [t.seconds / m.seconds for m, t in zip(mine, theirs, strict=False)]
    if not ratios or name == ref:
        return "—"
    return f"{min(ratios):.2f}–{max(ratios):.2f}"


def versions(args: argparse.Namespace) -> str:
    import pynetdicom
    baseline = (f"; baseline {args.baseline_name} (git archive of that commit"
                + (f", listener_processes = {args.baseline_listeners})"
                   if args.baseline_listeners > 1 else ")")
                if args.baseline else "")
    return (f"{first_line(['storescu', '--version']).strip('$ ')}; "
            f"{first_line(['Orthanc', '--version'])}; {revision()}{baseline}"
            f"; Python {platform.python_version()}, pynetdicom {pynetdicom.__version__}")


def filesystem(path: Path) -> str:
    out = subprocess.run(["df", "-T", str(path)], check=False, capture_output=True,
                         text=True).stdout
    fields = out.strip().splitlines()[-1].split() if out.strip() else []
    return f"{fields[1]} on {fields[0]}" if len(fields) > 1 else "?"


def report(args: argparse.Namespace, runs: Sequence[Run], nbytes: int, temp: Path) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    senders = f"{args.parallel} storescu processes" if args.parallel > 1 else "1 storescu"
    storescp_mode = "normal (parse + re-encode)" if args.storescp_normal else "+B bit-preserving"
    detail = "; ".join(f"{r.receiver} {r.seconds:.2f} s (CPU {r.cpu_seconds:.2f} s"
                       + (f", {r.by_children} by children"
                          + (" with the warm-up" if args.warmup else "")
                          if r.by_children is not None else "") + ")" for r in runs)
    return "\n".join([
        (f"## {now}: {args.slices} × {args.size}×{args.size} CT, {senders}, "
         f"median of {args.repeat}"),
        "",
        f"- command: `{command_line(__file__)}`",
        f"- machine: {machine()}; temp storage {filesystem(temp)}",
        f"- versions: {versions(args)}",
        (f"- data: {args.slices} instances, {nbytes / 1e6:.1f} MB (MB = 10^6 bytes), "
         "Explicit VR Little Endian, CT Image Storage"),
        (f"- receivers: storescp {storescp_mode}, no fsync; Orthanc defaults "
         "(SyncStorageArea: fsync per file); pacsnode default config (fsync of file and "
         f"directory, SQLite index, listener_processes = \"auto\": {listener_count(AUTO)} "
         "here)"
         + "".join(f"; {pacsnode_name(n)}: the same with listener_processes = {n}"
                   for n in args.listeners if n != AUTO)),
        (f"- warm-up: before the timed send, {args.warmup} instance(s) of another series "
         f"per association, over {args.parallel} association(s) the same way, untimed"
         if args.warmup else "- warm-up: none (the timed send is the receiver's first)"),
        ("- runs' files: kept until the end of the benchmark (no receiver creates files"
         " right after another's were deleted)" if args.keep_runs else
         "- runs' files: removed after each run (not enough free space to keep them)"),
        f"- every run: {detail}",
        "",
        table(runs, order(args)),
        "",
    ])


def order(args: argparse.Namespace) -> list[str]:
    """The receivers of this run in the order they run (the baseline before pacsnode)."""
    names = [n for n in RECEIVERS if n in args.receivers]
    if "pacsnode" in names:
        at = names.index("pacsnode")
        names[at:at + 1] = [pacsnode_name(n) for n in args.listeners]
    if args.baseline:
        first = next((i for i, n in enumerate(names) if n.startswith("pacsnode")), len(names))
        names.insert(first,
                     args.baseline_name)
    return names


@contextlib.contextmanager
def temp_dir(parent: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pacsnode-bench-", dir=parent))
    try:
        yield path
    except BaseException:
        print(f"failed; logs kept in {path}", file=sys.stderr)
        raise
    shutil.rmtree(path, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=300, help="instances in the series")
    p.add_argument("--size", type=int, default=512, help="rows = columns")
    p.add_argument("--repeat", type=int, default=1, help="runs per receiver (median reported)")
    p.add_argument("--parallel", type=int, default=1,
                   help="storescu processes (associations), files split in contiguous chunks")
    p.add_argument("--receivers", nargs="+", choices=RECEIVERS, default=list(RECEIVERS))
    p.add_argument("--listeners", type=listeners_arg, nargs="+", default=[AUTO], metavar="N",
                   help='run pacsnode once per N with [node] listener_processes = N, a '
                        'number or "auto" (reported as pacsnode-lN; pacsnode for "auto", '
                        'the default)')
    p.add_argument("--storescp-normal", action="store_true",
                   help="run storescp without +B (parse and re-encode each data set)")
    p.add_argument("--baseline", metavar="REV",
                   help="also run pacsnode as of git revision REV (exported with git archive), "
                        "interleaved with the others: before/after in one run")
    p.add_argument("--baseline-listeners", type=int, default=1, metavar="N",
                   help="the baseline's [node] listener_processes (default 1)")
    p.add_argument("--warmup", type=int, default=0, metavar="K",
                   help="first send K instances per association of another series, untimed "
                        "(default 0: the timed send is the receiver's first)")
    p.add_argument("--tmpdir", help="where the temp folders go (default: $TMPDIR or /tmp)")
    p.add_argument("--results", type=Path, default=RESULTS, help="file the table is appended to")
    p.add_argument("--no-append", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if min(args.slices, args.size, args.repeat, args.parallel, args.baseline_listeners,
           *(n for n in args.listeners if n != AUTO)) < 1:
        p.error("--slices, --size, --repeat, --parallel, --listeners and "
                "--baseline-listeners must be >= 1")
    args.listeners = list(dict.fromkeys(args.listeners))
    missing = [t for t in ("storescu", "storescp", "Orthanc") if shutil.which(t) is None]
    if missing:
        p.error(f"not installed: {', '.join(missing)} (Debian packages dcmtk, orthanc)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with temp_dir(args.tmpdir) as temp:
        t0 = time.perf_counter()
        study = make_study(SeriesSpec(modality="CT", slices=args.slices, rows=args.size,
                                      columns=args.size), seed=1)
        files = write_study(study, temp / "study")
        nbytes = sum(f.stat().st_size for f in files)
        args.warmup_files = write_study(make_study(SeriesSpec(
            modality="CT", slices=args.warmup * args.parallel, rows=args.size,
            columns=args.size), seed=2), temp / "warmup") if args.warmup else []
        print(f"generated {len(files)} instances, {nbytes / 1e6:.1f} MB in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        args.baseline_tree = None
        if args.baseline:
            args.baseline_tree = temp / "baseline"
            args.baseline_name = f"pacsnode@{export_revision(args.baseline, args.baseline_tree)}" \
                + (f"-l{args.baseline_listeners}" if args.baseline_listeners > 1 else "")
        # Every run's files stay until the end when there is room: deleting them makes
        # ext4 without a journal (this VM's) scan the freed inodes at every file created
        # in the next minutes (find_inode_bit/recently_deleted: 0.02 ms per create on a
        # quiet folder, 0.12-0.6 ms after a few thousand deletions), which charged each
        # receiver for the cleanup of the one before it.
        needed = args.repeat * len(order(args)) * nbytes * 1.2 + (1 << 30)
        args.keep_runs = shutil.disk_usage(temp).free > needed
        if not args.keep_runs:
            print(f"only {shutil.disk_usage(temp).free / 1e9:.1f} GB free: each run's "
                  "files are removed after it", file=sys.stderr)
        runs: list[Run] = []
        for i in range(args.repeat):
            for name in order(args):
                run = measure(name, files, nbytes, args, temp / f"{name}-{i}")
                print(f"  {name:9} run {i + 1}: {run.seconds:.2f} s", file=sys.stderr)
                runs.append(run)
                if not args.keep_runs:
                    shutil.rmtree(temp / f"{name}-{i}", ignore_errors=True)
        text = report(args, runs, nbytes, temp)
    print(text)
    if not args.no_append:
        append_results(text, args.results)
        print(f"appended to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
