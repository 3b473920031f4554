"""Events: every committed change writes exactly one outbox row in its own transaction,
refused and replayed requests write none, and the wallet built by its composition root
publishes them to `citytap.wallet.v1.events` keyed by the rider account."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from kafka import KafkaConsumer, TopicPartition

from citytap.common.v1 import money_pb2
from citytap.wallet.v1 import events_pb2, wallet_pb2, wallet_pb2_grpc
from libs import errors
from libs.grpc_client import connect
from libs.redis_client import create_redis
from libs.settings import load
from services.wallet.bootstrap import build
from services.wallet.deny_list import DENY_LIST_KEY, deny_list_key
from services.wallet.domain import (
    AccountKind,
    BlockReason,
    HoldRequest,
    PostHoldRequest,
    TransferKind,
    TransferRequest,
)
from services.wallet.settings import Settings
from tests.integration.wallet_support import TEST_CARD_HASH_KEY, WalletDb, wallet_db  # noqa: F401 - fixture

TOPIC = "citytap.wallet.v1.events"


def test_each_committed_change_writes_one_event_and_refusals_write_none(wallet_db: WalletDb) -> None:
    db, ledger = wallet_db, wallet_db.ledger
    revenue = db.sys(AccountKind.OPERATOR_REVENUE)
    start = len(db.events())
    steps: list[tuple[object, str | None]] = []  # (what happened, the event it must have written or None)

    def expect(action: object, event: str | None) -> None:
        before = db.snapshot()["counts"]["outbox_events"]
        try:
            action()  # type: ignore[operator]
        except errors.CityTapError:
            pass
        after = db.snapshot()["counts"]["outbox_events"]
        assert after - before == (0 if event is None else 1), (event, after - before)
        steps.append((action, event))

    rider = "rider-outbox"
    create = lambda: db.rider(rider)  # noqa: E731
    expect(create, "AccountCreated")
    expect(lambda: ledger.get_account(rider), None)
    expect(lambda: ledger.credit_from_clearing("fund", rider, 1000), "TransferPosted")
    expect(lambda: ledger.credit_from_clearing("fund", rider, 1000), None)  # replay
    expect(lambda: ledger.credit_from_clearing("fund", rider, 999), None)  # conflict
    pay = [TransferRequest("fare", rider, revenue, 100, "TWD", TransferKind.FARE)]
    expect(lambda: ledger.create_transfers(pay), "TransferPosted")
    expect(lambda: ledger.create_transfers(pay), None)
    expect(lambda: ledger.create_transfers([TransferRequest("big", rider, revenue, 5000, "TWD", TransferKind.FARE)]),
           None)
    expect(lambda: ledger.create_transfers([TransferRequest("zero", rider, revenue, 0, "TWD", TransferKind.FARE)]),
           None)
    hold = HoldRequest("tap", rider, revenue, 300, "TWD", TransferKind.FARE, None)
    expect(lambda: ledger.create_hold(hold), "HoldPlaced")
    expect(lambda: ledger.create_hold(hold), None)
    expect(lambda: ledger.post_hold(PostHoldRequest("tap", 200, "TWD")), "HoldPosted")
    expect(lambda: ledger.post_hold(PostHoldRequest("tap", 200, "TWD")), None)
    expect(lambda: ledger.void_hold("tap"), None)
    expect(lambda: ledger.create_hold(HoldRequest("tap2", rider, revenue, 300, "TWD", TransferKind.FARE, None)),
           "HoldPlaced")
    expect(lambda: ledger.void_hold("tap2"), "HoldVoided")
    expect(lambda: ledger.void_hold("tap2"), None)
    expect(lambda: ledger.create_hold(HoldRequest("tap3", rider, revenue, 300, "TWD", TransferKind.FARE,
                                                  db.clock() + timedelta(seconds=10))), "HoldPlaced")
    db.clock.advance(10)
    expect(lambda: ledger.expire_due_holds(), "HoldExpired")
    expect(lambda: ledger.expire_due_holds(), None)
    expect(lambda: ledger.link_card(rider, b"\x01\x02\x03\x04"), "CardLinked")
    expect(lambda: ledger.link_card(rider, b"\x01\x02\x03\x04"), None)
    expect(lambda: ledger.block_account(rider, BlockReason.STAFF_DECISION), "AccountBlocked")
    expect(lambda: ledger.block_account(rider, BlockReason.STAFF_DECISION), None)
    expect(lambda: ledger.unblock_account(rider), "AccountUnblocked")
    expect(lambda: ledger.unblock_account(rider), None)
    card_id = ledger.get_account(rider)[1][0].card_id
    expect(lambda: ledger.unlink_card(rider, card_id), "CardUnlinked")
    expect(lambda: ledger.unlink_card(rider, card_id), None)

    assert db.event_types()[start:] == [event for _, event in steps if event]
    events = db.events()[start:]
    assert {e.account_key for e in events} == {rider}
    assert len({e.event_id for e in events}) == len(events)
    # Every transfer travels in exactly one event.
    carried = [t.transfer_id for e in events if e.WhichOneof("payload") == "transfer_posted" for t in e.transfer_posted.transfers]
    carried += [e.hold_posted.transfer.transfer_id for e in events if e.WhichOneof("payload") == "hold_posted"]
    assert sorted(carried) == sorted(r[0] for r in db.query("SELECT id FROM {s}.transfers"))


# --- the composition root, against the real Kafka, PostgreSQL and Redis ------------------------


def wallet_settings() -> Settings:
    # Port 0 and a schema of its own: the stack's wallet service is running beside this one.
    environ = {**os.environ, "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0", "CITYTAP_WALLET_HOLD_SWEEP_INTERVAL_MS": "50",
               "CITYTAP_WALLET_WEBHOOK_LISTEN": "127.0.0.1:0", "CITYTAP_WALLET_SCHEMA": f"wallet_{uuid.uuid4().hex[:8]}"}
    environ.setdefault("CITYTAP_WALLET_CARD_HASH_KEY", TEST_CARD_HASH_KEY.hex())
    return load(Settings, environ)


def end_offsets(bootstrap: str) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [TopicPartition(TOPIC, p) for p in consumer.partitions_for_topic(TOPIC) or ()]
        return consumer.end_offsets(partitions)
    finally:
        consumer.close()


def events_since(bootstrap: str, offsets: dict[TopicPartition, int], key: str, expected: int,
                 timeout_s: float = 30.0) -> list[tuple[events_pb2.WalletEvent, dict]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    consumer.assign(list(offsets))
    for partition, offset in offsets.items():
        consumer.seek(partition, offset)
    found: list[tuple[events_pb2.WalletEvent, dict]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(found) < expected:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    if record.key == key.encode():
                        found.append((events_pb2.WalletEvent.FromString(record.value), dict(record.headers)))
        time.sleep(0.5)  # anything published twice would arrive right behind
        for records in consumer.poll(timeout_ms=500).values():
            found += [(events_pb2.WalletEvent.FromString(r.value), dict(r.headers)) for r in records
                      if r.key == key.encode()]
    finally:
        consumer.close()
    return found


def test_the_built_wallet_serves_publishes_and_keeps_the_deny_list(kafka_bootstrap: str, redis_url: str) -> None:
    settings = wallet_settings()
    app = build(settings)
    app.server.start()
    app.start()
    app.server.set_serving(True)
    channel = connect(f"127.0.0.1:{app.server.port}", default_timeout_s=10)
    client = wallet_pb2_grpc.WalletServiceStub(channel)
    redis = create_redis(redis_url)
    rider = f"rider-e2e-{int(time.time() * 1000)}"
    revenue = "system:operator-revenue:TWD"
    uid = os.urandom(7)
    try:
        offsets = end_offsets(kafka_bootstrap)
        client.CreateAccount(wallet_pb2.CreateAccountRequest(account_id=rider, rider_category="senior"))
        app.ledger.credit_from_clearing(f"{rider}-fund", rider, 5000)  # type: ignore[attr-defined]
        money = money_pb2.Money(amount_minor=150, currency="TWD")
        client.CreateTransfers(wallet_pb2.CreateTransfersRequest(transfers=[wallet_pb2.Transfer(
            transfer_id=f"{rider}-fare", debit_account_id=rider, credit_account_id=revenue, amount=money,
            kind=wallet_pb2.TRANSFER_KIND_FARE)]))
        soon = datetime.now(timezone.utc) + timedelta(seconds=1)
        client.CreateHold(wallet_pb2.CreateHoldRequest(hold_id=f"{rider}-tap", debit_account_id=rider,
                                                       credit_account_id=revenue, amount=money,
                                                       kind=wallet_pb2.TRANSFER_KIND_FARE, expires_at=soon))
        client.LinkCard(wallet_pb2.LinkCardRequest(account_id=rider, card_uid=uid))
        client.BlockAccount(wallet_pb2.BlockAccountRequest(account_id=rider, reason=wallet_pb2.BLOCK_REASON_LOST_OR_STOLEN))
        assert redis.sismember(deny_list_key(settings.schema), f"account:{rider}")
        assert not redis.sismember(DENY_LIST_KEY, f"account:{rider}")  # the real wallet's list is untouched
        # The sweeper worker expires the hold on its own (nothing here reads the balance, which
        # would expire it lazily).
        deadline = time.monotonic() + 10
        with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
            while time.monotonic() < deadline and conn.execute(
                    f"SELECT 1 FROM {settings.schema}.pending_holds WHERE hold_id = %s", (f"{rider}-tap",)).fetchone():
                time.sleep(0.1)
        client.UnblockAccount(wallet_pb2.UnblockAccountRequest(account_id=rider))
        assert not redis.sismember(deny_list_key(settings.schema), f"account:{rider}")

        expected = ["AccountCreated", "TransferPosted", "TransferPosted", "HoldPlaced", "CardLinked", "AccountBlocked",
                    "AccountUnblocked"]
        found = events_since(kafka_bootstrap, offsets, rider, len(expected) + 1)
        types = [h["event-type"].decode().rsplit(".", 1)[1] for _, h in found]
        # The expiry lands wherever the sweeper's timing puts it, but after the hold was placed.
        assert types.count("HoldExpired") == 1 and types.index("HoldExpired") > types.index("HoldPlaced")
        assert [t for t in types if t != "HoldExpired"] == expected
        assert len({e.event_id for e, _ in found}) == len(found)
        assert all(h["event-id"].decode() == e.event_id for e, h in found)
        transfers = [t.transfer_id for e, _ in found if e.WhichOneof("payload") == "transfer_posted"
                     for t in e.transfer_posted.transfers]
        assert transfers == [f"{rider}-fund", f"{rider}-fare"]
    finally:
        redis.close()
        channel.close()
        app.server.stop(0)
        app.close()


def test_a_missing_card_hash_key_stops_the_wallet_before_it_starts() -> None:
    environ = {k: v for k, v in os.environ.items() if k != "CITYTAP_WALLET_CARD_HASH_KEY"}
    environ["CITYTAP_LISTEN_ADDRESS"] = "127.0.0.1:0"
    with pytest.raises(Exception, match="CITYTAP_WALLET_CARD_HASH_KEY"):
        load(Settings, environ)
