"""The wallet's service layer: one method per use case, each one short database transaction.

Every write follows the same shape:

1. validate the request with the pure domain (bad input raises before any I/O);
2. look the client id up: the same id with the same fingerprint returns the stored result
   and writes nothing, a different fingerprint raises IDEMPOTENCY_CONFLICT;
3. lock the accounts involved with SELECT ... FOR NO KEY UPDATE in id order (one global
   order, so concurrent transactions never deadlock on each other), expiring any due holds
   of the debited accounts first (lazy expiry);
4. apply the request to a `domain.Book` of the locked rows, which raises the precise error;
5. insert the immutable rows (the triggers move balances and re-check every invariant) and
   the event(s) into the outbox, in the same transaction; then commit.

Deadlocks and serialization failures (which the lock order should make impossible) are
retried a bounded number of times; a concurrent insert of the same id is retried once so the
loser answers through the idempotency path.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Generic, Protocol, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from citytap.wallet.v1 import events_pb2, wallet_pb2
from libs import errors, outbox
from services.wallet import convert
from services.wallet.domain import (
    BALANCE_HOLDS_LISTED_MAX,
    CARDS_PER_ACCOUNT_MAX,
    LABEL_CHARS_MAX,
    NOTE_CHARS_MAX,
    Account,
    AccountKind,
    AccountStatus,
    BlockReason,
    Book,
    Card,
    CreateAccountRequest,
    HistoryEntry,
    Hold,
    HoldRequest,
    HoldStatus,
    PostHoldRequest,
    SYSTEM_KINDS,
    Transfer,
    TransferKind,
    TransferRequest,
    account_hash,
    card_hash,
    is_system_account,
    check_independent_batch,
    check_card_uid,
    check_id,
    check_text,
    decode_page_token,
    deny_member_for_account,
    deny_member_for_card,
    encode_page_token,
    event_account_key,
    hold_expiry,
    hold_hash,
    page_size,
    post_hash,
    resolve_post,
    system_account_hash,
    system_account_id,
    transfer_hash,
    validate_batch,
    validate_create_account,
    validate_hold,
    validate_post,
    validate_transfer,
)
from services.wallet.repository import Repository

log = logging.getLogger("citytap.wallet")

T = TypeVar("T")

TOPIC = "citytap.wallet.v1.events"
TX_ATTEMPTS_MAX = 4
TX_RETRY_BACKOFF_S_MAX = 0.05
# Due holds a write expires on the side before doing its own work; the sweeper does the rest.
LAZY_EXPIRY_MAX = 20
SWEEP_BATCH_MAX = 100


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class DenyList(Protocol):
    """Where blocked accounts and their cards are published for fare-gate."""

    def add(self, members: Iterable[str]) -> None: ...

    def remove(self, members: Iterable[str]) -> None: ...

    def replace(self, members: Iterable[str]) -> None: ...


@dataclass(frozen=True)
class LedgerConfig:
    """The wallet's business settings, as the service layer needs them."""

    currency: str
    rider_categories: tuple[str, ...]
    rider_floor_minor: int
    stored_value_max_minor: int
    card_hash_key: bytes
    hold_ttl_default_s: int = 7200
    hold_ttl_max_s: int = 7 * 24 * 3600

    def __post_init__(self) -> None:
        if self.rider_floor_minor > 0:
            raise ValueError("rider_floor_minor is zero or a negative allowance")
        if self.stored_value_max_minor <= 0:
            raise ValueError("stored_value_max_minor must be positive")
        if not 0 < self.hold_ttl_default_s <= self.hold_ttl_max_s:
            raise ValueError("hold TTLs must satisfy 0 < default <= max")

    def __repr__(self) -> str:  # never print the card hash key
        return f"LedgerConfig(currency={self.currency!r}, rider_categories={self.rider_categories!r}, ...)"


@dataclass(frozen=True)
class Balance:
    account: Account
    holds: list[Hold]


@dataclass(frozen=True)
class Resolution:
    account_id: str
    status: AccountStatus
    rider_category: str


@dataclass(frozen=True)
class _AfterCommit:
    """Returned by a transaction body that must commit its writes and then fail the call
    (posting a hold that turned out expired: the expiry stands, the post is refused)."""

    error: errors.CityTapError


@dataclass(frozen=True, slots=True)
class _OnCommit(Generic[T]):
    """Returned by a transaction body run with `commit_in_flight`: its last writes and the
    COMMIT were only queued, and `finish` reads their results once the commit is done."""

    finish: Callable[[], T]


class Ledger:
    """The wallet's use cases over one PostgreSQL schema, an outbox topic and a deny list."""

    def __init__(self, pool: ConnectionPool, *, schema: str, config: LedgerConfig, deny_list: DenyList,
                 clock: Callable[[], datetime] = utc_now, topic: str = TOPIC) -> None:
        self._pool = pool
        self._repo = Repository(schema)
        self.schema = schema
        self.config = config
        self._deny = deny_list
        self._clock = clock
        self._topic = topic
        digest = hashlib.sha256(f"citytap.wallet.deny-list.{schema}".encode()).digest()
        self._deny_lock_key = int.from_bytes(digest[:8], "big", signed=True)

    # --- plumbing -------------------------------------------------------------------------

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the wallet's clock must return aware datetimes")
        return now

    def _transaction(self, work: Callable[[psycopg.Connection], T], *, retry_unique: Collection[str] = (),
                     commit_in_flight: bool = False) -> T:
        """Run `work` in a transaction, retried on deadlocks and serialization failures.

        With `commit_in_flight` the transaction runs in pipeline mode: reads still wait for
        their results, but writes `work` queues without reading them go out together with the
        COMMIT, in one round trip, and `work` returns an `_OnCommit` to read them afterwards.
        The row locks those writes take are then held only while the server runs them, not
        while the answer travels back and the Python thread waits for a core to send COMMIT:
        under load, that wait was what queued every exit's post behind the hot system
        accounts. Checks that must hold before the commit go to the server too
        (`Repository.assert_transfer_balances`)."""
        for attempt in range(1, TX_ATTEMPTS_MAX + 1):
            try:
                with self._pool.connection() as conn:
                    if commit_in_flight:
                        with conn.pipeline(), conn.transaction():
                            result = work(conn)
                        if isinstance(result, _OnCommit):
                            result = result.finish()  # committed; reads what the commit's sync brought
                    else:
                        with conn.transaction():
                            result = work(conn)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                if attempt == TX_ATTEMPTS_MAX:
                    raise errors.Unavailable("UNAVAILABLE", "the ledger is busy; retry with the same ids") from exc
                log.warning("ledger transaction retried", extra={"fields": {"error": type(exc).__name__}})
                time.sleep(random.uniform(0, TX_RETRY_BACKOFF_S_MAX))
                continue
            except pg_errors.UniqueViolation as exc:
                if exc.diag.constraint_name in retry_unique and attempt < TX_ATTEMPTS_MAX:
                    # A concurrent request inserted the same id: answer through the replay path.
                    log.info("ledger transaction retried", extra={"fields": {"constraint": exc.diag.constraint_name}})
                    continue
                raise _mapped(exc) or exc
            except PoolTimeout as exc:
                raise errors.Unavailable("UNAVAILABLE", "no database connection is free; retry") from exc
            except psycopg.Error as exc:
                raise _mapped(exc) or exc
            if isinstance(result, _AfterCommit):
                raise result.error
            return result
        raise AssertionError("unreachable")

    def _emit(self, conn: psycopg.Connection, account_key: str, at: datetime, **payload: Any) -> None:
        outbox.enqueue(conn, self.schema, self._topic, convert.wallet_event(account_key, at, **payload))

    def _lock(self, conn: psycopg.Connection, account_ids: Collection[str], now: datetime) -> dict[str, Account]:
        """Lock `account_ids` (plus the counterparties of their due holds) in id order, expire
        the due holds those accounts have pending, and return the locked rows as they are now."""
        due = self._repo.due_holds(conn, now, debit_account_ids=account_ids, limit=LAZY_EXPIRY_MAX)
        lock_ids = set(account_ids) | {a for _, debit, credit in due for a in (debit, credit)}
        accounts = self._repo.lock_accounts_but_system(conn, lock_ids)
        if due and self._expire_locked(conn, [hold_id for hold_id, _, _ in due], accounts, now):
            accounts = self._repo.lock_accounts_but_system(conn, lock_ids)  # re-read: reservations were released
        return accounts

    def _expire_locked(self, conn: psycopg.Connection, hold_ids: Sequence[str], accounts: dict[str, Account],
                       now: datetime) -> list[Hold]:
        """Expire those of `hold_ids` that are still pending, due, and whose two accounts this
        transaction has locked; emit HoldExpired for each."""
        expired = []
        holds = self._repo.get_holds(conn, hold_ids)
        for hold in sorted(holds.values(), key=lambda h: (h.expires_at, h.hold_id)):
            if not hold.is_due(now) or hold.debit_account_id not in accounts or hold.credit_account_id not in accounts:
                continue
            self._repo.insert_resolution(conn, hold.hold_id, HoldStatus.EXPIRED, now)
            done = replace(hold, status=HoldStatus.EXPIRED, resolved_at=now)
            key = event_account_key([(accounts[hold.debit_account_id], accounts[hold.credit_account_id])])
            self._emit(conn, key, now, hold_expired=events_pb2.HoldExpired(hold=convert.hold_to_proto(done)))
            expired.append(done)
        return expired

    def _available(self, conn: psycopg.Connection, account_ids: Iterable[str], book: Book | None = None, *,
                   riders_only: bool) -> dict[str, int]:
        """The available balances of `account_ids` (only rider wallets, with `riders_only`) as
        this transaction leaves them: from `book` for the accounts it applied requests to (no
        query), read for the others (system accounts, and a retry answered from the record)."""
        wanted = set(account_ids)
        found = book.available_of(wanted, riders_only=riders_only) if book is not None else {}
        missing = {a for a in wanted - found.keys() if book is None or is_system_account(a)}
        if riders_only:
            missing = {a for a in missing if not is_system_account(a)}
        if missing:
            found.update({a.account_id: a.available_minor for a in self._repo.get_accounts(conn, missing).values()
                          if not riders_only or a.kind is AccountKind.RIDER_WALLET})
        return found

    @staticmethod
    def _report(out: dict[str, int] | None, available: dict[str, int]) -> None:
        if out is not None:
            out.clear()  # a retried transaction reports afresh
            out.update(available)

    def _queue_checked_transfers(self, conn: psycopg.Connection, requests: Sequence[TransferRequest],
                                 hashes: Sequence[bytes], now: datetime, planned: Sequence[tuple[int, int]], *,
                                 hold_ids: Sequence[str | None] | None = None) -> Callable[[], list[Transfer]]:
        """Queue the balance-moving inserts and the database's check of the balances they
        leave against `planned` (`commit_in_flight`: they go out with the COMMIT, which the
        check aborts on any difference); the returned function reads the transfers after the
        commit."""
        written = self._repo.queue_transfers(conn, requests, hashes, now, hold_ids=hold_ids)
        self._repo.assert_transfer_balances(conn, [r.transfer_id for r in requests], _compared(
            [r.debit_account_id for r in requests], [r.credit_account_id for r in requests], planned))
        return written

    def _unknown_account(self, account_id: str) -> errors.NotFound:
        return errors.NotFound("UNKNOWN_ACCOUNT", f"no account {account_id}", resource="account", account_id=account_id)

    # --- accounts -------------------------------------------------------------------------

    def ensure_system_accounts(self) -> list[str]:
        """Open the system accounts of the configured currency if missing; return those opened."""
        currency = self.config.currency

        def work(conn: psycopg.Connection) -> list[str]:
            now = self._now()
            opened = []
            for kind in SYSTEM_KINDS:
                account = self._repo.insert_account(
                    conn, account_id=system_account_id(kind, currency), kind=kind, currency=currency, floor_minor=None,
                    rider_category="", category_expires_at=None, owner_id="",
                    request_hash=system_account_hash(kind, currency), created_at=now)
                if account is not None:
                    self._emit(conn, account.account_id, now,
                               account_created=events_pb2.AccountCreated(account=convert.account_to_proto(account)))
                    opened.append(account.account_id)
            return opened

        return self._transaction(work)

    def system_account(self, kind: AccountKind) -> str:
        return system_account_id(kind, self.config.currency)

    def create_account(self, request: CreateAccountRequest) -> Account:
        request = validate_create_account(request, currency=self.config.currency,
                                          rider_categories=self.config.rider_categories)
        fingerprint = account_hash(request)

        def replay(existing: Account) -> Account:
            if existing.request_hash != fingerprint:
                raise errors.Conflict("IDEMPOTENCY_CONFLICT",
                                      f"account {request.account_id} exists with a different payload",
                                      account_id=request.account_id)
            return existing

        def work(conn: psycopg.Connection) -> Account:
            existing = self._repo.get_account(conn, request.account_id)
            if existing is not None:
                return replay(existing)
            now = self._now()
            if request.category_expires_at is not None and request.category_expires_at <= now:
                raise errors.InvalidArgument("INVALID_ARGUMENT", "category_expires_at must be in the future",
                                             field="category_expires_at")
            floor = self.config.rider_floor_minor if request.kind is AccountKind.RIDER_WALLET else 0
            account = self._repo.insert_account(
                conn, account_id=request.account_id, kind=request.kind, currency=request.currency, floor_minor=floor,
                rider_category=request.rider_category, category_expires_at=request.category_expires_at,
                owner_id=request.owner_id, request_hash=fingerprint, created_at=now)
            if account is None:  # a concurrent request won the insert; READ COMMITTED now sees it
                concurrent = self._repo.get_account(conn, request.account_id)
                assert concurrent is not None
                return replay(concurrent)
            key = event_account_key([(account, account)])
            self._emit(conn, key, now, account_created=events_pb2.AccountCreated(
                account=convert.account_to_proto(account)))
            return account

        return self._transaction(work)

    def get_account(self, account_id: str) -> tuple[Account, list[Card]]:
        check_id(account_id, "account_id")

        def work(conn: psycopg.Connection) -> tuple[Account, list[Card]]:
            account = self._repo.get_account(conn, account_id)
            if account is None:
                raise self._unknown_account(account_id)
            return account, self._repo.live_cards(conn, account_id)

        return self._transaction(work)

    def link_card(self, account_id: str, card_uid: bytes, label: str = "") -> Card:
        check_id(account_id, "account_id")
        card_hash_value = card_hash(self.config.card_hash_key, check_card_uid(card_uid))
        check_text(label, "label", LABEL_CHARS_MAX)

        def work(conn: psycopg.Connection) -> Card:
            account = self._repo.lock_accounts(conn, [account_id]).get(account_id)
            if account is None:
                raise self._unknown_account(account_id)
            if account.kind is not AccountKind.RIDER_WALLET:
                raise errors.InvalidArgument("INVALID_ARGUMENT", "cards link to rider wallets only", field="account_id")
            existing = self._repo.live_card_by_hash(conn, card_hash_value)
            if existing is not None:
                if existing.account_id == account_id:
                    return existing
                raise errors.Conflict("CREDENTIAL_IN_USE", "this card is linked to another account")
            if account.status is AccountStatus.BLOCKED:
                raise errors.FailedPrecondition("ACCOUNT_BLOCKED", f"account {account_id} is blocked",
                                                account_id=account_id)
            if len(self._repo.live_cards(conn, account_id)) >= CARDS_PER_ACCOUNT_MAX:
                raise errors.LimitExceeded("LIMIT_EXCEEDED", f"an account has at most {CARDS_PER_ACCOUNT_MAX} cards",
                                           limit="cards_per_account", account_id=account_id)
            now = self._now()
            card = Card(str(uuid.uuid4()), account_id, card_hash_value, label, now)
            self._repo.insert_card(conn, card)
            self._emit(conn, account_id, now, card_linked=events_pb2.CardLinked(
                account_id=account_id, card=convert.card_to_proto(card)))
            return card

        return self._transaction(work, retry_unique={"cards_one_live_link"})

    def unlink_card(self, account_id: str, card_id: str) -> datetime:
        """Unlink a card; unlinking an unlinked card returns when it was unlinked."""
        check_id(account_id, "account_id")
        check_id(card_id, "card_id")

        def work(conn: psycopg.Connection) -> datetime:
            account = self._repo.lock_accounts(conn, [account_id]).get(account_id)
            if account is None:
                raise self._unknown_account(account_id)
            card = self._repo.get_card(conn, card_id)
            if card is None or card.account_id != account_id:
                raise errors.NotFound("NOT_FOUND", f"account {account_id} has no card {card_id}", resource="card",
                                      card_id=card_id)
            if card.unlinked_at is not None:
                return card.unlinked_at
            now = self._now()
            self._repo.unlink_card(conn, card_id, now)
            self._emit(conn, account_id, now, card_unlinked=events_pb2.CardUnlinked(
                account_id=account_id, card_id=card_id))
            if account.status is AccountStatus.BLOCKED:
                conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._deny_lock_key,))
                self._deny.remove([deny_member_for_card(card.card_hash)])
            return now

        return self._transaction(work)

    def block_account(self, account_id: str, reason: BlockReason, note: str = "") -> Account:
        """Block an account and put it and its cards on the deny list. The deny list is written
        before the commit, under the account's row lock and the deny-list lock shared with
        rebuilds, so a committed block is always denied (a failed commit at worst over-denies
        until the next rebuild). Blocking a blocked account re-asserts the deny list."""
        check_id(account_id, "account_id")
        if not isinstance(reason, BlockReason):
            raise errors.InvalidArgument("INVALID_ARGUMENT", "reason must be set", field="reason")
        check_text(note, "note", NOTE_CHARS_MAX)
        event = events_pb2.AccountBlocked(account_id=account_id,
                                          reason=wallet_pb2.BlockReason.Value(f"BLOCK_REASON_{reason.name}"))
        return self._change_status(account_id, AccountStatus.BLOCKED, reason, note, self._deny.add,
                                   account_blocked=event)

    def unblock_account(self, account_id: str, note: str = "") -> Account:
        """Unblock an account and take it and its cards off the deny list (before the commit,
        like `block_account`). Unblocking an active account re-asserts the removal."""
        check_id(account_id, "account_id")
        check_text(note, "note", NOTE_CHARS_MAX)
        return self._change_status(account_id, AccountStatus.ACTIVE, None, note, self._deny.remove,
                                   account_unblocked=events_pb2.AccountUnblocked(account_id=account_id))

    def _change_status(self, account_id: str, target: AccountStatus, reason: BlockReason | None, note: str,
                       update_deny_list: Callable[[Iterable[str]], None], **event: Any) -> Account:
        """Move an account to `target` (block or unblock) with its event, and update the deny
        list before the commit under the shared deny-list lock. An account already in
        `target` is returned unchanged, but the deny list is re-asserted."""

        def work(conn: psycopg.Connection) -> Account:
            account = self._repo.lock_accounts(conn, [account_id]).get(account_id)
            if account is None:
                raise self._unknown_account(account_id)
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._deny_lock_key,))
            members = self._deny_members(conn, account_id)
            if account.status is target:
                update_deny_list(members)
                return account
            now = self._now()
            changed = self._repo.set_status(conn, account_id, target, reason, note, now)
            self._emit(conn, event_account_key([(changed, changed)]), now, **event)
            update_deny_list(members)
            return changed

        return self._transaction(work)

    def _deny_members(self, conn: psycopg.Connection, account_id: str) -> list[str]:
        cards = self._repo.live_cards(conn, account_id)
        return [deny_member_for_account(account_id), *(deny_member_for_card(c.card_hash) for c in cards)]

    def rebuild_deny_list(self) -> int:
        """Recompute the deny list from PostgreSQL and swap it in; return its size. Holds the
        deny-list lock exclusively, so no block or unblock interleaves with the rebuild."""

        def work(conn: psycopg.Connection) -> int:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._deny_lock_key,))
            accounts, cards = self._repo.blocked_deny_entries(conn)
            members = [deny_member_for_account(a) for a in accounts] + [deny_member_for_card(c) for c in cards]
            self._deny.replace(members)
            return len(members)

        return self._transaction(work)

    def resolve_card(self, card_uid: bytes) -> Resolution:
        card_hash_value = card_hash(self.config.card_hash_key, check_card_uid(card_uid))

        def work(conn: psycopg.Connection) -> Resolution:
            card = self._repo.live_card_by_hash(conn, card_hash_value)
            account = self._repo.get_account(conn, card.account_id) if card is not None else None
            if account is None:
                raise errors.NotFound("UNKNOWN_CREDENTIAL", "no account has this card linked")
            return Resolution(account.account_id, account.status, account.category_in_force(self._now()))

        return self._transaction(work)

    # --- balances and history -------------------------------------------------------------

    def get_balance(self, account_id: str) -> Balance:
        """An account with its pending holds; due holds are expired first (lazy expiry)."""
        check_id(account_id, "account_id")

        def work(conn: psycopg.Connection) -> Balance:
            now = self._now()
            account = self._repo.get_account(conn, account_id)
            if account is None:
                raise self._unknown_account(account_id)
            if account.pending_debits_minor and self._repo.due_holds(conn, now, debit_account_ids=[account_id], limit=1):
                account = self._lock(conn, [account_id], now)[account_id]
            return Balance(account, self._repo.pending_holds_of(conn, account_id, limit=BALANCE_HOLDS_LISTED_MAX))

        return self._transaction(work)

    def list_history(self, account_id: str, *, page_size_requested: int = 0, page_token: str = "",
                     start_at: datetime | None = None, end_at: datetime | None = None) -> tuple[list[HistoryEntry], str]:
        check_id(account_id, "account_id")
        size = page_size(page_size_requested)
        before = decode_page_token(page_token, account_id)
        if start_at is not None and end_at is not None and start_at >= end_at:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "start_at must be before end_at", field="start_at")

        def work(conn: psycopg.Connection) -> tuple[list[HistoryEntry], str]:
            if self._repo.get_account(conn, account_id) is None:
                raise self._unknown_account(account_id)
            entries = self._repo.history(conn, account_id, before_seq=before, start_at=start_at, end_at=end_at,
                                         limit=size + 1)
            token = encode_page_token(account_id, entries[size - 1].seq) if len(entries) > size else ""
            return entries[:size], token

        return self._transaction(work)

    # --- transfers ------------------------------------------------------------------------

    def create_transfers(self, requests: Sequence[TransferRequest], *, internal: bool = False,
                         credit_kind: AccountKind | None = None,
                         available: dict[str, int] | None = None) -> list[Transfer]:
        """Post transfers atomically, in order. `internal` admits the kinds only the wallet's
        own flows may post (top-ups); `credit_kind` requires every credited account's kind.
        `available`, when given, receives the available balance of each rider wallet the
        transfers touch, as the transaction left it."""
        touched = {a for r in requests for a in (r.debit_account_id, r.credit_account_id)}
        requests = validate_batch(requests, internal=internal)
        hashes = [transfer_hash(r) for r in requests]
        ids = [r.transfer_id for r in requests]

        def work(conn: psycopg.Connection) -> list[Transfer] | _OnCommit[list[Transfer]]:
            existing = self._repo.find_transfers(conn, ids)
            if existing:
                replayed = _replay_transfers(requests, hashes, existing)
                self._report(available, self._available(conn, touched, riders_only=True))
                return replayed
            clash = self._repo.existing_hold_ids(conn, ids)
            if clash:
                index = next(i for i, transfer_id in enumerate(ids) if transfer_id in clash)
                raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"{ids[index]} is already the id of a hold",
                                      index=str(index), transfer_id=ids[index])
            now = self._now()
            accounts = self._lock(conn, {a for r in requests for a in (r.debit_account_id, r.credit_account_id)}, now)
            book = Book(accounts, self.config.stored_value_max_minor)
            planned = [book.transfer(r, i) for i, r in enumerate(requests)]
            if credit_kind is not None:
                for index, request in enumerate(requests):
                    if accounts[request.credit_account_id].kind is not credit_kind:
                        raise errors.InvalidArgument("INVALID_ARGUMENT", f"the credited account must be a {credit_kind.name}",
                                                     field="credit_account_id", index=str(index))
            self._check_corrections(conn, requests)
            self._report(available, self._available(conn, touched, book, riders_only=True))
            # The event first, then the balance-moving inserts, their check and the COMMIT, in
            # one round trip (`commit_in_flight`; see _as_posted).
            key = event_account_key([(accounts[r.debit_account_id], accounts[r.credit_account_id]) for r in requests])
            self._emit(conn, key, now, transfer_posted=events_pb2.TransferPosted(
                transfers=[convert.transfer_to_proto(_as_posted(r, h, now)) for r, h in zip(requests, hashes)]))
            return _OnCommit(self._queue_checked_transfers(conn, requests, hashes, now, planned))

        return self._transaction(work, retry_unique={"transfers_pkey"}, commit_in_flight=True)  # type: ignore[arg-type]

    def post_transfer_batch(self, requests: Sequence[TransferRequest]) -> list[Transfer | errors.CityTapError]:
        """Post independent transfers in order, each as if sent alone, in ONE transaction.

        Each outcome is the posted transfer (or the original one, for an id already posted with
        the same payload) or the error that refused it; a refused transfer records nothing and
        leaves the balances the next one sees untouched. The whole call fails only when the
        batch itself is malformed (empty, too long, an id twice) or the database fails. One
        lock pass, one insert and one commit serve the whole batch, which is what makes batches
        the fast path for clients that post many transfers (see loadtests/wallet_transfers.py).
        """
        check_independent_batch([r.transfer_id for r in requests])
        outcomes: list[Transfer | errors.CityTapError | None] = [None] * len(requests)
        valid: list[int] = []
        for index, request in enumerate(requests):
            try:
                validate_transfer(request, index=index)
                valid.append(index)
            except errors.CityTapError as exc:
                outcomes[index] = exc
        hashes = {i: transfer_hash(requests[i]) for i in valid}

        def work(conn: psycopg.Connection
                 ) -> list[Transfer | errors.CityTapError] | _OnCommit[list[Transfer | errors.CityTapError]]:
            result = list(outcomes)
            todo = []
            existing = self._repo.find_transfers(conn, [requests[i].transfer_id for i in valid]) if valid else {}
            clash = self._repo.existing_hold_ids(conn, [requests[i].transfer_id for i in valid
                                                        if requests[i].transfer_id not in existing]) if valid else set()
            for i in valid:
                found = existing.get(requests[i].transfer_id)
                if found is not None:
                    result[i] = found if found.request_hash == hashes[i] else errors.Conflict(
                        "IDEMPOTENCY_CONFLICT", f"transfer {found.transfer_id} exists with a different payload",
                        index=str(i), transfer_id=found.transfer_id)
                elif requests[i].transfer_id in clash:
                    result[i] = errors.Conflict("IDEMPOTENCY_CONFLICT", f"{requests[i].transfer_id} is already the id of a hold",
                                                index=str(i), transfer_id=requests[i].transfer_id)
                else:
                    todo.append(i)
            if not todo:
                return result  # type: ignore[return-value]
            now = self._now()
            accounts = self._lock(conn, {a for i in todo for a in (requests[i].debit_account_id,
                                                                    requests[i].credit_account_id)}, now)
            targets = {requests[i].corrects_transfer_id for i in todo if requests[i].corrects_transfer_id}
            corrected = self._repo.existing_transfer_ids(conn, targets) if targets else set()
            position = {requests[i].transfer_id: i for i in todo}
            book = Book(accounts, self.config.stored_value_max_minor)
            posted: list[int] = []
            planned = []
            for i in todo:
                request = requests[i]
                try:
                    target = request.corrects_transfer_id
                    if target and target not in corrected:
                        if position.get(target, -1) > i:
                            raise errors.InvalidArgument("INVALID_ARGUMENT", "a transfer can only correct an earlier one",
                                                         field="corrects_transfer_id", index=str(i))
                        raise errors.NotFound("NOT_FOUND", f"no transfer {target} to correct", resource="transfer",
                                              field="corrects_transfer_id", index=str(i))
                    planned.append(book.transfer(request, i))
                except errors.CityTapError as exc:
                    result[i] = exc
                    continue
                posted.append(i)
                corrected.add(request.transfer_id)  # a later transfer of the batch may correct this one
            if not posted:
                return result  # type: ignore[return-value]
            # The events, then the balance-moving inserts, their check and the COMMIT, in one
            # round trip (`commit_in_flight`).
            for i in posted:
                request = requests[i]
                key = event_account_key([(accounts[request.debit_account_id], accounts[request.credit_account_id])])
                self._emit(conn, key, now, transfer_posted=events_pb2.TransferPosted(
                    transfers=[convert.transfer_to_proto(_as_posted(request, hashes[i], now))]))
            read = self._queue_checked_transfers(conn, [requests[i] for i in posted], [hashes[i] for i in posted],
                                                 now, planned)

            def finish() -> list[Transfer | errors.CityTapError]:
                for i, transfer in zip(posted, read(), strict=True):
                    result[i] = transfer
                return result  # type: ignore[return-value]

            return _OnCommit(finish)

        return self._transaction(work, retry_unique={"transfers_pkey"}, commit_in_flight=True)  # type: ignore[arg-type]

    def _check_corrections(self, conn: psycopg.Connection, requests: Sequence[TransferRequest]) -> None:
        earlier: set[str] = set()
        outside: dict[str, int] = {}
        for index, request in enumerate(requests):
            target = request.corrects_transfer_id
            if target and target not in earlier:
                if any(r.transfer_id == target for r in requests):
                    raise errors.InvalidArgument("INVALID_ARGUMENT", "a transfer can only correct an earlier one",
                                                 field="corrects_transfer_id", index=str(index))
                outside.setdefault(target, index)
            earlier.add(request.transfer_id)
        if outside:
            found = self._repo.existing_transfer_ids(conn, outside)
            for target, index in outside.items():
                if target not in found:
                    raise errors.NotFound("NOT_FOUND", f"no transfer {target} to correct", resource="transfer",
                                          field="corrects_transfer_id", index=str(index))

    def credit_from_clearing(self, transfer_id: str, account_id: str, amount_minor: int, *,
                             kind: TransferKind = TransferKind.TOP_UP, reference: str = "") -> Transfer:
        """Credit a rider wallet from the Stripe clearing account under the client id
        `transfer_id` (the top-up id): the seam the Stripe top-up flow posts through. Retries
        with the same id and payload return the original transfer."""
        request = TransferRequest(
            transfer_id=transfer_id, debit_account_id=self.system_account(AccountKind.STRIPE_CLEARING),
            credit_account_id=account_id, amount_minor=amount_minor, currency=self.config.currency, kind=kind,
            reference=reference)
        return self.create_transfers([request], internal=True, credit_kind=AccountKind.RIDER_WALLET)[0]

    # --- holds ----------------------------------------------------------------------------

    def create_hold(self, request: HoldRequest, *, available: dict[str, int] | None = None) -> Hold:
        """Place a hold; `available`, when given, receives the debited rider's available balance."""
        request = validate_hold(request)
        fingerprint = hold_hash(request)

        def work(conn: psycopg.Connection) -> Hold:
            existing = self._repo.get_hold(conn, request.hold_id)
            if existing is not None:
                if existing.request_hash != fingerprint:
                    raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"hold {request.hold_id} exists with a different payload",
                                          hold_id=request.hold_id)
                self._report(available, self._available(conn, [existing.debit_account_id], riders_only=False))
                return existing
            if self._repo.existing_transfer_ids(conn, [request.hold_id]):
                raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"{request.hold_id} is already the id of a transfer",
                                      hold_id=request.hold_id)
            now = self._now()
            expires_at = hold_expiry(request, now, ttl_default_s=self.config.hold_ttl_default_s,
                                     ttl_max_s=self.config.hold_ttl_max_s)
            accounts = self._lock(conn, {request.debit_account_id, request.credit_account_id}, now)
            book = Book(accounts, self.config.stored_value_max_minor)
            book.reserve(request)
            placed = Hold(hold_id=request.hold_id, debit_account_id=request.debit_account_id,
                          credit_account_id=request.credit_account_id, amount_minor=request.amount_minor,
                          currency=request.currency, kind=request.kind, reference=request.reference,
                          created_at=now, expires_at=expires_at, request_hash=fingerprint)
            key = event_account_key([(accounts[placed.debit_account_id], accounts[placed.credit_account_id])])
            with conn.pipeline():  # the event and the hold in one round trip
                self._emit(conn, key, now, hold_placed=events_pb2.HoldPlaced(hold=convert.hold_to_proto(placed)))
                hold = self._repo.insert_hold(
                    conn, hold_id=request.hold_id, debit_account_id=request.debit_account_id,
                    credit_account_id=request.credit_account_id, amount_minor=request.amount_minor,
                    currency=request.currency, kind=request.kind, reference=request.reference, request_hash=fingerprint,
                    created_at=now, expires_at=expires_at)
            assert hold == placed
            self._report(available, self._available(conn, [hold.debit_account_id], book, riders_only=False))
            return hold

        return self._transaction(work, retry_unique={"holds_pkey"})

    def _locked_hold(self, conn: psycopg.Connection, hold_id: str, now: datetime, *,
                     also: Collection[str] = ()) -> tuple[Hold, dict[str, Account]]:
        """The hold re-read after locking its two accounts and the `also` ones (every
        resolution locks the hold's rider side, so its state cannot change under us)."""
        hold = self._repo.get_hold(conn, hold_id)
        if hold is None:
            raise errors.NotFound("NOT_FOUND", f"no hold {hold_id}", resource="hold", hold_id=hold_id)
        accounts = self._repo.lock_accounts_but_system(conn, {hold.debit_account_id, hold.credit_account_id, *also})
        hold = self._repo.get_hold(conn, hold_id)
        assert hold is not None
        return hold, accounts

    def post_hold(self, request: PostHoldRequest) -> tuple[Hold, Transfer]:
        """Post a pending hold for its amount or less; the transfer's id is the hold's id.
        Posting again with the same amount and splits returns the original result."""
        hold, transfer, _ = self.post_hold_linked(request)
        return hold, transfer

    def post_hold_linked(self, request: PostHoldRequest, *,
                         available: dict[str, int] | None = None) -> tuple[Hold, Transfer, list[Transfer]]:
        """`post_hold`, plus the request's linked transfers posted right after the hold's own in
        the same transaction, all or none (a fare and the moves of its split). Returns them too;
        a retry with the same payload returns the original ones."""
        request = validate_post(request)
        linked_ids = [t.transfer_id for t in request.linked]

        def work(conn: psycopg.Connection) -> tuple[Hold, Transfer, list[Transfer]] | _AfterCommit:
            now = self._now()
            hold, accounts = self._locked_hold(conn, request.hold_id, now,
                                               also={a for t in request.linked for a in (t.debit_account_id,
                                                                                          t.credit_account_id)})
            amount, splits = resolve_post(request, hold)
            for index, linked in enumerate(request.linked):
                if linked.currency != hold.currency:
                    raise errors.InvalidArgument("INVALID_CURRENCY", f"the hold is in {hold.currency}",
                                                 field="linked_transfers.amount.currency", index=str(index))
            fingerprint = post_hash(amount, splits, request.linked)
            if hold.status is HoldStatus.POSTED:
                if hold.resolution_hash != fingerprint:
                    raise errors.Conflict("IDEMPOTENCY_CONFLICT",
                                          f"hold {hold.hold_id} was posted with another amount or other linked transfers",
                                          hold_id=hold.hold_id)
                found = self._repo.find_transfers(conn, [hold.transfer_id, *linked_ids])
                self._report(available, self._available(conn, [hold.debit_account_id], riders_only=False))
                return hold, found[hold.transfer_id], [found[i] for i in linked_ids]
            if hold.status is HoldStatus.VOIDED:
                raise errors.FailedPrecondition("INVALID_STATE", f"hold {hold.hold_id} was voided", hold_id=hold.hold_id,
                                                status=hold.status.name)
            if hold.status is HoldStatus.EXPIRED:
                raise _hold_expired(hold)
            if hold.is_due(now):
                self._expire_locked(conn, [hold.hold_id], accounts, now)
                return _AfterCommit(_hold_expired(hold))
            taken = self._repo.existing_transfer_ids(conn, [hold.hold_id, *linked_ids])
            if taken:
                transfer_id = hold.hold_id if hold.hold_id in taken else next(i for i in linked_ids if i in taken)
                raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"a transfer already has the id {transfer_id}",
                                      hold_id=hold.hold_id, transfer_id=transfer_id)
            clash = self._repo.existing_hold_ids(conn, linked_ids) if linked_ids else set()
            if clash:
                raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"{sorted(clash)[0]} is already the id of a hold",
                                      hold_id=hold.hold_id, transfer_id=sorted(clash)[0])
            book = Book(accounts, self.config.stored_value_max_minor)
            planned = [book.post(hold, amount)]
            planned += [book.transfer(t, i) for i, t in enumerate(request.linked)]
            transfer_request = TransferRequest(
                transfer_id=hold.hold_id, debit_account_id=hold.debit_account_id,
                credit_account_id=hold.credit_account_id, amount_minor=amount, currency=hold.currency, kind=hold.kind,
                splits=splits, reference=hold.reference)
            linked_hashes = [transfer_hash(t) for t in request.linked]
            posted = replace(hold, status=HoldStatus.POSTED, posted_amount_minor=amount, transfer_id=hold.hold_id,
                             resolved_at=now, resolution_hash=fingerprint)
            key = event_account_key([(accounts[hold.debit_account_id], accounts[hold.credit_account_id])])
            self._report(available, self._available(conn, [hold.debit_account_id], book, riders_only=False))
            # The event, the resolution, the transfer and its linked ones, the balance check and
            # the COMMIT go in one round trip (`commit_in_flight`): the transfers' triggers take
            # the system accounts' row locks, and the server releases them as soon as it has
            # run the batch.
            self._emit(conn, key, now, hold_posted=events_pb2.HoldPosted(
                hold=convert.hold_to_proto(posted),
                transfer=convert.transfer_to_proto(_as_posted(transfer_request, fingerprint, now,
                                                              hold_id=hold.hold_id)),
                linked_transfers=[convert.transfer_to_proto(_as_posted(t, h, now))
                                  for t, h in zip(request.linked, linked_hashes)]))
            self._repo.insert_resolution(conn, hold.hold_id, HoldStatus.POSTED, now, posted_amount_minor=amount,
                                         transfer_id=hold.hold_id, request_hash=fingerprint)
            read = self._queue_checked_transfers(
                conn, [transfer_request, *request.linked], [fingerprint, *linked_hashes], now, planned,
                hold_ids=[hold.hold_id] + [None] * len(request.linked))

            def finish() -> tuple[Hold, Transfer, list[Transfer]]:
                transfer, *linked = read()
                return posted, transfer, linked

            return _OnCommit(finish)

        return self._transaction(work, commit_in_flight=True)  # type: ignore[arg-type]

    def void_hold(self, hold_id: str, *, available: dict[str, int] | None = None) -> Hold:
        """Release a pending hold. Voiding a voided or expired hold returns it unchanged;
        voiding a posted hold is INVALID_STATE. `available`, when given, receives the debited
        rider's available balance afterwards."""
        check_id(hold_id, "hold_id")

        def work(conn: psycopg.Connection) -> Hold:
            result = void(conn)
            # Voids are rare (zero fares): the balance is read back, after the release.
            self._report(available, self._available(conn, [result.debit_account_id], riders_only=False))
            return result

        def void(conn: psycopg.Connection) -> Hold:
            now = self._now()
            hold, accounts = self._locked_hold(conn, hold_id, now)
            if hold.status in (HoldStatus.VOIDED, HoldStatus.EXPIRED):
                return hold
            if hold.status is HoldStatus.POSTED:
                raise errors.FailedPrecondition("INVALID_STATE", f"hold {hold_id} was posted", hold_id=hold_id,
                                                status=hold.status.name)
            if hold.is_due(now):
                return self._expire_locked(conn, [hold_id], accounts, now)[0]
            self._repo.insert_resolution(conn, hold_id, HoldStatus.VOIDED, now)
            voided = replace(hold, status=HoldStatus.VOIDED, resolved_at=now)
            key = event_account_key([(accounts[hold.debit_account_id], accounts[hold.credit_account_id])])
            self._emit(conn, key, now, hold_voided=events_pb2.HoldVoided(hold=convert.hold_to_proto(voided)))
            return voided

        return self._transaction(work)

    def expire_due_holds(self, *, batch_max: int = SWEEP_BATCH_MAX) -> int:
        """Expire up to `batch_max` due holds across all accounts (the sweeper's step)."""
        if not 0 < batch_max <= SWEEP_BATCH_MAX:
            raise ValueError(f"batch_max must be in 1..{SWEEP_BATCH_MAX}")

        def work(conn: psycopg.Connection) -> int:
            now = self._now()
            due = self._repo.due_holds(conn, now, limit=batch_max)
            if not due:
                return 0
            accounts = self._repo.lock_accounts_but_system(conn, {a for _, debit, credit in due for a in (debit, credit)})
            return len(self._expire_locked(conn, [hold_id for hold_id, _, _ in due], accounts, now))

        return self._transaction(work)


def _as_posted(request: TransferRequest, request_hash: bytes, posted_at: datetime, *, hold_id: str = "") -> Transfer:
    """The transfer `request` becomes when inserted at `posted_at`, for its event, which is
    written before the insert. The event carries no running balances, so none are set here.

    Why before: the insert's trigger updates the balance rows, which for a system account
    (the operator revenue every fare credits) is the moment its row lock is taken, held until
    the commit. Writing the event first keeps that lock for one statement and the commit only.
    """
    return Transfer(
        transfer_id=request.transfer_id, debit_account_id=request.debit_account_id,
        credit_account_id=request.credit_account_id, amount_minor=request.amount_minor, currency=request.currency,
        kind=request.kind, splits=request.splits, hold_id=hold_id, corrects_transfer_id=request.corrects_transfer_id,
        reference=request.reference, posted_at=posted_at, debit_balance_after_minor=0, credit_balance_after_minor=0,
        request_hash=request_hash)


def _hold_expired(hold: Hold) -> errors.FailedPrecondition:
    return errors.FailedPrecondition("HOLD_EXPIRED", f"hold {hold.hold_id} expired at {hold.expires_at.isoformat()}",
                                     hold_id=hold.hold_id)


def _replay_transfers(requests: Sequence[TransferRequest], hashes: Sequence[bytes],
                      existing: dict[str, Transfer]) -> list[Transfer]:
    """A retried batch: every id must exist with the same fingerprint, or nothing is returned."""
    for index, (request, fingerprint) in enumerate(zip(requests, hashes, strict=True)):
        found = existing.get(request.transfer_id)
        if found is None:
            raise errors.Conflict("IDEMPOTENCY_CONFLICT", "the batch mixes posted and new transfer ids",
                                  index=str(index), transfer_id=request.transfer_id)
        if found.request_hash != fingerprint:
            raise errors.Conflict("IDEMPOTENCY_CONFLICT",
                                  f"transfer {request.transfer_id} exists with a different payload",
                                  index=str(index), transfer_id=request.transfer_id)
    return [existing[r.transfer_id] for r in requests]


def _compared(debits: Sequence[str], credits: Sequence[str], planned: Sequence[tuple[int, int]]
              ) -> list[tuple[int | None, int | None]]:
    """The planned balances for the database's check (Repository.assert_transfer_balances),
    with None for system accounts' sides: they are not locked before the insert (see
    Repository.lock_accounts_but_system), so the domain cannot know their balance in advance.
    Any difference is a bug in the domain or the trigger, and aborts the write."""
    return [(None if is_system_account(d) else debit_after, None if is_system_account(c) else credit_after)
            for d, c, (debit_after, credit_after) in zip(debits, credits, planned, strict=True)]


def _mapped(exc: psycopg.Error) -> errors.CityTapError | None:
    """A database refusal that the domain checks should have caught first (the database is the
    backstop), as the error the caller would have got; anything else stays an internal error."""
    constraint = getattr(exc.diag, "constraint_name", None) or ""
    if isinstance(exc, pg_errors.CheckViolation) and constraint == "accounts_floor_zero_respected":
        return errors.FailedPrecondition("INSUFFICIENT_FUNDS", "the balance would go below zero")
    if isinstance(exc, pg_errors.CheckViolation) and constraint == "accounts_floor_allowance_respected":
        return errors.FailedPrecondition("FLOOR_BREACH", "the balance would go below its negative allowance")
    if isinstance(exc, pg_errors.CheckViolation) and constraint == "hold_resolutions_post_allowed":
        return errors.FailedPrecondition("HOLD_EXPIRED", "the hold can no longer be posted")
    if isinstance(exc, pg_errors.NumericValueOutOfRange):
        return errors.InvalidArgument("INVALID_AMOUNT", "the amount would overflow an account's balance")
    if isinstance(exc, pg_errors.UniqueViolation):
        if constraint == "cards_one_live_link":
            return errors.Conflict("CREDENTIAL_IN_USE", "this card is linked to another account")
        if constraint in ("transfers_pkey", "holds_pkey", "accounts_pkey", "hold_resolutions_pkey"):
            return errors.Conflict("IDEMPOTENCY_CONFLICT", "the id was used concurrently; retry to read its result")
    if isinstance(exc, psycopg.OperationalError):
        return errors.Unavailable("UNAVAILABLE", "the database is unreachable; retry with the same ids")
    return None
