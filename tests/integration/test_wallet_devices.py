"""The wallet's phone RPCs over the wire, on a wallet built through its composition root over
a scratch schema of the test stack's PostgreSQL, with the stack's Redis: registration and its
idempotency, rotation, revocation, the revocation set, NFC tokens and issuer keys."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import grpc
import pytest
import redis

from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs import device_credentials as dc
from libs.grpc_client import connect
from services.wallet.devices import revocation_member, revocation_set_key
from tests.integration.fare_gate_support import FareGateStack, close_fare_gate_stack, open_fare_gate_stack
from tests.integration.wallet_support import rpc_error

W = wallet_pb2


@pytest.fixture(scope="module")
def stack() -> Iterator[FareGateStack]:
    opened = open_fare_gate_stack()
    yield opened
    close_fare_gate_stack(opened)


@pytest.fixture(scope="module")
def stub(stack: FareGateStack) -> Iterator[wallet_pb2_grpc.WalletServiceStub]:
    channel = connect(f"127.0.0.1:{stack.wallet_app.server.port}", default_timeout_s=10)
    yield wallet_pb2_grpc.WalletServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def revocations(stack: FareGateStack) -> Iterator[tuple[redis.Redis, str]]:
    client = redis.Redis.from_url(os.environ["CITYTAP_REDIS_URL"])
    yield client, revocation_set_key(stack.wallet_schema)
    client.close()


def register(stub, account_id: str, key: bytes | None = None, device_id: str | None = None, label: str = "phone"):
    request = W.RegisterDeviceRequest(device_id=device_id or str(uuid.uuid4()), account_id=account_id,
                                      public_key=key if key is not None else dc.public_bytes(dc.generate_key()),
                                      label=label)
    return request, stub.RegisterDevice(request)


def test_register_device_is_idempotent_on_the_device_id(stack: FareGateStack, stub) -> None:
    rider = stack.rider(0)
    request, first = register(stub, rider.account_id)
    assert stub.RegisterDevice(request) == first  # same certificate, same NFC token
    keys = stub.ListIssuerKeys(W.ListIssuerKeysRequest()).keys
    phone_key = dc.generate_key()
    code = dc.make_qr_payload(phone_key, first.certificate, device_id=request.device_id,
                              issued_at=datetime.now(timezone.utc))
    with pytest.raises(Exception, match="INVALID_SIGNATURE"):
        dc.verify_qr_payload(code, dc.TrustedIssuers(keys), now=datetime.now(timezone.utc))  # not the certified key
    assert first.certificate.issuer_key_id == keys[0].key_id
    # The same id with another payload is a conflict, and changes nothing.
    for changed in (dict(public_key=dc.public_bytes(dc.generate_key())), dict(label="another"),
                    dict(account_id=stack.rider(0).account_id)):
        other = W.RegisterDeviceRequest()
        other.CopyFrom(request)
        for name, value in changed.items():
            setattr(other, name, value)
        assert rpc_error(stub.RegisterDevice, other) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")
    assert stub.RegisterDevice(request) == first


def test_a_key_certified_once_is_never_certified_for_another_device(stack: FareGateStack, stub) -> None:
    rider = stack.rider(0)
    key = dc.public_bytes(dc.generate_key())
    register(stub, rider.account_id, key)
    request = W.RegisterDeviceRequest(device_id=str(uuid.uuid4()), account_id=rider.account_id, public_key=key)
    assert rpc_error(stub.RegisterDevice, request) == (grpc.StatusCode.ALREADY_EXISTS, "CREDENTIAL_IN_USE")


@pytest.mark.parametrize(("change", "status", "reason"), [
    (dict(public_key=b"\x01" * 31), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_KEY"),
    (dict(public_key=b""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_KEY"),
    (dict(public_key=b"\x01" * 64), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_KEY"),
    (dict(device_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (dict(account_id="nobody-at-all"), grpc.StatusCode.NOT_FOUND, "UNKNOWN_ACCOUNT"),
    (dict(label="x" * 65), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
])
def test_bad_registrations_are_refused_and_change_nothing(stack: FareGateStack, stub, change: dict,
                                                          status: grpc.StatusCode, reason: str) -> None:
    rider = stack.rider(0)
    request = W.RegisterDeviceRequest(device_id=str(uuid.uuid4()), account_id=rider.account_id,
                                      public_key=dc.public_bytes(dc.generate_key()))
    for name, value in change.items():
        setattr(request, name, value)
    before = stack.query("SELECT count(*) FROM {w}.devices")
    assert rpc_error(stub.RegisterDevice, request) == (status, reason)
    assert stack.query("SELECT count(*) FROM {w}.devices") == before


def test_blocked_accounts_and_too_many_phones_are_refused(stack: FareGateStack, stub) -> None:
    rider = stack.rider(0)
    for _ in range(5):
        register(stub, rider.account_id)
    request = W.RegisterDeviceRequest(device_id=str(uuid.uuid4()), account_id=rider.account_id,
                                      public_key=dc.public_bytes(dc.generate_key()))
    assert rpc_error(stub.RegisterDevice, request) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED")
    blocked = stack.rider(0)
    stack.block(blocked)
    request.account_id = blocked.account_id
    assert rpc_error(stub.RegisterDevice, request) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_BLOCKED")


def test_the_nfc_token_is_stored_only_as_a_keyed_hash(stack: FareGateStack, stub) -> None:
    rider = stack.rider(0)
    request, answer = register(stub, rider.account_id)
    assert answer.nfc_token.startswith("nfc_") and len(answer.nfc_token) == 36
    rows = stack.query("SELECT d::text, k::text FROM {w}.devices d JOIN {w}.device_keys k ON k.device_id = d.id"
                       " WHERE d.id = %s", (request.device_id,))
    assert rows and all(answer.nfc_token not in text and answer.nfc_token.encode().hex() not in text
                        for row in rows for text in row)
    found = stub.ResolveDevice(W.ResolveDeviceRequest(nfc_token=answer.nfc_token))
    assert (found.account_id, found.device_id, found.status) == (rider.account_id, request.device_id,
                                                                 W.ACCOUNT_STATUS_ACTIVE)
    assert found.key_fingerprint == dc.key_fingerprint(request.public_key)
    assert rpc_error(stub.ResolveDevice, W.ResolveDeviceRequest(nfc_token="nfc_" + "b" * 32)) == (
        grpc.StatusCode.NOT_FOUND, "UNKNOWN_CREDENTIAL")


def test_rotation_revokes_the_old_key_and_a_retry_returns_the_new_certificate(stack: FareGateStack, stub,
                                                                               revocations) -> None:
    client, key = revocations
    rider = stack.rider(0)
    request, first = register(stub, rider.account_id)
    new_key = dc.public_bytes(dc.generate_key())
    rotate = W.RotateDeviceRequest(account_id=rider.account_id, device_id=request.device_id, public_key=new_key)
    rotated = stub.RotateDevice(rotate)
    assert stub.RotateDevice(rotate) == rotated  # a retry with the key now in force
    assert rotated.nfc_token != first.nfc_token
    assert client.sismember(key, revocation_member(dc.key_fingerprint(request.public_key)))
    assert not client.sismember(key, revocation_member(dc.key_fingerprint(new_key)))
    old = W.ResolveDeviceRequest(device_id=request.device_id, public_key=request.public_key)
    assert rpc_error(stub.ResolveDevice, old) == (grpc.StatusCode.PERMISSION_DENIED, "CREDENTIAL_REVOKED")
    assert rpc_error(stub.ResolveDevice, W.ResolveDeviceRequest(nfc_token=first.nfc_token)) == (
        grpc.StatusCode.PERMISSION_DENIED, "CREDENTIAL_REVOKED")
    assert stub.ResolveDevice(W.ResolveDeviceRequest(nfc_token=rotated.nfc_token)).account_id == rider.account_id
    # The old key can never come back, on this device or another.
    rotate.public_key = request.public_key
    assert rpc_error(stub.RotateDevice, rotate) == (grpc.StatusCode.ALREADY_EXISTS, "CREDENTIAL_IN_USE")
    other_account = stack.rider(0)
    assert rpc_error(stub.RotateDevice, W.RotateDeviceRequest(
        account_id=other_account.account_id, device_id=request.device_id, public_key=new_key)) == (
        grpc.StatusCode.NOT_FOUND, "NOT_FOUND")


def test_revocation_is_idempotent_and_survives_a_rebuild_of_the_set(stack: FareGateStack, stub, revocations) -> None:
    client, key = revocations
    rider = stack.rider(0)
    request, answer = register(stub, rider.account_id)
    member = revocation_member(dc.key_fingerprint(request.public_key))
    revoke = W.RevokeDeviceRequest(account_id=rider.account_id, device_id=request.device_id, note="lost")
    first = stub.RevokeDevice(revoke)
    assert stub.RevokeDevice(revoke) == first
    assert client.sismember(key, member)
    client.srem(key, member)  # Redis lost it
    assert stack.wallet_app.devices.rebuild_revocations() >= 1
    assert client.sismember(key, member)
    rotate = W.RotateDeviceRequest(account_id=rider.account_id, device_id=request.device_id,
                                   public_key=dc.public_bytes(dc.generate_key()))
    assert rpc_error(stub.RotateDevice, rotate) == (grpc.StatusCode.PERMISSION_DENIED, "CREDENTIAL_REVOKED")
    assert rpc_error(stub.ResolveDevice, W.ResolveDeviceRequest(nfc_token=answer.nfc_token)) == (
        grpc.StatusCode.PERMISSION_DENIED, "CREDENTIAL_REVOKED")
    unknown = W.RevokeDeviceRequest(account_id=rider.account_id, device_id=str(uuid.uuid4()))
    assert rpc_error(stub.RevokeDevice, unknown) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
