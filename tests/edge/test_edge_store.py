"""The model store: partial downloads resume from their record, closing is idempotent
(many agents share one process), installs keep the current and the last good model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fogline.edge import InstalledModel, ModelStore
from fogline.protocol import ArtifactError


def test_partial_download_resumes_and_close_is_idempotent(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    part = store.partial("a" * 64, size=10, chunk_size=4)
    assert part.count == 3 and part.missing == [0, 1, 2]
    part.write(0, b"abcd")
    part.write(2, b"ij")
    with pytest.raises(ArtifactError, match="expected 4"):
        part.write(1, b"xx")
    part.close()
    # Another file takes the lowest free descriptor number; a second close must not
    # touch it (the bug a fleet of agents in one process would hit).
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    try:
        part.close()
        os.fstat(other)  # still open
    finally:
        os.close(other)
    with pytest.raises(ArtifactError, match="closed"):
        part.write(1, b"efgh")
    again = store.partial("a" * 64, size=10, chunk_size=4)
    assert again.missing == [1]
    again.write(1, b"efgh")
    assert again.path.read_bytes() == b"abcdefghij"
    again.close()
    # A different chunking of the same artifact starts over.
    other_chunking = store.partial("a" * 64, size=10, chunk_size=5)
    assert other_chunking.missing == [0, 1]
    other_chunking.discard()
    other_chunking.discard()
    assert not other_chunking.path.exists()


def test_the_record_carries_the_sizes_and_an_older_record_starts_over(tmp_path: Path) -> None:
    """The record's first line holds the sizes (no ``.meta`` file per download); an
    older version's download (sizes in ``<sha>.meta``, no such line) starts over."""
    store = ModelStore(tmp_path)
    part = store.partial("b" * 64, size=10, chunk_size=4)
    part.write(0, b"abcd")
    part.close()
    assert part.record.read_text().split("\n")[:2] == ["size 10 chunk_size 4", "0"]
    assert sorted(p.name for p in store.downloads_dir.iterdir()) == [
        "b" * 64 + ".chunks",
        "b" * 64 + ".part",
    ]
    assert store.partial("b" * 64, size=10, chunk_size=4).missing == [1, 2]
    legacy_meta = store.downloads_dir / ("c" * 64 + ".meta")
    legacy_meta.write_text('{"size": 10, "chunk_size": 4}')
    (store.downloads_dir / ("c" * 64 + ".chunks")).write_text("0\n1\n")
    (store.downloads_dir / ("c" * 64 + ".part")).write_bytes(b"abcdefgh")
    old = store.partial("c" * 64, size=10, chunk_size=4)
    assert old.missing == [0, 1, 2]
    assert not legacy_meta.exists() and not old.path.exists() and not old.record.exists()
    torn = store.downloads_dir / ("d" * 64 + ".chunks")
    torn.write_text("size 10 chunk_")  # a crash while writing the first line
    assert store.partial("d" * 64, size=10, chunk_size=4).missing == [0, 1, 2]


def test_a_last_chunk_cuts_off_what_lies_beyond_the_artifact(tmp_path: Path) -> None:
    """A run that stopped between a padded direct write and cutting the padding off
    leaves a longer file; writing the last chunk again (also buffered) cuts it."""
    store = ModelStore(tmp_path)
    part = store.partial("e" * 64, size=10, chunk_size=4)
    part.path.write_bytes(b"\0" * 4096)
    for index, chunk in enumerate([b"abcd", b"efgh", b"ij"]):
        part.write(index, chunk)
    part.close()
    assert part.path.read_bytes() == b"abcdefghij"


def test_commit_keeps_current_and_last_good(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for version in (1, 2, 3):
        src = tmp_path / f"in{version}"
        src.write_bytes(b"model %d" % version)
        sha = f"{version}" * 64
        path = store.place("digits", version, sha, src, move=True)
        store.commit(InstalledModel(model="digits", version=version, sha256=sha, file=path.name))
    current, previous = store.current("digits"), store.previous("digits")
    assert current is not None and current.version == 3
    assert previous is not None and previous.version == 2
    files = sorted(p.name for p in (tmp_path / "models" / "digits").glob("*.onnx"))
    assert [f.split("-")[0] for f in files] == ["2", "3"]
    assert store.local_file("digits", "2" * 64) is not None
    assert store.local_file("digits", "1" * 64) is None
    # A corrupt state file reads as "not installed", never as a crash.
    (tmp_path / "models" / "digits" / "state.json").write_text("{not json")
    assert store.current("digits") is None
