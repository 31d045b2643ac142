"""DIMSE over pynetdicom: the Storage SCP the PACS pushes to, and the C-STORE/C-ECHO SCU.

The SCP handler does little: hand the encoded bytes to :class:`node.intake.Intake` and
answer with a named status (PS3.4 Annex B.2.3). Association policy (called AE, calling
AE allow-list with host/CIDR) is checked during negotiation, with a log line that says
why a peer was turned away.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import socket
import ssl
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pydicom.pixels.decoders.base import get_decoder
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    _config,
    evt,
)
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated names

from adapters.pdata import DirectInstance, StoreRequest
from adapters.reactor import WakingRequestHandler, remembered_negotiations
from node.domain import AssociationInfo, StoreOutcome
from node.errors import (
    DatasetMismatchError,
    DeliveryError,
    IntakeError,
    InvalidInstanceError,
    StorageFullError,
)
from node.intake import IncomingInstance, Intake
from node.metrics import Metrics
from node.part10 import file_header
from node.ports import SendReport
from node.settings import (
    AllowedCaller,
    DestinationSettings,
    NodeSettings,
    SourceSettings,
    TlsSettings,
)
from node.transcode import convert_file

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def decodable(transfer_syntax: str) -> bool:
    """Can this node read data sets and pixel data in this transfer syntax (pydicom and
    the codecs installed: the uncompressed ones, JPEG, JPEG-LS, JPEG 2000, RLE)?"""
    try:
        return bool(get_decoder(transfer_syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def preferred_order(proposed: Sequence[str]) -> list[str]:
    """A presentation context's transfer syntaxes as this node prefers them: those it
    can decode first, then the rest, each group in the order proposed."""
    return sorted(proposed, key=lambda uid: not decodable(uid))


class StatusValues:
    """C-STORE response statuses used by the SCP (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


_REJECT_MARK = "\x00rejected"


class _GatedAE(AE):
    """An AE whose calling-AE check also looks at the peer's address.

    pynetdicom consults ``require_calling_aet`` from the association's own thread while
    negotiating, so the decision is made per association (keyed by that thread).
    """

    def __init__(self, ae_title: str, allowed: Sequence[AllowedCaller], own_title: str) -> None:
        super().__init__(ae_title=ae_title)
        self._allowed = tuple(allowed)
        self._own_title = own_title
        self._decisions: weakref.WeakKeyDictionary[threading.Thread, list[str]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        requestor = getattr(assoc, "requestor", None)
        if requestor is None or getattr(requestor, "primitive", None) is None:
            return []
        if assoc not in self._decisions:
            self._decisions[assoc] = self._decide(requestor)
        return self._decisions[assoc]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        pass  # the allow-list comes from the settings only

    def _decide(self, requestor: Any) -> list[str]:
        calling = str(requestor.primitive.calling_ae_title).strip()
        called = str(requestor.primitive.called_ae_title).strip()
        address = str(requestor.address)
        if self.require_called_aet and called != self._own_title:
            log.warning("association from %s (%s) rejected: called AE title %r is not ours (%r)",
                        calling, address, called, self._own_title)
            return []
        if not self._allowed:
            return []
        for entry in self._allowed:
            if entry.ae_title == calling and _host_ok(entry.host, address):
                return [calling]
        known = any(entry.ae_title == calling for entry in self._allowed)
        why = (f"calling AE title {calling!r} is allowed, but not from address {address}"
               if known else f"calling AE title {calling!r} is not in allowed_callers")
        log.warning("association from %s (%s) rejected: %s", calling, address, why)
        return [_REJECT_MARK]

    def explained(self, assoc: threading.Thread) -> bool:
        """Whether the allow-list check already logged why this association was refused."""
        return self._decisions.get(assoc) == [_REJECT_MARK] or (
            self.require_called_aet and self._called_mismatch(assoc))

    def _called_mismatch(self, assoc: threading.Thread) -> bool:
        primitive = getattr(getattr(assoc, "requestor", None), "primitive", None)
        return primitive is not None and \
            str(primitive.called_ae_title).strip() != self._own_title


def _host_ok(rule: str | None, address: str) -> bool:
    if rule is None:
        return True
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(rule, strict=False)
    except ValueError:
        return False


def server_tls(settings: TlsSettings | None) -> ssl.SSLContext | None:
    """TLS 1.2+ for the listener; with a CA file, client certificates are required."""
    if settings is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    if settings.ca_file is not None:
        context.load_verify_locations(str(settings.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls(destination: DestinationSettings | SourceSettings) -> ssl.SSLContext:
    """TLS to a destination or source: its certificate is always verified (against
    ca_file when given, else the system store); our own certificate when the peer asks."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(destination.ca_file)
                                         if destination.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if destination.cert_file is not None and destination.key_file is not None:
        context.load_cert_chain(str(destination.cert_file), str(destination.key_file))
    return context


# How much later a process of several on one port (SharedSocketServer) tries to accept a
# new association per association it serves; an association accepted this recently
# counts as served (its thread may not have started yet).
ACCEPT_DEFERRAL = 0.002
RECENT_ACCEPT = 0.05


def _prefer_decodable(event: Any) -> None:
    """Before negotiation: put first, in each proposed presentation context, the transfer
    syntaxes this node can decode. pynetdicom's unrestricted storage service (every
    Storage SOP class, private ones too) accepts each context with its first proposed
    transfer syntax; a sender proposing, say, a private compression and then Explicit VR
    Little Endian in one context would otherwise get the one no model here can read.
    A context with none this node can decode keeps its first: the instance is stored
    as sent (and can be forwarded), though no model will run on it."""
    for context in event.assoc.requestor.primitive.presentation_context_definition_list:
        proposed = context.transfer_syntax
        if len(proposed) > 1 and not decodable(proposed[0]):
            order = preferred_order(proposed)
            if order[0] != proposed[0]:
                context.transfer_syntax = order


class SharedSocketServer(ThreadedAssociationServer):
    """The listener of several processes on one port (node/listener.py): they all accept
    from one listening socket, made by the receiver (``listen_fd`` None) and inherited by
    its listener children (``listen_fd``). The socket does not block: every process sees
    a new connection, the first to call accept takes it, the others get nothing and go
    back to waiting. A process that serves associations (or accepted one a moment ago)
    calls :data:`ACCEPT_DEFERRAL` later per association, so new associations go to the
    free processes first; with SO_REUSEPORT the kernel's hash of the peer's address put
    two of four parallel associations on one process and none on another. Connections
    not yet accepted wait in the one queue, so a child that dies drops none of them."""

    def __init__(self, *args: Any, listen_fd: int | None = None, **kwargs: Any) -> None:
        self._listen_fd = listen_fd
        self._last_accept = -1.0
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept, after a pause that grows with what this process serves already; raises
        BlockingIOError when another process took the connection meanwhile."""
        busy = len(self.active_associations) \
            + (time.monotonic() - self._last_accept < RECENT_ACCEPT)
        if busy:
            time.sleep(min(busy, 8) * ACCEPT_DEFERRAL)
        request = super().get_request()
        self._last_accept = time.monotonic()
        return request

    def server_bind(self) -> None:
        if self._listen_fd is None:
            super().server_bind()
            return
        assert self.socket is not None          # made by TCPServer.__init__, unused here
        self.socket.close()
        self.socket = socket.socket(fileno=self._listen_fd)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        assert self.socket is not None
        if self._listen_fd is None:
            super().server_activate()
        self.socket.setblocking(False)          # (shared with every process: one flag)

    def server_close(self) -> None:
        assert self.socket is not None
        self.socket.close()     # no shutdown(): that would stop the other processes too


class DimseReceiver:
    """The Storage SCP (plus Verification)."""

    def __init__(
        self,
        settings: NodeSettings,
        intake: Intake,
        *,
        on_released: Callable[[dict[str, int]], None] = lambda _: None,
        metrics: Metrics | None = None,
        moved_from: Callable[[str], str | None] = lambda _: None,
        listen_fd: int | None = None,
    ) -> None:
        """``on_released``: called at each association's release with the series it
        carried and how many distinct instances of each (assembly's fast path).
        ``moved_from``: the pull source (node/pull.py) whose PACS has this calling AE
        title, if any; instances it sends for our own C-MOVE are tagged with its name.
        ``listen_fd``: a listener child's inherited listening socket (with
        ``listener_processes`` > 1; the receiver's own is :attr:`listening_fd`)."""
        self._listen_fd = listen_fd
        self.settings = settings
        self.intake = intake
        self.on_released = on_released
        self.moved_from = moved_from
        self.metrics = metrics or Metrics()
        # per association: series UID -> the SOP Instance UIDs of it stored
        self._series: dict[int, dict[str, set[str]]] = {}
        self._series_lock = threading.Lock()
        self._server: Any = None
        self._ae: AE | None = None

    def build_ae(self) -> AE:
        s = self.settings
        ae = _GatedAE(s.ae_title, s.allowed_callers, s.ae_title)
        ae.require_called_aet = s.require_called_ae
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_bytes
        ae.network_timeout = s.network_timeout_seconds
        ae.dimse_timeout = s.dimse_timeout_seconds
        # A bare TCP connect (a port probe) holds an association slot until this expires.
        ae.acse_timeout = s.acse_timeout_seconds
        # Storage contexts need no list: with pynetdicom's unrestricted storage service
        # (set in start()) every Storage SOP class, standard, retired or private, is
        # accepted with the first transfer syntax the peer proposes, and stored as sent.
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        # Accept Storage SOP classes pynetdicom does not list (private or newer ones).
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        remembered_negotiations.install()      # (that negotiation, done once per proposal)
        # pynetdicom's standard handlers summarise every PDU and message for its debug
        # log, which node/log.py keeps at WARNING: building the summaries of one
        # association request costs ~2 ms. Bound only when someone reads them.
        _config.LOG_HANDLER_LEVEL = ("standard" if logging.getLogger("pynetdicom")
                                     .isEnabledFor(logging.DEBUG) else "none")
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, lambda event: StatusValues.SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REQUESTED, _prefer_decodable),
        ]
        ae = self.build_ae()
        self._ae = ae
        # pynetdicom's start_server, with a connection handler whose associations wake
        # on work instead of polling (adapters/reactor.py).
        shared = self.settings.listener_processes > 1
        if self._listen_fd is not None and not shared:
            raise ValueError("an inherited listening socket is for listener_processes > 1")
        extra: dict[str, Any] = {"listen_fd": self._listen_fd} if shared else {}
        server = ae.make_server((self.settings.host, self.settings.port),
                                evt_handlers=handlers, ssl_context=server_tls(self.settings.tls),
                                server_class=SharedSocketServer if shared
                                else ThreadedAssociationServer,
                                request_handler=WakingRequestHandler,
                                **extra)
        ae._servers.append(server)  # as start_server does: AE.shutdown() stops it too
        threading.Thread(target=server.serve_forever, name="dicom-listener",
                         daemon=True).start()
        self._server = server
        # Accepted sockets inherit TCP_NODELAY from the listening socket on Linux.
        self._server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.info("DICOM listener %s on %s:%d%s%s", self.settings.ae_title, self.settings.host,
                 self.port, " (TLS)" if self.settings.tls else "",
                 " (socket shared with the listener processes)" if shared else "")

    @property
    def listening_fd(self) -> int:
        """The listening socket's descriptor, for the listener children to inherit."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.socket.fileno())

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.settings.port

    def stop(self) -> None:
        """Stop accepting; associations in flight are aborted so their senders retry (an
        instance being stored when the abort comes is finished, but not acknowledged)."""
        if self._server is not None:
            server, self._server = self._server, None
            in_flight = server.active_associations
            server.shutdown()
            for assoc in in_flight:
                assoc.abort()       # returns once the association's threads have stopped

    def _on_store(self, event: Any) -> int:
        """EVT_C_STORE: a request pynetdicom decoded (most come by :meth:`open_direct`)."""
        request = event.request
        sop_class, sop_uid = str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
        originator = getattr(request, "MoveOriginatorApplicationEntityTitle", None)
        peer = self._peer(event.assoc, str(originator or "").strip() or None)
        data = file_header(sop_class, sop_uid, str(event.context.transfer_syntax),
                           source_ae_title=peer.calling_ae_title) \
            + event.encoded_dataset(include_meta=False)
        return self._answer(event.assoc, sop_uid, peer, lambda: self.intake.store(
            data, peer=peer, expected_sop_instance_uid=sop_uid,
            expected_sop_class_uid=sop_class))

    def open_direct(self, assoc: Any, request: StoreRequest) -> DirectInstance:
        """A request adapters/pdata.py reads from the PDUs itself, on the DUL thread: its
        data set goes to the spool fragment by fragment as it arrives."""
        peer = self._peer(assoc, request.move_originator_ae)
        incoming = self.intake.receive(
            file_header(request.sop_class_uid, request.sop_instance_uid,
                        request.transfer_syntax, source_ae_title=peer.calling_ae_title),
            peer=peer,
            expected_sop_instance_uid=request.sop_instance_uid,
            expected_sop_class_uid=request.sop_class_uid,
        )
        return _Incoming(incoming, lambda: self._answer(assoc, request.sop_instance_uid,
                                                        peer, incoming.finish),
                         self.intake.spool.make_spare)

    def _peer(self, assoc: Any, move_originator: str | None) -> AssociationInfo:
        peer = AssociationInfo(
            calling_ae_title=str(assoc.requestor.ae_title).strip(),
            called_ae_title=str(assoc.acceptor.ae_title).strip(),
            address=str(assoc.requestor.address),
            port=int(assoc.requestor.port or 0),
        )
        return self._as_source(peer, move_originator)

    def _answer(self, assoc: Any, sop_uid: str, peer: AssociationInfo,
                store: Callable[[], StoreOutcome]) -> int:
        """Run ``store``; the C-STORE status for its outcome, counted and logged."""
        try:
            outcome = store()
        except StorageFullError as exc:
            self.metrics.inc("pacsnode_instances_refused_total", status="A700")
            log.error("C-STORE %s from %s refused (A700 out of resources): %s", sop_uid,
                      peer.calling_ae_title, exc)
            return StatusValues.OUT_OF_RESOURCES
        except DatasetMismatchError as exc:
            self.metrics.inc("pacsnode_instances_refused_total", status="A900")
            log.warning("C-STORE %s from %s refused (A900): %s", sop_uid,
                        peer.calling_ae_title, exc)
            return StatusValues.DATASET_DOES_NOT_MATCH_SOP_CLASS
        except InvalidInstanceError as exc:
            self.metrics.inc("pacsnode_instances_refused_total", status="C000")
            log.warning("C-STORE %s from %s refused (C000 cannot understand): %s", sop_uid,
                        peer.calling_ae_title, exc)
            return StatusValues.CANNOT_UNDERSTAND
        except IntakeError as exc:
            self.metrics.inc("pacsnode_instances_refused_total", status="A700")
            log.error("C-STORE %s from %s refused (A700): %s", sop_uid, peer.calling_ae_title, exc)
            return StatusValues.OUT_OF_RESOURCES
        header = outcome.header
        with self._series_lock:
            self._series.setdefault(id(assoc), {}).setdefault(
                header.series_instance_uid, set()).add(header.sop_instance_uid)
        self.metrics.inc("pacsnode_instances_received_total")
        self.metrics.inc("pacsnode_bytes_received_total", float(outcome.size))
        return StatusValues.SUCCESS

    def _as_source(self, peer: AssociationInfo, originator: str | None) -> AssociationInfo:
        """A C-STORE sub-operation of a C-MOVE this node asked for (its Move Originator AE
        Title is ours, PS3.7 9.1.1.1) from a pull source's PACS carries the source's name
        as calling AE title, like the instances a C-GET returns."""
        if originator != self.settings.ae_title:
            return peer
        name = self.moved_from(peer.calling_ae_title)
        return dataclasses.replace(peer, calling_ae_title=name[:16]) if name else peer

    def _take_series(self, event: Any) -> dict[str, int]:
        with self._series_lock:
            carried = self._series.pop(id(event.assoc), {})
        return {uid: len(sops) for uid, sops in carried.items()}

    def _on_released(self, event: Any) -> None:
        carried = self._take_series(event)
        if carried:
            self.on_released(carried)

    def _on_accepted(self, event: Any) -> None:
        self.metrics.inc("pacsnode_associations_total", result="accepted")

    def _on_rejected(self, event: Any) -> None:
        self.metrics.inc("pacsnode_associations_total", result="rejected")
        ae = self._ae
        if isinstance(ae, _GatedAE) and ae.explained(event.assoc):
            return
        requestor = event.assoc.requestor
        log.warning("association from %s (%s) rejected: %d associations already active "
                    "(max_associations)", str(requestor.ae_title).strip(), requestor.address,
                    self.settings.max_associations)

    def _on_aborted(self, event: Any) -> None:
        self._take_series(event)

    def _on_closed(self, event: Any) -> None:
        assoc = event.assoc
        # pynetdicom sends A-RELEASE-RP before it reports EVT_RELEASED (association
        # thread); the peer may close at once and this event (DUL thread) come first.
        # A released or established association's series are left to EVT_RELEASED or
        # EVT_ABORTED, or the fast path would lose them.
        if not (assoc.is_established or assoc.is_released):
            self._take_series(event)
        if assoc.is_acceptor and getattr(assoc.requestor, "primitive", None) is None:
            # The peer closed before sending A-ASSOCIATE-RQ (a port probe). pynetdicom's
            # association thread would wait acse_timeout for it, holding a slot of
            # max_associations; an empty item wakes it into its own time-out path.
            assoc.dul.to_user_queue.put(None)


class DimseSender:
    """C-STORE SCU: one association per batch; files sent as stored, or converted to the
    destination's ``transfer_syntax``, which is then the one proposed."""

    def __init__(self, *, ae_title: str = "PACSNODE") -> None:
        self.ae_title = ae_title

    def _ae(self, destination: DestinationSettings) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = destination.timeout_seconds
        ae.dimse_timeout = destination.timeout_seconds
        ae.network_timeout = destination.timeout_seconds
        return ae

    def _associate(self, ae: AE, destination: DestinationSettings) -> Any:
        tls = (client_tls(destination), str(destination.host)) if destination.tls else None
        assoc = ae.associate(str(destination.host), int(destination.port or 0),
                             ae_title=str(destination.ae_title), tls_args=tls)
        if not assoc.is_established:
            what = "rejected the association" if assoc.is_rejected else "did not answer"
            raise DeliveryError(
                f"{destination.name} ({destination.host}:{destination.port}, AE "
                f"{destination.ae_title}) {what}", retryable=True)
        return assoc

    def echo(self, destination: DestinationSettings) -> float:
        ae = self._ae(destination)
        ae.add_requested_context(Verification)
        start = time.monotonic()
        assoc = self._associate(ae, destination)
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        if not status or int(status.Status) != 0:
            raise DeliveryError(f"{destination.name}: C-ECHO failed", retryable=True)
        return time.monotonic() - start

    def send(self, destination: DestinationSettings, paths: Sequence[Path]) -> SendReport:
        """All of ``paths`` over one association, each in the destination's transfer
        syntax (converted copies in a temporary folder) or as stored ("as-is")."""
        with tempfile.TemporaryDirectory(prefix="pacsnode-send-") as folder:
            converted = [convert_file(p, destination.transfer_syntax, Path(folder))
                         for p in paths]
            return self._send(destination, converted)

    def _send(self, destination: DestinationSettings, paths: Sequence[Path]) -> SendReport:
        ae = self._ae(destination)
        contexts: dict[tuple[str, str], None] = {}
        metas: list[tuple[Path, str, str]] = []
        for path in paths:
            meta = read_file_meta_info(path)
            pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            contexts[pair] = None
            metas.append((path, *pair))
        if len(contexts) > 128:
            raise DeliveryError("more than 128 SOP class/transfer syntax pairs in one batch",
                                retryable=False)
        for sop_class, ts in contexts:
            ae.add_requested_context(sop_class, [ts])
        failed: list[tuple[str, str]] = []
        sent = 0
        assoc = self._associate(ae, destination)
        try:
            for path, _, _ in metas:
                try:
                    status = assoc.send_c_store(path)
                except (ValueError, RuntimeError, OSError) as exc:
                    failed.append((path.name, str(exc)))
                    continue
                code = int(status.Status) if status and "Status" in status else None
                if code is None:
                    raise DeliveryError(f"{destination.name}: no response to C-STORE",
                                        retryable=True)
                if code in (0x0000, 0xB000, 0xB007, 0xB006):
                    sent += 1
                else:
                    failed.append((path.name, f"status 0x{code:04X}"))
        finally:
            if assoc.is_established:
                assoc.release()
        return SendReport(destination.name, sent, tuple(failed))


class _Incoming:
    """adapters/pdata.py's view of an instance the intake receives piece by piece."""

    def __init__(self, incoming: IncomingInstance, finish: Callable[[], int],
                 responded: Callable[[], None]) -> None:
        self._incoming = incoming
        self._finish = finish
        self.responded = responded

    def add(self, fragment: memoryview) -> None:
        self._incoming.add(fragment)

    def finish(self) -> int:
        return self._finish()

    def abandon(self) -> None:
        self._incoming.abandon()
