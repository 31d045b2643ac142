"""The spool's O_DIRECT writing: exact bytes for any piece sizes, and the fall-backs to
ordinary writes when a filesystem refuses O_DIRECT (at open, or only at the write)."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import threading
from pathlib import Path

import pytest

from node import spool as spool_module
from node.errors import StorageFullError
from node.spool import DIRECT_ALIGN, DIRECT_BUFFER, Spool
from tests.support import half_written, tmpfs_mount


def _takes_o_direct(folder: Path) -> bool:
    """Probe the filesystem ourselves (not through the spool)."""
    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


def _write(spool: Spool, data: bytes, pieces: list[int]) -> tuple[Path, int, bool]:
    """Write ``data`` cut into pieces of the given sizes (cycled); the committed path,
    the staged size, and whether the file was opened with O_DIRECT."""
    writer = spool.open_stage()
    direct = bool(fcntl.fcntl(writer._fd, fcntl.F_GETFL) & os.O_DIRECT)   # type: ignore[arg-type]
    at = count = 0
    while at < len(data):
        size = pieces[count % len(pieces)]
        writer.write(memoryview(data)[at:at + size])
        at, count = at + size, count + 1
    staged = writer.finish("")
    final = spool.commit(staged, f"s/{random.randrange(1 << 30)}.dcm")
    return final, staged.size, direct


SIZES = [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, 524_288 + 1_234,
         DIRECT_BUFFER - 1, DIRECT_BUFFER, DIRECT_BUFFER + 5_000, 3 * DIRECT_BUFFER + 123]


@pytest.mark.parametrize("pieces", [[16_384], [7, 4_093, 300_000], [DIRECT_BUFFER + 17]])
def test_direct_writes_keep_every_byte_for_any_sizes_and_pieces(
        tmp_path: Path, pieces: list[int]) -> None:
    if not _takes_o_direct(tmp_path):
        pytest.skip("this filesystem does not take O_DIRECT")
    spool = Spool(tmp_path)
    spool.prepare()
    rng = random.Random(7)
    for size in SIZES:
        data = rng.randbytes(size)
        final, staged_size, direct = _write(spool, data, pieces)
        assert direct, "the file was not opened with O_DIRECT"
        assert staged_size == size and final.read_bytes() == data, size
    assert spool.direct_io                          # never refused on the way
    assert len(spool._buffers) == 1                 # one buffer, reused file after file
    spool.close()
    assert spool._buffers == []


def test_writers_at_the_same_time_each_get_a_buffer_of_their_own(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    results: dict[int, list[tuple[bytes, Path]]] = {}

    def write_three(number: int) -> None:
        rng = random.Random(number)
        results[number] = []
        for _ in range(3):
            data = rng.randbytes(DIRECT_BUFFER + rng.randrange(DIRECT_BUFFER))
            final, _, _ = _write(spool, data, [rng.randrange(1, 200_000)])
            results[number].append((data, final))

    threads = [threading.Thread(target=write_three, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(6))
    assert all(final.read_bytes() == data for done in results.values() for data, final in done)
    assert 1 <= len(spool._buffers) <= 6            # at most one per writer at a time
    spool.close()


def test_direct_io_off_writes_through_the_page_cache(tmp_path: Path) -> None:
    spool = Spool(tmp_path, direct_io=False)
    spool.prepare()
    data = random.Random(1).randbytes(DIRECT_BUFFER + 99)
    final, _, direct = _write(spool, data, [5_000])
    assert not direct and final.read_bytes() == data


def test_a_filesystem_that_refuses_o_direct_at_open_gets_ordinary_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real_open = os.open

    def refusing_open(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)    # type: ignore[arg-type]

    monkeypatch.setattr(spool_module.os, "open", refusing_open)
    spool = Spool(tmp_path)
    spool.prepare()
    data = random.Random(2).randbytes(300_001)
    with caplog.at_level(logging.WARNING, logger="node.spool"):
        final, size, direct = _write(spool, data, [65_536])
        again, _, direct_again = _write(spool, data[:10], [3])
    assert (direct, direct_again, spool.direct_io) == (False, False, False)
    assert final.read_bytes() == data and size == len(data) and again.read_bytes() == data[:10]
    assert sum("does not take O_DIRECT" in r.getMessage() for r in caplog.records) == 1


def test_a_write_refused_with_o_direct_is_written_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    if not _takes_o_direct(tmp_path):
        pytest.skip("this filesystem does not take O_DIRECT")
    real_write = os.write

    def refusing_write(fd: int, data: object) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)             # type: ignore[arg-type]

    monkeypatch.setattr(spool_module.os, "write", refusing_write)
    spool = Spool(tmp_path)
    spool.prepare()
    spool.make_spare()                              # opened with O_DIRECT, used after
    data = random.Random(3).randbytes(2 * DIRECT_BUFFER + 4_321)
    with caplog.at_level(logging.WARNING, logger="node.spool"):
        final, size, direct = _write(spool, data, [100_000])     # refused midway
        later, _, later_direct = _write(spool, data, [100_000])  # the spare, then new
    assert direct and not later_direct and not spool.direct_io
    assert final.read_bytes() == data and size == len(data) and later.read_bytes() == data
    assert sum("refused a write with O_DIRECT" in r.getMessage() for r in caplog.records) == 1


def test_a_full_disk_with_o_direct_is_storage_full_and_leaves_nothing(tmp_path: Path) -> None:
    with tmpfs_mount(tmp_path / "small", "2m") as mount:
        spool = Spool(mount)
        spool.prepare()
        data = random.Random(4).randbytes(3 * DIRECT_BUFFER + 77)
        writer = spool.open_stage()
        with pytest.raises(StorageFullError):
            for at in range(0, len(data), 200_000):
                writer.write(data[at:at + 200_000])
            writer.finish("")
        assert half_written(mount / ".tmp") == []
        small = data[:DIRECT_BUFFER // 2 + 3]       # space is back: the next one fits
        final, _, _ = _write(spool, small, [50_000])
        assert final.read_bytes() == small
