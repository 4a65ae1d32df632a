"""ed25519 signing of releases and desired state, with pinned public keys.

The cloud holds a :class:`SigningKey`; agents pin its :class:`PublicKey` (as text,
``ed25519:<base64>``) in a :class:`TrustStore`. Signatures cover
:func:`~fogline.protocol.canonical_bytes` of the inner message.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ._codec import canonical_bytes
from ._errors import ConfigError, SignatureError
from ._messages import DesiredState, ReleaseManifest, SignedDesiredState, SignedRelease

# Signing, key generation and PEM files (the cloud) use ``cryptography``. Verification
# (every agent) prefers PyNaCl: libsodium's ed25519 costs ~2 MB resident where
# ``cryptography``'s Rust extension with its bundled OpenSSL costs ~9 MB, which matters
# on a device. Either loads at the first signature checked, not at import: an agent
# that only serves installed models needs neither. ``cryptography`` is the fallback
# where PyNaCl is not installed.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "PublicKey",
    "SigningKey",
    "TrustStore",
    "sign_desired",
    "sign_release",
    "verify_desired",
    "verify_release",
]

_TEXT_PREFIX = "ed25519:"


class PublicKey:
    """An ed25519 public key. ``key_id`` is the first 16 hex digits of its sha256."""

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise SignatureError("an ed25519 public key is 32 bytes")
        # Any 32 bytes make an ed25519 public key object (both backends check only the
        # length), so the backend's object can wait for the first verification.
        self._check: _SignatureCheck | None = None
        self.raw = raw
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        """Parse ``ed25519:<base64>``, the form ``fogline keys show`` prints."""
        text = text.strip()
        if not text.startswith(_TEXT_PREFIX):
            raise SignatureError(f"public key must start with {_TEXT_PREFIX!r}")
        try:
            raw = base64.b64decode(text[len(_TEXT_PREFIX) :], validate=True)
        except ValueError:
            raise SignatureError("public key is not valid base64") from None
        return cls(raw)

    def to_text(self) -> str:
        return _TEXT_PREFIX + base64.b64encode(self.raw).decode()

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise :class:`SignatureError` unless ``signature`` signs ``data``."""
        if self._check is None:
            self._check = _verify_backend()[1](self.raw)
        if not self._check(signature, data):
            raise SignatureError(f"signature does not verify with key {self.key_id}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.key_id})"


# -- verification backends -------------------------------------------------------------

# A backend turns a raw 32-byte public key into a check of (signature, data). A check
# answers False for anything that is not a valid signature of ``data`` by that key
# (forged, corrupt, wrong length, not bytes) and never raises for bad input.
_SignatureCheck = Callable[[bytes, bytes], bool]
_KeyLoader = Callable[[bytes], _SignatureCheck]


def _pynacl_loader() -> _KeyLoader:
    from nacl.exceptions import BadSignatureError, CryptoError
    from nacl.signing import VerifyKey

    def load(raw: bytes) -> _SignatureCheck:
        key = VerifyKey(raw)

        def check(signature: bytes, data: bytes) -> bool:
            try:
                key.verify(data, signature)
            except (BadSignatureError, CryptoError, ValueError, TypeError):
                # PyNaCl's ValueError and TypeError (wrong length, not bytes) are
                # subclasses of CryptoError and of the builtins.
                return False
            return True

        return check

    return load


def _cryptography_loader() -> _KeyLoader:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    def load(raw: bytes) -> _SignatureCheck:
        try:
            key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise SignatureError(f"not an ed25519 public key: {exc}") from None

        def check(signature: bytes, data: bytes) -> bool:
            try:
                key.verify(signature, data)
            except (InvalidSignature, TypeError):
                return False
            return True

        return check

    return load


# In order of preference; tests run every signature check against each.
_VERIFY_BACKENDS: dict[str, Callable[[], _KeyLoader]] = {
    "pynacl": _pynacl_loader,
    "cryptography": _cryptography_loader,
}
_chosen: tuple[str, _KeyLoader] | None = None


def _verify_backend() -> tuple[str, _KeyLoader]:
    """The first verification backend that imports, as (name, key loader); chosen once
    per process, at the first signature checked."""
    global _chosen
    if _chosen is None:
        for name, make in _VERIFY_BACKENDS.items():
            try:
                _chosen = (name, make())
                break
            except ImportError:
                continue
        else:
            raise SignatureError(
                "no ed25519 backend: install PyNaCl (or cryptography) to check signatures"
            )
    return _chosen


class SigningKey:
    """An ed25519 private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        from cryptography.hazmat.primitives import serialization

        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = PublicKey(raw)
        self.key_id = self.public_key.key_id

    @classmethod
    def generate(cls) -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            pem = Path(path).read_bytes()
            key = serialization.load_pem_private_key(pem, password=None)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"cannot load signing key {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"signing key {path} is not an ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """Load the key at ``path``, creating it (mode 0600) on first use."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        return key

    def save(self, path: Path) -> None:
        """Write the key as PKCS#8 PEM, readable by the owner only."""
        from cryptography.hazmat.primitives import serialization

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.chmod(0o600)  # O_CREAT's mode does not apply to a leftover tmp file
        tmp.replace(path)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class TrustStore:
    """The public keys an agent pins, by key id."""

    def __init__(self, keys: Iterable[PublicKey] = ()) -> None:
        self._keys = {k.key_id: k for k in keys}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> TrustStore:
        return cls(PublicKey.from_text(t) for t in texts)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[PublicKey]:
        return list(self._keys.values())

    def replace(self, keys: Iterable[PublicKey]) -> None:
        """Trust exactly ``keys`` from now on (a key rotation). One reference swap, so
        a verification running on another thread sees the old set or the new one."""
        self._keys = {k.key_id: k for k in keys}

    def verify(self, key_id: str, signature: bytes, data: bytes) -> None:
        key = self._keys.get(key_id)
        if key is None:
            raise SignatureError(f"key {key_id} is not pinned by this agent")
        key.verify(signature, data)


def sign_release(manifest: ReleaseManifest, key: SigningKey) -> SignedRelease:
    manifest = manifest.model_copy(update={"key_id": key.key_id})
    return SignedRelease(manifest=manifest, signature=key.sign(canonical_bytes(manifest)))


def verify_release(signed: SignedRelease, trust: TrustStore) -> ReleaseManifest:
    trust.verify(signed.manifest.key_id, signed.signature, canonical_bytes(signed.manifest))
    return signed.manifest


def sign_desired(desired: DesiredState, key: SigningKey) -> SignedDesiredState:
    desired = desired.model_copy(update={"key_id": key.key_id})
    return SignedDesiredState(desired=desired, signature=key.sign(canonical_bytes(desired)))


def verify_desired(signed: SignedDesiredState, trust: TrustStore) -> DesiredState:
    trust.verify(signed.desired.key_id, signed.signature, canonical_bytes(signed.desired))
    return signed.desired
