"""De-identification of training data: PS3.15 Annex E Basic Application Level
Confidentiality Profile, optionally with the Retain Longitudinal Temporal Information with
Modified Dates Option (E.3.6).

- The attribute actions are data (:mod:`node.finetune.deid_table`, Table E.1-1), applied at
  every nesting level.
- UIDs (action U, and every other UID that is not a registered DICOM UID) are replaced by
  ``2.25.<HMAC>``: the same input UID gives the same output UID in every study, so a SEG
  still references its (de-identified) source images.
- Patient name and ID become one pseudonym, an HMAC of the patient ID under a node-local
  secret: the same patient gets the same pseudonym across studies, other patients another.
- With ``retain_dates`` every date and time is shifted back by a per-patient offset (whole
  days plus seconds; date and time pairs move together), so intervals are kept.
- Private attributes and curve/overlay data are removed; PatientIdentityRemoved = YES and
  the method is recorded in DeidentificationMethod(CodeSequence) (DCM 113100, 113107).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom._uid_dict import UID_dictionary

from node.errors import PacsnodeError
from node.finetune.deid_table import BASIC_PROFILE, DATE_OPTION


class DeidError(PacsnodeError):
    """A data set cannot be de-identified (no patient ID, unreadable secret, ...)."""


# Attributes the profile lets us blank or remove but that the CT, MR and SEG IODs require
# to be present (Type 2): "X/Z"-style codes resolve to Z for these, to X otherwise.
_KEEP_PRESENT = frozenset({"AccessionNumber", "ContentDate", "ContentTime", "PatientBirthDate",
                           "PatientID", "PatientName", "PatientSex", "ReferringPhysicianName",
                           "StudyDate", "StudyID", "StudyTime", "ContentCreatorName"})
# ... and those the Enhanced General Equipment module (SEG) requires with a value (Type 1).
_KEEP_VALUE = frozenset({"DeviceSerialNumber"})
_DUMMY = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
          "UI": "2.25.0", "IS": "0", "DS": "0", "AS": "000Y", "CS": "ANON"}
METHOD = "PS3.15 E.1 Basic Appl. Level Confidentiality Profile"
DATES_METHOD = "Retain Longitudinal Temporal Info. Modified Dates Opt."
_ACTIONS = {keyword: action for keyword, action in BASIC_PROFILE}
_TAGS = {int(tag_for_keyword(k) or 0): k for k, _ in BASIC_PROFILE}


def load_secret(path: Path) -> bytes:
    """The node-local HMAC key; created (32 random bytes, mode 0600) on first use."""
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
                fh.flush()
                os.fsync(fh.fileno())
        key = path.read_bytes()
    except OSError as exc:
        raise DeidError(f"de-identification secret {path}: {exc.strerror}") from exc
    if len(key) < 16:
        raise DeidError(f"de-identification secret {path}: expected at least 16 bytes, got "
                        f"{len(key)}")
    return key


@dataclass(frozen=True)
class Deidentifier:
    """Applies the profile with one node-local ``secret`` (see the module docstring)."""

    secret: bytes
    retain_dates: bool = True

    def _mac(self, purpose: str, text: str) -> bytes:
        return hmac.new(self.secret, f"{purpose}\x1f{text}".encode(), hashlib.sha256).digest()

    def pseudonym(self, patient_id: str, issuer: str = "") -> str:
        """Stable per patient (and issuer of the ID), unlinkable without the secret."""
        return "PN" + self._mac("patient", f"{issuer}\\{patient_id}").hex()[:14].upper()

    def uid(self, uid: str) -> str:
        return f"2.25.{int.from_bytes(self._mac('uid', uid)[:16], 'big')}"

    def shift(self, patient_id: str) -> timedelta:
        """The patient's date offset: 30-3679 days and 1-86399 seconds back in time."""
        digest = self._mac("dates", patient_id)
        days = 30 + int.from_bytes(digest[:4], "big") % 3650
        seconds = 1 + int.from_bytes(digest[4:8], "big") % 86399
        return -timedelta(days=days, seconds=seconds)

    def __call__(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (file meta included); ``ds`` is not changed."""
        patient_id = str(ds.get("PatientID", "") or "")
        if not patient_id:
            raise DeidError(f"instance {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}: "
                            f"PatientID is empty; pseudonyms need a patient identifier")
        issuer = str(ds.get("IssuerOfPatientID", "") or "")
        out = copy.deepcopy(ds)
        pseudonym = self.pseudonym(patient_id, issuer)
        shift = self.shift(f"{issuer}\\{patient_id}") if self.retain_dates else None
        self._apply(out, shift, set())
        out.PatientID = pseudonym
        out.PatientName = pseudonym
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = [METHOD, DATES_METHOD] if shift else METHOD
        out.DeidentificationMethodCodeSequence = [_code("113100", "Basic Application "
                                                        "Confidentiality Profile")]
        if shift is not None:
            out.DeidentificationMethodCodeSequence.append(_code(
                "113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
            out.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            out.LongitudinalTemporalInformationModified = "REMOVED"
        if hasattr(ds, "file_meta"):
            meta = copy.deepcopy(ds.file_meta)
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
            for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                            "ReceivingApplicationEntityTitle", "PrivateInformation",
                            "PrivateInformationCreatorUID"):
                if keyword in meta:
                    delattr(meta, keyword)
            out.file_meta = meta
        return out

    def _apply(self, ds: Dataset, shift: timedelta | None, seen: set[int]) -> None:
        """Apply the table to ``ds`` and its items; ``seen`` holds the ids of items done
        (an item object can sit in two sequences: it must be changed once)."""
        if id(ds) in seen:
            return
        seen.add(id(ds))
        ds.remove_private_tags()
        for elem in list(ds):
            group = elem.tag.group
            if 0x5000 <= group <= 0x50FF or (0x6000 <= group <= 0x60FF
                                             and elem.tag.element in (0x3000, 0x4000)):
                del ds[elem.tag]  # curves, overlay data and comments (Table E.1-1: X)
        pairs = _date_time_pairs(ds)
        for elem in list(ds):
            keyword = _TAGS.get(int(elem.tag)) or elem.keyword
            action = self._action(keyword, elem, shift)
            if action == "X":
                del ds[elem.tag]
            elif action == "Z":
                empty: Sequence | str = Sequence() if elem.VR == "SQ" else ""
                ds[elem.tag] = DataElement(elem.tag, elem.VR, empty)
            elif action == "D":
                self._dummy(ds, elem, shift, seen)
            elif action == "C" and shift is not None:
                self._shift(ds, elem, pairs, shift)
            elif elem.VR == "SQ":
                for item in elem.value:
                    self._apply(item, shift, seen)
            elif elem.VR == "UI":
                self._replace_uids(ds, elem)

    def _action(self, keyword: str, elem: DataElement, shift: timedelta | None) -> str:
        action = _ACTIONS.get(keyword)
        if shift is not None and (keyword in DATE_OPTION or (
                action is None and elem.VR in ("DA", "TM", "DT"))):
            return "C"
        if action is None:
            return "K"
        if action == "X/Z/U*":
            return "K"  # keep the sequence; its UIDs are replaced below (U*)
        if "/" in action and keyword in _KEEP_VALUE:
            return "D"
        if "/" in action:
            return ("Z" if "Z" in action else "D") if keyword in _KEEP_PRESENT else "X"
        return "K" if action == "U" else action

    def _dummy(self, ds: Dataset, elem: DataElement, shift: timedelta | None,
               seen: set[int]) -> None:
        if elem.VR == "SQ":
            for item in elem.value:
                self._apply(item, shift, seen)
            return
        value = _DUMMY.get(elem.VR, "ANON")
        ds[elem.tag] = DataElement(elem.tag, elem.VR, value)

    def _replace_uids(self, ds: Dataset, elem: DataElement) -> None:
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        new = [self.uid(str(v)) if str(v) and str(v) not in UID_dictionary else str(v)
               for v in values]
        ds[elem.tag] = DataElement(elem.tag, "UI", new if len(new) != 1 else new[0])

    def _shift(self, ds: Dataset, elem: DataElement, pairs: dict[str, str],
               shift: timedelta) -> None:
        """Move a DA, TM or DT value by ``shift``; a date and its time move together."""
        text = str(elem.value or "")
        if not text:
            return
        keyword = elem.keyword
        if elem.VR == "DA":
            time = pairs.get(keyword, "000000")
            when = _parse(text + _clean_time(time)) + shift
            value = when.strftime("%Y%m%d")
        elif elem.VR == "TM":
            date = pairs.get(keyword, "20000101")
            when = _parse(date + _clean_time(text)) + shift
            value = when.strftime("%H%M%S") + _fraction(text)
        else:
            when = _parse(text[:14].ljust(14, "0"))
            value = (when + shift).strftime("%Y%m%d%H%M%S")
        ds[elem.tag] = DataElement(elem.tag, elem.VR, value)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _date_time_pairs(ds: Dataset) -> dict[str, str]:
    """{"StudyDate": <original StudyTime>, "StudyTime": <original StudyDate>, ...}."""
    pairs: dict[str, str] = {}
    for elem in ds:
        if elem.VR == "DA" and elem.keyword.endswith("Date"):
            partner = elem.keyword[:-4] + "Time"
            tag = tag_for_keyword(partner)
            if tag is not None and tag in ds and dictionary_VR(tag) == "TM" and ds[tag].value:
                pairs[elem.keyword] = str(ds[tag].value)
                pairs[partner] = str(elem.value)
    return pairs


def _clean_time(text: str) -> str:
    digits = text.split(".")[0].replace(":", "")
    return digits.ljust(6, "0")[:6]


def _fraction(text: str) -> str:
    return "." + text.split(".", 1)[1] if "." in text else ""


def _parse(text: str) -> datetime:
    try:
        return datetime.strptime(text[:14], "%Y%m%d%H%M%S")
    except ValueError as exc:
        raise DeidError(f"cannot shift date/time {text!r}: {exc}") from exc
