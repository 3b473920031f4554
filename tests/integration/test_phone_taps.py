"""Phones at the gate against the real stack: a wallet and a fare gate built through their
composition roots over the test stack's PostgreSQL, Redis and Kafka, talking gRPC; phones
emulated by phone_app, registered through the wallet's RegisterDevice.

Every attack on a phone code is refused with its own reason and leaves every table and
balance exactly as it was. Fares as in test_fare_gate_taps.py: metro maximum NT$65 held on
entry, Central - University NT$20.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent import futures
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from citytap.common.v1 import credential_pb2
from citytap.face.v1 import face_pb2_grpc
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs import device_credentials as dc
from libs import qr_nonces
from libs.grpc_client import connect
from libs.redis_client import create_redis
from phone_app.device import Phone
from tests.integration.fare_gate_support import (
    DENY,
    ENTRY,
    EXIT,
    OPEN,
    FareGateStack,
    R,
    close_fare_gate_stack,
    open_fare_gate_stack,
)

METRO_MAX = 6500
CEN_UNI = 2000
FACE_LIMIT_MINOR = 5000


def now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def face_server() -> Iterator[int]:
    """A face service that does not serve Match yet: the generated base class, which answers
    UNIMPLEMENTED, exactly what a face service without matching says."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    face_pb2_grpc.add_FaceServiceServicer_to_server(face_pb2_grpc.FaceServiceServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.fixture(scope="module")
def stack(face_server: int) -> Iterator[FareGateStack]:
    opened = open_fare_gate_stack(CITYTAP_FACE_ADDRESS=f"127.0.0.1:{face_server}",
                                  CITYTAP_FARE_GATE_FACE_LIMIT_MINOR=str(FACE_LIMIT_MINOR))
    yield opened
    close_fare_gate_stack(opened)


@pytest.fixture(scope="module")
def wallet(stack: FareGateStack) -> Iterator[wallet_pb2_grpc.WalletServiceStub]:
    channel = connect(f"127.0.0.1:{stack.wallet_app.server.port}", default_timeout_s=10)
    yield wallet_pb2_grpc.WalletServiceStub(channel)
    channel.close()


def phone_of(stack: FareGateStack, wallet: wallet_pb2_grpc.WalletServiceStub, funded_minor: int = 50_000
             ) -> tuple[Phone, object]:
    rider = stack.rider(funded_minor)
    phone = Phone.new(rider.account_id, label="test phone")
    phone.register(wallet)
    return phone, rider


def qr_tap(stack: FareGateStack, payload: bytes, gate: str, direction: int, at: datetime | None = None,
           tap_id: str | None = None):
    request = stack.request(None, gate, direction, at, tap_id=tap_id)
    request.credential.CopyFrom(credential_pb2.Credential(phone_qr=payload))
    return request


def nfc_tap(stack: FareGateStack, token: str, gate: str, direction: int, at: datetime | None = None):
    request = stack.request(None, gate, direction, at)
    request.credential.CopyFrom(credential_pb2.Credential(nfc_token=token))
    return request


def nonce_of(payload: bytes) -> bytes:
    return credential_pb2.PhoneQrClaim.FromString(credential_pb2.PhoneQrPayload.FromString(payload).claim).nonce


def refused_unchanged(stack: FareGateStack, request) -> tuple[grpc.StatusCode, str | None, str]:
    before = stack.snapshot()
    result = stack.refused(request)
    assert stack.snapshot() == before  # nothing recorded, held or charged
    return result


# --- paying by phone -----------------------------------------------------------------------------


def test_a_phone_pays_a_journey_with_qr_codes(stack: FareGateStack, wallet) -> None:
    phone, rider = phone_of(stack, wallet)
    entry = stack.stub.Tap(qr_tap(stack, phone.qr_payload(), "CEN-G1", ENTRY, now() - timedelta(minutes=15)))
    assert (entry.decision, entry.reason, entry.amount_held.amount_minor) == (OPEN, R.TAP_REASON_OK, METRO_MAX)
    exit_ = stack.stub.Tap(qr_tap(stack, phone.qr_payload(), "UNI-G1", EXIT))
    assert (exit_.decision, exit_.fare_charged.amount_minor, exit_.journey_id) == (OPEN, CEN_UNI, entry.journey_id)
    assert stack.balance(rider) == (50_000 - CEN_UNI, 0)
    kinds = stack.query("SELECT DISTINCT credential_kind FROM {fg}.taps WHERE account_id = %s", (rider.account_id,))
    assert kinds == [(credential_pb2.CREDENTIAL_KIND_PHONE_QR,)]


def test_a_code_a_till_has_taken_is_refused_at_the_gate(stack: FareGateStack, wallet, redis_url: str) -> None:
    """The nonce claim is the network's (libs.qr_nonces), shared with the merchant service:
    a code that paid at a till within its 30 s does not open a gate too."""
    phone, _ = phone_of(stack, wallet)
    payload = phone.qr_payload()
    nonce = nonce_of(payload)
    client = create_redis(redis_url)
    try:
        assert qr_nonces.claim(client, nonce, "merchant:charge:paid-at-a-till", ttl_s=40)  # as a till's charge does
        code, reason, _ = refused_unchanged(stack, qr_tap(stack, payload, "CEN-G1", ENTRY))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CREDENTIAL_REPLAYED")
        # And the other way round: the code of a gate's tap is the gate's, not a till's.
        other = phone.qr_payload()
        assert stack.stub.Tap(qr_tap(stack, other, "CEN-G1", ENTRY)).decision == OPEN
        assert not qr_nonces.claim(client, nonce_of(other), "merchant:charge:x", ttl_s=40)
    finally:
        client.close()


def test_a_retried_tap_may_present_its_code_again_but_another_tap_may_not(stack: FareGateStack, wallet) -> None:
    phone, rider = phone_of(stack, wallet)
    payload = phone.qr_payload()
    request = qr_tap(stack, payload, "CEN-G1", ENTRY)
    first = stack.stub.Tap(request)
    assert first.decision == OPEN
    assert stack.stub.Tap(request) == first  # the gate's retry: same tap id, same code
    code, reason, _ = refused_unchanged(stack, qr_tap(stack, payload, "CEN-G2", ENTRY))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CREDENTIAL_REPLAYED")
    assert stack.balance(rider) == (50_000, METRO_MAX)  # held once


def test_every_attack_on_a_phone_code_is_refused_with_its_reason(stack: FareGateStack, wallet) -> None:
    phone, rider = phone_of(stack, wallet)
    other, _ = phone_of(stack, wallet)
    issuer = stack.wallet_app.devices.config.issuer  # the wallet's own issuer key signs this broken body
    t = now()

    payload = credential_pb2.PhoneQrPayload.FromString(phone.qr_payload(t - timedelta(minutes=3)))
    claim = credential_pb2.PhoneQrClaim.FromString(payload.claim)
    claim.issued_at.seconds = int(t.timestamp())
    payload.claim = claim.SerializeToString()
    tampered_claim = payload.SerializeToString()

    payload = credential_pb2.PhoneQrPayload.FromString(phone.qr_payload())
    body = credential_pb2.DeviceCertificateBody.FromString(payload.certificate.body)
    body.account_id = other.account_id
    payload.certificate.body = body.SerializeToString()
    tampered_certificate = payload.SerializeToString()

    stranger = Phone.new(rider.account_id)
    stranger.certificate = dc.issue_certificate(dc.Issuer(dc.generate_key()), device_id=stranger.device_id,
                                                account_id=rider.account_id, public_key=stranger.public_key,
                                                not_before=t - timedelta(days=1), not_after=t + timedelta(days=1))

    mixed = credential_pb2.PhoneQrPayload.FromString(phone.qr_payload())
    mixed.certificate.CopyFrom(other.certificate)  # their certificate, my code: their account would pay

    short_key = credential_pb2.DeviceCertificateBody(device_id=phone.device_id, account_id=rider.account_id,
                                                     public_key=b"\x01" * 31)
    short_key.not_after.seconds = int((t + timedelta(days=1)).timestamp())
    wrong_length = dc.make_qr_payload(phone.key, dc.sign_certificate_body(issuer, short_key.SerializeToString()),
                                      device_id=phone.device_id, issued_at=t)

    cases = {
        "expired": (phone.qr_payload(t - timedelta(seconds=60)), grpc.StatusCode.FAILED_PRECONDITION,
                    "CREDENTIAL_EXPIRED"),
        "future-dated beyond skew": (phone.qr_payload(t + timedelta(seconds=60)), grpc.StatusCode.FAILED_PRECONDITION,
                                     "CREDENTIAL_EXPIRED"),
        "tampered claim": (tampered_claim, grpc.StatusCode.UNAUTHENTICATED, "INVALID_SIGNATURE"),
        "tampered certificate": (tampered_certificate, grpc.StatusCode.UNAUTHENTICATED, "INVALID_SIGNATURE"),
        "unknown issuer": (stranger.qr_payload(), grpc.StatusCode.UNAUTHENTICATED, "UNKNOWN_ISSUER"),
        "another device's certificate": (mixed.SerializeToString(), grpc.StatusCode.UNAUTHENTICATED,
                                         "DEVICE_MISMATCH"),
        "malformed bytes": (b"\x0a\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        "wrong key length": (wrong_length, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_KEY"),
    }
    for name, (payload_bytes, status, reason) in cases.items():
        got_status, got_reason, details = refused_unchanged(stack, qr_tap(stack, payload_bytes, "CEN-G1", ENTRY))
        assert (got_status, got_reason) == (status, reason), (name, details)
    assert stack.balance(rider) == (50_000, 0)
    # After all that the phone still pays: no attack used up anything of the rider's.
    assert stack.stub.Tap(qr_tap(stack, phone.qr_payload(), "CEN-G1", ENTRY)).decision == OPEN


def test_a_revoked_phone_pays_neither_by_qr_nor_by_nfc(stack: FareGateStack, wallet) -> None:
    phone, rider = phone_of(stack, wallet)
    # Used once, so the NFC resolution is in the gate's cache when the revocation lands.
    assert stack.stub.Tap(nfc_tap(stack, phone.nfc_token, "CEN-G1", ENTRY, now() - timedelta(minutes=10))
                          ).decision == OPEN
    assert stack.stub.Tap(nfc_tap(stack, phone.nfc_token, "UNI-G1", EXIT)).decision == OPEN
    wallet.RevokeDevice(wallet_pb2.RevokeDeviceRequest(account_id=rider.account_id, device_id=phone.device_id,
                                                       note="reported stolen"))
    for request in (qr_tap(stack, phone.qr_payload(), "CEN-G1", ENTRY),
                    nfc_tap(stack, phone.nfc_token, "CEN-G1", ENTRY)):
        code, reason, _ = refused_unchanged(stack, request)
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CREDENTIAL_REVOKED")
    assert stack.balance(rider) == (50_000 - CEN_UNI, 0)


def test_after_rotation_only_the_new_key_and_token_pay(stack: FareGateStack, wallet) -> None:
    phone, rider = phone_of(stack, wallet)
    old_key, old_certificate, old_token = phone.key, phone.certificate, phone.nfc_token
    old_code = phone.qr_payload()
    assert stack.stub.Tap(nfc_tap(stack, old_token, "CEN-G1", ENTRY, now() - timedelta(minutes=10))).decision == OPEN
    assert stack.stub.Tap(nfc_tap(stack, old_token, "UNI-G1", EXIT)).decision == OPEN
    phone.rotate(wallet)
    assert phone.nfc_token != old_token and phone.key is not old_key
    stale = Phone(phone.device_id, rider.account_id, old_key, certificate=old_certificate)
    for request in (qr_tap(stack, old_code, "CEN-G1", ENTRY), qr_tap(stack, stale.qr_payload(), "CEN-G1", ENTRY),
                    nfc_tap(stack, old_token, "CEN-G1", ENTRY)):
        code, reason, _ = refused_unchanged(stack, request)
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CREDENTIAL_REVOKED")
    entry = stack.stub.Tap(qr_tap(stack, phone.qr_payload(), "CEN-G1", ENTRY, now() - timedelta(minutes=5)))
    assert entry.decision == OPEN
    assert stack.stub.Tap(nfc_tap(stack, phone.nfc_token, "UNI-G1", EXIT)).fare_charged.amount_minor == CEN_UNI


def test_an_nfc_token_taps_like_a_card_and_an_unknown_one_is_denied(stack: FareGateStack, wallet) -> None:
    phone, rider = phone_of(stack, wallet)
    entry = stack.stub.Tap(nfc_tap(stack, phone.nfc_token, "CEN-G1", ENTRY, now() - timedelta(minutes=10)))
    assert (entry.decision, entry.amount_held.amount_minor) == (OPEN, METRO_MAX)
    # The same token again at once: a double tap, recognized by the token's pseudonym.
    again = stack.stub.Tap(nfc_tap(stack, phone.nfc_token, "CEN-G1", ENTRY, now() - timedelta(minutes=10)))
    assert (again.decision, again.reason) == (OPEN, R.TAP_REASON_OK_DOUBLE_TAP)
    assert stack.stub.Tap(nfc_tap(stack, phone.nfc_token, "UNI-G1", EXIT)).fare_charged.amount_minor == CEN_UNI
    assert stack.balance(rider) == (50_000 - CEN_UNI, 0)
    unknown = stack.stub.Tap(nfc_tap(stack, "nfc_" + "a" * 32, "CEN-G1", ENTRY))
    assert (unknown.decision, unknown.reason) == (DENY, R.TAP_REASON_DENIED_UNKNOWN_CREDENTIAL)


def test_a_phone_on_a_blocked_account_is_denied(stack: FareGateStack, wallet) -> None:
    phone, rider = phone_of(stack, wallet)
    stack.block(rider)
    answer = stack.stub.Tap(qr_tap(stack, phone.qr_payload(), "CEN-G1", ENTRY))
    assert (answer.decision, answer.reason) == (DENY, R.TAP_REASON_DENIED_BLOCKED)
    assert stack.balance(rider) == (50_000, 0)


def test_face_taps_are_refused_while_the_face_service_does_not_match(stack: FareGateStack) -> None:
    request = stack.request(None, "CEN-G1", ENTRY)
    request.credential.CopyFrom(credential_pb2.Credential(
        face_embedding=credential_pb2.FaceEmbedding(values=[0.01] * 128)))
    code, reason, details = refused_unchanged(stack, request)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_CREDENTIAL"), details


def test_offline_verification_needs_only_the_published_issuer_keys(stack: FareGateStack, wallet) -> None:
    phone, rider = phone_of(stack, wallet)
    keys = wallet.ListIssuerKeys(wallet_pb2.ListIssuerKeysRequest()).keys
    assert [k.public_key for k in keys] == [stack.wallet_app.devices.config.issuer.public_key]
    code = dc.verify_qr_payload(phone.qr_payload(), dc.TrustedIssuers(keys), now=now())
    assert (code.device_id, code.account_id) == (phone.device_id, rider.account_id)
    assert uuid.UUID(code.device_id)


# --- the phone-app CLI and the gate emulator's phone options ---------------------------------------


def test_the_phone_app_cli_registers_renders_and_the_emulator_taps_with_it(stack: FareGateStack, tmp_path,
                                                                           capsys) -> None:
    from phone_app.__main__ import main as phone_app
    from services.fare_gate.emulator.cli import main as emulator

    rider = stack.rider(50_000)
    state, png = tmp_path / "phone.json", tmp_path / "qr.png"
    wallet_address = f"127.0.0.1:{stack.wallet_app.server.port}"
    gate = ["--address", f"127.0.0.1:{stack.fare_gate_app.server.port}", "--json"]
    assert phone_app(["register", "--account", rider.account_id, "--state", str(state),
                      "--wallet-address", wallet_address]) == 0
    assert state.stat().st_mode & 0o077 == 0  # the private key is the rider's alone
    assert phone_app(["register", "--account", rider.account_id, "--state", str(state),
                      "--wallet-address", wallet_address]) == 0  # a retry reuses the kept key
    capsys.readouterr()
    assert phone_app(["qr", "--state", str(state), "--png", str(png)]) == 0
    payload_hex = capsys.readouterr().out.strip()
    assert png.read_bytes().startswith(b"\x89PNG") and len(bytes.fromhex(payload_hex)) <= dc.QR_PAYLOAD_BYTES_BOUND
    at = (now() - timedelta(minutes=10)).isoformat()
    assert emulator(["tap", *gate, "--gate", "CEN-G1", "--stop", "CEN", "--direction", "entry",
                     "--phone-qr", payload_hex, "--at", at]) == 0
    capsys.readouterr()
    assert phone_app(["nfc", "--state", str(state)]) == 0
    token = capsys.readouterr().out.strip()
    assert emulator(["tap", *gate, "--gate", "UNI-G1", "--stop", "UNI", "--direction", "exit", "--nfc", token]) == 0
    assert '"fare_minor": 2000' in capsys.readouterr().out
    # A fresh code straight from the phone's state file, after rotating its key.
    assert phone_app(["rotate", "--state", str(state), "--wallet-address", wallet_address]) == 0
    assert emulator(["tap", *gate, "--gate", "CEN-G1", "--stop", "CEN", "--direction", "entry",
                     "--phone-qr", str(state)]) == 0
    assert stack.balance(rider) == (50_000 - CEN_UNI, METRO_MAX)
    # The old token no longer pays: the emulator reports the refusal (exit status 2).
    assert emulator(["tap", *gate, "--gate", "CEN-G2", "--stop", "CEN", "--direction", "entry", "--nfc", token]) == 2
    assert "CREDENTIAL_REVOKED" in capsys.readouterr().err


def test_the_phone_app_cli_names_the_problem_with_exit_status_2(tmp_path, capsys) -> None:
    from phone_app.__main__ import main as phone_app

    missing = tmp_path / "nobody.json"
    assert phone_app(["qr", "--state", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert phone_app(["nfc", "--state", str(broken)]) == 2
    assert "not a phone state file" in capsys.readouterr().err
