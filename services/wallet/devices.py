"""Phones that pay: device registration, rotation, revocation, NFC tokens and issuer keys.

A phone makes its own Ed25519 key pair and registers the public key (RegisterDevice); the
wallet certifies it with its issuer key (libs.device_credentials) and gives the phone a
virtual card token for NFC host-card emulation. The phone then pays with signed QR codes
that gates verify offline against the published issuer keys (ListIssuerKeys), or with the
NFC token, which gates resolve like a card (ResolveDevice).

Use cases (methods of `Devices`), each one short PostgreSQL transaction:

- `register`: idempotent on the device id (same id and payload: the original certificate and
  token; another payload: IDEMPOTENCY_CONFLICT); a key already certified for any device is
  CREDENTIAL_IN_USE; at most `devices_per_account_max` active phones per account.
- `rotate`: certify a new key for a registered phone; the old key, its certificate and its
  NFC token stop paying. Sending the key in force again returns its certificate (a retry).
- `revoke`: the phone stops paying; revoking twice returns the first time.
- `resolve`: the account behind a verified QR code's device key or an NFC token; a retired
  key or a revoked phone is CREDENTIAL_REVOKED.
- `rebuild_revocations`: recompute the Redis revocation set from PostgreSQL.

**Revocation set.** Gates must refuse a revoked phone's QR codes, which they verify without
asking the wallet, and its NFC token, whose resolution they cache. So every retired key's
fingerprint (SHA-256 of the public key) is published in the Redis set
`citytap:wallet:device-revocations` as `key:<64 hex digits>`, which fare-gate reads on every
phone tap. Like the deny list (deny_list.py) it is a cache of PostgreSQL: rotate and revoke
write it before they commit, under a lock shared with rebuilds, and `rebuild_revocations`
swaps in the truth at start and periodically. A key drops off the set once its certificate
has expired, since an expired certificate is refused anyway.

**NFC tokens.** A token is derived from a random 16-byte salt with the wallet's card hash
key (HMAC-SHA256), and only the salt and the token's keyed hash are stored: the token
itself is never written down, and without the key the table does not give it away.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc
import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from citytap.common.v1 import credential_pb2
from citytap.wallet.v1 import wallet_pb2
from libs import device_credentials as dc
from libs import errors
from services.wallet import convert
from services.wallet.deny_list import DEFAULT_SCHEMA, RedisDenyList
from services.wallet.domain import (
    LABEL_CHARS_MAX,
    NOTE_CHARS_MAX,
    AccountKind,
    AccountStatus,
    check_id,
    check_text,
)
from services.wallet.ledger import utc_now
from services.wallet.repository import Repository

log = logging.getLogger("citytap.wallet.devices")

T = TypeVar("T")

REVOCATION_SET_KEY = "citytap:wallet:device-revocations"
NFC_TOKEN_PREFIX = "nfc_"
NFC_TOKEN_CHARS = 32  # base32 of 20 bytes: 160 bits, as hard to guess as the card hash key allows
NFC_TOKEN_CHARS_MAX = 64
_NFC_SALT_BYTES = 16
TX_ATTEMPTS_MAX = 3


def revocation_set_key(schema: str) -> str:
    """The revocation set of a wallet on `schema`: the well-known key fare-gate reads for the
    production schema, a key of its own for an isolated instance (as `deny_list_key`)."""
    return REVOCATION_SET_KEY if schema == DEFAULT_SCHEMA else f"{REVOCATION_SET_KEY}:{schema}"


def revocation_member(fingerprint: bytes) -> str:
    """How the revocation set names a retired device key."""
    return f"key:{fingerprint.hex()}"


def nfc_token_for(key: bytes, salt: bytes) -> str:
    """The NFC token derived from `salt`: unguessable without the wallet's key."""
    digest = hmac.new(key, b"citytap.nfc-token.v1\x1f" + salt, hashlib.sha256).digest()[:20]
    return NFC_TOKEN_PREFIX + base64.b32encode(digest).decode().lower()


def nfc_token_hash(key: bytes, token: str) -> bytes:
    """The keyed hash an NFC token is stored and looked up by."""
    return hmac.new(key, b"nfc:" + token.encode(), hashlib.sha256).digest()


def check_nfc_token(token: object, field_name: str = "nfc_token") -> str:
    if not isinstance(token, str) or not token or len(token) > NFC_TOKEN_CHARS_MAX or not token.isascii():
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} must be 1 to {NFC_TOKEN_CHARS_MAX} ASCII "
                                                         "characters", field=field_name)
    return token


def registration_hash(account_id: str, public_key: bytes, label: str) -> bytes:
    return hashlib.sha256("\x1f".join(["device.v1", account_id, public_key.hex(), label]).encode()).digest()


@dataclass(frozen=True)
class DeviceConfig:
    """What the device use cases need; `issuer` is None when no issuer seed is configured."""

    issuer: dc.Issuer | None
    token_key: bytes
    certificate_ttl_s: int = 90 * 24 * 3600
    devices_per_account_max: int = 5

    def __post_init__(self) -> None:
        if self.certificate_ttl_s <= 0 or self.devices_per_account_max <= 0:
            raise ValueError("certificate_ttl_s and devices_per_account_max must be positive")
        if len(self.token_key) < 32:
            raise ValueError("the NFC token key must be at least 32 bytes")

    def __repr__(self) -> str:  # never print keys
        return f"DeviceConfig(issuer={'set' if self.issuer else 'unset'}, ttl_s={self.certificate_ttl_s})"


@dataclass(frozen=True, slots=True)
class Certified:
    """A certified key as the phone receives it."""

    certificate: credential_pb2.DeviceCertificate
    nfc_token: str


@dataclass(frozen=True, slots=True)
class DeviceResolution:
    account_id: str
    status: AccountStatus
    rider_category: str
    device_id: str
    key_fingerprint: bytes


@dataclass(frozen=True, slots=True)
class _Device:
    device_id: str
    account_id: str
    request_hash: bytes
    status: str
    key_generation: int
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class _Key:
    device_id: str
    generation: int
    public_key: bytes
    key_fingerprint: bytes
    certificate: bytes
    not_after: datetime
    nfc_token_salt: bytes
    retired_at: datetime | None


_KEY_COLUMNS = ("device_id, generation, public_key, key_fingerprint, certificate, not_after, nfc_token_salt,"
                " retired_at")


def _key(row: tuple) -> _Key:
    device_id, generation, public_key, fingerprint, certificate, not_after, salt, retired_at = row
    return _Key(device_id, generation, bytes(public_key), bytes(fingerprint), bytes(certificate), not_after,
                bytes(salt), retired_at)


class Devices:
    """The device use cases over the wallet's schema, with the Redis revocation set."""

    def __init__(self, pool: ConnectionPool, *, schema: str, config: DeviceConfig, revocations: Any,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self._pool = pool
        self._schema = schema
        self._accounts = Repository(schema)
        self.config = config
        self.revocations = revocations
        self._clock = clock
        digest = hashlib.sha256(f"citytap.wallet.device-revocations.{schema}".encode()).digest()
        self._lock_key = int.from_bytes(digest[:8], "big", signed=True)

    # --- plumbing -------------------------------------------------------------------------

    def _q(self, text: str) -> str:
        return text.replace("{s}", f'"{self._schema}"')

    def _transaction(self, work: Callable[[psycopg.Connection], T]) -> T:
        for attempt in range(1, TX_ATTEMPTS_MAX + 1):
            try:
                with self._pool.connection() as conn, conn.transaction():
                    return work(conn)
            except pg_errors.UniqueViolation as exc:
                constraint = exc.diag.constraint_name
                if constraint == "device_keys_one_public_key":
                    raise errors.Conflict("CREDENTIAL_IN_USE", "this public key is already certified for a device",
                                          field="public_key") from exc
                if constraint == "devices_pkey" and attempt < TX_ATTEMPTS_MAX:
                    continue  # a concurrent registration of the same id won: answer as a replay
                raise
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                if attempt == TX_ATTEMPTS_MAX:
                    raise errors.Unavailable("UNAVAILABLE", "the wallet is busy; retry") from exc
                time.sleep(0.01 * attempt)
            except PoolTimeout as exc:
                raise errors.Unavailable("UNAVAILABLE", "no database connection is free; retry") from exc
            except psycopg.OperationalError as exc:
                raise errors.Unavailable("UNAVAILABLE", "the database is unreachable; retry") from exc
        raise AssertionError("unreachable")

    def _now(self) -> datetime:
        return dc.utc(self._clock())

    def _issuer(self) -> dc.Issuer:
        if self.config.issuer is None:
            raise errors.FailedPrecondition("INVALID_STATE", "phone payment is not configured on this wallet: "
                                                             "CITYTAP_WALLET_DEVICE_ISSUER_SEED is not set")
        return self.config.issuer

    def _device(self, conn: psycopg.Connection, device_id: str, *, lock: bool = False) -> _Device | None:
        row = conn.execute(self._q(
            "SELECT id, account_id, request_hash, status, key_generation, revoked_at FROM {s}.devices WHERE id = %s"
            + (" FOR UPDATE" if lock else "")), (device_id,)).fetchone()
        if row is None:
            return None
        return _Device(row[0], row[1], bytes(row[2]), row[3], row[4], row[5])

    def _key_of(self, conn: psycopg.Connection, device_id: str, generation: int) -> _Key:
        row = conn.execute(self._q(f"SELECT {_KEY_COLUMNS} FROM {{s}}.device_keys"
                                   " WHERE device_id = %s AND generation = %s"), (device_id, generation)).fetchone()
        assert row is not None, "a device always has its key in force"
        return _key(row)

    def _certified(self, key: _Key) -> Certified:
        return Certified(credential_pb2.DeviceCertificate.FromString(key.certificate),
                         nfc_token_for(self.config.token_key, key.nfc_token_salt))

    def _certify(self, conn: psycopg.Connection, *, device_id: str, account_id: str, public_key: bytes,
                 generation: int, now: datetime) -> Certified:
        issuer = self._issuer()
        not_after = now + timedelta(seconds=self.config.certificate_ttl_s)
        certificate = dc.issue_certificate(issuer, device_id=device_id, account_id=account_id, public_key=public_key,
                                           not_before=now, not_after=not_after)
        salt = os.urandom(_NFC_SALT_BYTES)
        token = nfc_token_for(self.config.token_key, salt)
        conn.execute(self._q(
            "INSERT INTO {s}.device_keys (device_id, generation, public_key, key_fingerprint, certificate, not_after,"
            " nfc_token_salt, nfc_token_hash, certified_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"),
            (device_id, generation, public_key, dc.key_fingerprint(public_key), certificate.SerializeToString(),
             not_after, salt, nfc_token_hash(self.config.token_key, token), now))
        return Certified(certificate, token)

    def _key_in_use(self, conn: psycopg.Connection, public_key: bytes) -> bool:
        return conn.execute(self._q("SELECT 1 FROM {s}.device_keys WHERE public_key = %s"),
                            (public_key,)).fetchone() is not None

    def _rider(self, conn: psycopg.Connection, account_id: str) -> Any:
        account = self._accounts.lock_accounts(conn, [account_id]).get(account_id)
        if account is None:
            raise errors.NotFound("UNKNOWN_ACCOUNT", f"no account {account_id}", resource="account",
                                  account_id=account_id)
        if account.kind is not AccountKind.RIDER_WALLET:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "phones pay from rider wallets only", field="account_id")
        if account.status is AccountStatus.BLOCKED:
            raise errors.FailedPrecondition("ACCOUNT_BLOCKED", f"account {account_id} is blocked",
                                            account_id=account_id)
        return account

    def _owned(self, conn: psycopg.Connection, account_id: str, device_id: str) -> _Device:
        device = self._device(conn, device_id, lock=True)
        if device is None or device.account_id != account_id:
            raise errors.NotFound("NOT_FOUND", f"account {account_id} has no device {device_id}", resource="device",
                                  device_id=device_id)
        return device

    def _retire(self, conn: psycopg.Connection, key: _Key, reason: str, now: datetime) -> None:
        """Retire a key and publish its fingerprint before the commit, under the lock rebuilds
        take exclusively, so a committed retirement is always on the set."""
        conn.execute(self._q("UPDATE {s}.device_keys SET retired_at = %s, retired_reason = %s"
                             " WHERE device_id = %s AND generation = %s AND retired_at IS NULL"),
                     (now, reason, key.device_id, key.generation))
        conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._lock_key,))
        self.revocations.add([revocation_member(key.key_fingerprint)])

    # --- use cases --------------------------------------------------------------------------

    def register(self, *, device_id: str, account_id: str, public_key: bytes, label: str = "") -> Certified:
        check_id(device_id, "device_id")
        check_id(account_id, "account_id")
        dc.parse_public_key(public_key)
        check_text(label, "label", LABEL_CHARS_MAX)
        self._issuer()
        fingerprint = registration_hash(account_id, public_key, label)

        def work(conn: psycopg.Connection) -> Certified:
            existing = self._device(conn, device_id)
            if existing is not None:
                if existing.request_hash != fingerprint:
                    raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"device {device_id} is registered with a different "
                                                                  "payload", device_id=device_id)
                return self._certified(self._key_of(conn, device_id, 1))
            self._rider(conn, account_id)
            active = conn.execute(self._q("SELECT count(*) FROM {s}.devices WHERE account_id = %s"
                                          " AND status = 'ACTIVE'"), (account_id,)).fetchone()[0]
            if active >= self.config.devices_per_account_max:
                raise errors.LimitExceeded("LIMIT_EXCEEDED", f"an account has at most "
                                           f"{self.config.devices_per_account_max} active phones",
                                           limit="devices_per_account", account_id=account_id)
            if self._key_in_use(conn, public_key):
                raise errors.Conflict("CREDENTIAL_IN_USE", "this public key is already certified for a device",
                                      field="public_key")
            now = self._now()
            conn.execute(self._q(
                "INSERT INTO {s}.devices (id, account_id, label, request_hash, status, key_generation, registered_at)"
                " VALUES (%s, %s, %s, %s, 'ACTIVE', 1, %s)"), (device_id, account_id, label, fingerprint, now))
            return self._certify(conn, device_id=device_id, account_id=account_id, public_key=public_key,
                                 generation=1, now=now)

        return self._transaction(work)

    def rotate(self, *, account_id: str, device_id: str, public_key: bytes) -> Certified:
        check_id(account_id, "account_id")
        check_id(device_id, "device_id")
        dc.parse_public_key(public_key)
        self._issuer()

        def work(conn: psycopg.Connection) -> Certified:
            device = self._owned(conn, account_id, device_id)
            if device.status == "REVOKED":
                raise errors.PermissionDenied("CREDENTIAL_REVOKED", f"device {device_id} is revoked",
                                              device_id=device_id)
            current = self._key_of(conn, device_id, device.key_generation)
            if current.public_key == public_key:
                return self._certified(current)  # a retry: the key in force, as certified
            self._rider(conn, account_id)
            if self._key_in_use(conn, public_key):
                raise errors.Conflict("CREDENTIAL_IN_USE", "this public key is already certified for a device",
                                      field="public_key")
            now = self._now()
            generation = device.key_generation + 1
            certified = self._certify(conn, device_id=device_id, account_id=account_id, public_key=public_key,
                                      generation=generation, now=now)
            conn.execute(self._q("UPDATE {s}.devices SET key_generation = %s WHERE id = %s"), (generation, device_id))
            self._retire(conn, current, "ROTATED", now)
            return certified

        return self._transaction(work)

    def revoke(self, *, account_id: str, device_id: str, note: str = "") -> datetime:
        check_id(account_id, "account_id")
        check_id(device_id, "device_id")
        check_text(note, "note", NOTE_CHARS_MAX)

        def work(conn: psycopg.Connection) -> datetime:
            device = self._owned(conn, account_id, device_id)
            current = self._key_of(conn, device_id, device.key_generation)
            if device.revoked_at is not None:
                conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._lock_key,))
                self.revocations.add([revocation_member(current.key_fingerprint)])  # re-assert
                return device.revoked_at
            now = self._now()
            conn.execute(self._q("UPDATE {s}.devices SET status = 'REVOKED', revoked_at = %s, revoke_note = %s"
                                 " WHERE id = %s"), (now, note, device_id))
            self._retire(conn, current, "REVOKED", now)
            return now

        return self._transaction(work)

    def resolve(self, *, device_id: str = "", public_key: bytes = b"", nfc_token: str = "") -> DeviceResolution:
        """The account behind an NFC token, or behind a device key from a verified QR code."""
        if nfc_token:
            if device_id or public_key:
                raise errors.InvalidArgument("INVALID_ARGUMENT", "send nfc_token alone, or device_id with public_key",
                                             field="nfc_token")
            where, params = "k.nfc_token_hash = %s", (nfc_token_hash(self.config.token_key,
                                                                      check_nfc_token(nfc_token)),)
        else:
            check_id(device_id, "device_id")
            dc.parse_public_key(public_key)
            where, params = "k.device_id = %s AND k.public_key = %s", (device_id, bytes(public_key))
        columns = ", ".join(f"k.{c.strip()}" for c in _KEY_COLUMNS.split(","))

        def work(conn: psycopg.Connection) -> DeviceResolution:
            row = conn.execute(self._q(f"SELECT {columns}, d.account_id, d.status FROM {{s}}.device_keys k"
                                       f" JOIN {{s}}.devices d ON d.id = k.device_id WHERE {where}"), params).fetchone()
            if row is None:
                raise errors.NotFound("UNKNOWN_CREDENTIAL", "no phone has this credential")
            key, account_id, status = _key(row[:8]), row[8], row[9]
            if key.retired_at is not None or status == "REVOKED":
                raise errors.PermissionDenied("CREDENTIAL_REVOKED", "this phone credential was revoked or rotated away",
                                              device_id=key.device_id)
            now = self._now()
            if key.not_after < now:
                raise errors.FailedPrecondition("CREDENTIAL_EXPIRED", "the phone's certificate has expired; rotate "
                                                "its key", problem="certificate_expired")
            account = self._accounts.get_account(conn, account_id)
            assert account is not None
            return DeviceResolution(account_id, account.status, account.category_in_force(now), key.device_id,
                                    key.key_fingerprint)

        return self._transaction(work)

    def issuer_keys(self) -> list[credential_pb2.IssuerKey]:
        return [self.config.issuer.published()] if self.config.issuer is not None else []

    def rebuild_revocations(self) -> int:
        """Recompute the revocation set from PostgreSQL and swap it in; return its size."""

        def work(conn: psycopg.Connection) -> int:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
            rows = conn.execute(self._q("SELECT key_fingerprint FROM {s}.device_keys"
                                        " WHERE retired_at IS NOT NULL AND not_after >= %s"), (self._now(),)).fetchall()
            members = [revocation_member(bytes(r[0])) for r in rows]
            self.revocations.replace(members)
            return len(members)

        return self._transaction(work)


# --- gRPC -------------------------------------------------------------------------------------


class DeviceRpcs:
    """Mix into WalletServicer (before the generated base class) to serve RegisterDevice,
    RotateDevice, RevokeDevice, ListIssuerKeys and ResolveDevice; `attach_devices` gives it
    the service once the composition root built it."""

    _devices: Devices | None = None

    def attach_devices(self, devices: Devices) -> None:
        self._devices = devices

    def _device_service(self) -> Devices:
        if self._devices is None:
            raise errors.Unavailable("UNAVAILABLE", "the wallet is still starting")
        return self._devices

    def RegisterDevice(self, request: wallet_pb2.RegisterDeviceRequest,
                       context: grpc.ServicerContext) -> wallet_pb2.RegisterDeviceResponse:
        certified = self._device_service().register(device_id=request.device_id, account_id=request.account_id,
                                                    public_key=request.public_key, label=request.label)
        return wallet_pb2.RegisterDeviceResponse(certificate=certified.certificate, nfc_token=certified.nfc_token)

    def RotateDevice(self, request: wallet_pb2.RotateDeviceRequest,
                     context: grpc.ServicerContext) -> wallet_pb2.RotateDeviceResponse:
        certified = self._device_service().rotate(account_id=request.account_id, device_id=request.device_id,
                                                  public_key=request.public_key)
        return wallet_pb2.RotateDeviceResponse(certificate=certified.certificate, nfc_token=certified.nfc_token)

    def RevokeDevice(self, request: wallet_pb2.RevokeDeviceRequest,
                     context: grpc.ServicerContext) -> wallet_pb2.RevokeDeviceResponse:
        revoked_at = self._device_service().revoke(account_id=request.account_id, device_id=request.device_id,
                                                   note=request.note)
        return wallet_pb2.RevokeDeviceResponse(revoked_at=convert.timestamp(revoked_at))

    def ListIssuerKeys(self, request: wallet_pb2.ListIssuerKeysRequest,
                       context: grpc.ServicerContext) -> wallet_pb2.ListIssuerKeysResponse:
        return wallet_pb2.ListIssuerKeysResponse(keys=self._device_service().issuer_keys())

    def ResolveDevice(self, request: wallet_pb2.ResolveDeviceRequest,
                      context: grpc.ServicerContext) -> wallet_pb2.ResolveDeviceResponse:
        found = self._device_service().resolve(device_id=request.device_id, public_key=request.public_key,
                                               nfc_token=request.nfc_token)
        return wallet_pb2.ResolveDeviceResponse(account_id=found.account_id,
                                                status=convert.status_to_proto(found.status),
                                                rider_category=found.rider_category, device_id=found.device_id,
                                                key_fingerprint=found.key_fingerprint)


# --- wiring -----------------------------------------------------------------------------------


def device_config(settings: Any) -> DeviceConfig:
    seed = settings.device_issuer_seed
    issuer = dc.Issuer(dc.key_from_seed(bytes(seed))) if seed is not None else None
    return DeviceConfig(issuer=issuer, token_key=bytes(settings.card_hash_key),
                        certificate_ttl_s=settings.device_certificate_ttl_s,
                        devices_per_account_max=settings.devices_per_account_max)


def wire_devices(app: Any, pool: ConnectionPool, redis_client: Any, settings: Any, *,
                 clock: Callable[[], datetime] = utc_now) -> Devices:
    """Called by the wallet's composition root: builds the service on the ledger's pool,
    rebuilds the revocation set now and registers the worker that rebuilds it periodically."""
    schema = settings.schema
    devices = Devices(pool, schema=schema, config=device_config(settings),
                      revocations=RedisDenyList(redis_client, key=revocation_set_key(schema)), clock=clock)
    devices.rebuild_revocations()
    interval_s = settings.deny_list_rebuild_interval_s
    if interval_s:
        app.add_worker(_rebuild_worker(devices, interval_s))
    return devices


def _rebuild_worker(devices: Devices, interval_s: float) -> Callable[[threading.Event], None]:
    def rebuild_device_revocations(stop: threading.Event) -> None:
        while not stop.wait(interval_s):
            try:
                devices.rebuild_revocations()
            except Exception:  # noqa: BLE001 - keep rebuilding after transient failures
                log.exception("rebuilding the device revocation set failed; retrying next interval")

    return rebuild_device_revocations
