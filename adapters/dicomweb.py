"""DICOMweb over dicomweb-client: STOW-RS delivery of results (and, later, QIDO/WADO pull).

Library and HTTP errors are translated at this boundary into DeliveryError, saying
whether trying again may help: a refused request (4xx but 408/429) is not retryable,
a server or network failure is. Tokens are read from files, never logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from node.errors import DeliveryError
from node.ports import SendReport
from node.settings import DestinationSettings
from node.transcode import convert

log = logging.getLogger(__name__)

_RETRYABLE_HTTP = {408, 425, 429}


def _headers(destination: DestinationSettings) -> dict[str, str]:
    if destination.token_file is None:
        return {}
    try:
        token = destination.token_file.read_text().strip()
    except OSError as exc:
        raise DeliveryError(f"{destination.name}: cannot read token_file "
                            f"{destination.token_file}: {exc.strerror}", retryable=False) from exc
    return {"Authorization": f"Bearer {token}"}


def _session(destination: DestinationSettings) -> requests.Session:
    session = requests.Session()
    if destination.ca_file is not None:
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override session.verify; the
        # configured CA must win, so take proxies from the environment by hand instead.
        session.trust_env = False
        session.proxies = requests.utils.get_environ_proxies(str(destination.url))
        session.verify = str(destination.ca_file)
    if destination.username is not None and destination.password_file is not None:
        try:
            password = destination.password_file.read_text().strip()
        except OSError as exc:
            raise DeliveryError(f"{destination.name}: cannot read password_file "
                                f"{destination.password_file}: {exc.strerror}",
                                retryable=False) from exc
        session.auth = (destination.username, password)
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
