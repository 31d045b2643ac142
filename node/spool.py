"""The spool: received instances on disk, written durably.

A file becomes visible under its final name only after its bytes are fsync'd; the
rename is then made durable by fsync'ing the directory (write, fsync, rename, fsync),
and a series' first file also fsyncs the parents of the folders made for it.
Half-written files live only in ``.tmp/`` and are removed at start.

With ``direct_io`` (the default) the bytes go from a reused, aligned buffer straight to
the disk (``O_DIRECT``) instead of through the page cache, which each instance would
fill with fresh pages only for the fsync to write them out at once. On a filesystem that
refuses ``O_DIRECT`` (tmpfs before Linux 6.6, some network filesystems) the spool falls
back to ordinary writes and says so once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import logging
import mmap
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.digest import digest_of, sha256_of_file
from node.errors import StorageError, StorageFullError

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
TMP_DIR = ".tmp"
SPARE_SUFFIX = ".spare"   # an empty temporary file kept ready (removed at start and stop)
MAX_SPARES = 8            # at most this many kept ready (one per association storing)
# O_DIRECT: offsets, lengths and memory in multiples of this (the largest logical block
# size in use; 512-byte devices take it too). The buffer gathers pieces into such blocks.
DIRECT_ALIGN = 4096
DIRECT_BUFFER = 1 << 20   # bytes gathered before a write; one buffer per file being written
MAX_BUFFERS = 16          # buffers kept for reuse (the default max_associations)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def worker_statuses(spool: Path) -> Iterator[dict[str, Any]]:
    """What each worker process announced in ``<spool>/.worker-status*.json`` (its pid,
    models loaded, run counts; written by node/inference/service.py write_status).
    Files that vanish or are half-written are skipped."""
    for path in spool.glob(".worker-status*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            yield data


def write_status_file(path: Path, data: dict[str, Any]) -> None:
    """Replace a process's JSON status file (workers, listener children) atomically: a
    reader never sees half of one. The temporary name is per process and does not end
    in .json, so the readers' globs never pick it up."""
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(data))
    os.replace(temp, path)


def safe_component(uid: str) -> str:
    """A UID as a file name; anything that is not a plain UID is hashed (never a path)."""
    if _UID_RE.match(uid) and len(uid) <= 64:
        return uid
    return "x-" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


def relative_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return "/".join(
        (safe_component(study_uid), safe_component(series_uid), safe_component(sop_uid) + ".dcm")
    )


@dataclass(frozen=True)
class StagedFile:
    temp_path: Path
    size: int
    digest: str     # node/digest.py's form; empty where the caller computes it itself


class StageWriter:
    """A temporary file in the spool's ``.tmp/``, written in pieces, then fsync'd
    (:meth:`finish`) or removed (:meth:`discard`). A failed write removes it too and
    raises StorageFullError/StorageError.

    Given a ``buffer`` (the file was opened with ``O_DIRECT``), pieces are gathered there
    and written in whole aligned blocks; the last, partial block is written through the
    page cache once ``O_DIRECT`` is turned off for the file (:meth:`finish`).
    """

    def __init__(self, path: Path, fd: int, *, fsync: bool, buffer: mmap.mmap | None = None,
                 spool: Spool | None = None) -> None:
        self.path = path
        self.size = 0
        self._fd: int | None = fd
        self._fsync = fsync
        self._buffer = buffer
        self._held = 0          # bytes in the buffer not written yet
        self._spool = spool     # gets the buffer back, and hears when O_DIRECT fails

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._fd is None:
            raise StorageError("writing to the spool: the file is already closed")
        view = memoryview(data).cast("B")
        self.size += len(view)
        try:
            if self._buffer is None:
                self._write_all(view)
            else:
                self._gather(view)
        except OSError as exc:
            self.discard()
            raise _storage_error(exc, "writing to the spool") from exc

    def finish(self, digest: str) -> StagedFile:
        """fsync and close: the bytes are on disk under the temporary name."""
        if self._fd is None:
            raise StorageError("writing to the spool: the file is already closed")
        try:
            if self._buffer is not None:
                self._write_held(final=True)
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self.discard()
            raise _storage_error(exc, "writing to the spool") from exc
        self._close()
        return StagedFile(self.path, self.size, digest)

    def discard(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._give_back_buffer()

    def _write_all(self, view: memoryview) -> None:
        assert self._fd is not None
        while view:
            view = view[os.write(self._fd, view):]

    def _gather(self, view: memoryview) -> None:
        """Copy into the buffer; each time it is full, write its whole blocks."""
        buffer = self._buffer
        while buffer is not None:
            room = len(buffer) - self._held
            if len(view) < room:
                buffer[self._held:self._held + len(view)] = view
                self._held += len(view)
                return
            buffer[self._held:] = view[:room]
            view = view[room:]
            self._held = len(buffer)
            self._write_held(final=False)
            buffer = self._buffer
        self._write_all(view)           # O_DIRECT was given up on the way

    def _write_held(self, *, final: bool) -> None:
        """Write the buffer's whole blocks with O_DIRECT and keep the partial last one
        for later, or (``final``) write it through the page cache."""
        assert self._fd is not None and self._buffer is not None
        blocks = self._held - self._held % DIRECT_ALIGN
        done, refused = 0, False
        with memoryview(self._buffer) as view:
            while done < blocks:
                try:
                    written = os.write(self._fd, view[done:blocks])
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    written = 0         # the filesystem took O_DIRECT at open, not here
                done += written
                if not written or done % DIRECT_ALIGN:
                    # refused, or a short write that leaves the offset unaligned
                    refused = not written
                    break
            rest = bytes(view[done:self._held])
        if done < blocks or final:
            self._leave_direct(rest, refused=refused)
        else:
            self._buffer[:len(rest)] = rest
            self._held = len(rest)

    def _leave_direct(self, rest: bytes, *, refused: bool) -> None:
        """Turn O_DIRECT off for this file, write ``rest`` through the page cache and
        give the buffer back; ``refused``: tell the spool to stop using O_DIRECT."""
        assert self._fd is not None
        self._give_back_buffer()
        if refused and self._spool is not None:
            self._spool.direct_io_refused()
        _clear_direct(self._fd)
        self._write_all(memoryview(rest))

    def _give_back_buffer(self) -> None:
        buffer, self._buffer, self._held = self._buffer, None, 0
        if buffer is not None:
            if self._spool is not None:
                self._spool.give_back_buffer(buffer)
            else:
                buffer.close()


class Spool:
    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0,
                 staging: str | None = None, direct_io: bool = True) -> None:
        """``staging``: a private folder under ``.tmp/`` for a receiver that shares the
        spool with others (each cleans only its own half-written files at start).
        ``direct_io``: write with ``O_DIRECT`` where the filesystem takes it."""
        self.root = root
        self.fsync = fsync
        self.direct_io = direct_io and bool(_O_DIRECT)
        self.min_free_bytes = min_free_bytes
        self._tmp = root / TMP_DIR / staging if staging else root / TMP_DIR
        # temporary names: random per spool object, then counted (uuid4 per file costs
        # ~60 us of every instance; next() on a count is atomic under the GIL)
        self._name_prefix = uuid.uuid4().hex[:16]
        self._name_counter = itertools.count()
        # Creating a file costs ~0.2 ms (a new inode): make_spare creates them ahead, at
        # a moment the caller has nothing else to do, so that open_stage takes one ready.
        self._spares: list[tuple[Path, int, bool]] = []     # (path, fd, opened O_DIRECT)
        self._buffers: list[mmap.mmap] = []     # aligned buffers for O_DIRECT, reused
        self._spare_lock = threading.Lock()
        self._closed = False

    def prepare(self) -> int:
        """Create the folders; remove half-written files a crash left behind. Returns how many."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self._tmp.iterdir():
            if leftover.is_dir():
                continue            # another receiver's staging folder (shared spool)
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.warning("removed %d half-written file(s) from %s", removed, self._tmp)
        return removed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def stage(self, data: bytes, *, before_fsync: Callable[[], None] | None = None,
              digest: bool = True) -> StagedFile:
        """Write ``data`` to a temporary file and fsync it. Raises StorageFullError/StorageError.

        ``before_fsync`` is called once the bytes are handed over and only their way to
        the disk is left (with direct I/O the write itself, then the fsync: both release
        the GIL).
        ``digest=False`` leaves the digest empty for a caller that hashes the bytes itself
        (beside the fsync, on another thread).
        """
        writer = self.open_stage(len(data))
        writer.write(data)
        if before_fsync is not None:
            before_fsync()
        return writer.finish(digest_of(data) if digest else "")

    def open_stage(self, expected_size: int = 0) -> StageWriter:
        """A temporary file to write piece by piece (:class:`StageWriter`), for data that
        arrives in pieces. Raises StorageFullError/StorageError."""
        if self.min_free_bytes and self.free_bytes() - expected_size < self.min_free_bytes:
            raise StorageFullError(
                f"spool free space below the configured minimum of {self.min_free_bytes} bytes"
            )
        with self._spare_lock:
            spare = self._spares.pop() if self._spares else None
        try:
            path, fd, direct = spare if spare is not None else self._create_temp()
        except OSError as exc:
            raise _storage_error(exc, "writing to the spool") from exc
        if direct and not self.direct_io:       # a spare made before O_DIRECT was refused
            _clear_direct(fd)
            direct = False
        return StageWriter(path, fd, fsync=self.fsync, spool=self,
                           buffer=self._take_buffer() if direct else None)

    def _take_buffer(self) -> mmap.mmap:
        with self._spare_lock:
            if self._buffers:
                return self._buffers.pop()
        return mmap.mmap(-1, DIRECT_BUFFER)     # (page-aligned, as O_DIRECT wants)

    def give_back_buffer(self, buffer: mmap.mmap) -> None:
        """A StageWriter is done with its O_DIRECT buffer: keep it for the next one."""
        with self._spare_lock:
            if not self._closed and self.direct_io and len(self._buffers) < MAX_BUFFERS:
                self._buffers.append(buffer)
                return
        buffer.close()

    def direct_io_refused(self, *, at_open: bool = False) -> None:
        """The filesystem refused O_DIRECT, at a write or (``at_open``) when a file was
        opened: write through the page cache from now on (said once)."""
        with self._spare_lock:
            if not self.direct_io:
                return
            self.direct_io = False
            buffers, self._buffers = self._buffers, []
        for buffer in buffers:
            buffer.close()
        log.warning("the spool's filesystem %s; writing through the page cache from now on",
                    "does not take O_DIRECT" if at_open else "refused a write with O_DIRECT")

    def make_spare(self) -> None:
        """Create an empty temporary file for a later :meth:`open_stage`, unless
        :data:`MAX_SPARES` are ready. The DICOM receiver calls it once a C-STORE response
        is out, while the sender gets its next instance ready: creating the file there
        takes it off the next instance's path without a thread of its own. Failing to
        create one is not an error (open_stage creates, and reports, its own)."""
        with self._spare_lock:
            if self._closed or len(self._spares) >= MAX_SPARES:
                return
        try:
            spare = self._create_temp(SPARE_SUFFIX)
        except OSError:
            return
        with self._spare_lock:
            if not self._closed and len(self._spares) < MAX_SPARES:
                self._spares.append(spare)
                return
        os.close(spare[1])
        spare[0].unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the spare temporary files and make no more."""
        with self._spare_lock:
            self._closed = True
            spares, self._spares = self._spares, []
            buffers, self._buffers = self._buffers, []
        for path, fd, _ in spares:
            os.close(fd)
            path.unlink(missing_ok=True)
        for buffer in buffers:
            buffer.close()

    def _create_temp(self, suffix: str = ".part") -> tuple[Path, int, bool]:
        """A new temporary file: its path, descriptor, and whether it has O_DIRECT."""
        temp = self._tmp / f"{self._name_prefix}-{next(self._name_counter)}{suffix}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if self.direct_io:
            try:
                return temp, os.open(temp, flags | _O_DIRECT, 0o640), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            temp.unlink(missing_ok=True)    # (some filesystems create it, then refuse)
            self.direct_io_refused(at_open=True)
        return temp, os.open(temp, flags, 0o640), False

    def commit(self, staged: StagedFile, rel_path: str) -> Path:
        """Move a staged file to its final name, durably. Replaces an existing file atomically."""
        final = self.root / rel_path
        try:
            created: list[Path] = []
            try:
                os.replace(staged.temp_path, final)
            except FileNotFoundError:       # the series' first file: no folder yet
                created = self._make_folders(final.parent)
                os.replace(staged.temp_path, final)
            if self.fsync:
                _fsync_dir(final.parent)
                for folder in created:      # a new folder's own name, in its parent
                    _fsync_dir(folder.parent)
        except OSError as exc:
            staged.temp_path.unlink(missing_ok=True)
            raise _storage_error(exc, "moving a file into the spool") from exc
        return final

    def _make_folders(self, folder: Path) -> list[Path]:
        """Create ``folder`` and the missing ones above it (up to the spool root); the
        ones that were missing, deepest first (one another association creates meanwhile
        counts too: its parent's fsync may not have happened yet)."""
        missing: list[Path] = []
        while folder != self.root and not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
        return missing

    def keep_previous(self, rel_path: str) -> Path | None:
        """Hard-link the file about to be replaced into .tmp/, so a failure can restore it."""
        keep = self._tmp / f"{self._name_prefix}-{next(self._name_counter)}.prev"
        try:
            os.link(self.root / rel_path, keep)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _storage_error(exc, "keeping the previous version of a file") from exc
        return keep

    def restore_previous(self, kept: Path, rel_path: str) -> None:
        os.replace(kept, self.root / rel_path)

    def discard(self, staged: StagedFile) -> None:
        staged.temp_path.unlink(missing_ok=True)

    def remove(self, rel_path: str) -> None:
        (self.root / rel_path).unlink(missing_ok=True)

    def sha256_of(self, rel_path: str) -> str | None:
        """SHA-256 of a committed file (index rows from before BLAKE3); None when gone."""
        return sha256_of_file(self.root / rel_path)

    def iter_files(self) -> Iterator[str]:
        """Relative paths of every committed file (for reconciliation with the index)."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d != TMP_DIR]
            base = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if name.endswith(".dcm"):
                    yield (base / name).as_posix()


def _clear_direct(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError, doing: str) -> StorageFullError | StorageError:
    if exc.errno in _NO_SPACE:
        return StorageFullError(f"no space left on the spool volume while {doing}")
    return StorageError(f"{doing} failed: {exc.strerror or exc}")
