"""Till charges and refunds against the real stack: the split recorded in the ledger as one
linked batch, limits at their edges, idempotency, partial and concurrent refunds, refusals
that change nothing, and a seeded run that checks the ledger after every step."""

from __future__ import annotations

import random
import time
from fractions import Fraction
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition

from citytap.common.v1 import credential_pb2
from citytap.merchant.v1 import events_pb2, merchant_pb2
from libs import device_credentials as dc
from libs import errors, qr_nonces
from libs.grpc_client import connect
from libs.grpc_server import create_server
from libs.protos import money_pb
from libs.redis_client import create_redis
from libs.splits import Term
from services.fare_gate.credentials import PhoneState
from services.merchant.contracts import ContractCache
from services.settlement.servicer import SettlementServicer
from services.settlement.servicer import registration as settlement_registration
from services.wallet.domain import BlockReason
from tests.integration.merchant_support import (  # noqa: F401 - the fixture is used by name
    CATEGORY,
    CITY_BP,
    PARTY_CITY,
    PARTY_MERCHANT,
    PARTY_PLATFORM,
    PLATFORM_BP,
    PLATFORM_FEE_MINOR,
    START,
    TAIPEI,
    MerchantStack,
    bearer,
    card_credential,
    expect_error,
    merchant_stack,
    party_totals,
)

pytestmark = pytest.mark.integration

CITY_ACCOUNT = "system:city-revenue:TWD"
PLATFORM_ACCOUNT = "system:platform-fees:TWD"


def expected_split(amount: int) -> tuple[int, int, int]:
    """(city, platform, merchant) under the default contract, computed independently: the fixed
    fee first, then exact shares of the rest, the leftover units to the largest fractions."""
    fee = min(PLATFORM_FEE_MINOR, amount)
    left = amount - fee
    exact = [Fraction(left * bp, 10_000) for bp in (CITY_BP, PLATFORM_BP, 10_000 - CITY_BP - PLATFORM_BP)]
    parts = [int(e) for e in exact]
    by_fraction = sorted(range(3), key=lambda i: (-(exact[i] - parts[i]), i))
    for index in by_fraction[:left - sum(parts)]:
        parts[index] += 1
    return parts[0], parts[1] + fee, parts[2]


@pytest.fixture()
def shop(merchant_stack: MerchantStack) -> tuple[str, str]:
    """A verified merchant and a key that may charge, read and refund."""
    merchant = merchant_stack.verified_merchant()
    merchant_stack.clock.set(START)
    return merchant.merchant_id, merchant_stack.key(merchant.merchant_id, "charges:write", "charges:read",
                                                    "refunds:write")


def assert_ledger_sound(stack: MerchantStack) -> None:
    assert stack.wallet.invariant_violations() == []
    unbalanced = stack.wallet.query("SELECT t.id FROM {s}.transfers t JOIN {s}.transfer_splits s ON s.transfer_id = t.id"
                                    " GROUP BY t.id, t.amount_minor HAVING sum(s.amount_minor) <> t.amount_minor")
    assert unbalanced == []


def test_a_charge_records_its_split_in_the_ledger_as_one_batch(merchant_stack: MerchantStack,
                                                               shop: tuple[str, str]) -> None:
    stack, (merchant_id, secret) = merchant_stack, shop
    rider, uid = stack.rider()
    city_before, platform_before = stack.balance(CITY_ACCOUNT), stack.balance(PLATFORM_ACCOUNT)
    charge = stack.charge(secret, merchant_id, uid, 12_345)
    city, platform, merchant_share = expected_split(12_345)
    assert party_totals(charge.splits) == {(PARTY_CITY, "taipei-city"): city, (PARTY_PLATFORM, "citytap"): platform,
                                           (PARTY_MERCHANT, merchant_id): merchant_share}
    assert {(s.contract_id, s.contract_version) for s in charge.splits} == {(stack.default_contract_id, 1)}
    assert charge.transfer_id == f"mch:{charge.charge_id}"
    assert charge.credential_kind == credential_pb2.CREDENTIAL_KIND_CARD
    payable = f"merchant:{merchant_id}"
    assert stack.transfers(charge.transfer_id) == [
        (charge.transfer_id, rider, payable, 12_345, "MERCHANT_PAYMENT", None),
        (f"{charge.transfer_id}:1", payable, CITY_ACCOUNT, city, "FEE", None),
        (f"{charge.transfer_id}:2", payable, PLATFORM_ACCOUNT, platform, "FEE", None),
    ]
    lines = stack.wallet.query("SELECT party, party_id, amount_minor FROM {s}.transfer_splits WHERE transfer_id = %s"
                               " ORDER BY line_no", (charge.transfer_id,))
    assert lines == [("CITY", "taipei-city", city), ("PLATFORM", "citytap", platform),
                     ("MERCHANT", merchant_id, merchant_share)]
    assert stack.balance(rider) == 500_000 - 12_345
    assert stack.balance(payable) == merchant_share
    assert (stack.balance(CITY_ACCOUNT) - city_before, stack.balance(PLATFORM_ACCOUNT) - platform_before) == \
        (city, platform)
    # All three transfers went in one wallet batch: one TransferPosted event carries them.
    posted = [e.transfer_posted for e in stack.wallet.events() if e.WhichOneof("payload") == "transfer_posted"
              and any(t.transfer_id == charge.transfer_id for t in e.transfer_posted.transfers)]
    assert len(posted) == 1 and len(posted[0].transfers) == 3
    event = [e for e in stack.events(merchant_id) if e.WhichOneof("payload") == "charge_succeeded"]
    assert len(event) == 1 and event[0].charge_succeeded.charge == charge
    assert_ledger_sound(stack)


def test_a_retried_charge_returns_the_original_and_moves_money_once(merchant_stack: MerchantStack,
                                                                    shop: tuple[str, str]) -> None:
    stack, (merchant_id, secret) = merchant_stack, shop
    rider, uid = stack.rider()
    first = stack.charge(secret, merchant_id, uid, 4_200, order_id="order-42")
    with ThreadPoolExecutor(3) as pool:
        retries = list(pool.map(lambda _: stack.charge(secret, merchant_id, uid, 4_200, order_id="order-42"), range(3)))
    assert all(r == first for r in retries)
    assert stack.balance(rider) == 500_000 - 4_200
    assert len(stack.transfers(first.transfer_id)) == 3
    before = stack.snapshot()
    for changed in (dict(amount_minor=4_201), dict(description="green tea")):
        args = dict(amount_minor=4_200, description="oolong tea") | changed
        with pytest.raises(grpc.RpcError) as info:
            stack.charge(secret, merchant_id, uid, args["amount_minor"], order_id="order-42",
                         description=args["description"])
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert stack.snapshot() == before
    assert [e.WhichOneof("payload") for e in stack.events(merchant_id)].count("charge_succeeded") == 1


def test_per_purchase_and_per_day_limits_at_their_edges(merchant_stack: MerchantStack, shop: tuple[str, str]) -> None:
    stack, (merchant_id, secret) = merchant_stack, shop
    other = stack.verified_merchant()
    other_key = stack.key(other.merchant_id)
    rider, uid = stack.rider(funded_minor=900_000)
    # 04:29:59 in Taipei on 2 January still belongs to the service day of 1 January.
    stack.clock.set(datetime(2030, 1, 2, 4, 29, 59, tzinfo=TAIPEI))

    def refused(amount: int, key: str = secret, merchant: str = merchant_id) -> dict[str, str]:
        before = stack.snapshot()
        code, reason, meta = expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
            merchant_id=merchant, order_id=f"o-{uuid.uuid4().hex[:8]}", credential=card_credential(uid),
            amount=money_pb(amount, "TWD")), metadata=bearer(key))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED")
        assert stack.snapshot() == before
        return meta

    assert refused(100_001)["limit"] == "per_purchase"
    stack.charge(secret, merchant_id, uid, 100_000)            # exactly the per-purchase limit
    stack.charge(other_key, other.merchant_id, uid, 100_000)   # the day counts every merchant
    stack.charge(secret, merchant_id, uid, 99_999)
    meta = refused(2)
    assert (meta["limit"], meta["headroom_minor"]) == ("per_day", "1")
    stack.charge(other_key, other.merchant_id, uid, 1)         # exactly the day limit
    assert refused(1, other_key, other.merchant_id)["headroom_minor"] == "0"
    # 04:30:00: a new service day, a fresh limit.
    stack.clock.set(datetime(2030, 1, 2, 4, 30, 0, tzinfo=TAIPEI))
    stack.charge(secret, merchant_id, uid, 100_000)
    assert stack.balance(rider) == 900_000 - 300_000 - 100_000
    days = stack.query("SELECT service_day::text, sum(amount_minor) FROM {m}.charges WHERE rider_account_id = %s"
                       " GROUP BY 1 ORDER BY 1", (rider,))
    assert days == [("2030-01-01", 300_000), ("2030-01-02", 100_000)]


def test_concurrent_tills_cannot_together_pass_the_day_limit(merchant_stack: MerchantStack,
                                                             shop: tuple[str, str]) -> None:
    stack, (merchant_id, secret) = merchant_stack, shop
    rider, uid = stack.rider(funded_minor=900_000)

    def attempt(n: int) -> str:
        try:
            stack.charge(secret, merchant_id, uid, 80_000, order_id=f"race-{n}")
            return "ok"
        except grpc.RpcError as exc:
            return exc.code().name

    with ThreadPoolExecutor(6) as pool:
        outcomes = sorted(pool.map(attempt, range(6)))
    assert outcomes == ["RESOURCE_EXHAUSTED"] * 3 + ["ok"] * 3
    assert stack.balance(rider) == 900_000 - 240_000


def test_refused_charges_record_nothing_and_can_be_retried(merchant_stack: MerchantStack,
                                                           shop: tuple[str, str]) -> None:
    stack, (merchant_id, secret) = merchant_stack, shop
    rider, uid = stack.rider(funded_minor=1_000)
    blocked, blocked_uid = stack.rider()
    stack.wallet.ledger.block_account(blocked, BlockReason.LOST_OR_STOLEN)

    def refused(request: merchant_pb2.ChargeRequest) -> tuple[grpc.StatusCode, str | None]:
        before = stack.snapshot()
        code, reason, _ = expect_error(stack.stub.Charge, request, metadata=bearer(secret))
        assert stack.snapshot() == before
        return code, reason

    def request(**fields: object) -> merchant_pb2.ChargeRequest:
        values: dict[str, object] = dict(merchant_id=merchant_id, order_id="order-7", credential=card_credential(uid),
                                         amount=money_pb(5_000, "TWD"))
        values.update(fields)
        return merchant_pb2.ChargeRequest(**values)  # type: ignore[arg-type]

    assert refused(request()) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert refused(request(credential=card_credential(b"\x01\x02\x03\x04"))) == \
        (grpc.StatusCode.NOT_FOUND, "UNKNOWN_CREDENTIAL")
    assert refused(request(credential=card_credential(blocked_uid))) == \
        (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_BLOCKED")
    face = credential_pb2.Credential(face_embedding=credential_pb2.FaceEmbedding(values=[0.1] * 128))
    assert refused(request(credential=face)) == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_CREDENTIAL")
    assert refused(request(credential=credential_pb2.Credential())) == \
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert refused(request(amount=money_pb(0, "TWD"))) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT")
    assert refused(request(amount=money_pb(-5, "TWD"))) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT")
    assert refused(request(amount=money_pb(5_000, "USD"))) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CURRENCY")
    assert refused(request(order_id="")) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert refused(request(merchant_id=str(uuid.uuid4()))) == \
        (grpc.StatusCode.PERMISSION_DENIED, "API_KEY_WRONG_MERCHANT")
    # A refused order id is decided afresh: once the rider has the money, the same order succeeds.
    stack.wallet.ledger.credit_from_clearing(f"fund-more-{rider}", rider, 10_000)
    charge = stack.stub.Charge(request(), metadata=bearer(secret)).charge
    assert charge.order_id == "order-7" and stack.balance(rider) == 11_000 - 5_000


def test_a_category_contract_takes_over_exactly_at_its_effective_time(merchant_stack: MerchantStack) -> None:
    stack = merchant_stack
    category = f"{random.Random(7).randint(6000, 6999)}"
    merchant = stack.verified_merchant(category=category)
    secret = stack.key(merchant.merchant_id)
    _, uid = stack.rider()
    stack.clock.set(START)
    switch = START + timedelta(hours=1)
    contract_id = f"merchant-{category}-{uuid.uuid4().hex[:6]}"
    stack.add_contract(contract_id, 1, category, switch, [Term("CITY", "taipei-city", 1_000),
                                                          Term("MERCHANT", "", 9_000)])
    stack.clock.set(switch - timedelta(microseconds=1))
    before = stack.charge(secret, merchant.merchant_id, uid, 10_000)
    stack.clock.set(switch)
    after = stack.charge(secret, merchant.merchant_id, uid, 10_000)
    assert {s.contract_id for s in before.splits} == {stack.default_contract_id}
    assert {(s.contract_id, s.contract_version) for s in after.splits} == {(contract_id, 1)}
    assert party_totals(after.splits) == {(PARTY_CITY, "taipei-city"): 1_000, (PARTY_MERCHANT, merchant.merchant_id): 9_000}
    stack.clock.set(START)


def test_partial_and_full_refunds_reverse_the_split_exactly(merchant_stack: MerchantStack,
                                                            shop: tuple[str, str]) -> None:
    stack, (merchant_id, secret) = merchant_stack, shop
    rider, uid = stack.rider()
    payable = f"merchant:{merchant_id}"
    city_before, platform_before = stack.balance(CITY_ACCOUNT), stack.balance(PLATFORM_ACCOUNT)
    charge = stack.charge(secret, merchant_id, uid, 10_001)
    first = stack.refund(secret, merchant_id, charge.charge_id, 3_333, refund_id="r-1")
    assert first.charge.status == merchant_pb2.CHARGE_STATUS_PARTIALLY_REFUNDED
    assert sum(s.amount.amount_minor for s in first.refund.splits) == 3_333
    assert stack.refund(secret, merchant_id, charge.charge_id, 3_333, refund_id="r-1") == first  # idempotent
    second = stack.refund(secret, merchant_id, charge.charge_id, 3_333, refund_id="r-2")
    assert second.charge.refunded_amount.amount_minor == 6_666
    before = stack.snapshot()
    for amount, refund_id in ((3_336, "r-3"), (3_334, "r-1")):  # above what is left; a reused id
        code, reason, meta = expect_error(stack.stub.Refund, merchant_pb2.RefundRequest(
            refund_id=refund_id, merchant_id=merchant_id, charge_id=charge.charge_id,
            amount=money_pb(amount, "TWD")), metadata=bearer(secret))
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)
        assert reason == ("INVALID_AMOUNT" if refund_id == "r-3" else "IDEMPOTENCY_CONFLICT")
        if refund_id == "r-3":
            assert meta["refundable_minor"] == "3335"
    assert stack.snapshot() == before
    last = stack.refund(secret, merchant_id, charge.charge_id, 3_335, refund_id="r-3")
    assert last.charge.status == merchant_pb2.CHARGE_STATUS_REFUNDED
    refunds = [first.refund, second.refund, last.refund]
    assert party_totals(s for r in refunds for s in r.splits) == party_totals(charge.splits)
    # Everything is back where it was: the rider, the payable, the city and the platform.
    assert stack.balance(rider) == 500_000
    assert stack.balance(payable) == 0
    assert (stack.balance(CITY_ACCOUNT), stack.balance(PLATFORM_ACCOUNT)) == (city_before, platform_before)
    assert all(t[4] in ("CORRECTION", "MERCHANT_REFUND") and t[5] for t in stack.transfers("mrf:"))
    code, reason, _ = expect_error(stack.stub.Refund, merchant_pb2.RefundRequest(
        refund_id="r-4", merchant_id=merchant_id, charge_id=charge.charge_id, amount=money_pb(1, "TWD")),
        metadata=bearer(secret))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT")
    seen = stack.stub.GetCharge(merchant_pb2.GetChargeRequest(merchant_id=merchant_id, charge_id=charge.charge_id),
                                metadata=bearer(secret))
    assert [r.refund_id for r in seen.refunds] == ["r-1", "r-2", "r-3"]
    events = [e for e in stack.events(merchant_id) if e.WhichOneof("payload") == "charge_refunded"]
    assert [e.charge_refunded.refund.refund_id for e in events] == ["r-1", "r-2", "r-3"]
    assert_ledger_sound(stack)


def test_concurrent_refunds_never_give_back_more_than_was_charged(merchant_stack: MerchantStack,
                                                                  shop: tuple[str, str]) -> None:
    stack, (merchant_id, secret) = merchant_stack, shop
    rider, uid = stack.rider()
    charge = stack.charge(secret, merchant_id, uid, 10_000)

    def attempt(n: int) -> str:
        try:
            stack.refund(secret, merchant_id, charge.charge_id, 3_000, refund_id=f"race-{n}")
            return "ok"
        except grpc.RpcError as exc:
            return str(exc.code().name)

    with ThreadPoolExecutor(5) as pool:
        outcomes = sorted(pool.map(attempt, range(5)))
    assert outcomes == ["INVALID_ARGUMENT"] * 2 + ["ok"] * 3
    assert stack.balance(rider) == 500_000 - 10_000 + 9_000
    assert_ledger_sound(stack)


def test_seeded_charges_and_refunds_keep_every_split_exact_and_the_ledger_at_zero(
        merchant_stack: MerchantStack, shop: tuple[str, str]) -> None:
    stack, (merchant_id, secret) = merchant_stack, shop
    rng = random.Random(20300101)
    riders = [stack.rider(funded_minor=900_000) for _ in range(3)]
    charges: list[merchant_pb2.Charge] = []
    refunded: dict[str, int] = {}
    for step in range(40):
        if charges and rng.random() < 0.4:
            charge = rng.choice(charges)
            left = charge.amount.amount_minor - refunded[charge.charge_id]
            amount = rng.randint(1, max(1, left + 50))
            try:
                answer = stack.refund(secret, merchant_id, charge.charge_id, amount)
                assert amount <= left
                assert sum(s.amount.amount_minor for s in answer.refund.splits) == amount
                refunded[charge.charge_id] += amount
            except grpc.RpcError as exc:
                assert amount > left and exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            _, uid = rng.choice(riders)
            amount = rng.choice([1, 99, 100, 101, rng.randint(1, 60_000)])
            try:
                charge = stack.charge(secret, merchant_id, uid, amount)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, step
                continue
            assert sum(s.amount.amount_minor for s in charge.splits) == amount
            assert all(s.amount.amount_minor >= 0 for s in charge.splits)
            charges.append(charge)
            refunded[charge.charge_id] = 0
        assert_ledger_sound(stack)
    payable_expected = 0
    for charge in charges:
        seen = stack.stub.GetCharge(merchant_pb2.GetChargeRequest(merchant_id=merchant_id, charge_id=charge.charge_id),
                                    metadata=bearer(secret))
        assert seen.charge.refunded_amount.amount_minor == refunded[charge.charge_id]
        kept = party_totals(charge.splits)[(PARTY_MERCHANT, merchant_id)]
        taken_back = sum(party_totals(r.splits).get((PARTY_MERCHANT, merchant_id), 0) for r in seen.refunds)
        payable_expected += kept - taken_back
    assert stack.balance(f"merchant:{merchant_id}") == payable_expected
    assert len(charges) >= 10


def test_merchant_events_reach_kafka_in_order_keyed_by_the_merchant(merchant_stack: MerchantStack,
                                                                   kafka_bootstrap: str) -> None:
    stack = merchant_stack
    topic = "citytap.merchant.v1.events"
    probe = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    partitions = [TopicPartition(topic, p) for p in probe.partitions_for_topic(topic) or ()]
    offsets = probe.end_offsets(partitions)
    probe.close()
    merchant = stack.verified_merchant()
    secret = stack.key(merchant.merchant_id, "charges:write", "refunds:write")
    _, uid = stack.rider()
    stack.clock.set(START)
    charge = stack.charge(secret, merchant.merchant_id, uid, 7_000)
    stack.refund(secret, merchant.merchant_id, charge.charge_id, 7_000)
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    consumer.assign(partitions)
    for partition, offset in offsets.items():
        consumer.seek(partition, offset)
    found: list[tuple[events_pb2.MerchantEvent, dict]] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and len(found) < 4:
            for records in consumer.poll(timeout_ms=500).values():
                found += [(events_pb2.MerchantEvent.FromString(r.value), dict(r.headers)) for r in records
                          if r.key == merchant.merchant_id.encode()]
    finally:
        consumer.close()
    kinds = [event.WhichOneof("payload") for event, _ in found]
    assert kinds == ["merchant_onboarded", "merchant_verified", "charge_succeeded", "charge_refunded"]
    assert [headers["event-id"].decode() for _, headers in found] == [event.event_id for event, _ in found]
    assert found[3][0].charge_refunded.charge.status == merchant_pb2.CHARGE_STATUS_REFUNDED


def test_a_charge_whose_wallet_answer_was_lost_is_finished_by_the_retry(merchant_stack: MerchantStack,
                                                                        shop: tuple[str, str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    stack, (merchant_id, secret) = merchant_stack, shop
    rider, uid = stack.rider(funded_minor=10_000)
    wallet = stack.app.merchants._wallet  # type: ignore[attr-defined]
    real_post = wallet.post_batch

    def posted_but_lost(plan, currency):  # the wallet posts the batch, its answer never arrives
        real_post(plan, currency)
        raise errors.Unavailable("UNAVAILABLE", "the wallet's answer was lost")

    def never_arrived(plan, currency):  # the request never reached the wallet
        raise errors.Unavailable("UNAVAILABLE", "the wallet could not be reached")

    monkeypatch.setattr(wallet, "post_batch", posted_but_lost)
    code, reason, _ = expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
        merchant_id=merchant_id, order_id="lost-1", credential=card_credential(uid), amount=money_pb(6_000, "TWD"), description="oolong tea"),
        metadata=bearer(secret))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")
    assert stack.query("SELECT status FROM {m}.charges WHERE order_id = 'lost-1'") == [("PENDING",)]
    assert stack.balance(rider) == 4_000  # the money moved; the charge is in doubt
    monkeypatch.setattr(wallet, "post_batch", never_arrived)
    code, _, _ = expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
        merchant_id=merchant_id, order_id="lost-2", credential=card_credential(uid), amount=money_pb(3_000, "TWD"), description="oolong tea"),
        metadata=bearer(secret))
    assert code == grpc.StatusCode.UNAVAILABLE
    monkeypatch.setattr(wallet, "post_batch", real_post)
    # The retries: the first finds its batch already posted, the second is posted now.
    first = stack.charge(secret, merchant_id, uid, 6_000, order_id="lost-1")
    second = stack.charge(secret, merchant_id, uid, 3_000, order_id="lost-2")
    assert first.status == second.status == merchant_pb2.CHARGE_STATUS_SUCCEEDED
    assert stack.balance(rider) == 1_000
    assert len(stack.transfers(first.transfer_id)) == 3
    kinds = [e.charge_succeeded.charge.order_id for e in stack.events(merchant_id)
             if e.WhichOneof("payload") == "charge_succeeded"]
    assert kinds.count("lost-1") == 1 and kinds.count("lost-2") == 1
    # A charge left in doubt that the wallet then refuses is removed, and its order id is free again.
    monkeypatch.setattr(wallet, "post_batch", never_arrived)
    expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
        merchant_id=merchant_id, order_id="lost-3", credential=card_credential(uid), amount=money_pb(900, "TWD"), description="oolong tea"),
        metadata=bearer(secret))
    monkeypatch.setattr(wallet, "post_batch", real_post)
    stack.charge(secret, merchant_id, uid, 500, order_id="drain")  # meanwhile the rider spends
    code, reason, _ = expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
        merchant_id=merchant_id, order_id="lost-3", credential=card_credential(uid), amount=money_pb(900, "TWD"), description="oolong tea"),
        metadata=bearer(secret))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert stack.query("SELECT count(*) FROM {m}.charges WHERE order_id = 'lost-3'") == [(0,)]
    assert_ledger_sound(stack)


def test_charges_and_refunds_a_till_never_retried_are_settled_from_the_ledger(
        merchant_stack: MerchantStack, shop: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The wallet's answer lost and the till gone: after in_doubt_after_s (60 s) retries stop
    posting, and after the margin (the wallet's 5 s deadline + 30 s) settle_in_doubt confirms
    what the ledger posted and removes what it did not, so nothing moved goes unrecorded."""
    stack, (merchant_id, secret) = merchant_stack, shop
    merchants = stack.app.merchants  # type: ignore[attr-defined]
    rider, uid = stack.rider(funded_minor=10_000)
    paid = stack.charge(secret, merchant_id, uid, 2_000, order_id="paid-earlier")
    wallet = merchants._wallet
    real_post = wallet.post_batch

    def posted_but_lost(plan, currency):  # the wallet posts the batch, its answer never arrives
        real_post(plan, currency)
        raise errors.Unavailable("UNAVAILABLE", "the wallet's answer was lost")

    def never_arrived(plan, currency):
        raise errors.Unavailable("UNAVAILABLE", "the wallet could not be reached")

    def request(order_id: str, amount: int) -> merchant_pb2.ChargeRequest:
        return merchant_pb2.ChargeRequest(merchant_id=merchant_id, order_id=order_id, credential=card_credential(uid),
                                          amount=money_pb(amount, "TWD"), description="oolong tea")

    monkeypatch.setattr(wallet, "post_batch", posted_but_lost)
    assert expect_error(stack.stub.Charge, request("gone-posted", 3_000), metadata=bearer(secret))[0] == \
        grpc.StatusCode.UNAVAILABLE
    assert expect_error(stack.stub.Refund, merchant_pb2.RefundRequest(
        refund_id="refund-gone", merchant_id=merchant_id, charge_id=paid.charge_id, amount=money_pb(500, "TWD")),
        metadata=bearer(secret))[0] == grpc.StatusCode.UNAVAILABLE
    monkeypatch.setattr(wallet, "post_batch", never_arrived)
    assert expect_error(stack.stub.Charge, request("gone-unposted", 1_000), metadata=bearer(secret))[0] == \
        grpc.StatusCode.UNAVAILABLE
    monkeypatch.setattr(wallet, "post_batch", real_post)
    assert stack.balance(rider) == 10_000 - 2_000 - 3_000 + 500  # what the ledger did
    assert sorted(stack.query("SELECT order_id, status FROM {m}.charges WHERE merchant_id = %s", (merchant_id,))) == [
        ("gone-posted", "PENDING"), ("gone-unposted", "PENDING"), ("paid-earlier", "SUCCEEDED")]

    assert merchants.settle_in_doubt() == {"charges_confirmed": 0, "charges_removed": 0, "refunds_confirmed": 0,
                                           "refunds_removed": 0}  # too early: a till may still retry
    stack.clock.advance(61)
    code, reason, _ = expect_error(stack.stub.Charge, request("gone-unposted", 1_000), metadata=bearer(secret))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")  # in doubt: the retry does not post it
    assert stack.balance(rider) == 5_500
    assert merchants.settle_in_doubt()["charges_removed"] == 0  # within the margin: nothing yet
    stack.clock.advance(35)
    assert merchants.settle_in_doubt() == {"charges_confirmed": 1, "charges_removed": 1, "refunds_confirmed": 1,
                                           "refunds_removed": 0}
    assert merchants.settle_in_doubt()["charges_confirmed"] == 0  # once only
    assert sorted(stack.query("SELECT order_id, status, refunded_minor FROM {m}.charges WHERE merchant_id = %s",
                              (merchant_id,))) == [
        ("gone-posted", "SUCCEEDED", 0), ("paid-earlier", "PARTIALLY_REFUNDED", 500)]
    events = [e.WhichOneof("payload") for e in stack.events(merchant_id)]
    assert events.count("charge_succeeded") == 2 and events.count("charge_refunded") == 1
    # The till's late retries now get the settled answers; the removed order id charges afresh.
    assert stack.charge(secret, merchant_id, uid, 3_000, order_id="gone-posted").status == \
        merchant_pb2.CHARGE_STATUS_SUCCEEDED
    assert stack.refund(secret, merchant_id, paid.charge_id, 500, refund_id="refund-gone").refund.amount.amount_minor == 500
    stack.charge(secret, merchant_id, uid, 1_000, order_id="gone-unposted")
    assert stack.balance(rider) == 4_500
    assert_ledger_sound(stack)


def test_phones_pay_by_qr_once_and_by_nfc_until_revoked(merchant_stack: MerchantStack, shop: tuple[str, str]) -> None:
    stack, (merchant_id, secret) = merchant_stack, shop
    rider, _ = stack.rider()
    device_id, key, certificate, nfc_token = stack.phone(rider)
    now = stack.clock()

    def qr(issued_at: datetime = now, **kwargs: object) -> credential_pb2.Credential:
        return credential_pb2.Credential(phone_qr=dc.make_qr_payload(key, certificate, device_id=device_id,
                                                                     issued_at=issued_at, **kwargs))

    code = qr()
    paid = stack.charge_with(secret, merchant_id, code, 2_500, order_id="qr-1")
    assert paid.credential_kind == credential_pb2.CREDENTIAL_KIND_PHONE_QR
    assert stack.charge_with(secret, merchant_id, code, 2_500, order_id="qr-1") == paid  # the till retries
    before = stack.snapshot()
    refusals = [
        ("the same code for another order", code, grpc.StatusCode.FAILED_PRECONDITION, "CREDENTIAL_REPLAYED"),
        ("a code 36 s old", qr(now - timedelta(seconds=36)), grpc.StatusCode.FAILED_PRECONDITION, "CREDENTIAL_EXPIRED"),
        ("a code from 6 s ahead", qr(now + timedelta(seconds=6)), grpc.StatusCode.FAILED_PRECONDITION,
         "CREDENTIAL_EXPIRED"),
        ("garbage", credential_pb2.Credential(phone_qr=b"\x00not a code"), grpc.StatusCode.INVALID_ARGUMENT,
         "INVALID_ARGUMENT"),
    ]
    for name, credential, status, reason in refusals:
        assert expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
            merchant_id=merchant_id, order_id="qr-2", credential=credential, amount=money_pb(100, "TWD")),
            metadata=bearer(secret))[:2] == (status, reason), name
    assert stack.snapshot() == before
    # A code refused for the rider's limit did not pay, so it was not used up.
    fresh = qr(now - timedelta(seconds=35))  # the oldest a code may be: 30 s and 5 s of skew
    assert expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
        merchant_id=merchant_id, order_id="qr-3", credential=fresh, amount=money_pb(100_001, "TWD")),
        metadata=bearer(secret))[1] == "LIMIT_EXCEEDED"
    stack.charge_with(secret, merchant_id, fresh, 100, order_id="qr-3")

    tap = credential_pb2.Credential(nfc_token=nfc_token)
    assert stack.charge_with(secret, merchant_id, tap, 300).credential_kind == credential_pb2.CREDENTIAL_KIND_NFC
    assert stack.balance(rider) == 500_000 - 2_500 - 100 - 300
    stack.devices.revoke(account_id=rider, device_id=device_id)
    for credential in (tap, qr()):
        assert expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
            merchant_id=merchant_id, order_id=f"after-revoke-{uuid.uuid4().hex[:6]}", credential=credential,
            amount=money_pb(100, "TWD")), metadata=bearer(secret))[:2] == \
            (grpc.StatusCode.PERMISSION_DENIED, "CREDENTIAL_REVOKED")
    assert_ledger_sound(stack)


def test_a_phone_code_pays_once_across_tills_and_gates(merchant_stack: MerchantStack, shop: tuple[str, str],
                                                      redis_url: str) -> None:
    """The till and the gate share the network's nonce claims (libs.qr_nonces, the same Redis
    key fare-gate's PhoneState claims): a code a gate took does not pay at a till, a code a
    till took does not open a gate, and a charge refused for a limit leaves the code unspent."""
    stack, (merchant_id, secret) = merchant_stack, shop
    rider, _ = stack.rider()
    device_id, key, certificate, _ = stack.phone(rider)
    client = create_redis(redis_url)
    gate = PhoneState(client, cache_ttl_s=60)

    def qr() -> tuple[credential_pb2.Credential, bytes]:
        payload = dc.make_qr_payload(key, certificate, device_id=device_id, issued_at=stack.clock())
        claim = credential_pb2.PhoneQrClaim.FromString(credential_pb2.PhoneQrPayload.FromString(payload).claim)
        return credential_pb2.Credential(phone_qr=payload), claim.nonce

    try:
        at_gate, nonce = qr()
        assert gate.claim_nonce(nonce, "tap-at-a-gate", ttl_s=40)  # the gate took it first
        before = stack.snapshot()
        assert expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
            merchant_id=merchant_id, order_id="after-the-gate", credential=at_gate, amount=money_pb(100, "TWD")),
            metadata=bearer(secret))[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "CREDENTIAL_REPLAYED")
        assert stack.snapshot() == before
        assert stack.query("SELECT count(*) FROM {m}.qr_nonces WHERE nonce = %s", (nonce,)) == [(0,)]

        at_till, nonce = qr()
        stack.charge_with(secret, merchant_id, at_till, 100, order_id="till-first")
        assert client.get(qr_nonces.key(nonce)).decode().startswith("merchant:charge:")
        assert not gate.claim_nonce(nonce, "tap-after-the-till", ttl_s=40)  # the gate refuses it

        too_much, nonce = qr()  # refused for the limit, before any claim: the code still pays at a gate
        assert expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
            merchant_id=merchant_id, order_id="over-limit", credential=too_much, amount=money_pb(100_001, "TWD")),
            metadata=bearer(secret))[1] == "LIMIT_EXCEEDED"
        assert client.get(qr_nonces.key(nonce)) is None
        assert gate.claim_nonce(nonce, "tap-with-an-unspent-code", ttl_s=40)
    finally:
        client.close()
    assert stack.balance(rider) == 500_000 - 100
    assert_ledger_sound(stack)


def test_contracts_are_cached_and_outlive_a_settlement_outage(merchant_stack: MerchantStack) -> None:
    stack = merchant_stack
    servicer = SettlementServicer()
    servicer.attach(contracts=stack.contract_book)
    server = create_server("127.0.0.1:0", [settlement_registration(servicer)], domain="settlement.citytap")
    server.start()
    server.set_serving(True)
    channel = connect(f"127.0.0.1:{server.port}", default_timeout_s=2)
    now = [1000.0]
    cache = ContractCache(channel, currency="TWD", timeout_s=1.0, ttl_s=30, monotonic=lambda: now[0])
    try:
        listed = cache.versions()
        assert stack.default_contract_id in {v.dated.terms.contract_id for v in listed}
        now[0] += 29
        assert cache.versions() is listed and cache.fetches == 1       # within the TTL: no call
        now[0] += 2
        assert cache.versions() == listed and cache.fetches == 2        # after it: fetched again
        server.stop(0)
        now[0] += 31
        assert cache.versions() == listed and cache.fetches == 2        # settlement down: the last list stands
        now[0] += 3600
        with pytest.raises(errors.Unavailable):                          # but not for ever
            cache.versions()
    finally:
        channel.close()
        server.stop(0)
