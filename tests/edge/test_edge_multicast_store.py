"""Grouped chunk syncs: a chunk is recorded only after a flush synced it, so a crash
before the flush only means fetching it again. The whole-file hash is fed as chunks are
written and reads back only what an earlier run wrote."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fogline.edge import ModelStore
from fogline.protocol import ArtifactError

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


def test_the_whole_file_hash_covers_written_and_earlier_chunks(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    data = os.urandom(4 * CHUNK + 7)
    sha = hashlib.sha256(data).hexdigest()
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    # An earlier run left chunks 1 and 3 on disk.
    earlier = store.partial(sha, len(data), CHUNK)
    earlier.write(1, chunks[1])
    earlier.write(3, chunks[3])
    earlier.close()
    part = store.partial(sha, len(data), CHUNK)
    for index in (4, 2, 0):  # out of order: written ahead of the hash, held for it
        part.write(index, chunks[index], sync=False)
    part.close()
    assert part.file_sha256() == sha
    # A chunk from the earlier run that went bad on disk is caught: it is read back.
    bad = bytearray(part.path.read_bytes())
    bad[CHUNK] ^= 0xFF
    part.path.write_bytes(bytes(bad))
    again = store.partial(sha, len(data), CHUNK)
    assert again.missing == []
    assert again.file_sha256() != sha


def test_an_incomplete_download_has_no_whole_file_hash(tmp_path: Path) -> None:
    part = ModelStore(tmp_path).partial("d" * 64, 2 * CHUNK, CHUNK)
    part.write(0, b"x" * CHUNK)
    with pytest.raises(ArtifactError, match="incomplete"):
        part.file_sha256()


def test_a_failed_whole_file_hash_finds_the_chunks_that_break_their_claims(
    tmp_path: Path,
) -> None:
    """Chunks written with the sha256 they came with are hashed once (into the whole
    file); only when the whole fails are they checked one by one, and only the bad ones
    are dropped, also across a restart (the claims are in the record)."""
    store = ModelStore(tmp_path)
    data = os.urandom(3 * CHUNK + 5)
    sha = hashlib.sha256(data).hexdigest()
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    claims = [hashlib.sha256(c).hexdigest() for c in chunks]
    part = store.partial(sha, len(data), CHUNK)
    for index, chunk in enumerate(chunks):
        sent = bytes([chunk[0] ^ 0xFF]) + chunk[1:] if index == 2 else chunk
        part.write(index, sent, sync=False, claimed_sha256=claims[index])
    part.flush()
    assert part.file_sha256() != sha
    # A restart keeps the claims: the bad chunk is found from the record too.
    again = store.partial(sha, len(data), CHUNK)
    assert again.claims == dict(enumerate(claims))
    assert again.bad_chunks() == [2]
    assert part.bad_chunks() == [2]
    assert part.missing == [2] and store.partial(sha, len(data), CHUNK).missing == [2]
    part.write(2, chunks[2], sync=False, claimed_sha256=claims[2])
    part.close()
    assert part.file_sha256() == sha and part.path.read_bytes() == data
    # Right claims over wrong bytes blame no chunk: only the whole-file check can tell.
    liar = store.partial("e" * 64, len(data), CHUNK)
    for index, chunk in enumerate(chunks):
        liar.write(index, chunk, claimed_sha256=claims[index])
    assert liar.file_sha256() != "e" * 64 and liar.bad_chunks() == []
