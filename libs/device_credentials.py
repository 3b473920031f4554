"""Phone credentials: device certificates, signed QR codes, and their offline verification.

A phone pays with a key pair it made itself. The wallet certifies the phone's Ed25519 public
key: an issuer key signs a serialized `DeviceCertificateBody` (device id, account, public
key, validity window). The phone then shows short-lived QR codes: it signs a serialized
`PhoneQrClaim` (device id, a random nonce, when it was made) and puts the claim, its
signature and the certificate in a `PhoneQrPayload`. All messages are in
proto/citytap/common/v1/credential.proto.

A gate verifies a code with nothing but the trusted issuer public keys (from the wallet's
ListIssuerKeys, or a gate bundle) and its clock: `verify_qr_payload`. Each failure raises a
`libs.errors` exception with its own reason:

    INVALID_ARGUMENT     the bytes are not a well-formed payload (metadata "field")
    UNKNOWN_ISSUER       the certificate names an issuer key nobody trusts (now)
    INVALID_SIGNATURE    a signature does not verify (metadata "signed": certificate | claim)
    INVALID_KEY          the certified device key is not a raw 32-byte Ed25519 key
    CREDENTIAL_EXPIRED   the certificate or the code is outside its validity window,
                         including a code dated in the future beyond the allowed skew
                         (metadata "problem": certificate_expired | certificate_not_yet_valid |
                         code_expired | code_from_the_future)
    DEVICE_MISMATCH      the claim names another device than the certificate
    CREDENTIAL_REVOKED   `check_not_revoked`: the device key is on a revocation list

Offline verification cannot know about revocation or replays: the online caller checks the
key's fingerprint against the wallet's revocation set (`check_not_revoked`) and accepts each
nonce once (fare-gate's credentials.py).

Pure: no I/O and no clock; callers pass `now`. The only dependency is `cryptography`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Container, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from citytap.common.v1 import credential_pb2
from libs import errors

PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 16  # what phones put in a claim
NONCE_BYTES_MIN = 16
NONCE_BYTES_MAX = 64
DEVICE_ID_CHARS_MAX = 64
# The longest a code stays valid, and the clock skew allowed by default between phone and gate.
QR_VALIDITY_S_MAX = 30
CLOCK_SKEW_S_DEFAULT = 5
# Anything longer is not a payload we made: refused before parsing. A real payload is about
# 340 bytes (see QR_PAYLOAD_BYTES_BOUND and phone_app/README.md).
QR_PAYLOAD_BYTES_MAX = 1024
# The size a payload we make stays under; tests hold us to it so the QR stays easy to read.
QR_PAYLOAD_BYTES_BOUND = 360

_FIELD = "credential.phone_qr"


def utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    return moment.astimezone(timezone.utc)


# --- keys -------------------------------------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    """A new Ed25519 key pair, as a phone or an issuer makes one."""
    return Ed25519PrivateKey.generate()


def key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    """The private key whose 32-byte seed is `seed` (how keys are kept in settings and files)."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise errors.InvalidArgument("INVALID_KEY", f"an Ed25519 seed is {SEED_BYTES} bytes", field="seed")
    return Ed25519PrivateKey.from_private_bytes(bytes(seed))


def seed_of(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def parse_public_key(raw: object, *, field: str = "public_key") -> Ed25519PublicKey:
    """A raw Ed25519 public key; anything else (another length, another type) is INVALID_KEY."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != PUBLIC_KEY_BYTES:
        length = len(raw) if isinstance(raw, (bytes, bytearray)) else "no"
        raise errors.InvalidArgument("INVALID_KEY", f"expected a raw {PUBLIC_KEY_BYTES}-byte Ed25519 public key, "
                                                    f"got {length} bytes", field=field)
    try:
        return Ed25519PublicKey.from_public_bytes(bytes(raw))
    except ValueError as exc:
        raise errors.InvalidArgument("INVALID_KEY", "not an Ed25519 public key", field=field) from exc


def key_fingerprint(public_key: bytes) -> bytes:
    """SHA-256 of a raw public key: how revocation lists name a device key."""
    return hashlib.sha256(bytes(public_key)).digest()


def issuer_key_id(public_key: bytes) -> str:
    """A short, stable id for an issuer key, derived from the key (8 hex digits keep QR codes small)."""
    return "ik" + key_fingerprint(public_key)[:4].hex()


# --- timestamps (whole seconds: smaller codes, and truncation only makes a code look older) --


def _stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.seconds = int(utc(moment).timestamp())
    return stamp


def _moment(stamp: timestamp_pb2.Timestamp) -> datetime:
    return datetime.fromtimestamp(stamp.seconds, tz=timezone.utc) + timedelta(microseconds=stamp.nanos // 1000)


# --- issuing (the wallet) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    """An issuer key the wallet certifies device keys with."""

    key: Ed25519PrivateKey
    valid_from: datetime | None = None
    valid_until: datetime | None = None

    @property
    def public_key(self) -> bytes:
        return public_bytes(self.key)

    @property
    def key_id(self) -> str:
        return issuer_key_id(self.public_key)

    def published(self) -> credential_pb2.IssuerKey:
        """The public half, as gates receive it."""
        message = credential_pb2.IssuerKey(key_id=self.key_id, public_key=self.public_key)
        if self.valid_from is not None:
            message.valid_from.CopyFrom(_stamp(self.valid_from))
        if self.valid_until is not None:
            message.valid_until.CopyFrom(_stamp(self.valid_until))
        return message


def issue_certificate(issuer: Issuer, *, device_id: str, account_id: str, public_key: bytes, not_before: datetime,
                      not_after: datetime) -> credential_pb2.DeviceCertificate:
    """Certify `public_key` for `device_id` paying from `account_id` between the two times."""
    parse_public_key(public_key)
    if not device_id or len(device_id) > DEVICE_ID_CHARS_MAX:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"device_id must be 1 to {DEVICE_ID_CHARS_MAX} characters",
                                     field="device_id")
    if utc(not_after) <= utc(not_before):
        raise ValueError("not_after must be after not_before")
    body = credential_pb2.DeviceCertificateBody(device_id=device_id, account_id=account_id,
                                                public_key=bytes(public_key))
    body.not_before.CopyFrom(_stamp(not_before))
    body.not_after.CopyFrom(_stamp(not_after))
    return sign_certificate_body(issuer, body.SerializeToString())


def sign_certificate_body(issuer: Issuer, body: bytes) -> credential_pb2.DeviceCertificate:
    """Sign serialized body bytes as they are (tests use it to certify bodies no wallet would)."""
    return credential_pb2.DeviceCertificate(body=body, signature=issuer.key.sign(body), issuer_key_id=issuer.key_id)


# --- making a code (the phone) ------------------------------------------------------------------


def make_qr_payload(device_key: Ed25519PrivateKey, certificate: credential_pb2.DeviceCertificate, *, device_id: str,
                    issued_at: datetime, nonce: bytes | None = None) -> bytes:
    """The bytes a phone puts in its QR code: a fresh claim signed with the device key."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    claim = credential_pb2.PhoneQrClaim(device_id=device_id, nonce=nonce)
    claim.issued_at.CopyFrom(_stamp(issued_at))
    return sign_claim(device_key, certificate, claim.SerializeToString())


def sign_claim(device_key: Ed25519PrivateKey, certificate: credential_pb2.DeviceCertificate, claim: bytes) -> bytes:
    """Sign serialized claim bytes as they are and wrap them with the certificate."""
    payload = credential_pb2.PhoneQrPayload(claim=claim, signature=device_key.sign(claim))
    payload.certificate.CopyFrom(certificate)
    return payload.SerializeToString()


# --- verifying a code (the gate, offline) -------------------------------------------------------


class TrustedIssuers:
    """The issuer public keys a gate trusts, by key id."""

    def __init__(self, keys: Iterable[credential_pb2.IssuerKey]) -> None:
        self._keys: dict[str, tuple[Ed25519PublicKey, datetime | None, datetime | None]] = {}
        for key in keys:
            public = parse_public_key(key.public_key, field="issuer_key.public_key")
            self._keys[key.key_id] = (public,
                                      _moment(key.valid_from) if key.HasField("valid_from") else None,
                                      _moment(key.valid_until) if key.HasField("valid_until") else None)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def key_for(self, key_id: str, now: datetime) -> Ed25519PublicKey:
        entry = self._keys.get(key_id)
        if entry is None:
            raise errors.Unauthenticated("UNKNOWN_ISSUER", "the device certificate names an issuer key that is not "
                                                           "trusted", issuer_key_id=key_id[:32])
        public, valid_from, valid_until = entry
        if (valid_from is not None and now < valid_from) or (valid_until is not None and now > valid_until):
            raise errors.Unauthenticated("UNKNOWN_ISSUER", "the issuer key is outside its trusted period",
                                         issuer_key_id=key_id)
        return public


@dataclass(frozen=True, slots=True)
class VerifiedCode:
    """What a phone QR code proved: who pays, with which key, and the nonce to accept once."""

    device_id: str
    account_id: str
    public_key: bytes
    nonce: bytes
    issued_at: datetime
    issuer_key_id: str
    certificate_not_after: datetime

    @property
    def key_fingerprint(self) -> bytes:
        return key_fingerprint(self.public_key)


def _malformed(message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument("INVALID_ARGUMENT", message, field=_FIELD)


def _verify(public: Ed25519PublicKey, signature: bytes, data: bytes, signed: str) -> None:
    if len(signature) != SIGNATURE_BYTES:
        raise errors.Unauthenticated("INVALID_SIGNATURE", f"the {signed} signature is not {SIGNATURE_BYTES} bytes",
                                     signed=signed)
    try:
        public.verify(signature, data)
    except InvalidSignature:
        raise errors.Unauthenticated("INVALID_SIGNATURE", f"the {signed} signature does not verify",
                                     signed=signed) from None


def _expired(problem: str, message: str) -> errors.FailedPrecondition:
    return errors.FailedPrecondition("CREDENTIAL_EXPIRED", message, problem=problem)


def verify_qr_payload(payload: bytes, issuers: TrustedIssuers, *, now: datetime,
                      validity_s: int = QR_VALIDITY_S_MAX, clock_skew_s: int = CLOCK_SKEW_S_DEFAULT) -> VerifiedCode:
    """Verify a phone QR payload offline; return what it proves or raise its reason.

    Order: well-formed, issuer trusted, certificate signature, device key, certificate
    window, claim names the certified device, claim signature, code age. A code is accepted
    while `now - validity_s - clock_skew_s <= issued_at <= now + clock_skew_s`, both edges
    included; a certificate while `not_before - skew <= now <= not_after + skew`.
    """
    if not 0 < validity_s <= QR_VALIDITY_S_MAX:
        raise ValueError(f"validity_s must be 1 to {QR_VALIDITY_S_MAX}")
    if clock_skew_s < 0:
        raise ValueError("clock_skew_s must not be negative")
    now = utc(now)
    skew = timedelta(seconds=clock_skew_s)
    if not isinstance(payload, (bytes, bytearray)) or not payload:
        raise _malformed("the phone QR payload is empty")
    if len(payload) > QR_PAYLOAD_BYTES_MAX:
        raise _malformed(f"the phone QR payload is longer than {QR_PAYLOAD_BYTES_MAX} bytes")
    try:
        message = credential_pb2.PhoneQrPayload.FromString(bytes(payload))
    except DecodeError:
        raise _malformed("the phone QR payload is not a PhoneQrPayload") from None
    if not message.HasField("certificate") or not message.certificate.body or not message.claim:
        raise _malformed("the phone QR payload lacks its certificate or its claim")
    certificate = message.certificate

    issuer_public = issuers.key_for(certificate.issuer_key_id, now)
    _verify(issuer_public, certificate.signature, certificate.body, "certificate")
    try:
        body = credential_pb2.DeviceCertificateBody.FromString(certificate.body)
    except DecodeError:
        raise _malformed("the device certificate body is not a DeviceCertificateBody") from None
    device_public = parse_public_key(body.public_key, field="certificate.public_key")
    if not body.device_id or not body.account_id or not body.HasField("not_after"):
        raise _malformed("the device certificate lacks its device, account or expiry")
    not_after = _moment(body.not_after)
    if now > not_after + skew:
        raise _expired("certificate_expired", "the device certificate has expired")
    if body.HasField("not_before") and now < _moment(body.not_before) - skew:
        raise _expired("certificate_not_yet_valid", "the device certificate is not valid yet")

    try:
        claim = credential_pb2.PhoneQrClaim.FromString(message.claim)
    except DecodeError:
        raise _malformed("the phone QR claim is not a PhoneQrClaim") from None
    if claim.device_id != body.device_id:
        raise errors.Unauthenticated("DEVICE_MISMATCH", "the code was made by another device than the one certified")
    _verify(device_public, message.signature, message.claim, "claim")
    if not NONCE_BYTES_MIN <= len(claim.nonce) <= NONCE_BYTES_MAX:
        raise _malformed(f"the claim's nonce must be {NONCE_BYTES_MIN} to {NONCE_BYTES_MAX} bytes")
    if not claim.HasField("issued_at"):
        raise _malformed("the claim lacks issued_at")
    issued_at = _moment(claim.issued_at)
    if issued_at > now + skew:
        raise _expired("code_from_the_future", f"the code is dated more than {clock_skew_s} s ahead of the gate")
    if issued_at < now - timedelta(seconds=validity_s) - skew:
        raise _expired("code_expired", f"the code is older than {validity_s} s")
    return VerifiedCode(device_id=body.device_id, account_id=body.account_id, public_key=bytes(body.public_key),
                        nonce=bytes(claim.nonce), issued_at=issued_at, issuer_key_id=certificate.issuer_key_id,
                        certificate_not_after=not_after)


def check_not_revoked(code: VerifiedCode, revoked_fingerprints: Container[bytes]) -> None:
    """The online half of revocation: refuse a code whose device key is listed as revoked."""
    if code.key_fingerprint in revoked_fingerprints:
        raise errors.PermissionDenied("CREDENTIAL_REVOKED", "this phone's key was revoked or rotated away",
                                      device_id=code.device_id)


def nonce_ttl_s(validity_s: int = QR_VALIDITY_S_MAX, clock_skew_s: int = CLOCK_SKEW_S_DEFAULT) -> int:
    """How long an accepted nonce must be remembered: just over the longest time its code
    can still pass `verify_qr_payload` (from skew ahead of the gate to validity + skew behind)."""
    return validity_s + 2 * clock_skew_s + 1
