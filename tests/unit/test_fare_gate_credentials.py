"""Phone and face credentials in the tap use case, over the in-memory fakes of
test_fare_gate_service.py: the face limit, unmatched faces, the nonce store's rules, and
issuer keys that refresh on their own. No I/O."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from libs import device_credentials as dc
from libs import errors
from services.fare_gate.credentials import (
    ISSUER_REFRESH_ON_MISS_S_MIN,
    NONCE_PREFIX,
    CredentialConfig,
    CredentialResolver,
    IssuerKeys,
    PhoneState,
)
from services.fare_gate.domain import CredentialKind, Decision, Direction, FaceProbe, Reason, TapInput
from services.fare_gate.face_client import MATCHED, NO_MATCH, FaceMatch
from services.fare_gate.fares import FareEngine
from services.fare_gate.hot_state import HotState
from services.fare_gate.taps import TapService
from services.fare_gate.wallet_client import DeviceResolution
from tests.unit.test_fare_gate_service import (  # noqa: F401 - `engine` is a fixture
    CONFIG,
    GATES,
    NOW,
    BrokenRedis,
    FakeRepository,
    FakeWallet,
    MemoryRedis,
    engine,
)

METRO_MAX = 500  # the test feed holds NT$5 on a metro entry
EMBEDDING = FaceProbe(embedding=(0.01,) * 128)


class NxRedis(MemoryRedis):
    """MemoryRedis that also honours SET NX, as the nonce store needs."""

    def set(self, key: str, value: str, ex: int | None = None, nx: bool = False) -> bool:  # type: ignore[override]
        assert ex is not None and ex > 0
        if nx and key in self.values:
            return False
        self.values[key] = value.encode()
        return True


@dataclass
class FaceWallet(FakeWallet):
    categories: dict[str, str] = field(default_factory=dict)
    devices: dict[str, DeviceResolution] = field(default_factory=dict)

    def account_category(self, account_id: str) -> tuple[str, bool]:
        return self.categories.get(account_id, ""), False

    def resolve_device(self, **lookup: Any) -> DeviceResolution | None:
        return self.devices.get(lookup.get("nfc_token") or lookup.get("device_id", ""))


class FakeFace:
    def __init__(self) -> None:
        self.faces: dict[tuple[float, ...], str] = {}
        self.calls = 0

    def match(self, probe: FaceProbe, *, reference_id: str) -> FaceMatch:
        self.calls += 1
        account = self.faces.get(probe.embedding)
        return FaceMatch(MATCHED, account) if account else FaceMatch(NO_MATCH, "")


def service(engine: FareEngine, *, face_limit_minor: int) -> tuple[TapService, FaceWallet, FakeRepository, FakeFace]:
    wallet, repo, face = FaceWallet(), FakeRepository(), FakeFace()
    hot = HotState(MemoryRedis(), cache_ttl_s=60)
    resolver = CredentialResolver(key=bytes(32), hot_state=hot, wallet=wallet, face=face,  # type: ignore[arg-type]
                                  config=CredentialConfig(face_limit_minor=face_limit_minor))
    tap_service = TapService(engine=engine, gates=GATES, repository=repo, wallet=wallet,  # type: ignore[arg-type]
                             hot_state=hot, credential_key=bytes(32), config=CONFIG, clock=lambda: NOW,
                             credentials=resolver)
    return tap_service, wallet, repo, face


def face_tap(gate: str, direction: Direction, probe: FaceProbe = EMBEDDING, minutes_ago: int = 0) -> TapInput:
    return TapInput(str(uuid.uuid4()), gate, "", int(direction), NOW - timedelta(minutes=minutes_ago),
                    CredentialKind.FACE, b"", "", face=probe)


def test_a_face_alone_may_not_start_a_journey_above_the_face_limit(engine: FareEngine) -> None:
    taps, wallet, repo, face = service(engine, face_limit_minor=METRO_MAX - 1)
    wallet.balances["rider-f"] = 10_000
    face.faces[EMBEDDING.embedding] = "rider-f"
    with pytest.raises(errors.LimitExceeded) as info:
        taps.tap(face_tap("A-G1", Direction.ENTRY))
    assert info.value.reason == "LIMIT_EXCEEDED"
    assert wallet.holds == {} and repo.db.events == []  # nothing held, nothing recorded


def test_a_face_within_the_limit_pays_and_its_exit_is_never_limited(engine: FareEngine) -> None:
    taps, wallet, repo, face = service(engine, face_limit_minor=METRO_MAX)
    wallet.balances["rider-f"] = 10_000
    face.faces[EMBEDDING.embedding] = "rider-f"
    entry = taps.tap(face_tap("A-G1", Direction.ENTRY, minutes_ago=10))
    assert (entry.decision, entry.amount_held_minor) == (Decision.OPEN, METRO_MAX)
    exit_ = taps.tap(face_tap("C-G1", Direction.EXIT))
    assert (exit_.decision, exit_.journey_id) == (Decision.OPEN, entry.journey_id)
    assert face.calls == 2


def test_an_unmatched_face_is_recorded_as_an_unknown_credential(engine: FareEngine) -> None:
    taps, wallet, repo, _ = service(engine, face_limit_minor=METRO_MAX)
    outcome = taps.tap(face_tap("A-G1", Direction.ENTRY, FaceProbe(embedding=(0.5,) * 128)))
    assert (outcome.decision, outcome.reason) == (Decision.DENY, Reason.DENIED_UNKNOWN_CREDENTIAL)
    assert wallet.holds == {}


def test_a_gate_without_phone_or_face_set_up_refuses_them_as_unsupported(engine: FareEngine) -> None:
    wallet, repo = FaceWallet(), FakeRepository()
    taps = TapService(engine=engine, gates=GATES, repository=repo, wallet=wallet,  # type: ignore[arg-type]
                      hot_state=HotState(MemoryRedis(), cache_ttl_s=60), credential_key=bytes(32), config=CONFIG,
                      clock=lambda: NOW)
    for raw in (face_tap("A-G1", Direction.ENTRY),
                TapInput(str(uuid.uuid4()), "A-G1", "", 1, NOW, CredentialKind.PHONE_QR, b"", "", phone_qr=b"\x01"),
                TapInput(str(uuid.uuid4()), "A-G1", "", 1, NOW, CredentialKind.NFC, b"", "", nfc_token="nfc_x")):
        with pytest.raises(errors.InvalidArgument) as info:
            taps.tap(raw)
        assert info.value.reason == "UNSUPPORTED_CREDENTIAL"
    assert repo.db.events == []


def test_a_nonce_is_accepted_once_except_for_a_retry_of_the_same_tap() -> None:
    memory = NxRedis()
    phone = PhoneState(memory, cache_ttl_s=60)
    nonce = bytes(range(16))
    assert phone.claim_nonce(nonce, "tap-1", ttl_s=41)
    assert phone.claim_nonce(nonce, "tap-1", ttl_s=41)  # the gate retried
    assert not phone.claim_nonce(nonce, "tap-2", ttl_s=41)  # someone else replays it
    assert list(memory.values) == [NONCE_PREFIX + nonce.hex()]
    with pytest.raises(errors.Unavailable):  # fails closed: no answer, no entry
        PhoneState(BrokenRedis(), cache_ttl_s=60).claim_nonce(nonce, "tap-3", ttl_s=41)
    assert CredentialConfig(qr_validity_s=30, qr_clock_skew_s=5).nonce_ttl_s == 41


def test_a_cached_phone_resolution_is_used_only_for_the_key_it_was_made_for() -> None:
    phone = PhoneState(NxRedis(), cache_ttl_s=60)
    credential, old, new = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    phone.cache(credential, "rider-p", "student", old)
    assert phone.cached(credential) == ("rider-p", "student", old)
    memory = NxRedis()
    memory.sets["citytap:wallet:device-revocations"] = {f"key:{old.hex()}".encode()}
    listed = PhoneState(memory, cache_ttl_s=60)
    assert listed.key_revoked(old) and not listed.key_revoked(new)
    assert PhoneState(BrokenRedis(), cache_ttl_s=60).key_revoked(old) is False  # the wallet decides then


def test_issuer_keys_refresh_on_schedule_and_on_an_unknown_key_but_not_too_often() -> None:
    issuer = dc.Issuer(dc.generate_key())
    fetched: list[int] = []
    clock = [0.0]
    outage = [False]

    def fetch() -> list:
        if outage[0]:
            raise errors.Unavailable("UNAVAILABLE", "wallet down")
        fetched.append(1)
        return [issuer.published()]

    keys = IssuerKeys(fetch, refresh_s=300, monotonic=lambda: clock[0])
    assert issuer.key_id in keys.trusted() and len(fetched) == 1
    keys.trusted(force=True)
    assert len(fetched) == 1  # an unknown key right after a refresh does not hammer the wallet
    clock[0] = ISSUER_REFRESH_ON_MISS_S_MIN
    keys.trusted(force=True)
    assert len(fetched) == 2
    clock[0] += 300
    outage[0] = True
    assert issuer.key_id in keys.trusted()  # the wallet is down: the last keys still verify codes
    outage[0] = False
    keys.trusted()
    assert len(fetched) == 2  # and the next taps do not wait on the wallet again at once
    clock[0] += ISSUER_REFRESH_ON_MISS_S_MIN
    keys.trusted()
    assert len(fetched) == 3


def test_phone_and_face_settings_have_safe_defaults_and_refuse_long_lived_codes() -> None:
    from libs.settings import SettingsError, load
    from services.fare_gate.settings import Settings
    from tests.unit.test_fare_gate_setup import BASE

    settings = load(Settings, BASE)
    assert (settings.qr_validity_s, settings.qr_clock_skew_s, settings.face_address) == (30, 5, None)
    assert settings.device_revocations_key == "citytap:wallet:device-revocations"
    with pytest.raises(SettingsError, match="CITYTAP_FARE_GATE_QR_VALIDITY_S"):
        load(Settings, {**BASE, "CITYTAP_FARE_GATE_QR_VALIDITY_S": "31"})
    with pytest.raises(SettingsError, match="CITYTAP_FARE_GATE_FACE_LIMIT_MINOR"):
        load(Settings, {**BASE, "CITYTAP_FARE_GATE_FACE_LIMIT_MINOR": "-1"})


def test_the_wallet_issuer_seed_is_optional_exact_and_never_printed() -> None:
    from libs.settings import SettingsError, load
    from services.wallet.devices import device_config
    from services.wallet.settings import Settings
    from tests.unit.test_wallet_settings import BASE

    assert load(Settings, BASE).device_issuer_seed is None
    assert device_config(load(Settings, BASE)).issuer is None
    seed = "ab" * 32
    settings = load(Settings, {**BASE, "CITYTAP_WALLET_DEVICE_ISSUER_SEED": seed})
    assert seed not in repr(settings) and seed not in str(settings.device_issuer_seed)
    issuer = device_config(settings).issuer
    assert issuer is not None and issuer.public_key == dc.public_bytes(dc.key_from_seed(bytes.fromhex(seed)))
    with pytest.raises(SettingsError, match="CITYTAP_WALLET_DEVICE_ISSUER_SEED"):
        load(Settings, {**BASE, "CITYTAP_WALLET_DEVICE_ISSUER_SEED": "ab" * 33})
