"""Phone credentials offline: certificates, QR codes, and every way a code is refused.

The gate's check needs nothing but the trusted issuer public keys and a clock; these tests
run it with the network switched off to prove it.
"""

from __future__ import annotations

import socket
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import segno

from citytap.common.v1 import credential_pb2, errors_pb2
from libs import device_credentials as dc
from libs import errors

NOW = datetime(2030, 3, 4, 8, 0, tzinfo=timezone.utc)
DEVICE_ID = str(uuid.UUID(int=1))
ACCOUNT_ID = str(uuid.UUID(int=2))
SKEW_S = 5


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline means offline: any attempt to open a socket fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("offline verification tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


class Phone:
    """A registered phone: its key, its certificate, and a way to make codes."""

    def __init__(self, issuer: dc.Issuer, *, device_id: str = DEVICE_ID, account_id: str = ACCOUNT_ID,
                 not_before: datetime = NOW - timedelta(days=1),
                 not_after: datetime = NOW + timedelta(days=90)) -> None:
        self.key = dc.generate_key()
        self.device_id = device_id
        self.certificate = dc.issue_certificate(issuer, device_id=device_id, account_id=account_id,
                                                public_key=dc.public_bytes(self.key), not_before=not_before,
                                                not_after=not_after)

    def code(self, issued_at: datetime = NOW, *, nonce: bytes | None = None, device_id: str | None = None) -> bytes:
        return dc.make_qr_payload(self.key, self.certificate, device_id=device_id or self.device_id,
                                  issued_at=issued_at, nonce=nonce)


@pytest.fixture()
def issuer() -> dc.Issuer:
    return dc.Issuer(dc.key_from_seed(bytes(range(32))))


@pytest.fixture()
def trusted(issuer: dc.Issuer) -> dc.TrustedIssuers:
    return dc.TrustedIssuers([issuer.published()])


def verify(payload: bytes, trusted: dc.TrustedIssuers, now: datetime = NOW) -> dc.VerifiedCode:
    return dc.verify_qr_payload(payload, trusted, now=now, validity_s=30, clock_skew_s=SKEW_S)


def refused(payload: bytes, trusted: dc.TrustedIssuers, now: datetime = NOW) -> errors.CityTapError:
    with pytest.raises(errors.CityTapError) as info:
        verify(payload, trusted, now)
    return info.value


# --- a good code ---------------------------------------------------------------------------------


def test_a_valid_code_verifies_offline_with_the_issuer_key_alone(issuer: dc.Issuer,
                                                                  trusted: dc.TrustedIssuers) -> None:
    phone = Phone(issuer)
    code = verify(phone.code(), trusted)
    assert (code.device_id, code.account_id, code.public_key) == (DEVICE_ID, ACCOUNT_ID, dc.public_bytes(phone.key))
    assert len(code.nonce) == dc.NONCE_BYTES and code.issued_at == NOW
    assert code.key_fingerprint == dc.key_fingerprint(dc.public_bytes(phone.key))
    assert code.issuer_key_id == issuer.key_id
    # Two codes of the same phone carry different nonces (each is accepted once online).
    assert verify(phone.code(), trusted).nonce != code.nonce


def test_the_payload_stays_small_enough_for_an_easy_qr_code(issuer: dc.Issuer) -> None:
    # UUID device and account ids, the longest the wallet hands out today.
    payload = Phone(issuer).code()
    assert len(payload) <= dc.QR_PAYLOAD_BYTES_BOUND
    qr = segno.make(payload, error="m", micro=False, boost_error=False)
    assert qr.version <= 14  # 73 x 73 modules at medium error correction: see phone_app/README.md


def test_an_issuer_key_survives_its_seed(issuer: dc.Issuer) -> None:
    again = dc.Issuer(dc.key_from_seed(dc.seed_of(issuer.key)))
    assert again.public_key == issuer.public_key and again.key_id == issuer.key_id


# --- clock skew at the edges ---------------------------------------------------------------------


def test_the_age_window_includes_both_edges(issuer: dc.Issuer, trusted: dc.TrustedIssuers) -> None:
    phone = Phone(issuer)
    verify(phone.code(NOW - timedelta(seconds=30 + SKEW_S)), trusted)  # oldest accepted
    verify(phone.code(NOW + timedelta(seconds=SKEW_S)), trusted)  # furthest ahead accepted
    old = refused(phone.code(NOW - timedelta(seconds=30 + SKEW_S + 1)), trusted)
    assert (old.reason, old.metadata["problem"]) == ("CREDENTIAL_EXPIRED", "code_expired")
    ahead = refused(phone.code(NOW + timedelta(seconds=SKEW_S + 1)), trusted)
    assert (ahead.reason, ahead.metadata["problem"]) == ("CREDENTIAL_EXPIRED", "code_from_the_future")
    # One microsecond past the edge is past it: the gate's clock is not rounded.
    late = refused(phone.code(NOW - timedelta(seconds=30 + SKEW_S)), trusted, NOW + timedelta(microseconds=1))
    assert late.reason == "CREDENTIAL_EXPIRED"


def test_no_skew_means_exactly_thirty_seconds(issuer: dc.Issuer, trusted: dc.TrustedIssuers) -> None:
    phone = Phone(issuer)
    dc.verify_qr_payload(phone.code(NOW - timedelta(seconds=30)), trusted, now=NOW, clock_skew_s=0)
    for issued_at in (NOW - timedelta(seconds=31), NOW + timedelta(seconds=1)):
        with pytest.raises(errors.FailedPrecondition, match="CREDENTIAL_EXPIRED"):
            dc.verify_qr_payload(phone.code(issued_at), trusted, now=NOW, clock_skew_s=0)


def test_the_certificate_window_allows_the_same_skew(issuer: dc.Issuer, trusted: dc.TrustedIssuers) -> None:
    phone = Phone(issuer, not_before=NOW - timedelta(days=90), not_after=NOW - timedelta(seconds=SKEW_S))
    verify(phone.code(), trusted)  # expired exactly skew ago: still inside
    expired = Phone(issuer, not_before=NOW - timedelta(days=90), not_after=NOW - timedelta(seconds=SKEW_S + 1))
    error = refused(expired.code(), trusted)
    assert (error.reason, error.metadata["problem"]) == ("CREDENTIAL_EXPIRED", "certificate_expired")
    early = Phone(issuer, not_before=NOW + timedelta(seconds=SKEW_S + 1), not_after=NOW + timedelta(days=1))
    error = refused(early.code(), trusted)
    assert (error.reason, error.metadata["problem"]) == ("CREDENTIAL_EXPIRED", "certificate_not_yet_valid")


def test_the_configured_validity_cannot_exceed_thirty_seconds(issuer: dc.Issuer, trusted: dc.TrustedIssuers) -> None:
    with pytest.raises(ValueError):
        dc.verify_qr_payload(Phone(issuer).code(), trusted, now=NOW, validity_s=31)
    assert dc.nonce_ttl_s(30, 5) == 41  # remembered just over the widest window a code passes


# --- every attack, each with its own reason ------------------------------------------------------


def test_a_tampered_claim_is_refused(issuer: dc.Issuer, trusted: dc.TrustedIssuers) -> None:
    phone = Phone(issuer)
    payload = credential_pb2.PhoneQrPayload.FromString(phone.code(NOW - timedelta(minutes=5)))
    claim = credential_pb2.PhoneQrClaim.FromString(payload.claim)
    claim.issued_at.seconds = int(NOW.timestamp())  # make an old code look fresh
    payload.claim = claim.SerializeToString()
    error = refused(payload.SerializeToString(), trusted)
    assert (type(error), error.reason, error.metadata["signed"]) == (errors.Unauthenticated, "INVALID_SIGNATURE",
                                                                     "claim")


def test_a_tampered_certificate_is_refused(issuer: dc.Issuer, trusted: dc.TrustedIssuers) -> None:
    phone = Phone(issuer)
    payload = credential_pb2.PhoneQrPayload.FromString(phone.code())
    body = credential_pb2.DeviceCertificateBody.FromString(payload.certificate.body)
    body.account_id = "someone-else"  # pay from another rider's account
    payload.certificate.body = body.SerializeToString()
    error = refused(payload.SerializeToString(), trusted)
    assert (error.reason, error.metadata["signed"]) == ("INVALID_SIGNATURE", "certificate")


def test_a_certificate_signed_by_an_untrusted_key_under_a_trusted_id_is_refused(
        issuer: dc.Issuer, trusted: dc.TrustedIssuers) -> None:
    forger = dc.Issuer(dc.generate_key())
    phone = Phone(forger)
    payload = credential_pb2.PhoneQrPayload.FromString(phone.code())
    payload.certificate.issuer_key_id = issuer.key_id
    assert refused(payload.SerializeToString(), trusted).reason == "INVALID_SIGNATURE"


def test_an_unknown_issuer_is_refused(trusted: dc.TrustedIssuers) -> None:
    phone = Phone(dc.Issuer(dc.generate_key()))
    error = refused(phone.code(), trusted)
    assert (type(error), error.reason) == (errors.Unauthenticated, "UNKNOWN_ISSUER")


def test_an_issuer_key_outside_its_trusted_period_is_refused(issuer: dc.Issuer) -> None:
    retired = dc.Issuer(issuer.key, valid_from=NOW - timedelta(days=400), valid_until=NOW - timedelta(days=1))
    trusted = dc.TrustedIssuers([retired.published()])
    assert refused(Phone(issuer).code(), trusted).reason == "UNKNOWN_ISSUER"


def test_another_devices_certificate_with_this_devices_claim_is_refused(issuer: dc.Issuer,
                                                                         trusted: dc.TrustedIssuers) -> None:
    mine = Phone(issuer, device_id=str(uuid.UUID(int=10)))
    theirs = Phone(issuer, device_id=str(uuid.UUID(int=11)), account_id=str(uuid.UUID(int=12)))
    # My key signs a fresh claim, wrapped in their certificate so their account pays.
    mine_payload = credential_pb2.PhoneQrPayload.FromString(mine.code())
    mine_payload.certificate.CopyFrom(theirs.certificate)
    error = refused(mine_payload.SerializeToString(), trusted)
    assert (type(error), error.reason) == (errors.Unauthenticated, "DEVICE_MISMATCH")
    # Claiming their device id with my key instead: the signature gives it away.
    forged = dc.make_qr_payload(mine.key, theirs.certificate, device_id=theirs.device_id, issued_at=NOW)
    assert refused(forged, trusted).reason == "INVALID_SIGNATURE"


@pytest.mark.parametrize("payload", [
    b"", b"\x00", b"\xff" * 40, b"not a protobuf at all", b"\x0a\x05hello", b"\x00" * (dc.QR_PAYLOAD_BYTES_MAX + 1),
])
def test_malformed_bytes_are_refused(payload: bytes, trusted: dc.TrustedIssuers) -> None:
    error = refused(payload, trusted)
    assert (type(error), error.reason, error.metadata["field"]) == (errors.InvalidArgument, "INVALID_ARGUMENT",
                                                                    "credential.phone_qr")


def test_a_payload_without_a_claim_or_with_a_short_nonce_is_malformed(issuer: dc.Issuer,
                                                                      trusted: dc.TrustedIssuers) -> None:
    phone = Phone(issuer)
    payload = credential_pb2.PhoneQrPayload.FromString(phone.code())
    payload.ClearField("claim")
    assert refused(payload.SerializeToString(), trusted).reason == "INVALID_ARGUMENT"
    assert refused(phone.code(nonce=b"\x01" * 15), trusted).reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_a_certified_key_of_the_wrong_length_is_refused(issuer: dc.Issuer, trusted: dc.TrustedIssuers,
                                                        length: int) -> None:
    # Only a broken issuer would sign this; the gate still refuses it by its own reason.
    body = credential_pb2.DeviceCertificateBody(device_id=DEVICE_ID, account_id=ACCOUNT_ID, public_key=b"\x07" * length)
    body.not_after.seconds = int((NOW + timedelta(days=1)).timestamp())
    certificate = dc.sign_certificate_body(issuer, body.SerializeToString())
    payload = dc.make_qr_payload(dc.generate_key(), certificate, device_id=DEVICE_ID, issued_at=NOW)
    error = refused(payload, trusted)
    assert (type(error), error.reason) == (errors.InvalidArgument, "INVALID_KEY")


def test_wrong_key_types_and_lengths_are_refused_when_issuing(issuer: dc.Issuer) -> None:
    for bad in (b"", b"\x01" * 31, b"\x01" * 33, "a" * 32, None):
        with pytest.raises(errors.InvalidArgument, match="INVALID_KEY"):
            dc.issue_certificate(issuer, device_id=DEVICE_ID, account_id=ACCOUNT_ID,
                                 public_key=bad,  # type: ignore[arg-type]
                                 not_before=NOW, not_after=NOW + timedelta(days=1))
    with pytest.raises(errors.InvalidArgument, match="INVALID_KEY"):
        dc.key_from_seed(b"\x01" * 16)
    with pytest.raises(errors.InvalidArgument, match="INVALID_KEY"):
        dc.TrustedIssuers([credential_pb2.IssuerKey(key_id="short", public_key=b"\x01" * 16)])


def test_a_short_signature_is_a_bad_signature(issuer: dc.Issuer, trusted: dc.TrustedIssuers) -> None:
    payload = credential_pb2.PhoneQrPayload.FromString(Phone(issuer).code())
    payload.signature = payload.signature[:63]
    assert refused(payload.SerializeToString(), trusted).reason == "INVALID_SIGNATURE"


def test_a_revoked_key_is_refused_by_the_online_check(issuer: dc.Issuer, trusted: dc.TrustedIssuers) -> None:
    phone = Phone(issuer)
    code = verify(phone.code(), trusted)
    dc.check_not_revoked(code, set())
    with pytest.raises(errors.PermissionDenied) as info:
        dc.check_not_revoked(code, {dc.key_fingerprint(dc.public_bytes(phone.key))})
    assert info.value.reason == "CREDENTIAL_REVOKED"


def test_each_attack_has_a_published_reason_of_its_own() -> None:
    """The reasons above are distinct, so a gate and support staff can tell the attacks apart."""
    reasons = {"INVALID_ARGUMENT", "UNKNOWN_ISSUER", "INVALID_SIGNATURE", "INVALID_KEY", "CREDENTIAL_EXPIRED",
               "DEVICE_MISMATCH", "CREDENTIAL_REVOKED", "CREDENTIAL_REPLAYED"}
    published = {name.removeprefix("ERROR_REASON_") for name in errors_pb2.ErrorReason.keys()}
    assert reasons <= published and len(reasons) == 8
