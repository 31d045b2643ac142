"""Pull from a DIMSE-only PACS over pynetdicom: C-FIND at SERIES level, then C-GET or
C-MOVE of each series (PS3.4 Annex C, Study Root information model).

C-GET returns the instances on the same association: the PACS sends them as C-STORE
sub-operations and the node acts as Storage SCP for them (SCP/SCU role selection, PS3.7
D.3.3.4). C-MOVE sends them to the node's own AE title, which the PACS must know with
this node's address and port; they arrive through the normal receiver path, so a move
is complete when its final response is. Association, status and time-out failures
become :class:`node.errors.SourceError` naming the source and the reason.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    DEFAULT_TRANSFER_SYNTAXES,
    StoragePresentationContexts,
    build_context,
    build_role,
    evt,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated names
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from adapters.dimse import client_tls
from node.errors import SourceError
from node.part10 import file_header
from node.ports import MovedInstances, RemoteSeries
from node.settings import SourceSettings

log = logging.getLogger(__name__)

FIND = UID(StudyRootQueryRetrieveInformationModelFind)
GET = UID(StudyRootQueryRetrieveInformationModelGet)
MOVE = UID(StudyRootQueryRetrieveInformationModelMove)

# what the node accepts as C-GET storage SCP: uncompressed and the common compressed ones
_STORE_SYNTAXES: list[str | UID] = [*DEFAULT_TRANSFER_SYNTAXES, JPEGLosslessSV1,
                                     JPEGBaseline8Bit, JPEG2000Lossless, JPEG2000,
                                     JPEGLSLossless, RLELossless]


# The Patient and Study level keys of the Study Root model (PS3.4 C.6.2.1): in a
# hierarchical poll, filters on these go into the study query, all others into each
# series query.
STUDY_LEVEL_KEYS = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
    "EthnicGroup", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "StudyInstanceUID", "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
    "SOPClassesInStudy", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
})
# What every series-level query asks back (a filter on one of them narrows it).
_SERIES_RETURN_KEYS = {"SeriesInstanceUID": "", "Modality": "",
                       "NumberOfSeriesRelatedInstances": ""}


class QueryRetrieveStatusValues:
    """C-FIND / C-GET / C-MOVE response statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    CANCELLED = 0xFE00
    SUB_OPERATIONS_FAILED = 0xB000
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_DOES_NOT_MATCH = 0xA900


_MEANING = {
    QueryRetrieveStatusValues.CANCELLED: "cancelled",
    QueryRetrieveStatusValues.SUB_OPERATIONS_FAILED: "sub-operations failed",
    QueryRetrieveStatusValues.OUT_OF_RESOURCES: "out of resources",
    QueryRetrieveStatusValues.OUT_OF_RESOURCES_MATCHES:
        "out of resources: unable to calculate the number of matches",
    QueryRetrieveStatusValues.OUT_OF_RESOURCES_SUB_OPERATIONS:
        "out of resources: unable to perform sub-operations",
    QueryRetrieveStatusValues.MOVE_DESTINATION_UNKNOWN: "move destination unknown",
    QueryRetrieveStatusValues.IDENTIFIER_DOES_NOT_MATCH:
        "identifier does not match the SOP class",
}
_PENDING = {QueryRetrieveStatusValues.PENDING, QueryRetrieveStatusValues.PENDING_WARNING}
_STORE_SUCCESS = 0x0000
_STORE_OUT_OF_RESOURCES = 0xA700
_DONE = None                     # end of the C-GET's instances
_QUEUE_DEPTH = 16                # instances held between the association and the consumer


def _describe(code: int) -> str:
    meaning = _MEANING.get(code) or ("unable to process" if code >> 12 == 0xC else "failure")
    return f"status 0x{code:04X} ({meaning})"


class DimseSource:
    """C-FIND for series of recent studies; C-GET or C-MOVE (``retrieve``) for them."""

    def __init__(self, *, ae_title: str = "PACSNODE") -> None:
        self.ae_title = ae_title

    def find_series(self, source: SourceSettings, *, since: date | None,
                    extra: Mapping[str, str] | None = None) -> list[RemoteSeries]:
        keys = {"StudyDate": f"{since:%Y%m%d}-" if since is not None else "",
                **source.filters, **(extra or {})}
        with self._associated(source, [build_context(FIND)]) as assoc:
            if source.query == "series":        # one relational query (PS3.4 C.4.1.2.2)
                return [remote for answer in _find(assoc, source, _identifier(
                    source, {"StudyInstanceUID": "", **_SERIES_RETURN_KEYS, **keys}))
                        if (remote := _remote(answer)) is not None]
            # hierarchical (PS3.4 C.4.1.2.1): the studies, then each one's series
            study_keys = {k: v for k, v in keys.items() if k in STUDY_LEVEL_KEYS}
            series_keys = {k: v for k, v in keys.items() if k not in STUDY_LEVEL_KEYS}
            found: list[RemoteSeries] = []
            for study in _find(assoc, source, _identifier(
                    source, {"StudyInstanceUID": "", **study_keys}, level="STUDY")):
                uid, study_date = study.get("StudyInstanceUID"), study.get("StudyDate")
                if not uid:
                    continue
                found += [remote for answer in _find(assoc, source, _identifier(source, {
                    **_SERIES_RETURN_KEYS, **series_keys, "StudyInstanceUID": str(uid)}))
                          if (remote := _remote(answer, study_date)) is not None]
            return found

    def fetch_series(self, source: SourceSettings, study_instance_uid: str,
                     series_instance_uid: str) -> Iterator[bytes | MovedInstances]:
        query = _identifier(source, {"StudyInstanceUID": study_instance_uid,
                                     "SeriesInstanceUID": series_instance_uid})
        if source.retrieve == "move":
            return self._move(source, query)
        return self._get(source, query)

    def _move(self, source: SourceSettings, query: Dataset) -> Iterator[MovedInstances]:
        destination = source.move_destination or self.ae_title
        with self._associated(source, [build_context(MOVE)]) as assoc:
            moved = _retrieved(source, "C-MOVE", assoc.send_c_move(query, destination, MOVE))
        yield MovedInstances(moved or 0)

    def _get(self, source: SourceSettings, query: Dataset) -> Iterator[bytes]:
        """Run the C-GET on a thread; its C-STORE sub-operations are handed over through
        a small queue, so a large series is never held in memory whole."""
        handed: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE_DEPTH)
        stop = threading.Event()
        state: dict[str, Any] = {"stored": 0}

        def put(item: bytes | None) -> bool:
            while not stop.is_set():
                try:
                    handed.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def on_store(event: Any) -> int:
            request = event.request
            data = file_header(str(request.AffectedSOPClassUID),
                               str(request.AffectedSOPInstanceUID),
                               str(event.context.transfer_syntax),
                               source_ae_title=source.name[:16],
                               ) + event.encoded_dataset(include_meta=False)
            if not put(data):
                return _STORE_OUT_OF_RESOURCES          # the consumer went away
            state["stored"] += 1
            return _STORE_SUCCESS

        def run() -> None:
            try:
                with self._associated(source, _get_contexts(), roles=_get_roles(),
                                      handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
                    state["assoc"] = assoc
                    completed = _retrieved(source, "C-GET", assoc.send_c_get(query, GET))
                if completed is not None and completed != state["stored"]:
                    raise SourceError(f"{source.name}: C-GET reported {completed} instances "
                                      f"sent, {state['stored']} arrived")
            except SourceError as exc:
                state["error"] = exc
            # anything else too: it must reach the consumer, never pass for "all sent"
            except Exception as exc:
                state["error"] = SourceError(f"{source.name}: C-GET failed: "
                                             f"{type(exc).__name__}: {exc}")
            finally:
                put(_DONE)

        worker = threading.Thread(target=run, name=f"c-get:{source.name}", daemon=True)
        worker.start()
        try:
            while (item := handed.get()) is not _DONE:
                assert item is not None
                yield item
        finally:
            stop.set()
            if worker.is_alive() and "assoc" in state:      # the consumer stopped early
                state["assoc"].abort()
                # wake the C-GET from its wait for the next message (pynetdicom would
                # otherwise wait out dimse_timeout on the closed association)
                state["assoc"].dimse.msg_queue.put((None, None))
            worker.join(timeout=source.timeout_seconds)
        if "error" in state:
            raise state["error"]

    @contextmanager
    def _associated(self, source: SourceSettings, contexts: list[Any], *,
                    roles: Sequence[Any] = (),
                    handlers: list[Any] | None = None) -> Iterator[Any]:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = source.timeout_seconds
        ae.requested_contexts = contexts
        where = f"{source.name} ({source.host}:{source.port}, AE {source.ae_title})"
        try:
            tls = (client_tls(source), str(source.host)) if source.tls else None
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"{source.name}: TLS set-up failed: {exc}") from exc
        assoc = ae.associate(str(source.host), int(source.port or 0),
                             ae_title=str(source.ae_title), ext_neg=list(roles) or None,
                             evt_handlers=handlers or [], tls_args=tls)
        if not assoc.is_established:
            raise SourceError(f"{where} {_refusal(assoc, source)}")
        try:
            wanted = contexts[0].abstract_syntax
            if not any(cx.abstract_syntax == wanted for cx in assoc.accepted_contexts):
                raise SourceError(f"{where} does not offer {wanted.name} (presentation "
                                  f"context refused)")
            yield assoc
        except (ValueError, RuntimeError, OSError) as exc:    # pynetdicom's own complaints
            raise SourceError(f"{where}: {type(exc).__name__}: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()


def _refusal(assoc: Any, source: SourceSettings) -> str:
    answer = getattr(assoc.acceptor, "primitive", None)
    if assoc.is_rejected and answer is not None:
        return (f"rejected the association ({answer.result_str}, {answer.source_str}: "
                f"{answer.reason_str}); check ae_title and that the PACS knows our AE title")
    if answer is not None and getattr(answer, "result", None) == 0:
        return "accepted none of the proposed presentation contexts"
    handshake = ("the TLS handshake failed (is its certificate signed by ca_file?), "
                 if source.tls else "")
    return (f"did not answer (connection refused, {handshake}or no reply within "
            f"{source.timeout_seconds:g} s)")


def _find(assoc: Any, source: SourceSettings, query: Dataset) -> list[Dataset]:
    """The answers of one C-FIND; SourceError unless it ends in success."""
    answers: list[Dataset] = []
    for status, answer in assoc.send_c_find(query, FIND):
        code = _status_code(source, "C-FIND", status)
        if code in _PENDING:
            if answer is not None:
                answers.append(answer)
            continue
        if code != QueryRetrieveStatusValues.SUCCESS:
            raise SourceError(f"{source.name}: C-FIND failed: {_describe(code)}")
    return answers


def _identifier(source: SourceSettings, keys: Mapping[str, str], *,
                level: str = "SERIES") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        try:
            setattr(ds, keyword, value)
        except (ValueError, TypeError) as exc:
            raise SourceError(f"{source.name}: query key {keyword} = {value!r}: {exc}") from exc
    return ds


def _status_code(source: SourceSettings, what: str, status: Dataset) -> int:
    if "Status" not in status:
        raise SourceError(f"{source.name}: {what}: no response within "
                          f"{source.timeout_seconds:g} s, or the association was aborted")
    return int(status.Status)


def _retrieved(source: SourceSettings, what: str,
               responses: Iterator[tuple[Dataset, Dataset | None]]) -> int | None:
    """How many instances a C-GET / C-MOVE completed (None when the PACS did not say, in
    the final response or a pending one); SourceError unless all were."""
    counted: Dataset | None = None
    for status, _ in responses:
        code = _status_code(source, what, status)
        if "NumberOfCompletedSuboperations" in status:
            counted = status
        if code in _PENDING:
            continue
        completed = warned = failed = 0
        if counted is not None:
            completed = int(counted.get("NumberOfCompletedSuboperations") or 0)
            warned = int(counted.get("NumberOfWarningSuboperations") or 0)
            failed = int(status.get("NumberOfFailedSuboperations")
                         or counted.get("NumberOfFailedSuboperations") or 0)
        if code == QueryRetrieveStatusValues.SUCCESS and not failed:
            return completed + warned if counted is not None else None
        counts = f"; {completed + warned} sent, {failed} failed" if failed else ""
        raise SourceError(f"{source.name}: {what} failed: {_describe(code)}{counts}")
    raise SourceError(f"{source.name}: {what}: the association ended without a final response")


def _remote(answer: Dataset, study_date: Any = None) -> RemoteSeries | None:
    """A series-level answer as a RemoteSeries (``study_date``: the study's, from a study
    level answer, where the series answer has none)."""
    study, series = answer.get("StudyInstanceUID"), answer.get("SeriesInstanceUID")
    if not study or not series:
        return None
    count = answer.get("NumberOfSeriesRelatedInstances")
    study_date = answer.get("StudyDate") or study_date
    return RemoteSeries(str(study), str(series), int(count) if count not in (None, "") else None,
                        str(study_date) if study_date else None)


def _get_contexts() -> list[Any]:
    """The C-GET context first (the one that must be accepted), then storage ones:
    1 + 120 of the 128 a request may carry (PS3.8 9.3.2.2)."""
    return [build_context(GET)] + [build_context(str(cx.abstract_syntax), _STORE_SYNTAXES)
                                   for cx in StoragePresentationContexts]


def _get_roles() -> list[Any]:
    return [build_role(str(cx.abstract_syntax), scp_role=True)
            for cx in StoragePresentationContexts]
