"""The one exception tree of pacsnode.

Adapters catch library exceptions and re-raise one of these ``from`` the original,
so callers never have to know which library sat underneath.
"""

from __future__ import annotations


class PacsnodeError(Exception):
    """Root of every error pacsnode raises on purpose."""


class ConfigError(PacsnodeError):
    """A configuration file is missing, unreadable or invalid.

    ``problems`` holds one line per problem, each naming file, key path, the value
    found and what was expected.
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems

    def __str__(self) -> str:
        if not self.problems:
            return super().__str__()
        return "\n".join([super().__str__(), *("  " + p for p in self.problems)])


class IntakeError(PacsnodeError):
    """An instance could not be accepted into the spool."""


class InvalidInstanceError(IntakeError):
    """The received bytes are not a usable DICOM instance (the sender should not retry)."""


class StorageFullError(IntakeError):
    """No room left on the spool volume (the sender may retry later)."""


class StorageError(IntakeError):
    """Writing or indexing failed for another reason (the sender may retry)."""


class JobError(PacsnodeError):
    """A job cannot be found or cannot make the requested transition."""


class DeliveryError(PacsnodeError):
    """Sending to a destination failed; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class DatasetMismatchError(InvalidInstanceError):
    """The data set contradicts the request that carried it (PS3.4 B.2.3, status A900)."""


class ModelError(PacsnodeError):
    """A model cannot be loaded or run (missing files, bad bundle, out of memory)."""


class VolumeError(PacsnodeError):
    """A series cannot be read as one volume; the message starts "series <UID>: "."""


class ResultError(PacsnodeError):
    """A prediction cannot be written as DICOM SEG/SR (bad labels, sources or references)."""


class SourceError(PacsnodeError):
    """A pull source (DICOMweb or DIMSE) cannot be queried or read: network, refused
    association, HTTP or DIMSE failure status, bad reply."""


class ExecutorError(PacsnodeError):
    """The inference executor lost a job's run (a Ray actor or node died, a run timed
    out); ``retryable`` says whether running the job again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
