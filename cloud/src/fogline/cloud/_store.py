"""A content-addressed artifact store on disk, keyed by sha256.

Files live at ``<root>/<sha[:2]>/<sha>``. Writes go to a temporary file in the same
directory, are fsynced and renamed into place, so a reader (or a concurrent writer of
the same content) never sees a partial artifact.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from fogline.protocol import ArtifactError

__all__ = ["ArtifactStore"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20


def _check(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ArtifactError(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
    return sha256


class ArtifactStore:
    """Immutable blobs by sha256. Safe for several processes at once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return _SHA256.fullmatch(sha256 or "") is not None and self._path(sha256).is_file()

    def path(self, sha256: str) -> Path:
        """The file of an artifact; :class:`ArtifactError` if it is not here."""
        path = self._path(_check(sha256))
        if not path.is_file():
            raise ArtifactError(f"artifact {sha256} is not in the store")
        return path

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256):
            self._write(sha256, [data])
        return sha256

    def put_file(self, source: Path) -> str:
        """Copy ``source`` into the store and return its sha256."""
        digest = hashlib.sha256()
        try:
            with Path(source).open("rb") as fh:
                while block := fh.read(_BLOCK):
                    digest.update(block)
            sha256 = digest.hexdigest()
            if not self.has(sha256):
                with Path(source).open("rb") as fh:
                    self._write(sha256, iter(lambda: fh.read(_BLOCK), b""))
        except OSError as exc:
            raise ArtifactError(f"cannot store {source}: {exc.strerror or exc}") from None
        return sha256

    def _write(self, sha256: str, blocks: Iterable[bytes]) -> None:
        directory = self._path(sha256).parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as fh:
                for block in blocks:
                    digest.update(block)
                    fh.write(block)
                fh.flush()
                os.fsync(fh.fileno())
            if digest.hexdigest() != sha256:
                raise ArtifactError(f"artifact {sha256} changed while it was being stored")
            Path(tmp).chmod(0o444)
            # Same content under the same name: a concurrent writer's rename is harmless.
            Path(tmp).replace(self._path(sha256))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, sha256: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` of an artifact (short at the end)."""
        path = self.path(sha256)
        size = path.stat().st_size
        if offset < 0 or offset >= size:
            raise ArtifactError(f"offset {offset} is outside artifact {sha256} of {size} bytes")
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(size - offset if length is None else length)

    def verify(self, sha256: str) -> bool:
        """Whether the stored bytes still hash to their name."""
        digest = hashlib.sha256()
        with self.path(sha256).open("rb") as fh:
            while block := fh.read(_BLOCK):
                digest.update(block)
        return digest.hexdigest() == sha256

    def __iter__(self) -> Iterator[str]:
        for path in sorted(self.root.glob("??/*")):
            if _SHA256.fullmatch(path.name):
                yield path.name
