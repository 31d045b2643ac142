"""DICOMweb over dicomweb-client: STOW-RS delivery of results, QIDO-RS + WADO-RS pull.

Library and HTTP errors are translated at this boundary into DeliveryError (saying
whether trying again may help: a refused request, 4xx but 408/429, is not retryable, a
server or network failure is) or, for sources, SourceError. Tokens are read from files,
never logged.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from node.errors import DeliveryError, PacsnodeError, SourceError
from node.ports import RemoteSeries, SendReport
from node.settings import DestinationSettings, SourceSettings
from node.transcode import convert

log = logging.getLogger(__name__)

_RETRYABLE_HTTP = {408, 425, 429}


Endpoint = DestinationSettings | SourceSettings
ConfigProblem = Callable[[str], PacsnodeError]


def _not_retryable(message: str) -> PacsnodeError:
    return DeliveryError(message, retryable=False)


def _headers(endpoint: Endpoint, problem: ConfigProblem = _not_retryable) -> dict[str, str]:
    if endpoint.token_file is None:
        return {}
    try:
        token = endpoint.token_file.read_text().strip()
    except OSError as exc:
        raise problem(f"{endpoint.name}: cannot read token_file "
                      f"{endpoint.token_file}: {exc.strerror}") from exc
    return {"Authorization": f"Bearer {token}"}


def _session(endpoint: Endpoint, problem: ConfigProblem = _not_retryable) -> requests.Session:
    session = requests.Session()
    if endpoint.ca_file is not None:
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override session.verify; the
        # configured CA must win, so take proxies from the environment by hand instead.
        session.trust_env = False
        session.proxies = requests.utils.get_environ_proxies(str(endpoint.url))
        session.verify = str(endpoint.ca_file)
    if endpoint.username is not None and endpoint.password_file is not None:
        try:
            password = endpoint.password_file.read_text().strip()
        except OSError as exc:
            raise problem(f"{endpoint.name}: cannot read password_file "
                          f"{endpoint.password_file}: {exc.strerror}") from exc
        session.auth = (endpoint.username, password)
    return session


class DicomwebSender:
    """STOW-RS: one request per study in the batch; each object in the destination's
    ``transfer_syntax`` (or as stored)."""

    def _client(self, destination: DestinationSettings) -> DICOMwebClient:
        return DICOMwebClient(url=str(destination.url), session=_session(destination),
                              headers=_headers(destination),
                              timeout=destination.timeout_seconds)

    def echo(self, destination: DestinationSettings) -> float:
        start = time.monotonic()
        try:
            self._client(destination).search_for_studies(limit=1)
        except requests.HTTPError as exc:
            raise _translate(destination, exc) from exc
        except requests.RequestException as exc:
            raise DeliveryError(f"{destination.name}: {type(exc).__name__}: {exc}",
                                retryable=True) from exc
        return time.monotonic() - start

    def send(self, destination: DestinationSettings, paths: Sequence[Path]) -> SendReport:
        by_study: dict[str, list[Dataset]] = {}
        for path in paths:
            ds = convert(pydicom.dcmread(path), destination.transfer_syntax, path.name)
            by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
        client = self._client(destination)
        sent = 0
        failed: list[tuple[str, str]] = []
        for study_uid, datasets in by_study.items():
            try:
                response = client.store_instances(datasets, study_instance_uid=study_uid)
            except requests.HTTPError as exc:
                raise _translate(destination, exc) from exc
            except requests.RequestException as exc:
                raise DeliveryError(f"{destination.name}: {type(exc).__name__}: {exc}",
                                    retryable=True) from exc
            refused = _failed_sop(response)
            failed += [(uid, reason) for uid, reason in refused]
            sent += len(datasets) - len(refused)
        return SendReport(destination.name, sent, tuple(failed))


def _failed_sop(response: Dataset | None) -> list[tuple[str, str]]:
    """FailedSOPSequence of a STOW-RS response (PS3.18 Table 10.5.3-1)."""
    out: list[tuple[str, str]] = []
    for item in getattr(response, "FailedSOPSequence", []) or []:
        reason: Any = item.get("FailureReason", "?")
        out.append((str(item.get("ReferencedSOPInstanceUID", "?")), f"failure reason {reason}"))
    return out


def _translate(destination: DestinationSettings, exc: requests.HTTPError) -> DeliveryError:
    status = exc.response.status_code if exc.response is not None else 0
    retryable = status >= 500 or status in _RETRYABLE_HTTP or status == 0
    return DeliveryError(f"{destination.name}: HTTP {status} from {destination.url}",
                         retryable=retryable)


_PAGE = 100                     # QIDO-RS results per request (limit/offset paging)
_ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)     # as stored, no transcoding
_STUDY = "0020000D"
_SERIES = "0020000E"
_COUNT = "00201209"             # NumberOfSeriesRelatedInstances
_STUDY_DATE = "00080020"


class DicomwebSource:
    """QIDO-RS for series of recent studies, WADO-RS for their instances."""

    def __init__(self) -> None:
        # dicomweb-client logs every request at INFO; a poll every few seconds would
        # drown the node's own lines (node/pull.py logs what was fetched)
        logging.getLogger("dicomweb_client.web").setLevel(logging.WARNING)

    def _client(self, source: SourceSettings) -> DICOMwebClient:
        return DICOMwebClient(url=str(source.url), session=_session(source, SourceError),
                              headers=_headers(source, SourceError),
                              timeout=source.timeout_seconds)

    def find_series(self, source: SourceSettings, *, since: date | None,
                    extra: Mapping[str, str] | None = None) -> list[RemoteSeries]:
        filters: dict[str, Any] = {**source.filters, **(extra or {})}
        if since is not None:
            filters["StudyDate"] = f"{since:%Y%m%d}-"
        client = self._client(source)
        found: list[RemoteSeries] = []
        offset = 0
        while True:
            page = _guarded(source, functools.partial(
                client.search_for_series, search_filters=filters,
                fields=["NumberOfSeriesRelatedInstances", "StudyDate"], limit=_PAGE,
                offset=offset))
            for item in page:
                remote = _remote(item)
                if remote is not None:
                    found.append(remote)
            if len(page) < _PAGE:
                return found
            offset += len(page)

    def fetch_series(self, source: SourceSettings, study_instance_uid: str,
                     series_instance_uid: str) -> Iterator[bytes]:
        client = self._client(source)
        datasets = _guarded(source, lambda: client.iter_series(
            study_instance_uid, series_instance_uid, media_types=_ANY_TRANSFER_SYNTAX))
        while True:
            ds = _guarded(source, lambda: next(datasets, None))
            if ds is None:
                return
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            yield buf.getvalue()


def _guarded(source: SourceSettings, call: Callable[[], Any]) -> Any:
    """Run one client call; library and HTTP errors become SourceError."""
    try:
        return call()
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        raise SourceError(f"{source.name}: HTTP {status} from {source.url}") from exc
    except requests.RequestException as exc:
        raise SourceError(f"{source.name}: {type(exc).__name__}: {exc}") from exc
    except (ValueError, OSError) as exc:
        raise SourceError(f"{source.name}: unreadable reply: {exc}") from exc


def _remote(item: dict[str, Any]) -> RemoteSeries | None:
    def first(tag: str) -> Any:
        values = (item.get(tag) or {}).get("Value") or [None]
        return values[0]

    study, series, count = first(_STUDY), first(_SERIES), first(_COUNT)
    if not study or not series:
        return None
    study_date = first(_STUDY_DATE)
    return RemoteSeries(str(study), str(series), int(count) if count is not None else None,
                        str(study_date) if study_date else None)
