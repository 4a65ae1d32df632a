"""ed25519 keys and signatures over canonical bytes. Each attack asserts the typed
error, and that verification never hands back a tampered body."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from fogline.protocol import (
    ConfigError,
    DesiredModel,
    DesiredState,
    Message,
    ProtocolError,
    PublicKey,
    ReleaseManifest,
    SignatureError,
    SignedDesiredState,
    SignedRelease,
    SigningKey,
    TrustStore,
    _signing,
    canonical_bytes,
    decode,
    encode,
    sign_desired,
    sign_release,
    verify_desired,
    verify_release,
)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(params=sorted(_signing._VERIFY_BACKENDS))
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every signature check runs with each verification backend (PyNaCl on agents,
    cryptography where PyNaCl is missing)."""
    name: str = request.param
    monkeypatch.setattr(_signing, "_chosen", (name, _signing._VERIFY_BACKENDS[name]()))
    yield name


@pytest.fixture
def trust(key: SigningKey, backend: str) -> TrustStore:
    # A fresh PublicKey: a key builds its backend object at its first check.
    return TrustStore([PublicKey(key.public_key.raw)])


@pytest.fixture
def manifest(samples: dict[str, Message]) -> ReleaseManifest:
    message = samples["release_manifest"]
    assert isinstance(message, ReleaseManifest)
    return message


@pytest.fixture
def desired(samples: dict[str, Message]) -> DesiredState:
    message = samples["desired_state"]
    assert isinstance(message, DesiredState)
    return message


# -- keys ------------------------------------------------------------------------------


def test_generate_save_load(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "keys" / "cloud.pem"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = SigningKey.load(path)
    assert loaded.key_id == key.key_id
    assert loaded.public_key == key.public_key
    # The same key signs the same way (ed25519 is deterministic).
    assert loaded.sign(b"data") == key.sign(b"data")
    assert not list(path.parent.glob("*.tmp"))


def test_save_tightens_the_mode_of_a_leftover_tmp_file(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "cloud.pem"
    leftover = tmp_path / "cloud.pem.tmp"
    leftover.write_text("junk")
    leftover.chmod(0o644)
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey.load(path).key_id == key.key_id


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "cloud.pem"
    created = SigningKey.load_or_create(path)
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SigningKey.load_or_create(path)
    assert again.key_id == created.key_id
    assert SigningKey.generate().key_id != created.key_id


def test_key_id_is_derived_from_the_public_key(key: SigningKey) -> None:
    assert len(key.key_id) == 16
    assert key.key_id == PublicKey(key.public_key.raw).key_id
    int(key.key_id, 16)


def test_public_key_text_round_trip(key: SigningKey) -> None:
    text = key.public_key.to_text()
    assert text.startswith("ed25519:")
    assert PublicKey.from_text(text) == key.public_key
    assert PublicKey.from_text(f"  {text}\n") == key.public_key
    assert hash(PublicKey.from_text(text)) == hash(key.public_key)
    store = TrustStore.from_texts([text])
    assert key.key_id in store and len(store) == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ed25519:",
        "rsa:AAAA",
        "AAAA",
        "ed25519:not base64!",
        "ed25519:AAAA",  # 3 bytes
        "ed25519:" + "A" * 44 + "AAAA",  # 36 bytes
        "ed25519:\u00e9\u00e9\u00e9\u00e9",
    ],
)
def test_bad_public_key_text(text: str) -> None:
    with pytest.raises(SignatureError):
        PublicKey.from_text(text)


@pytest.mark.parametrize("raw", [b"", b"\x00" * 31, b"\x00" * 33, "x" * 32])
def test_bad_raw_public_key(raw: Any) -> None:
    with pytest.raises(SignatureError):
        PublicKey(raw)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"\x00\xff" * 100,
    ],
)
def test_corrupt_key_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cloud.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"cloud\.pem"):
        SigningKey.load(path)
    with pytest.raises(ConfigError):
        SigningKey.load_or_create(path)  # never silently replaced


def test_truncated_key_file_is_a_config_error(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "cloud.pem"
    key.save(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConfigError):
        SigningKey.load(path)


def test_non_ed25519_key_file_is_a_config_error(tmp_path: Path) -> None:
    pem = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "ec.pem"
    path.write_bytes(pem)
    with pytest.raises(ConfigError, match="ed25519"):
        SigningKey.load(path)


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SigningKey.load(tmp_path / "absent.pem")
    with pytest.raises(ConfigError):
        SigningKey.load(tmp_path)  # a directory


# -- releases --------------------------------------------------------------------------


def test_sign_and_verify_release(
    key: SigningKey, trust: TrustStore, manifest: ReleaseManifest
) -> None:
    signed = sign_release(manifest.model_copy(update={"key_id": "placeholder"}), key)
    assert signed.manifest.key_id == key.key_id  # signing stamps the key id
    assert verify_release(signed, trust) == signed.manifest
    # ... and it survives the wire.
    over_the_wire = decode(encode(signed), SignedRelease)
    assert verify_release(over_the_wire, trust) == signed.manifest


@pytest.mark.parametrize(
    "change",
    [
        {"version": 4},
        {"expires_at": 9_999_999_999.0},
        {"created_at": 0.0},
        {"model": "other"},
        {"labels": None},
        {"metadata": {"trainer": "evil"}},
    ],
)
def test_tampered_release_body_is_rejected(
    key: SigningKey, trust: TrustStore, manifest: ReleaseManifest, change: dict[str, Any]
) -> None:
    signed = sign_release(manifest, key)
    forged = SignedRelease(
        manifest=signed.manifest.model_copy(update=change), signature=signed.signature
    )
    with pytest.raises(SignatureError):
        verify_release(forged, trust)


def test_tampered_variant_hash_is_rejected(
    key: SigningKey, trust: TrustStore, manifest: ReleaseManifest
) -> None:
    signed = sign_release(manifest, key)
    variant = signed.manifest.variants[0].model_copy(update={"sha256": "00" * 32})
    forged = SignedRelease(
        manifest=signed.manifest.model_copy(update={"variants": [variant]}),
        signature=signed.signature,
    )
    with pytest.raises(SignatureError):
        verify_release(forged, trust)


@pytest.mark.parametrize("position", [0, 31, 63])
def test_tampered_signature_is_rejected(
    key: SigningKey, trust: TrustStore, manifest: ReleaseManifest, position: int
) -> None:
    signed = sign_release(manifest, key)
    sig = bytearray(signed.signature)
    sig[position] ^= 0x01
    forged = SignedRelease(manifest=signed.manifest, signature=bytes(sig))
    with pytest.raises(SignatureError):
        verify_release(forged, trust)


def test_wrong_key_is_rejected(trust: TrustStore, manifest: ReleaseManifest) -> None:
    intruder = SigningKey.generate()
    signed = sign_release(manifest, intruder)
    with pytest.raises(SignatureError, match="not pinned"):
        verify_release(signed, trust)


def test_wrong_key_claiming_the_pinned_key_id(
    key: SigningKey, trust: TrustStore, manifest: ReleaseManifest
) -> None:
    intruder = SigningKey.generate()
    forged_manifest = manifest.model_copy(update={"key_id": key.key_id})
    forged = SignedRelease(
        manifest=forged_manifest, signature=intruder.sign(canonical_bytes(forged_manifest))
    )
    with pytest.raises(SignatureError, match=key.key_id):
        verify_release(forged, trust)


def test_unknown_key_id_and_empty_trust_store(key: SigningKey, manifest: ReleaseManifest) -> None:
    signed = sign_release(manifest, key)
    with pytest.raises(SignatureError):
        verify_release(signed, TrustStore())
    with pytest.raises(SignatureError):
        TrustStore([key.public_key]).verify("0123456789abcdef", signed.signature, b"x")


def test_a_release_signature_does_not_verify_a_desired_state(
    key: SigningKey, trust: TrustStore, desired: DesiredState
) -> None:
    # The message type is part of the signed bytes (domain separation).
    signed = sign_desired(desired, key)
    data = canonical_bytes(signed.desired)
    assert data.startswith(b"fogline-sig-v1\x00desired_state\x00")
    trust.verify(key.key_id, signed.signature, data)
    with pytest.raises(SignatureError):
        other_domain = data.replace(b"desired_state", b"release_man", 1)
        trust.verify(key.key_id, signed.signature, other_domain)


# -- desired state ---------------------------------------------------------------------


def test_sign_and_verify_desired(key: SigningKey, trust: TrustStore, desired: DesiredState) -> None:
    signed = sign_desired(desired, key)
    assert signed.desired.key_id == key.key_id
    assert verify_desired(signed, trust) == signed.desired
    assert verify_desired(decode(encode(signed), SignedDesiredState), trust) == signed.desired


@pytest.mark.parametrize(
    "change",
    [
        {"sequence": 8},
        {"scope": "fleet"},
        {"target": "everyone"},
        {"expires_at": None},
        {"models": {"digits": DesiredModel(version=1, allow_rollback=True)}},
    ],
)
def test_tampered_desired_state_is_rejected(
    key: SigningKey, trust: TrustStore, desired: DesiredState, change: dict[str, Any]
) -> None:
    signed = sign_desired(desired, key)
    forged = SignedDesiredState(
        desired=signed.desired.model_copy(update=change), signature=signed.signature
    )
    with pytest.raises(SignatureError):
        verify_desired(forged, trust)


def test_desired_state_signed_by_another_key(trust: TrustStore, desired: DesiredState) -> None:
    with pytest.raises(SignatureError):
        verify_desired(sign_desired(desired, SigningKey.generate()), trust)


# -- canonical bytes -------------------------------------------------------------------


def test_canonical_bytes_ignore_dict_insertion_order(desired: DesiredState) -> None:
    models = {f"m{i}": DesiredModel(version=i + 1) for i in range(10)}
    forward = desired.model_copy(update={"models": models})
    backward = desired.model_copy(update={"models": dict(reversed(list(models.items())))})
    assert list(forward.models) != list(backward.models)
    assert canonical_bytes(forward) == canonical_bytes(backward)


def test_canonical_bytes_ignore_field_order_on_the_wire(
    key: SigningKey, trust: TrustStore, manifest: ReleaseManifest
) -> None:
    # A producer in another language may send the body's keys in any order.
    signed = sign_release(manifest, key)
    body = signed.model_dump(mode="python")
    body["manifest"] = dict(reversed(list(body["manifest"].items())))
    body["manifest"]["metadata"] = dict(reversed(list(body["manifest"]["metadata"].items())))
    reordered = SignedRelease.model_validate(body)
    assert verify_release(reordered, trust) == signed.manifest


def test_canonical_bytes_are_stable_and_distinguish_values(desired: DesiredState) -> None:
    assert canonical_bytes(desired) == canonical_bytes(desired.model_copy())
    assert canonical_bytes(desired) != canonical_bytes(desired.model_copy(update={"sequence": 8}))


def test_canonical_bytes_of_an_unencodable_message() -> None:
    bogus = DesiredState.model_construct(
        scope="fleet", sequence=1 << 70, issued_at=1.0, key_id="k", models={}
    )
    with pytest.raises(ProtocolError):
        canonical_bytes(bogus)


# -- verification backends -------------------------------------------------------------


@pytest.mark.parametrize(
    "signature",
    [b"", b"\x00" * 63, b"\x00" * 64, b"\x00" * 65, "not bytes", None],
)
def test_malformed_signatures_are_signature_errors(
    key: SigningKey, trust: TrustStore, signature: Any
) -> None:
    with pytest.raises(SignatureError, match=key.key_id):
        trust.verify(key.key_id, signature, b"data")


def test_signature_over_other_data_is_rejected(key: SigningKey, trust: TrustStore) -> None:
    signature = key.sign(b"data")
    trust.verify(key.key_id, signature, b"data")
    for other in (b"", b"dat", b"data\x00", b"Data"):
        with pytest.raises(SignatureError):
            trust.verify(key.key_id, signature, other)


@pytest.mark.parametrize("raw", [b"\x00" * 32, b"\x01" + b"\x00" * 31, b"\xff" * 32])
def test_degenerate_public_keys_verify_nothing(backend: str, raw: bytes) -> None:
    # Any 32 bytes parse as a key (even a non-point or a small-order point); no
    # signature from a real key, and no all-zero signature, verifies under them.
    public = PublicKey(raw)
    for signature in (SigningKey.generate().sign(b"data"), b"\x00" * 64):
        with pytest.raises(SignatureError):
            public.verify(signature, b"data")


def test_backends_are_chosen_in_order_of_preference(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Any:
        raise ImportError("not installed")

    monkeypatch.setattr(_signing, "_chosen", None)
    assert _signing._verify_backend()[0] == "pynacl"
    monkeypatch.setattr(_signing, "_chosen", None)
    monkeypatch.setitem(_signing._VERIFY_BACKENDS, "pynacl", missing)
    assert _signing._verify_backend()[0] == "cryptography"
    monkeypatch.setattr(_signing, "_chosen", None)
    monkeypatch.setitem(_signing._VERIFY_BACKENDS, "cryptography", missing)
    with pytest.raises(SignatureError, match="PyNaCl"):
        PublicKey(b"\x00" * 32).verify(b"\x00" * 64, b"data")


_VERIFY_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
if sys.argv[3] == "without-pynacl":
    sys.modules["nacl"] = None  # import nacl raises ImportError
from fogline.protocol import SignedRelease, SignatureError, TrustStore, decode, verify_release
from fogline.protocol import _signing
signed = decode(Path(sys.argv[1]).read_bytes(), SignedRelease)
trust = TrustStore.from_texts([sys.argv[2]])
verify_release(signed, trust)
forged = SignedRelease(manifest=signed.manifest.model_copy(update={"version": 99}),
                       signature=signed.signature)
try:
    verify_release(forged, trust)
    raise SystemExit("forged release verified")
except SignatureError:
    pass
print(_signing._verify_backend()[0], "cryptography" in sys.modules)
"""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("with-pynacl", "pynacl False"), ("without-pynacl", "cryptography True")],
)
def test_an_agent_process_checks_signatures_without_loading_cryptography(
    tmp_path: Path, key: SigningKey, manifest: ReleaseManifest, mode: str, expected: str
) -> None:
    # cryptography (its Rust extension and a bundled OpenSSL, ~9 MB resident) stays out
    # of a process that only verifies, unless PyNaCl is missing.
    path = tmp_path / "release.msgpack"
    path.write_bytes(encode(sign_release(manifest, key)))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _VERIFY_IN_A_FRESH_PROCESS,
            str(path),
            key.public_key.to_text(),
            mode,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split("\n")[-2] == expected
