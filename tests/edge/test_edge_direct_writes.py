"""Large chunks are written with O_DIRECT from reused aligned buffers (no new
page-cache pages per download); the file holds exactly the bytes, in any order of
arrival, the last chunk's block padding cut off; a file system refusing direct I/O
gets buffered writes."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import fogline.edge._store as store_module
from fogline.edge import ModelStore

CHUNK = 512 * 1024
SIZE = 3 * CHUNK + 300_001  # the last chunk: direct too, not whole blocks


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_direct_writes_give_the_exact_file_in_any_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct_opens = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            direct_opens.append(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(store_module.os, "open", spy)
    data = os.urandom(SIZE)
    sha = hashlib.sha256(data).hexdigest()
    part = ModelStore(tmp_path).partial(sha, SIZE, CHUNK)
    for index in (3, 1, 0, 2):  # the padded last chunk first: the file grows past it
        part.write(index, _chunks(data)[index], sync=False)
    part.close()
    if not store_module._direct_ok:
        pytest.skip("this file system refuses O_DIRECT (buffered writes were used)")
    assert len(direct_opens) == 4
    assert part.path.stat().st_size == SIZE
    assert part.path.read_bytes() == data
    assert part.file_sha256() == sha


def test_a_refused_direct_open_falls_back_to_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    o_direct = getattr(os, "O_DIRECT", 0)

    def refuse(path: Any, flags: int, *args: Any) -> int:
        if o_direct and flags & o_direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(store_module.os, "open", refuse)
    monkeypatch.setattr(store_module, "_direct_ok", bool(o_direct))
    data = os.urandom(SIZE)
    part = ModelStore(tmp_path).partial("d" * 64, SIZE, CHUNK)
    for index, chunk in enumerate(_chunks(data)):
        part.write(index, chunk, sync=False)
    part.close()
    assert part.path.read_bytes() == data
    assert store_module._direct_ok is False  # asked once, then buffered


def test_unaligned_chunks_are_written_buffered(tmp_path: Path) -> None:
    chunk = CHUNK + 100  # offsets off the block grid: never direct
    data = os.urandom(2 * chunk + 5)
    part = ModelStore(tmp_path).partial("e" * 64, len(data), chunk)
    for index in (2, 0, 1):
        part.write(index, data[index * chunk : (index + 1) * chunk], sync=False)
    part.close()
    assert part.path.read_bytes() == data


def test_writers_share_a_bounded_set_of_buffers() -> None:
    buffers = store_module._AlignedBuffers(2)
    first, second = buffers.take(CHUNK), buffers.take(CHUNK)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(buffers.take(CHUNK)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # both in use: the third writer waits
    buffers.give(first)
    waiter.join(5)
    assert got == [first]  # ... and then reuses one, no third buffer
    buffers.give(second)
    big = buffers.take(4 * CHUNK)  # larger than any free one: one is replaced
    assert len(big) >= 4 * CHUNK
