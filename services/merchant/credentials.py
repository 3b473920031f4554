"""Who pays at the till: a presented credential resolved to the rider account it pays from.

Per kind:

- **card UID**: the wallet's ResolveCredential (by the card's keyed hash).
- **NFC token** (a phone's virtual card): the wallet's ResolveDevice, which refuses a token
  of a revoked or rotated device with CREDENTIAL_REVOKED.
- **phone QR**: verified here with `libs.device_credentials` against the wallet's issuer
  public keys (fetched by ListIssuerKeys, refreshed every `issuer_keys_refresh_s` and once
  more, at most every 10 s, when a code names a key we do not know): certificate, validity,
  claim signature, device, age (`qr_validity_s`, `qr_clock_skew_s`). Then the wallet's
  ResolveDevice checks the device key is still in force. The code's nonce is returned with
  the time it may be forgotten; the charge records it in the same transaction as the charge,
  so each code pays once (CREDENTIAL_REPLAYED otherwise).
- **face**: the face service's Match for MERCHANT_PAYMENTS; refused UNSUPPORTED_CREDENTIAL
  when no face service is configured.

Refusals are `libs.errors` exceptions with their reasons, raised before anything is recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from citytap.common.v1 import credential_pb2
from libs import device_credentials as dc
from libs import errors
from services.merchant.domain import CredentialKind
from services.merchant.face_client import FaceClient
from services.merchant.wallet_client import WalletClient, WalletRefused

ISSUER_REFRESH_ON_MISS_S_MIN = 10.0


@dataclass(frozen=True)
class CredentialConfig:
    qr_validity_s: int = dc.QR_VALIDITY_S_MAX
    qr_clock_skew_s: int = dc.CLOCK_SKEW_S_DEFAULT
    issuer_keys_refresh_s: float = 300.0


@dataclass(frozen=True)
class Payer:
    """The rider account a credential pays from; `nonce` is set for a phone QR code."""

    account_id: str
    blocked: bool
    kind: CredentialKind
    nonce: bytes | None = None
    nonce_expires_at: datetime | None = None


class CredentialResolver:
    def __init__(self, wallet: WalletClient, face: FaceClient | None, config: CredentialConfig = CredentialConfig(),
                 *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wallet = wallet
        self._face = face
        self._config = config
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._issuers: dc.TrustedIssuers | None = None
        self._fetched_at = 0.0

    def resolve(self, credential: credential_pb2.Credential, *, now: datetime, reference_id: str) -> Payer:
        kind = credential.WhichOneof("kind")
        try:
            if kind == "card_uid":
                found = self._wallet.resolve(credential)
                return Payer(found.account_id, found.blocked, CredentialKind.CARD)
            if kind == "nfc_token":
                found = self._wallet.resolve_device(nfc_token=credential.nfc_token)
                return Payer(found.account_id, found.blocked, CredentialKind.NFC)
            if kind == "phone_qr":
                return self._phone_qr(credential.phone_qr, now)
        except WalletRefused as refusal:
            raise refusal.error from refusal
        if kind in ("face_embedding", "face_frames"):
            if self._face is None:
                raise errors.InvalidArgument("UNSUPPORTED_CREDENTIAL", "no face service is configured for tills",
                                             field="credential")
            return Payer(self._face.match(credential, reference_id=reference_id), False, CredentialKind.FACE)
        raise errors.InvalidArgument("INVALID_ARGUMENT", "credential must hold exactly one credential",
                                     field="credential")

    def _phone_qr(self, payload: bytes, now: datetime) -> Payer:
        config = self._config
        try:
            code = dc.verify_qr_payload(payload, self._trusted(), now=now, validity_s=config.qr_validity_s,
                                        clock_skew_s=config.qr_clock_skew_s)
        except errors.Unauthenticated as exc:
            if exc.reason != "UNKNOWN_ISSUER" or not self._refresh_on_miss():
                raise
            code = dc.verify_qr_payload(payload, self._trusted(), now=now, validity_s=config.qr_validity_s,
                                        clock_skew_s=config.qr_clock_skew_s)
        found = self._wallet.resolve_device(device_id=code.device_id, public_key=code.public_key)
        if found.account_id != code.account_id:
            raise errors.Unauthenticated("DEVICE_MISMATCH", "the certificate names another account than the device's")
        forget_at = now + timedelta(seconds=dc.nonce_ttl_s(config.qr_validity_s, config.qr_clock_skew_s))
        return Payer(found.account_id, found.blocked, CredentialKind.PHONE_QR, code.nonce, forget_at)

    def _trusted(self) -> dc.TrustedIssuers:
        with self._lock:
            if self._issuers is None or self._monotonic() - self._fetched_at >= self._config.issuer_keys_refresh_s:
                self._issuers = dc.TrustedIssuers(self._wallet.issuer_keys())
                self._fetched_at = self._monotonic()
            return self._issuers

    def _refresh_on_miss(self) -> bool:
        with self._lock:
            if self._monotonic() - self._fetched_at < ISSUER_REFRESH_ON_MISS_S_MIN:
                return False
            self._issuers = None
        return True
