"""The model store on disk, under the agent's data directory::

    models/<model>/state.json         {"current": {...}, "previous": {...}}
    models/<model>/<version>-<sha>.onnx
    downloads/<sha>.part              a partial artifact, written at chunk offsets
    downloads/<sha>.chunks            first line "size <bytes> chunk_size <bytes>", then
                                      chunks on disk, one per line: index and the sha256
                                      the chunk came with ("3 ab12..."; or "3": verified)

Every write that matters is atomic: temp file, fsync, rename, fsync of the directory.
A chunk index is appended only after its bytes are synced (``fdatasync``), so after a
crash the record never claims a chunk that is not on disk; a restart re-requests only
missing chunks. Chunks are written as they arrive and synced in groups (``flush``: one
``fdatasync`` for every chunk written since the last one, then their indices are
recorded), so a small artifact costs one sync, not one per chunk. A verified download
is therefore already on disk when it is installed: moving it into place needs only the
rename, and the ``fsync`` of the model directory that ``commit`` does for ``state.json``
makes that rename durable too (same directory), before the model becomes current.
The record itself is not synced: losing its tail only means fetching those chunks
again, and a torn last line (no newline) is ignored. A record without its first line
(lost, torn, another chunking, or an older version's, whose sizes were in a ``.meta``
file) starts the download over. The whole-file hash checked before install backs all
of this up. (The sizes are in the record, not a file of their own, since creating,
renaming and removing one more file per download was a good part of its metadata work.)

One hash pass per byte: a chunk that comes with its own sha256 (an artifact service's
``ArtifactChunk.chunk_sha256``) is written and recorded with that claim, and its bytes
go only into the whole-file hash. Only when the whole file then does not match its
sha256 are the chunks hashed one by one against their claims (:meth:`bad_chunks`), so
that just the bad ones are fetched again, as an immediate per-chunk check would have.
Nothing is installed before the whole-file hash matches.

Large chunks on the block grid are written with ``O_DIRECT`` (from a few reused aligned
buffers; see :func:`_pwrite_direct`), others, and file systems without direct I/O,
buffered; ``flush`` syncs both alike.

A partial download holds no file descriptor between writes: with a fleet of agents in
one process every descriptor counts (paho-mqtt's ``select()`` loop cannot use
descriptor numbers of 1024 and above).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fogline.protocol import ArtifactError, TensorSpec

__all__ = ["InstalledModel", "ModelStore", "PartialArtifact", "atomic_write"]

log = logging.getLogger("fogline.edge.store")

_HOLD_BYTES = 16 * 1024 * 1024  # chunks written ahead of the hash, kept for it
_DIRECT_MIN = 256 * 1024  # chunks from this size on are written with O_DIRECT
_DIRECT_ALIGN = 4096  # offset, length and memory alignment a direct write keeps to
_DIRECT_BUFFERS = 8  # aligned buffers at most (direct writes at once, per process)


class _AlignedBuffers:
    """Page-aligned scratch buffers for direct writes, made on demand and reused: a
    fresh megabyte costs a few hundred page faults per chunk. At most ``limit`` exist;
    a writer finding them all in use waits for one (the disk does not write faster
    for more writes at once). A device uses one; a process running many simulated
    agents shares these few between all of them (scratch memory only: each write
    copies its chunk in, writes it out and gives the buffer back)."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._limit = limit

    def take(self, size: int) -> mmap.mmap:
        with self._cond:
            while True:
                for i, buf in enumerate(self._free):
                    if len(buf) >= size:
                        return self._free.pop(i)
                if self._made < self._limit:
                    self._made += 1
                    break
                if self._free:  # all too small: replace one
                    self._free.pop().close()
                    self._made -= 1
                    continue
                self._cond.wait()
        try:
            return mmap.mmap(-1, -(-size // (64 * 1024)) * 64 * 1024)
        except BaseException:
            with self._cond:
                self._made -= 1
                self._cond.notify()
            raise

    def give(self, buf: mmap.mmap) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()


_BUFFERS = _AlignedBuffers(_DIRECT_BUFFERS)
_direct_ok = hasattr(os, "O_DIRECT")  # False once a file system refused it


def _pwrite_direct(path: Path, data: bytes, offset: int, end_of_file: int | None) -> bool:
    """Write ``data`` at ``offset`` with O_DIRECT, from an aligned copy padded to a
    whole block; with ``end_of_file`` (the chunk is the file's last) the padding is cut
    off again. False (nothing written) where the file system refuses direct I/O.

    Why: a buffered write of a megabyte allocates a few hundred new page-cache pages,
    which costs the writer ~2-3 ms of CPU here (0.04 ms to overwrite cached pages), and
    ``flush`` then syncs them anyway. A direct write goes from one reused buffer to the
    disk: the download does not fill the page cache of a small device either."""
    global _direct_ok
    padded = -(-len(data) // _DIRECT_ALIGN) * _DIRECT_ALIGN
    buf = _BUFFERS.take(padded)
    try:
        buf[: len(data)] = data
        if padded > len(data):  # beyond the end of the file, cut off below
            buf[len(data) : padded] = bytes(padded - len(data))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _direct_ok = False  # e.g. tmpfs: buffered from now on
            return False
        try:
            with memoryview(buf) as view:
                try:
                    written = os.pwrite(fd, view[:padded], offset)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    _direct_ok = False
                    return False
                while written < padded:  # short writes are rare; keep to whole blocks
                    written += os.pwrite(fd, view[written:padded], offset + written)
            if end_of_file is not None and padded > len(data):
                os.ftruncate(fd, end_of_file)
        finally:
            os.close(fd)
    finally:
        _BUFFERS.give(buf)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Small files go through os.open/os.read/os.write: Python's open() adds fstat, an isatty
# ioctl and lseek to every file, each a system call that lets the GIL go (with a fleet
# of agents in one process, each a hand-off to another thread and back).


def _read_file(path: Path) -> bytes:
    """The whole of a small file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = []
        while piece := os.read(fd, 1 << 16):
            pieces.append(piece)
    finally:
        os.close(fd)
    return b"".join(pieces)


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, whole.
    ``durable=False`` skips the fsyncs (informational files written often)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    if durable:
        _fsync_dir(path.parent)


@dataclass(frozen=True)
class InstalledModel:
    """One installed version, with the specs from its signed manifest."""

    model: str
    version: int
    sha256: str
    file: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def input_specs(self) -> list[TensorSpec] | None:
        return [TensorSpec.model_validate(s) for s in self.inputs] or None

    def output_specs(self) -> list[TensorSpec] | None:
        return [TensorSpec.model_validate(s) for s in self.outputs] or None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstalledModel:
        return cls(
            model=str(data["model"]),
            version=int(data["version"]),
            sha256=str(data["sha256"]),
            file=str(data["file"]),
            inputs=list(data.get("inputs", [])),
            outputs=list(data.get("outputs", [])),
        )


class PartialArtifact:
    """A download in progress: the ``.part`` file plus its record of verified chunks."""

    def __init__(self, directory: Path, sha256: str, size: int, chunk_size: int) -> None:
        self.sha256 = sha256
        self.size = size
        self.chunk_size = chunk_size
        self.count = (size + chunk_size - 1) // chunk_size
        self.path = directory / f"{sha256}.part"
        self.record = directory / f"{sha256}.chunks"
        self._legacy_meta = directory / f"{sha256}.meta"  # older versions' sizes
        self._header = f"size {size} chunk_size {chunk_size}\n"
        self._headed = False  # the record exists and starts with the header
        self.done: set[int] = set()
        self.claims: dict[int, str] = {}  # chunk index -> the sha256 it came with
        self._unsynced: list[int] = []  # written, not yet synced nor recorded
        self._closed = False
        # The whole-file hash, fed with chunks as they are written, in order; chunks
        # written ahead wait in memory (bounded), the rest is read back at the end.
        self._hash = hashlib.sha256()
        self._hashed = 0  # chunks [0, _hashed) are in the hash
        self._held: dict[int, bytes] = {}
        self._held_bytes = 0
        self._open()

    def _open(self) -> None:
        try:
            text = _read_file(self.record).decode(errors="replace")
        except FileNotFoundError:  # nothing recorded: every chunk is (over)written anew
            self._legacy_meta.unlink(missing_ok=True)
            return
        if not text.startswith(self._header):  # other sizes, torn, or an older version's
            for p in (self.path, self.record, self._legacy_meta):
                p.unlink(missing_ok=True)
            return
        self._headed = True
        # Only complete lines: a crash may leave a torn last one.
        for line in text[len(self._header) :].split("\n")[:-1]:
            index, _, claim = line.partition(" ")
            if index.isdigit() and int(index) < self.count:
                self.done.add(int(index))
                if claim:
                    self.claims[int(index)] = claim
                else:  # verified when written
                    self.claims.pop(int(index), None)

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.done]

    def span(self, index: int) -> tuple[int, int]:
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    @property
    def unsynced_bytes(self) -> int:
        return sum(self.span(i)[1] for i in self._unsynced)

    def write(
        self, index: int, data: bytes, *, sync: bool = True, claimed_sha256: str | None = None
    ) -> None:
        """Write a chunk; with ``sync`` also :meth:`flush`. A chunk written without it
        counts as done but is recorded only by the next flush. ``claimed_sha256``: the
        chunk's own hash as it came, not checked here (see :meth:`bad_chunks`); without
        it the chunk is taken as verified already."""
        offset, length = self.span(index)
        if len(data) != length:
            raise ArtifactError(f"chunk {index} is {len(data)} bytes; expected {length}")
        if self._closed:
            raise ArtifactError(f"partial artifact {self.sha256[:12]} is closed")
        last = offset + length == self.size
        if not (
            _direct_ok
            and length >= _DIRECT_MIN
            and offset % _DIRECT_ALIGN == 0
            and (last or length % _DIRECT_ALIGN == 0)  # padding must not touch the next
            and _pwrite_direct(self.path, data, offset, self.size if last else None)
        ):
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, offset)
                # An earlier run may have stopped between a padded direct write of the
                # last chunk and cutting the padding off.
                if last and os.fstat(fd).st_size > self.size:
                    os.ftruncate(fd, self.size)
            finally:
                os.close(fd)
        self.done.add(index)
        if claimed_sha256 is None:
            self.claims.pop(index, None)
        else:
            self.claims[index] = claimed_sha256
        self._unsynced.append(index)
        self._feed(index, data)
        if sync:
            self.flush()

    def _feed(self, index: int, data: bytes) -> None:
        if index == self._hashed:
            self._hash.update(data)
            self._hashed += 1
            while (held := self._held.pop(self._hashed, None)) is not None:
                self._held_bytes -= len(held)
                self._hash.update(held)
                self._hashed += 1
        elif index > self._hashed and self._held_bytes + len(data) <= _HOLD_BYTES:
            self._held[index] = data
            self._held_bytes += len(data)

    def file_sha256(self) -> str:
        """The sha256 of the whole file, every chunk present. Chunks written through this
        object are hashed from the bytes written (the ``.part`` file holds exactly those:
        reading them back from the page cache proves nothing more, and costs a second
        pass of reads); chunks from an earlier run, or written too far ahead of the
        hash, are read from the file."""
        if self.missing:
            raise ArtifactError(f"partial artifact {self.sha256[:12]} is incomplete")
        if self._hashed == self.count:
            return self._hash.hexdigest()
        with open(self.path, "rb") as fh:
            while self._hashed < self.count:
                data = self._held.pop(self._hashed, None)
                if data is None:
                    offset, length = self.span(self._hashed)
                    fh.seek(offset)
                    data = fh.read(length)
                self._hash.update(data)
                self._hashed += 1
        self._held.clear()
        self._held_bytes = 0
        return self._hash.hexdigest()

    def bad_chunks(self) -> list[int]:
        """After the whole file failed its hash: the chunks whose bytes do not match the
        sha256 they came with, read back and hashed one by one. They are forgotten (to be
        fetched again) and the whole-file hash starts over. Empty when every claim holds:
        then the source sent wrong bytes under right claims, and only the caller's
        whole-file check can tell."""
        bad = []
        with open(self.path, "rb") as fh:
            for index, claim in sorted(self.claims.items()):
                offset, length = self.span(index)
                fh.seek(offset)
                if hashlib.sha256(fh.read(length)).hexdigest() != claim:
                    bad.append(index)
        if not bad:
            return []
        self.flush()
        for index in bad:
            self.done.discard(index)
            del self.claims[index]
        lines = "".join(
            f"{i} {self.claims[i]}\n" if i in self.claims else f"{i}\n" for i in sorted(self.done)
        )
        atomic_write(self.record, (self._header + lines).encode(), durable=False)
        self._headed = True
        self._hash = hashlib.sha256()
        self._hashed = 0
        self._held.clear()
        self._held_bytes = 0
        return bad

    def flush(self) -> None:
        """Sync every chunk written since the last flush, then record them."""
        if not self._unsynced or self._closed:
            return
        # fdatasync through a fresh descriptor covers writes made through earlier ones.
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        lines = "".join(
            f"{i} {self.claims[i]}\n" if i in self.claims else f"{i}\n" for i in self._unsynced
        )
        if not self._headed:  # the first record of this download: the sizes go first
            lines = self._header + lines
        fd = os.open(self.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            _write_all(fd, lines.encode())
        finally:
            os.close(fd)
        self._headed = True
        self._unsynced.clear()

    def close(self) -> None:
        """Flush, then close; idempotent; later writes raise :class:`ArtifactError`. No
        descriptor is held between writes, so a second close can never touch another
        agent's file."""
        if not self._closed:
            self.flush()
        self._closed = True

    def discard(self) -> None:
        """Forget every chunk (e.g. after a whole-file hash mismatch)."""
        self._closed = True
        self._unsynced.clear()
        self._held.clear()
        self._held_bytes = 0
        for p in (self.path, self.record):
            p.unlink(missing_ok=True)
        self._headed = False
        self.done.clear()
        self.claims.clear()


class ModelStore:
    """Installed models (current + last good) and partial downloads on disk."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.models_dir = self.root / "models"
        self.downloads_dir = self.root / "downloads"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # -- reading --------------------------------------------------------------------------
    def _state_path(self, model: str) -> Path:
        return self.models_dir / model / "state.json"

    def state(self, model: str) -> dict[str, InstalledModel]:
        path = self._state_path(model)
        try:
            raw = json.loads(_read_file(path))
            return {k: InstalledModel.from_json(v) for k, v in raw.items() if v}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "model state %s is unreadable (%s); treating %s as not installed", path, exc, model
            )
            return {}

    def current(self, model: str) -> InstalledModel | None:
        return self.state(model).get("current")

    def previous(self, model: str) -> InstalledModel | None:
        return self.state(model).get("previous")

    def installed_models(self) -> list[str]:
        return sorted(p.parent.name for p in self.models_dir.glob("*/state.json"))

    def path_of(self, record: InstalledModel) -> Path:
        return self.models_dir / record.model / record.file

    def local_file(self, model: str, sha256: str) -> Path | None:
        """An installed file with this hash (e.g. the last good model), if any."""
        for rec in self.state(model).values():
            if rec.sha256 == sha256 and self.path_of(rec).exists():
                return self.path_of(rec)
        return None

    # -- downloads ---------------------------------------------------------------------------
    def partial(self, sha256: str, size: int, chunk_size: int) -> PartialArtifact:
        return PartialArtifact(self.downloads_dir, sha256, size, chunk_size)

    # -- installing ----------------------------------------------------------------------------
    def place(
        self,
        model: str,
        version: int,
        sha256: str,
        source: Path,
        *,
        move: bool,
        synced: bool = False,
    ) -> Path:
        """Put a verified artifact under ``models/<model>/`` atomically; not yet current.

        ``synced``: ``source`` is a flushed :class:`PartialArtifact` (its data already
        synced), and the caller will :meth:`commit` it, whose directory fsync also makes
        this rename durable; then no sync is needed here."""
        directory = self.models_dir / model
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{version}-{sha256[:16]}.onnx"
        if target.exists():
            return target
        if move:
            if not synced:
                with open(source, "rb+") as fh:
                    os.fsync(fh.fileno())
            source.replace(target)
        else:
            atomic_write(target, source.read_bytes())
        if not synced:
            _fsync_dir(directory)
        return target

    def commit(self, record: InstalledModel) -> None:
        """Make ``record`` current; the old current becomes the last good (previous)."""
        with self._lock:
            state = self.state(record.model)
            old = state.get("current")
            new_state: dict[str, Any] = {"current": asdict(record)}
            if old is not None and old.sha256 != record.sha256:
                new_state["previous"] = asdict(old)
            elif "previous" in state:
                new_state["previous"] = asdict(state["previous"])
            atomic_write(self._state_path(record.model), json.dumps(new_state, indent=1).encode())
            keep = {r["file"] for r in new_state.values()}
            for path in (self.models_dir / record.model).glob("*.onnx"):
                if path.name not in keep:
                    path.unlink(missing_ok=True)

    def forget_file(self, path: Path) -> None:
        """Remove a placed file that never became current (failed self-test)."""
        with self._lock:
            names = {r.file for r in self.state(path.parent.name).values()}
            if path.name not in names:
                path.unlink(missing_ok=True)
