"""Re-encoding objects in the transfer syntax a destination asks for (``transfer_syntax``).

Only the encodings pydicom writes without a codec are offered: Implicit VR Little Endian,
Explicit VR Little Endian and Deflated Explicit VR Little Endian (PS3.5 Annex A.1-A.5).
Objects in one of those are converted losslessly; a compressed object (JPEG, RLE, ...)
cannot be, and is refused with a message saying so rather than sent in a syntax the
destination did not ask for. "as-is" sends every object as it is stored.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from node.errors import DeliveryError

AS_IS = "as-is"
TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
}
_CONVERTIBLE = {*TRANSFER_SYNTAXES, "1.2.840.10008.1.2.2"}   # + Explicit VR Big Endian


def choices() -> str:
    return ", ".join([f'"{AS_IS}"', *(f'"{uid}" ({name})'
                                      for uid, name in TRANSFER_SYNTAXES.items())])


def check_transfer_syntax(value: str) -> str:
    """Config validator: "as-is" or one of :data:`TRANSFER_SYNTAXES`."""
    if value != AS_IS and value not in TRANSFER_SYNTAXES:
        raise ValueError(f"{choices()}; compressed transfer syntaxes are not offered (no "
                         f"codec re-encodes them losslessly here)")
    return value


def convert(ds: Dataset, target: str, where: str) -> Dataset:
    """``ds`` set to be written in ``target`` (unchanged for "as-is" or the same syntax)."""
    source = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if target == AS_IS or source == target:
        return ds
    if source not in _CONVERTIBLE:
        raise DeliveryError(
            f"{where}: stored in transfer syntax {source or '(none)'}, which cannot be "
            f"converted to {target} ({TRANSFER_SYNTAXES.get(target, target)}) without a "
            f'codec; set the destination\'s transfer_syntax = "{AS_IS}"', retryable=False)
    ds.file_meta.TransferSyntaxUID = UID(target)
    return ds


def convert_file(path: Path, target: str, folder: Path) -> Path:
    """``path`` itself when no conversion is needed, else a copy in ``folder`` written in
    ``target``."""
    if target == AS_IS:
        return path
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise DeliveryError(f"{path.name}: cannot read it to convert it to {target}: {exc}",
                            retryable=False) from exc
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == target:
        return path
    out = folder / path.name
    convert(ds, target, path.name).save_as(out, enforce_file_format=True)
    return out
