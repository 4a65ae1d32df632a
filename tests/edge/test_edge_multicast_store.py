"""Grouped chunk syncs: a chunk is recorded only after a flush synced it, so a crash
before the flush only means fetching it again."""

from __future__ import annotations

import os
from pathlib import Path

from fogline.edge import ModelStore

CHUNK = 1024


def test_chunks_are_recorded_only_when_flushed(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    data = os.urandom(3 * CHUNK)
    part = store.partial("a" * 64, len(data), CHUNK)
    part.write(0, data[:CHUNK], sync=False)
    part.write(1, data[CHUNK : 2 * CHUNK], sync=False)
    assert part.missing == [2] and part.unsynced_bytes == 2 * CHUNK
    # "Crash" now: a fresh view of the same download must not trust the unsynced chunks.
    assert store.partial("a" * 64, len(data), CHUNK).missing == [0, 1, 2]
    part.flush()
    assert part.unsynced_bytes == 0
    assert store.partial("a" * 64, len(data), CHUNK).missing == [2]
    part.write(2, data[2 * CHUNK :], sync=False)
    part.close()  # closing flushes
    assert store.partial("a" * 64, len(data), CHUNK).missing == []
    assert part.path.read_bytes() == data


def test_discard_drops_unsynced_chunks(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    part = store.partial("b" * 64, 2 * CHUNK, CHUNK)
    part.write(0, b"x" * CHUNK, sync=False)
    part.discard()
    part.close()  # nothing left to flush, nothing recreated
    assert not part.path.exists() and not part.record.exists()


def test_placing_a_synced_download_moves_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    data = os.urandom(CHUNK)
    part = store.partial("c" * 64, len(data), CHUNK)
    part.write(0, data)
    part.close()
    placed = store.place("m", 1, "c" * 64, part.path, move=True, synced=True)
    assert placed.read_bytes() == data and not part.path.exists()
