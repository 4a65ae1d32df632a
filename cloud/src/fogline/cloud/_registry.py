"""The model registry: SQLite metadata over a content-addressed artifact store.

Versions are allocated inside ``BEGIN IMMEDIATE`` transactions, so two processes
registering the same model name at once get distinct, monotonic versions. Artifacts are
stored (atomically, by hash) before their metadata row is committed, so a committed row
never points at a missing file.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fogline.protocol import (
    ArtifactError,
    RegistryError,
    TensorSpec,
    UnknownModelError,
    validate_id,
)

from ._store import ArtifactStore

__all__ = ["DesiredRecord", "ModelRecord", "Registry", "VariantRecord", "parse_model_ref"]

log = logging.getLogger("fogline.cloud.registry")

Status = Literal["registered", "published"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    published_at REAL,
    inputs TEXT NOT NULL,
    outputs TEXT NOT NULL,
    labels TEXT,
    example_input BLOB,
    lineage TEXT NOT NULL,
    card TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS variants (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    quantization TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (name, version, quantization)
);
CREATE TABLE IF NOT EXISTS assignments (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    device_class TEXT NOT NULL,
    quantization TEXT NOT NULL,
    PRIMARY KEY (name, version, device_class)
);
CREATE TABLE IF NOT EXISTS desired (
    scope TEXT NOT NULL,
    target TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    models TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (scope, target)
);
"""


@dataclass(frozen=True)
class VariantRecord:
    quantization: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelRecord:
    """One registered model version."""

    name: str
    version: int
    status: Status
    source: str
    created_at: float
    updated_at: float
    published_at: float | None
    variants: list[VariantRecord]
    assignments: dict[str, str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    labels: list[str] | None
    lineage: dict[str, Any]
    card: dict[str, Any]
    example_input: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def variant(self, quantization: str) -> VariantRecord:
        for v in self.variants:
            if v.quantization == quantization:
                return v
        raise UnknownModelError(f"{self.ref} has no variant {quantization!r}")

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly view (no example tensors)."""
        return {
            "name": self.name,
            "version": self.version,
            "status": self.status,
            "source": self.source,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "published_at": self.published_at,
            "variants": [v.__dict__ for v in self.variants],
            "assignments": dict(self.assignments),
            "inputs": [s.model_dump() for s in self.inputs],
            "outputs": [s.model_dump() for s in self.outputs],
            "labels": self.labels,
            "lineage": self.lineage,
            "card": self.card,
        }


@dataclass(frozen=True)
class DesiredRecord:
    """A scope's desired state as last published: model -> version, and which of those
    versions are signed rollbacks (agents install an older version only for those)."""

    scope: Literal["fleet", "group", "device"]
    target: str | None
    sequence: int
    models: dict[str, int]
    rollbacks: frozenset[str] = frozenset()


def _dump_desired_models(models: Mapping[str, int], rollbacks: frozenset[str]) -> str:
    return json.dumps(
        {
            name: {"version": v, "allow_rollback": True} if name in rollbacks else v
            for name, v in models.items()
        },
        sort_keys=True,
    )


def _load_desired_models(text: str) -> tuple[dict[str, int], frozenset[str]]:
    """Reads both forms: a bare version (every registry before rollbacks), or a version
    with ``allow_rollback``."""
    models: dict[str, int] = {}
    rollbacks: set[str] = set()
    for name, entry in json.loads(text).items():
        if isinstance(entry, dict):
            models[name] = int(entry["version"])
            if entry.get("allow_rollback"):
                rollbacks.add(name)
        else:
            models[name] = int(entry)
    return models, frozenset(rollbacks)


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:VERSION`` → (name, version or None)."""
    name, sep, version = ref.partition(":")
    validate_id(name, "model name")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise UnknownModelError(f"model version in {ref!r} must be a positive integer")
    return name, int(version)


def _dump_arrays(arrays: Mapping[str, np.ndarray] | None) -> bytes | None:
    if arrays is None:
        return None
    buf = io.BytesIO()
    savez: Any = np.savez  # its stub mistypes **kwds arrays
    savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _load_arrays(blob: bytes | None) -> dict[str, np.ndarray] | None:
    if blob is None:
        return None
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class Registry:
    """Models, versions, variants and lineage under one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create data dir {self.data_dir}: {exc.strerror}") from None
        self.db_path = self.data_dir / "registry.sqlite3"
        self.store = ArtifactStore(self.data_dir / "artifacts")
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry {self.db_path}: {exc}") from None
        try:
            db.row_factory = sqlite3.Row
            yield db
        except sqlite3.Error as exc:
            raise RegistryError(f"registry {self.db_path}: {exc}") from None
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no upgrade deadlocks)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- writing ------------------------------------------------------------------------
    def register(
        self,
        name: str,
        *,
        artifacts: Mapping[str, Path],
        assignments: Mapping[str, str],
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        source: str,
        lineage: Mapping[str, Any],
        card: Mapping[str, Any],
        labels: Sequence[str] | None = None,
        example_input: Mapping[str, np.ndarray] | None = None,
    ) -> ModelRecord:
        """Store the variant files (quantization → path) and register a new version."""
        validate_id(name, "model name")
        for device_class, quantization in assignments.items():
            validate_id(device_class, "device class")
            if quantization not in artifacts:
                raise RegistryError(
                    f"device class {device_class} assigned unknown variant {quantization!r}"
                )
        variants = []
        for quantization, path in artifacts.items():
            validate_id(quantization, "quantization")
            sha = self.store.put_file(path)
            variants.append(VariantRecord(quantization, sha, self.store.size(sha)))
        now = time.time()
        try:
            card_json = json.dumps(dict(card), sort_keys=True, allow_nan=False)
            lineage_json = json.dumps(dict(lineage), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"model card or lineage is not JSON: {exc}") from None
        with self._write() as db:
            (version,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM models WHERE name = ?", (name,)
            ).fetchone()
            db.execute(
                "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    version,
                    "registered",
                    source,
                    now,
                    now,
                    None,
                    json.dumps([s.model_dump() for s in inputs]),
                    json.dumps([s.model_dump() for s in outputs]),
                    None if labels is None else json.dumps(list(labels)),
                    _dump_arrays(example_input),
                    lineage_json,
                    card_json,
                ),
            )
            db.executemany(
                "INSERT INTO variants VALUES (?,?,?,?,?)",
                [(name, version, v.quantization, v.sha256, v.size) for v in variants],
            )
            db.executemany(
                "INSERT INTO assignments VALUES (?,?,?,?)",
                [(name, version, c, q) for c, q in assignments.items()],
            )
        log.info("registered %s:%d (%d variants)", name, version, len(variants))
        return self.get(name, version)

    def mark_published(self, name: str, version: int) -> ModelRecord:
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "UPDATE models SET status='published', published_at=?, updated_at=? "
                "WHERE name=? AND version=?",
                (now, now, name, version),
            )
            if cur.rowcount == 0:
                raise UnknownModelError(f"no model {name}:{version}")
        return self.get(name, version)

    def update_desired(
        self,
        scope: Literal["fleet", "group", "device"],
        target: str | None,
        model: str,
        version: int,
        *,
        allow_rollback: bool = False,
    ) -> DesiredRecord:
        """Set ``model`` to ``version`` in a scope's desired state and bump its sequence;
        ``allow_rollback`` marks it a signed rollback (other models keep their marks).

        The sequence is at least the current time in milliseconds, so it stays monotonic
        for agents even if this registry is ever recreated."""
        key = target or ""
        with self._write() as db:
            row = db.execute(
                "SELECT sequence, models FROM desired WHERE scope=? AND target=?", (scope, key)
            ).fetchone()
            previous = 0 if row is None else int(row["sequence"])
            models, rollbacks = (
                ({}, frozenset()) if row is None else _load_desired_models(row["models"])
            )
            models[model] = version
            rollbacks = rollbacks | {model} if allow_rollback else rollbacks - {model}
            sequence = max(previous + 1, int(time.time() * 1000))
            db.execute(
                "INSERT OR REPLACE INTO desired VALUES (?,?,?,?,?)",
                (scope, key, sequence, _dump_desired_models(models, rollbacks), time.time()),
            )
        return DesiredRecord(scope, target, sequence, models, rollbacks)

    # -- reading ------------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> ModelRecord:
        """One version (the latest if ``version`` is None); :class:`UnknownModelError`."""
        validate_id(name, "model name")
        with self._connect() as db:
            if version is None:
                row = db.execute(
                    "SELECT * FROM models WHERE name=? ORDER BY version DESC LIMIT 1", (name,)
                ).fetchone()
            else:
                row = db.execute(
                    "SELECT * FROM models WHERE name=? AND version=?", (name, version)
                ).fetchone()
            if row is None:
                what = name if version is None else f"{name}:{version}"
                raise UnknownModelError(f"no model {what} in the registry at {self.data_dir}")
            return self._record(db, row)

    def resolve(self, ref: str) -> ModelRecord:
        name, version = parse_model_ref(ref)
        return self.get(name, version)

    def list_models(self, name: str | None = None) -> list[ModelRecord]:
        with self._connect() as db:
            if name is None:
                rows = db.execute("SELECT * FROM models ORDER BY name, version").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM models WHERE name=? ORDER BY version", (validate_id(name),)
                ).fetchall()
            return [self._record(db, r) for r in rows]

    def desired(self, scope: str, target: str | None = None) -> DesiredRecord | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM desired WHERE scope=? AND target=?", (scope, target or "")
            ).fetchone()
        if row is None:
            return None
        models, rollbacks = _load_desired_models(row["models"])
        return DesiredRecord(row["scope"], target, int(row["sequence"]), models, rollbacks)

    def desired_records(self) -> list[DesiredRecord]:
        """Every scope's desired state, fleet first, then groups and devices by name."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM desired ORDER BY scope != 'fleet', scope, target"
            ).fetchall()
        out = []
        for row in rows:
            models, rollbacks = _load_desired_models(row["models"])
            target = row["target"] or None
            out.append(DesiredRecord(row["scope"], target, int(row["sequence"]), models, rollbacks))
        return out

    def artifact_path(self, record: ModelRecord, quantization: str) -> Path:
        variant = record.variant(quantization)
        try:
            return self.store.path(variant.sha256)
        except ArtifactError:
            raise RegistryError(
                f"{record.ref} variant {quantization} is missing from the store"
            ) from None

    def _record(self, db: sqlite3.Connection, row: sqlite3.Row) -> ModelRecord:
        key = (row["name"], row["version"])
        variants = [
            VariantRecord(r["quantization"], r["sha256"], int(r["size"]))
            for r in db.execute(
                "SELECT * FROM variants WHERE name=? AND version=? ORDER BY quantization", key
            )
        ]
        assignments = {
            r["device_class"]: r["quantization"]
            for r in db.execute(
                "SELECT * FROM assignments WHERE name=? AND version=? ORDER BY device_class", key
            )
        }
        return ModelRecord(
            name=row["name"],
            version=int(row["version"]),
            status=row["status"],
            source=row["source"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            published_at=row["published_at"],
            variants=variants,
            assignments=assignments,
            inputs=[TensorSpec.model_validate(s) for s in json.loads(row["inputs"])],
            outputs=[TensorSpec.model_validate(s) for s in json.loads(row["outputs"])],
            labels=None if row["labels"] is None else json.loads(row["labels"]),
            lineage=json.loads(row["lineage"]),
            card=json.loads(row["card"]),
            example_input=_load_arrays(row["example_input"]),
        )
