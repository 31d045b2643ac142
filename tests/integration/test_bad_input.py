"""Bad input: every file pydicom ships in ``data/test_files``, sent to a running node.

Acceptance criterion: "the node stays up; each instance is stored or refused with a
failure status and a log line naming the reason". Each file goes out with storescu;
files storescu will not send (no meta, no SOP class, DICOMDIR, text, gzip...) go out
with pynetdicom carrying the file's own bytes. The index is checked right after each
send, because many of these files share a SOP Instance UID and later ones replace
earlier ones.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import tempfile
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import blake3
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config
from pynetdicom.dsutils import encode_file_meta, split_dataset

from tests.support import TCP_ENV, NodeProcess

pytestmark = pytest.mark.integration

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# storescu proposes uncompressed syntaxes only unless told; one option per encapsulated
# (or deflated) transfer syntax makes it propose the file's own syntax as well.
STORESCU_PROPOSE = {
    JPEGBaseline8Bit: "-xy", JPEGExtended12Bit: "-xx", JPEGLosslessSV1: "-xs",
    JPEG2000Lossless: "-xv", JPEG2000: "-xw", JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu", RLELossless: "-xr", DeflatedExplicitVRLittleEndian: "-xd",
}
BYTE_EXACT_SYNTAXES = {*STORESCU_PROPOSE, JPEGLossless}

STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")


@dataclass(frozen=True)
class Probe:
    """What the test knows about one file before sending it."""

    path: Path
    data: bytes
    offset: int  # where the data set starts (after preamble and file meta), 0 if no meta
    transfer_syntax_uid: str | None  # from the file meta, if any
    sop_class_uid: str | None
    sop_instance_uid: str | None
    reads_cleanly: bool  # pydicom reads it without force and all REQUIRED UIDs are there
    encoding: tuple[bool | None, bool | None]  # (implicit VR, little endian) as pydicom read it

    @property
    def name(self) -> str:
        return self.path.relative_to(TEST_FILES).as_posix()


@dataclass(frozen=True)
class Outcome:
    probe: Probe
    client: str  # "storescu", "pynetdicom" or "" (unsendable)
    calling_ae_title: str
    sop_instance_uid: str | None  # the request's Affected SOP Instance UID
    status: int | None  # the C-STORE response status the client saw
    note: str  # why storescu did not send, why nothing could send, ...

    @property
    def verdict(self) -> str:
        if not self.client:
            return "unsendable"
        if self.status is None:
            return "no-status"
        return "stored" if self.status == 0x0000 else "refused"


def present_files() -> list[Path]:
    """Every file pydicom ships on disk (data fetched on demand is simply not here)."""
    return sorted(p for p in TEST_FILES.rglob("*") if p.is_file())


def _uid_or_none(value: Any) -> str | None:
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    return text if UID_RE.match(text) and len(text) <= 64 else None


def probe(path: Path) -> Probe:
    data = path.read_bytes()
    try:
        meta, offset = split_dataset(path)
    except Exception:  # noqa: BLE001  no preamble/DICM or unreadable meta: no meta at all
        meta, offset = Dataset(), 0
    ts = _uid_or_none(meta.get("TransferSyntaxUID"))
    sop_class = sop_instance = None
    encoding: tuple[bool | None, bool | None] = (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds: Dataset | None = pydicom.dcmread(BytesIO(data), force=True,
                                                 stop_before_pixels=True)
        except Exception:  # noqa: BLE001  bad input is the point; fall back to the meta
            ds = None
        if ds is not None:
            encoding = ds.original_encoding
            sop_class = _uid_or_none(ds.get("SOPClassUID"))
            sop_instance = _uid_or_none(ds.get("SOPInstanceUID"))
        try:
            full = pydicom.dcmread(BytesIO(data))
            clean = all(full.get(k) for k in REQUIRED)
        except Exception:  # noqa: BLE001
            clean = False
    sop_class = sop_class or _uid_or_none(meta.get("MediaStorageSOPClassUID"))
    sop_instance = sop_instance or _uid_or_none(meta.get("MediaStorageSOPInstanceUID"))
    return Probe(path, data, min(offset, len(data)), ts, sop_class, sop_instance, clean,
                 encoding)


# -- the node's index and spool ---------------------------------------------------------

def _blake3(data: bytes) -> str:
    """The index's digest of these bytes (node/digest.py's form), computed here."""
    return "blake3:" + blake3.blake3(data).hexdigest()


def index_row(node: NodeProcess, sop_instance_uid: str | None) -> tuple[str, str, str] | None:
    """(path, digest, transfer syntax) of the instance row, read-only, or None."""
    if sop_instance_uid is None:
        return None
    db = node.config.parent / "index.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        row = conn.execute(
            "SELECT path, digest, transfer_syntax_uid FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,)).fetchone()
    return (str(row[0]), str(row[1]), str(row[2])) if row else None


def spool_bytes(node: NodeProcess, rel: str) -> bytes | None:
    path = node.config.parent / "spool" / rel
    return path.read_bytes() if path.is_file() else None


def data_set_part(data: bytes) -> bytes:
    with tempfile.NamedTemporaryFile(suffix=".dcm") as tmp:
        tmp.write(data)
        tmp.flush()
        _, offset = split_dataset(Path(tmp.name))
    return data[offset:]


# -- senders ------------------------------------------------------------------------------

def send_storescu(port: int, p: Probe, aet: str) -> tuple[int | None, str]:
    """(status, why-not-sent). status None: storescu did not get a response."""
    extra = ["-R", "-d", "-to", "10", "-ta", "10", "-td", "60"]
    if p.transfer_syntax_uid in STORESCU_PROPOSE:
        extra.append(STORESCU_PROPOSE[UID(p.transfer_syntax_uid)])
    proc = subprocess.run(
        ["storescu", "-aet", aet, "-aec", "PACSNODE", *extra, "127.0.0.1", str(port),
         str(p.path)],
        check=False, capture_output=True, text=True, errors="replace", env=TCP_ENV,
        timeout=120)
    out = proc.stdout + proc.stderr
    rsp = out.split("C-STORE RSP", 1)
    match = STATUS_RE.search(rsp[1]) if len(rsp) == 2 else None
    if match:
        return int(match.group(1), 16), ""
    errors = [line[3:] for line in out.splitlines() if line.startswith(("F: ", "E: "))]
    return None, errors[0] if errors else f"storescu exited {proc.returncode}, no response"


@contextmanager
def chunked_sending() -> Iterator[None]:
    """Make pynetdicom put a file's data set bytes on the wire as they are (no re-encode)."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def raw_request(p: Probe) -> tuple[str, str, bytes]:
    """SOP Instance UID, transfer syntax and data set bytes to send for ``p``."""
    sop_instance = p.sop_instance_uid or f"2.25.{uuid.uuid4().int}"
    ts = p.transfer_syntax_uid
    if ts not in ALL_TRANSFER_SYNTAXES:
        by_encoding: dict[tuple[bool | None, bool | None], str] = {
            (False, True): ExplicitVRLittleEndian, (False, False): ExplicitVRBigEndian}
        ts = by_encoding.get(p.encoding, ImplicitVRLittleEndian)
    assert ts is not None
    return sop_instance, ts, p.data[p.offset:]


def send_raw(port: int, p: Probe, aet: str, directory: Path) -> tuple[str | None, int | None, str]:
    """Send the file's own data set bytes with pynetdicom.

    The file's SOP class is proposed first; if the node turns that presentation context
    down (DICOMDIR's Media Storage Directory class, say), Secondary Capture carries the
    same bytes. Returns (request SOP Instance UID, status, note); a request UID of None
    means no client could get the bytes to the node.
    """
    sop_instance, ts, body = raw_request(p)
    notes: list[str] = []
    for sop_class in dict.fromkeys(c for c in (p.sop_class_uid, SecondaryCaptureImageStorage)
                                   if c):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(sop_class)
        meta.MediaStorageSOPInstanceUID = UID(sop_instance)
        meta.TransferSyntaxUID = UID(ts)
        carrier = directory / f"{aet}.dcm"
        carrier.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body)
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        try:
            ae.add_requested_context(sop_class, [ts])
        except ValueError as exc:
            notes.append(f"pynetdicom cannot propose {sop_class} / {ts}: {exc}")
            continue
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
        if not assoc.is_established:
            notes.append(f"node accepted no context for {sop_class} / {ts}")
            continue
        try:
            with chunked_sending():
                rsp = assoc.send_c_store(carrier)
        except (ValueError, AttributeError, RuntimeError, OSError) as exc:
            notes.append(f"pynetdicom cannot build the C-STORE request: {exc}")
            continue
        finally:
            if assoc.is_established:
                assoc.release()
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if status is None:
            notes.append("no C-STORE response (association aborted?)")
        return sop_instance, status, "; ".join(notes)
    return None, None, "; ".join(notes)


# -- the checks made right after each send ------------------------------------------------

def check_index_after(node: NodeProcess, o: Outcome,
                      before: tuple[str, str, str] | None) -> list[str]:
    """Problems with the index/spool state right after one send."""
    after = index_row(node, o.sop_instance_uid)
    if o.verdict == "stored":
        if after is None:
            return [(f"{o.probe.name}: acknowledged Success but {o.sop_instance_uid} "
                     "is not in the index")]
        data = spool_bytes(node, after[0])
        if data is None:
            return [f"{o.probe.name}: indexed, but spool file {after[0]} is missing"]
        if _blake3(data) != after[1]:
            return [f"{o.probe.name}: spool file {after[0]} does not match its index digest"]
    elif o.verdict == "refused":
        if after != before:
            return [(f"{o.probe.name}: refused with 0x{o.status:04X} but the index "
                     f"changed ({before} -> {after})")]
        # A refused resend must not have overwritten the instance stored before it.
        data = spool_bytes(node, before[0]) if before else None
        if before and (data is None or _blake3(data) != before[1]):
            return [(f"{o.probe.name}: refused with 0x{o.status:04X} but spool file "
                     f"{before[0]} no longer holds the indexed instance")]
    return []


def refusal_line(log: str, o: Outcome) -> str | None:
    """The node's log line for this refused request (UID and calling AE pin the send)."""
    needle = f"C-STORE {o.sop_instance_uid} from {o.calling_ae_title} refused ("
    for line in log.splitlines():
        if needle in line and line.split("): ", 1)[-1].strip():
            return line
    return None


def echo_ok(port: int) -> bool:
    proc = subprocess.run(["echoscu", "-aec", "PACSNODE", "-to", "10", "127.0.0.1", str(port)],
                          check=False, capture_output=True, text=True, env=TCP_ENV,
                          timeout=60)
    return proc.returncode == 0


# -- the test -------------------------------------------------------------------------------

def test_every_pydicom_test_file(dcmtk: None, node_factory: Any, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    files = present_files()
    assert len(files) > 20, f"pydicom's test files not found under {TEST_FILES}"
    probes = [probe(path) for path in files]
    node: NodeProcess = node_factory().start()
    carriers = tmp_path / "carriers"
    carriers.mkdir()
    problems: list[str] = []

    # 1. Byte-exactness of encapsulated and deflated syntaxes, with the file's own bytes
    #    on the wire (storescu decodes and re-encodes, so it cannot show this).
    exact: dict[str, list[str]] = {}
    for i, p in enumerate(probes):
        if not p.reads_cleanly or p.transfer_syntax_uid not in BYTE_EXACT_SYNTAXES:
            continue
        uid, status, note = send_raw(node.port, p, f"EXACT{i:03d}", carriers)
        row = index_row(node, uid)
        if status != 0x0000 or row is None:
            problems.append(f"{p.name} ({p.transfer_syntax_uid}): not stored "
                            f"(status {status}, {note})")
            continue
        stored = spool_bytes(node, row[0])
        if stored is None or data_set_part(stored) != p.data[p.offset:]:
            problems.append(f"{p.name}: spool file {row[0]} is not byte-exact")
        elif row[2] != p.transfer_syntax_uid:
            problems.append(f"{p.name}: indexed as {row[2]}, sent as {p.transfer_syntax_uid}")
        else:
            exact.setdefault(str(p.transfer_syntax_uid), []).append(p.name)

    # 2. Every file, storescu first, pynetdicom where storescu will not send.
    outcomes: list[Outcome] = []
    for i, p in enumerate(probes):
        before = index_row(node, p.sop_instance_uid)
        aet = f"BAD{i:03d}"
        status, why = send_storescu(node.port, p, aet)
        if status is not None:
            o = Outcome(p, "storescu", aet, p.sop_instance_uid, status, "")
        else:
            aet = f"RAW{i:03d}"
            uid, status, note = send_raw(node.port, p, aet, carriers)
            before = before if uid == p.sop_instance_uid else None  # a fresh, invented UID
            note = f"storescu: {why}" + (f"; {note}" if note else "")
            o = Outcome(p, "pynetdicom" if uid else "", aet, uid, status, note)
        problems += check_index_after(node, o, before)
        outcomes.append(o)

    # 3. The node is still up and answering.
    assert node.proc is not None and node.proc.poll() is None, "the node process exited"
    assert echo_ok(node.port), "the node no longer answers C-ECHO"

    log = node.log()
    for o in outcomes:
        if o.verdict == "refused" and refusal_line(log, o) is None:
            problems.append(f"{o.probe.name}: refused with 0x{o.status:04X} but the log has "
                            f"no refusal line for {o.sop_instance_uid} from {o.calling_ae_title}")
        if o.verdict == "stored" and refusal_line(log, o) is not None:
            problems.append(f"{o.probe.name}: acknowledged Success, yet the log refuses it: "
                            f"{refusal_line(log, o)}")
        if o.verdict == "no-status":
            problems.append(f"{o.probe.name}: no C-STORE status at all ({o.note})")
    # A handler that raised would answer a pynetdicom status with no reason of ours.
    problems += [f"node log: {line}" for line in log.splitlines()
                 if "Traceback" in line or "Exception in" in line]

    counts = Counter(o.verdict for o in outcomes)
    lines = [f"bad input: {len(outcomes)} files: {counts['stored']} stored, "
             f"{counts['refused']} refused, {counts['unsendable']} unsendable"
             f"{', ' + str(counts['no-status']) + ' without status' if counts['no-status'] else ''}"
             f" ({sum(o.client == 'pynetdicom' for o in outcomes)} sent with pynetdicom, "
             f"{sum(p.reads_cleanly for p in probes)} read cleanly by pydicom); byte-exact: "
             + ", ".join(f"{UID(ts).name} ({len(v)})" for ts, v in exact.items())]
    for o in outcomes:
        reason = ""
        if o.verdict == "refused":
            line = refusal_line(log, o) or ""
            reason = line.split("refused ", 1)[-1]
        elif o.note:
            reason = o.note
        shown = f"0x{o.status:04X}" if o.status is not None else "-"
        lines.append(f"  {o.verdict:10} {o.client or '-':10} {shown:6} {o.probe.name}  {reason}")
    print("\n".join(lines))
    with capsys.disabled():
        print("\n" + lines[0])

    assert not problems, "\n".join(problems)

    unsendable = [o for o in outcomes if o.verdict == "unsendable"]
    assert len(unsendable) <= len(outcomes) // 10, "\n".join(
        f"{o.probe.name}: {o.note}" for o in unsendable)

    clean = [o for o in outcomes if o.probe.reads_cleanly]
    not_stored = [o.probe.name for o in clean if o.verdict != "stored"]
    assert not not_stored, f"pydicom reads these cleanly, yet they were not stored: {not_stored}"
    assert len(clean) > len(outcomes) // 2, f"only {len(clean)} of {len(outcomes)} files are clean"

    present = {str(p.transfer_syntax_uid) for p in probes
               if p.reads_cleanly and p.transfer_syntax_uid in BYTE_EXACT_SYNTAXES}
    assert present, "no compressed or deflated file among pydicom's test files"
    assert set(exact) == present, f"byte-exact only for {sorted(exact)} of {sorted(present)}"
