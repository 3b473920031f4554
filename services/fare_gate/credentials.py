"""What a tap's credential stands for: a stable pseudonym and the rider account it pays from.

The tap path (taps.py) asks `CredentialResolver.resolve(tap, now)` once per tap and gets a
`Resolved`: the credential's pseudonym (an HMAC under fare-gate's credential key, used for
double taps, passback and retries, so no credential is stored in clear) and the account,
or no account for a credential nobody knows (recorded as a DENIED_UNKNOWN_CREDENTIAL tap).

Per kind:

- **card UID**: the Redis card cache, else the wallet's ResolveCredential (then cached).
  Pseudonym HMAC("card:" + uid), unchanged since card taps began.
- **phone QR**: verified here, offline, against the wallet's issuer public keys only
  (libs.device_credentials: certificate, validity, claim signature, device, age), then
  checked online: the device key must not be on the wallet's Redis revocation set, and the
  code's nonce is accepted once across the network (libs.qr_nonces: Redis SET NX, shared
  with the merchant service's tills, remembered just over the code's validity; a retry of
  the same tap id may present it again). Then the account: the phone cache, else
  the wallet's ResolveDevice. Pseudonym HMAC("device:" + device id): every code a phone
  makes is the same credential, so a double tap or a passback is seen as one.
- **NFC token**: like a card UID, through ResolveDevice; the cached answer carries the
  device key's fingerprint, checked against the revocation set on every tap, so a revoked
  or rotated token stops paying at once. Pseudonym HMAC("nfc:" + token).
- **face**: the face service's Match (purpose TRANSIT_FARES); the pseudonym is that of the
  matched account, HMAC("face:" + account id). A face match alone may not start a journey
  whose maximum fare exceeds `face_limit_minor` (`check_face_limit`, LIMIT_EXCEEDED).

Refusals are `libs.errors` exceptions with their own reasons, raised before anything is
recorded or charged: INVALID_ARGUMENT (malformed QR), UNKNOWN_ISSUER, INVALID_SIGNATURE,
INVALID_KEY, CREDENTIAL_EXPIRED, DEVICE_MISMATCH, CREDENTIAL_REVOKED, CREDENTIAL_REPLAYED,
LIVENESS_FAILED, LIMIT_EXCEEDED, UNSUPPORTED_CREDENTIAL (a kind this gate is not set up
for). The replay check fails closed: when Redis cannot say whether a nonce was used, the tap
is refused UNAVAILABLE and the gate decides offline, where it keeps its own nonce memory.

This module's `PhoneState` is, beside hot_state.py, the one place fare-gate talks to Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import redis

from libs import device_credentials as dc
from libs import errors, qr_nonces
from services.fare_gate.domain import CredentialKind, Tap, credential_hash, pseudonym
from services.fare_gate.face_client import MATCHED, FaceClient, unsupported
from services.fare_gate.hot_state import HotState
from services.fare_gate.wallet_client import WalletClient, WalletRefusal

log = logging.getLogger("citytap.fare_gate.credentials")

# The wallet's revocation set (services/wallet/devices.py): members `key:<hex SHA-256 of a
# retired device key>`.
DEVICE_REVOCATIONS_KEY = "citytap:wallet:device-revocations"
NONCE_PREFIX = qr_nonces.KEY_PREFIX
PHONE_CACHE_PREFIX = "citytap:fare_gate:phone:"
_SEPARATOR = "\x1f"
# An unknown issuer key makes the gate re-read the wallet's keys, at most this often.
ISSUER_REFRESH_ON_MISS_S_MIN = 10.0


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    qr_validity_s: int = dc.QR_VALIDITY_S_MAX
    qr_clock_skew_s: int = dc.CLOCK_SKEW_S_DEFAULT
    face_limit_minor: int = 0  # the most a face match alone may hold or charge for one journey
    issuer_keys_refresh_s: int = 300

    def __post_init__(self) -> None:
        if not 0 < self.qr_validity_s <= dc.QR_VALIDITY_S_MAX:
            raise ValueError(f"qr_validity_s must be 1 to {dc.QR_VALIDITY_S_MAX}")
        if self.qr_clock_skew_s < 0 or self.face_limit_minor < 0 or self.issuer_keys_refresh_s <= 0:
            raise ValueError("skew and face limit must not be negative; the refresh interval must be positive")

    @property
    def nonce_ttl_s(self) -> int:
        return dc.nonce_ttl_s(self.qr_validity_s, self.qr_clock_skew_s)


@dataclass(frozen=True, slots=True)
class Resolved:
    """A credential's pseudonym and, when anyone holds it, the account it pays from."""

    credential_hash: bytes
    account_id: str | None
    rider_category: str = ""
    blocked: bool = False


class PhoneState:
    """The phone parts of hot state in Redis: used nonces, the wallet's revocation set and
    the phone-to-account cache (account, rider category, device key fingerprint)."""

    def __init__(self, client: redis.Redis, *, cache_ttl_s: int, revocations_key: str = DEVICE_REVOCATIONS_KEY
                 ) -> None:
        self._client = client
        self._ttl_s = cache_ttl_s
        self._revocations_key = revocations_key

    def claim_nonce(self, nonce: bytes, tap_id: str, *, ttl_s: int) -> bool:
        """True when this tap may use the nonce: nobody had it, or this same tap (a retry) did.
        The claim is the network's (libs.qr_nonces): a code a till took is refused here too."""
        return qr_nonces.claim(self._client, nonce, f"fare_gate:tap:{tap_id}", ttl_s=ttl_s)

    def key_revoked(self, fingerprint: bytes) -> bool:
        """True when the wallet lists the key as revoked; False when Redis cannot say (the
        wallet then checks on the resolution it is asked for)."""
        try:
            return bool(self._client.sismember(self._revocations_key, f"key:{fingerprint.hex()}"))
        except redis.RedisError as exc:
            log.warning("revocation set unreadable; relying on the wallet", extra={"fields": {"error": str(exc)}})
            return False

    def cached(self, credential: bytes) -> tuple[str, str, bytes] | None:
        if self._ttl_s == 0:
            return None
        try:
            value = self._client.get(PHONE_CACHE_PREFIX + credential.hex())
        except redis.RedisError as exc:
            log.warning("phone cache unreadable; asking the wallet", extra={"fields": {"error": str(exc)}})
            return None
        if value is None:
            return None
        account_id, category, fingerprint = (value.decode().split(_SEPARATOR) + ["", ""])[:3]
        try:
            return (account_id, category, bytes.fromhex(fingerprint)) if account_id and fingerprint else None
        except ValueError:
            return None

    def cache(self, credential: bytes, account_id: str, category: str, fingerprint: bytes) -> None:
        if self._ttl_s == 0:
            return
        try:
            self._client.set(PHONE_CACHE_PREFIX + credential.hex(),
                             _SEPARATOR.join([account_id, category, fingerprint.hex()]), ex=self._ttl_s)
        except redis.RedisError as exc:
            log.warning("phone cache unwritable", extra={"fields": {"error": str(exc)}})


class IssuerKeys:
    """The wallet's issuer public keys, re-read every `refresh_s` and, at most every
    ISSUER_REFRESH_ON_MISS_S_MIN, when a certificate names a key not yet known."""

    def __init__(self, fetch: Callable[[], list], *, refresh_s: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._refresh_s = refresh_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._trusted: dc.TrustedIssuers | None = None
        self._fetched_at = float("-inf")

    def trusted(self, *, force: bool = False) -> dc.TrustedIssuers:
        with self._lock:
            age = self._monotonic() - self._fetched_at
            stale = self._trusted is None or age >= self._refresh_s or (force and age >= ISSUER_REFRESH_ON_MISS_S_MIN)
            if stale:
                try:
                    self._trusted = dc.TrustedIssuers(self._fetch())
                    self._fetched_at = self._monotonic()
                except errors.Unavailable:
                    if self._trusted is None:
                        raise
                    # Keep the last keys, and try again in a while rather than on every tap.
                    self._fetched_at = self._monotonic() - self._refresh_s + ISSUER_REFRESH_ON_MISS_S_MIN
                    log.warning("issuer keys not refreshed; keeping the last ones")
            assert self._trusted is not None
            return self._trusted


class CredentialResolver:
    """Turns a tap's credential into its pseudonym and account (see the module docstring)."""

    def __init__(self, *, key: bytes, hot_state: HotState, wallet: WalletClient, phone: PhoneState | None = None,
                 issuers: IssuerKeys | None = None, face: FaceClient | None = None,
                 config: CredentialConfig = CredentialConfig()) -> None:
        self._key = key
        self._hot = hot_state
        self._wallet = wallet
        self._phone = phone
        self._issuers = issuers
        self._face = face
        self.config = config

    def resolve(self, tap: Tap, now: datetime) -> Resolved:
        kind = tap.credential_kind
        if kind is CredentialKind.CARD:
            return self._card(tap.card_uid)
        if kind is CredentialKind.PHONE_QR:
            return self._phone_qr(tap, now)
        if kind is CredentialKind.NFC:
            return self._nfc(tap.nfc_token)
        if kind is CredentialKind.FACE:
            return self._face_match(tap)
        raise unsupported(f"{kind.name.lower()} credentials are not accepted")

    # --- cards --------------------------------------------------------------------------------

    def _card(self, card_uid: bytes) -> Resolved:
        card = credential_hash(self._key, card_uid)
        cached = self._hot.cached_account(card)
        if cached is not None:
            account_id, category = cached
            return Resolved(card, account_id, category, self._hot.account_denied(account_id))
        resolution = self._wallet.resolve_card(card_uid)
        if resolution is None:
            return Resolved(card, None)
        self._hot.cache_account(card, resolution.account_id, resolution.rider_category)
        return Resolved(card, resolution.account_id, resolution.rider_category, resolution.blocked)

    # --- phones -------------------------------------------------------------------------------

    def _phone_state(self) -> PhoneState:
        if self._phone is None or self._issuers is None:
            raise unsupported("phone credentials are not set up on this fare gate")
        return self._phone

    def verify(self, payload: bytes, now: datetime) -> dc.VerifiedCode:
        """Offline verification with the issuer keys alone (re-read once if the key is new)."""
        self._phone_state()
        assert self._issuers is not None
        config = self.config
        try:
            return dc.verify_qr_payload(payload, self._issuers.trusted(), now=now, validity_s=config.qr_validity_s,
                                        clock_skew_s=config.qr_clock_skew_s)
        except errors.Unauthenticated as exc:
            if exc.reason != "UNKNOWN_ISSUER":
                raise
            return dc.verify_qr_payload(payload, self._issuers.trusted(force=True), now=now,
                                        validity_s=config.qr_validity_s, clock_skew_s=config.qr_clock_skew_s)

    def _phone_qr(self, tap: Tap, now: datetime) -> Resolved:
        phone = self._phone_state()
        code = self.verify(tap.phone_qr, now)
        fingerprint = code.key_fingerprint
        if phone.key_revoked(fingerprint):
            raise _revoked(code.device_id)
        if not phone.claim_nonce(code.nonce, tap.tap_id, ttl_s=self.config.nonce_ttl_s):
            raise errors.FailedPrecondition("CREDENTIAL_REPLAYED", "this phone QR code was already used; show a "
                                                                   "fresh one", device_id=code.device_id)
        credential = pseudonym(self._key, "device", code.device_id.encode())
        return self._device(credential, fingerprint, device_id=code.device_id, public_key=code.public_key)

    def _nfc(self, token: str) -> Resolved:
        phone = self._phone_state()
        credential = pseudonym(self._key, "nfc", token.encode())
        cached = phone.cached(credential)
        if cached is not None:
            account_id, category, fingerprint = cached
            if phone.key_revoked(fingerprint):
                raise _revoked("")
            return Resolved(credential, account_id, category, self._hot.account_denied(account_id))
        return self._device(credential, None, nfc_token=token)

    def _device(self, credential: bytes, fingerprint: bytes | None, **lookup: object) -> Resolved:
        """The account of a phone credential: the cache when it names this very key, else the wallet."""
        assert self._phone is not None
        if fingerprint is not None:
            cached = self._phone.cached(credential)
            if cached is not None and cached[2] == fingerprint:
                account_id, category, _ = cached
                return Resolved(credential, account_id, category, self._hot.account_denied(account_id))
        try:
            found = self._wallet.resolve_device(**lookup)  # type: ignore[arg-type]
        except WalletRefusal as refusal:
            if refusal.reason == "CREDENTIAL_REVOKED":
                raise _revoked(str(lookup.get("device_id", ""))) from refusal
            if refusal.reason == "CREDENTIAL_EXPIRED":
                raise errors.FailedPrecondition("CREDENTIAL_EXPIRED", "the phone's certificate has expired",
                                                problem="certificate_expired") from refusal
            raise
        if found is None:
            return Resolved(credential, None)
        self._phone.cache(credential, found.account_id, found.rider_category, found.key_fingerprint)
        return Resolved(credential, found.account_id, found.rider_category, found.blocked)

    # --- faces --------------------------------------------------------------------------------

    def _face_match(self, tap: Tap) -> Resolved:
        if self._face is None:
            raise unsupported("face credentials are not set up on this fare gate (no face service address)")
        assert tap.face is not None
        match = self._face.match(tap.face, reference_id=tap.tap_id)
        if match.outcome != MATCHED:
            # Nobody (or nobody clearly) owns this face: recorded as an unknown credential
            # under a name that only a retry of this very tap shares.
            return Resolved(pseudonym(self._key, "face-unmatched", tap.tap_id.encode()), None)
        account_id = match.account_id
        face_key = pseudonym(self._key, "face", account_id.encode())
        cached = self._hot.cached_account(face_key)
        if cached is not None:
            return Resolved(face_key, account_id, cached[1], self._hot.account_denied(account_id))
        try:
            category, blocked = self._wallet.account_category(account_id)
        except WalletRefusal as refusal:
            if refusal.reason != "UNKNOWN_ACCOUNT":
                raise
            log.warning("a face matched an account the wallet does not know", extra={"fields": {
                "tap_id": tap.tap_id}})
            return Resolved(face_key, None)
        self._hot.cache_account(face_key, account_id, category)
        return Resolved(face_key, account_id, category, blocked)

    def check_face_limit(self, tap: Tap, max_fare_minor: int) -> None:
        """A face match alone never holds or charges more than the configured amount."""
        if tap.credential_kind is CredentialKind.FACE and max_fare_minor > self.config.face_limit_minor:
            raise errors.LimitExceeded("LIMIT_EXCEEDED", f"this journey's maximum fare ({max_fare_minor}) is above "
                                       f"what a face alone may pay ({self.config.face_limit_minor}); use a card or "
                                       "phone", limit="face_per_journey")


def _revoked(device_id: str) -> errors.PermissionDenied:
    return errors.PermissionDenied("CREDENTIAL_REVOKED", "this phone credential was revoked or rotated away",
                                   **({"device_id": device_id} if device_id else {}))
