"""The tap path's use cases: Tap, and closing journeys that got no exit in time.

One tap, in order (README.md "The tap path" has the reasoning):

1. validate the request (domain.validate_tap); a malformed tap changes nothing;
2. resolve the credential (credentials.py: a card through the Redis cache, else the
   wallet's ResolveCredential; a phone QR code verified offline, its nonce accepted once;
   an NFC token or a face); an unknown credential is recorded as denied, with no lock and
   no wallet write (a retry finds that record and gets the same answer), and a refused
   phone or face credential raises its reason before anything is recorded;
3. in one PostgreSQL transaction holding the account's advisory lock:
   a. read, in one round trip, the tap id (a retry returns its recorded answer, or
      IDEMPOTENCY_CONFLICT for another payload), the last opening of this card at this
      gate, the open journey and the rider's fare state;
   b. screen it (blocked, double tap, passback, exit without entry);
   c. make the one wallet write the tap needs: CreateHold (entry), PostHold or VoidHold
      (exit), CreateTransfers (validate), each with an id derived from a tap id;
   d. read the available balance for the answer;
   e. write the tap, the journey, the rider's fare state and the events, and commit.

Crash safety: the wallet write (3c) happens before the local commit (3e). If the process
dies in between, nothing local is recorded, the lock is released with the connection, and
the gate's retry (same tap id, same payload) finds no tap, prices the same state again,
and repeats the same wallet write under the same id, which the wallet answers with the
original result: the work completes once, never twice. If the gate never retries, the
entry's hold expires on its own (`hold_expiry`) and nothing is charged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from libs import errors
from services.fare_gate import fare_events
from services.fare_gate.domain import (
    Catalogue,
    CredentialKind,
    Decision,
    Direction,
    Gate,
    Journey,
    JourneyEnd,
    JourneyStatus,
    Reason,
    Tap,
    TapInput,
    TapOutcome,
    Verdict,
    hold_expiry,
    hold_id_for,
    journey_id_for,
    replay,
    screen,
    tap_fingerprint,
    validate_tap,
)
from services.fare_gate.credentials import CredentialResolver
from services.fare_gate.fare_split import FarePlan, FareSplitter
from services.fare_gate.fares import FareEngine, FareError, Leg, RiderFareState
from services.fare_gate.hot_state import HotState
from services.fare_gate.repository import AccountTx, Repository, Snapshot
from services.fare_gate.wallet_client import WalletClient, WalletRefusal

log = logging.getLogger("citytap.fare_gate.taps")

INSUFFICIENT = frozenset({"INSUFFICIENT_FUNDS", "FLOOR_BREACH"})
# A hold that is no longer ours to post: the wallet expired it, or something already
# resolved it (a lost exit whose gate never retried).
HOLD_GONE = frozenset({"HOLD_EXPIRED", "INVALID_STATE", "IDEMPOTENCY_CONFLICT", "NOT_FOUND"})


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True, slots=True)
class TapConfig:
    revenue_account_id: str
    fare_media_id: str | None
    double_tap_window_s: int
    passback_window_s: int
    incomplete_after_s: int  # when the feed gives none for a network
    hold_grace_s: int
    tap_age_s_max: int
    clock_skew_s_max: int
    account_lock_timeout_ms: int


@dataclass(frozen=True, slots=True)
class Rider:
    account_id: str
    rider_category: str  # as the wallet gave it; empty for the default
    blocked: bool


@dataclass(frozen=True, slots=True)
class _Charge:
    """What pricing a leg came to: the signed amount, the rider's next state, the product."""

    amount_minor: int
    state: RiderFareState
    fare_product_id: str | None
    note: str | None = None


class TapService:
    """Decides taps and closes overdue journeys; both the servicer and the worker use it."""

    def __init__(self, *, engine: FareEngine, gates: dict[str, Gate], repository: Repository, wallet: WalletClient,
                 hot_state: HotState, credential_key: bytes, config: TapConfig,
                 clock: Callable[[], datetime] = utc_now, credentials: CredentialResolver | None = None,
                 splitter: FareSplitter | None = None) -> None:
        self.engine = engine
        self.gates = gates
        self.config = config
        self._repo = repository
        self._wallet = wallet
        self._clock = clock
        self._splitter = splitter
        # Without a resolver of its own the service takes cards only (unit tests build it so).
        self._credentials = credentials or CredentialResolver(key=credential_key, hot_state=hot_state, wallet=wallet)
        feed = engine.feed
        self.currency = feed.currency
        self.catalogue = Catalogue(frozenset(feed.stops), {rid: r.network_id for rid, r in feed.routes.items()})
        self._incomplete_after_s = {}
        for network in {g.network_id for g in gates.values()}:
            try:
                from_feed = engine.max_fare(network, None, config.fare_media_id).incomplete_after_s
            except FareError:
                from_feed = None  # no default rider category: the setting applies
            self._incomplete_after_s[network] = from_feed or config.incomplete_after_s

    def incomplete_after_s(self, network_id: str) -> int:
        return self._incomplete_after_s.get(network_id, self.config.incomplete_after_s)

    # --- Tap ------------------------------------------------------------------------------

    def tap(self, raw: TapInput) -> TapOutcome:
        now = self._clock()
        config = self.config
        tap = validate_tap(raw, self.gates, self.catalogue, now=now, tap_age_s_max=config.tap_age_s_max,
                           clock_skew_s_max=config.clock_skew_s_max)
        # A retry needs no look-up of its own: it resolves to the same account (from the
        # cache, usually) and finds its recorded answer under that account's lock.
        card, rider = self._resolve(tap, now)
        fingerprint = tap_fingerprint(tap, card)
        if rider is None:
            outcome = TapOutcome(Decision.DENY, Reason.DENIED_UNKNOWN_CREDENTIAL, currency=self.currency)
            raced = self._repo.record_unmatched_tap(tap, card, fingerprint, outcome,
                                                    fare_events.tap_recorded(tap, outcome, None, now))
            return replay(raced, fingerprint) if raced is not None else outcome
        with self._repo.account_transaction(rider.account_id, lock_timeout_ms=config.account_lock_timeout_ms) as tx:
            snapshot = tx.snapshot(tap_id=tap.tap_id, card_hash=card, gate_id=tap.gate_id, direction=int(tap.direction),
                                   around=tap.tapped_at, double_tap_window_s=config.double_tap_window_s)
            if snapshot.recorded is not None:
                return replay(snapshot.recorded, fingerprint)
            outcome = self._decide(tx, tap, rider, snapshot, now)
            tx.insert_tap(tap, card, fingerprint, rider.account_id, outcome)
            tx.enqueue(fare_events.tap_recorded(tap, outcome, rider.account_id, now))
        return outcome

    def _resolve(self, tap: Tap, now: datetime) -> tuple[bytes, Rider | None]:
        """The credential's pseudonym and rider (credentials.py); a face-only entry whose
        maximum fare is above the face limit is refused here, before anything is recorded."""
        resolved = self._credentials.resolve(tap, now)
        if resolved.account_id is None:
            return resolved.credential_hash, None
        rider = Rider(resolved.account_id, resolved.rider_category, resolved.blocked)
        if tap.credential_kind is CredentialKind.FACE and tap.direction is not Direction.EXIT:
            category = self._category(rider.rider_category)
            max_fare = self.engine.max_fare(tap.network_id, category, self.config.fare_media_id).amount_minor
            self._credentials.check_face_limit(tap, max_fare)
        return resolved.credential_hash, rider

    def _decide(self, tx: AccountTx, tap: Tap, rider: Rider, snapshot: Snapshot, now: datetime) -> TapOutcome:
        config = self.config
        open_journey = snapshot.open_journey
        state, last_transfer_id = snapshot.fare_state, snapshot.last_transfer_id
        verdict = screen(tap.direction, blocked=rider.blocked, tapped_at=tap.tapped_at,
                         last_opening_here=snapshot.last_opening,
                         open_journey=open_journey.facts() if open_journey else None,
                         double_tap_window_s=config.double_tap_window_s, passback_window_s=config.passback_window_s)
        if verdict.verdict is Verdict.DENY:
            assert verdict.reason is not None
            return self._deny(verdict.reason)
        if verdict.verdict is Verdict.REPEAT:
            assert verdict.repeat_of is not None
            return verdict.repeat_of
        if verdict.verdict is Verdict.CLOSE_STALE_THEN_PROCEED:
            assert open_journey is not None
            state, last_transfer_id = self._close_incomplete(
                tx, open_journey, state, last_transfer_id, now,
                note=f"closed by {tap.direction.name.lower()} tap {tap.tap_id}")
        if tap.direction is Direction.ENTRY:
            return self._enter(tx, tap, rider, now)
        if tap.direction is Direction.EXIT:
            assert open_journey is not None
            return self._exit(tx, tap, open_journey, state, last_transfer_id, now)
        return self._validate(tx, tap, rider, state, last_transfer_id, now)

    def _deny(self, reason: Reason, balance_minor: int | None = None) -> TapOutcome:
        return TapOutcome(Decision.DENY, reason, balance_minor=balance_minor, currency=self.currency)

    def _category(self, name: str | None) -> str | None:
        """The feed's rider category for the wallet's; the default when the feed lacks it."""
        if not name:
            return None
        if name not in self.engine.feed.rider_categories:
            log.warning("rider category unknown to the fare feed; pricing with the default",
                        extra={"fields": {"rider_category": name}})
            return None
        return name

    def _denial_for(self, refusal: WalletRefusal, account_id: str) -> TapOutcome:
        """The denial for a wallet refusal the rider caused; anything else is raised."""
        if refusal.reason in INSUFFICIENT:
            return self._deny(Reason.DENIED_INSUFFICIENT_BALANCE, self._wallet.available_minor(account_id))
        if refusal.reason == "ACCOUNT_BLOCKED":
            return self._deny(Reason.DENIED_BLOCKED)
        if refusal.reason == "IDEMPOTENCY_CONFLICT":
            # The derived wallet id is taken by another payload: this tap id was used by
            # another tap (another card) at the same moment.
            raise errors.Conflict("IDEMPOTENCY_CONFLICT", "this tap id is already in use by another tap") from refusal
        raise refusal

    @property
    def splitter(self) -> FareSplitter | None:
        return self._splitter

    def _plan(self, transfer_id: str, amount_minor: int, moment: datetime, *, refund: bool = False) -> FarePlan | None:
        """The fare's split and share moves, or None (no splitter configured, or no contract)."""
        if self._splitter is None:
            return None
        return self._splitter.plan(transfer_id, amount_minor, moment, refund=refund)

    def _available(self, account_id: str, reported: int | None) -> int:
        """The rider's available balance: as the wallet's write reported it, else asked for."""
        return reported if reported is not None else self._wallet.available_minor(account_id)

    # --- entry ------------------------------------------------------------------------------

    def _enter(self, tx: AccountTx, tap: Tap, rider: Rider, now: datetime) -> TapOutcome:
        config = self.config
        category = self._category(rider.rider_category)
        held = self.engine.max_fare(tap.network_id, category, config.fare_media_id).amount_minor
        after_s = self.incomplete_after_s(tap.network_id)
        journey = Journey(
            journey_id=journey_id_for(tap.tap_id), account_id=rider.account_id, status=JourneyStatus.OPEN,
            network_id=tap.network_id, rider_category=category, currency=self.currency, entry_tap_id=tap.tap_id,
            entry_gate_id=tap.gate_id, entry_stop_id=tap.stop_id, route_id=tap.route_id, started_at=tap.tapped_at,
            hold_id=hold_id_for(tap.tap_id), amount_held_minor=held,
            incomplete_due_at=tap.tapped_at + timedelta(seconds=after_s))
        try:
            hold = self._wallet.create_hold(
                hold_id=journey.hold_id or "", debit_account_id=rider.account_id,
                credit_account_id=config.revenue_account_id, amount_minor=held, currency=self.currency,
                expires_at=hold_expiry(tap.tapped_at, after_s, config.hold_grace_s), reference=journey.journey_id)
        except WalletRefusal as refusal:
            return self._denial_for(refusal, rider.account_id)
        if not hold.pending:
            # Only a retry long after its hold lapsed gets here; settings keep holds alive
            # longer than a tap may be retried, so this is a bug or a clock jump.
            raise errors.FailedPrecondition("INVALID_STATE", f"the entry hold {hold.hold_id} is no longer pending",
                                            hold_id=hold.hold_id)
        balance = self._available(rider.account_id, hold.debit_available_minor)
        tx.insert_journey(journey)
        tx.enqueue(fare_events.journey_started(journey, now))
        return TapOutcome(Decision.OPEN, Reason.OK, 0, held, balance, journey.journey_id, self.currency)

    # --- exit -------------------------------------------------------------------------------

    def _exit(self, tx: AccountTx, tap: Tap, journey: Journey, state: RiderFareState, last_transfer_id: str | None,
              now: datetime) -> TapOutcome:
        ended_at = max(tap.tapped_at, journey.started_at)
        leg = _in_order(state, Leg(journey.entry_stop_id, journey.started_at, tap.stop_id, ended_at,
                                   network_id=journey.network_id))
        charge = self._price(state, leg, journey.rider_category, fallback_minor=journey.amount_held_minor)
        end = JourneyEnd(JourneyStatus.COMPLETED, now, charge.amount_minor, "", charge.fare_product_id,
                         exit_tap_id=tap.tap_id, exit_gate_id=tap.gate_id, exit_stop_id=tap.stop_id,
                         ended_at=ended_at, note=charge.note)
        assert journey.hold_id is not None
        available: int | None = None
        try:
            end, charged, available = self._settle_hold(journey, end, refund_id=hold_id_for(tap.tap_id),
                                                        last_transfer_id=last_transfer_id)
        except WalletRefusal as refusal:
            if refusal.reason not in HOLD_GONE:
                raise
            # Let the rider out; what the wallet holds for this journey needs a person.
            log.error("exit could not settle its hold", extra={"fields": {
                "journey_id": journey.journey_id, "hold_id": journey.hold_id, "wallet_reason": refusal.reason}})
            end = replace(end, status=JourneyStatus.UNRESOLVED, fare_minor=0, transfer_id="",
                          note=f"hold not settled: wallet said {refusal.reason}")
            charged, charge = 0, replace(charge, state=state)
        balance = self._available(journey.account_id, available)
        tx.close_journey(journey.journey_id, end)
        tx.save_fare_state(journey.account_id, charge.state, feed_version=self.engine.feed.version,
                           last_transfer_id=end.transfer_id if end.fare_minor > 0 else last_transfer_id)
        if end.status is JourneyStatus.COMPLETED:
            tx.enqueue(fare_events.journey_completed(journey, end))
        return TapOutcome(Decision.OPEN, Reason.OK, charged, 0, balance, journey.journey_id, self.currency)

    def _settle_hold(self, journey: Journey, end: JourneyEnd, *, refund_id: str, last_transfer_id: str | None
                     ) -> tuple[JourneyEnd, int, int | None]:
        """Post the hold for a positive fare (at most what it holds), void it for zero, void
        it and refund for a negative one. Returns the end as settled, what was charged, and
        the rider's available balance as the wallet reported it (None if it did not)."""
        assert journey.hold_id is not None
        amount = end.fare_minor
        if amount > journey.amount_held_minor:
            log.error("fare above the entry hold; charging the hold", extra={"fields": {
                "journey_id": journey.journey_id, "fare_minor": amount, "held_minor": journey.amount_held_minor}})
            end = replace(end, fare_minor=journey.amount_held_minor,
                          note=f"fare {amount} above the hold {journey.amount_held_minor}; uncollected difference")
            amount = journey.amount_held_minor
        # The moment the fare happened, the same on every retry, picks the split contract.
        moment = end.ended_at or journey.incomplete_due_at or journey.started_at
        if amount > 0:
            posted = self._wallet.post_hold(hold_id=journey.hold_id, amount_minor=amount, currency=self.currency,
                                            plan=self._plan(journey.hold_id, amount, moment))
            return replace(end, transfer_id=journey.hold_id), amount, posted.debit_available_minor
        # Voided, or expired on its own: either way nothing was taken. A posted hold is
        # refused by the wallet (INVALID_STATE).
        voided = self._wallet.void_hold(hold_id=journey.hold_id)
        if amount == 0:
            return end, 0, voided.debit_available_minor
        refund = self._wallet.transfer(
            transfer_id=refund_id, debit_account_id=self.config.revenue_account_id,
            credit_account_id=journey.account_id, amount_minor=-amount, currency=self.currency,
            reference=journey.journey_id, corrects_transfer_id=last_transfer_id or "",
            plan=self._plan(refund_id, -amount, moment, refund=True))
        return replace(end, transfer_id=refund.transfer_id), 0, refund.rider_available_minor.get(journey.account_id)

    # --- validate on board ------------------------------------------------------------------

    def _validate(self, tx: AccountTx, tap: Tap, rider: Rider, state: RiderFareState, last_transfer_id: str | None,
                  now: datetime) -> TapOutcome:
        config = self.config
        category = self._category(rider.rider_category)
        leg = _in_order(state, Leg(tap.stop_id, tap.tapped_at, network_id=tap.network_id, route_id=tap.route_id))
        try:
            charge = self._charge_leg(state, leg, category)
        except FareError as exc:
            raise errors.FailedPrecondition("INVALID_STATE", f"the fare feed cannot price this tap: {exc.message}",
                                            fare_reason=exc.reason) from exc
        journey = Journey(
            journey_id=journey_id_for(tap.tap_id), account_id=rider.account_id, status=JourneyStatus.COMPLETED,
            network_id=tap.network_id, rider_category=category, currency=self.currency, entry_tap_id=tap.tap_id,
            entry_gate_id=tap.gate_id, entry_stop_id=tap.stop_id, route_id=tap.route_id, started_at=tap.tapped_at,
            hold_id=None, amount_held_minor=0, incomplete_due_at=None)
        transfer_id = hold_id_for(tap.tap_id)
        amount = charge.amount_minor
        available: int | None = None
        try:
            if amount > 0:
                posted = self._wallet.transfer(transfer_id=transfer_id, debit_account_id=rider.account_id,
                                               credit_account_id=config.revenue_account_id, amount_minor=amount,
                                               currency=self.currency, reference=journey.journey_id,
                                               plan=self._plan(transfer_id, amount, tap.tapped_at))
                available = posted.rider_available_minor.get(rider.account_id)
            elif amount < 0:
                posted = self._wallet.transfer(
                    transfer_id=transfer_id, debit_account_id=config.revenue_account_id,
                    credit_account_id=rider.account_id, amount_minor=-amount, currency=self.currency,
                    reference=journey.journey_id, corrects_transfer_id=last_transfer_id or "",
                    plan=self._plan(transfer_id, -amount, tap.tapped_at, refund=True))
                available = posted.rider_available_minor.get(rider.account_id)
        except WalletRefusal as refusal:
            return self._denial_for(refusal, rider.account_id)
        balance = self._available(rider.account_id, available)
        end = JourneyEnd(JourneyStatus.COMPLETED, now, amount, transfer_id if amount else "", charge.fare_product_id,
                         ended_at=tap.tapped_at)
        tx.insert_journey(journey, end)
        tx.save_fare_state(rider.account_id, charge.state, feed_version=self.engine.feed.version,
                           last_transfer_id=transfer_id if amount > 0 else last_transfer_id)
        tx.enqueue(fare_events.journey_completed(journey, end))
        return TapOutcome(Decision.OPEN, Reason.OK, max(amount, 0), 0, balance, journey.journey_id, self.currency)

    # --- pricing ------------------------------------------------------------------------------

    def _charge_leg(self, state: RiderFareState, leg: Leg, category: str | None) -> _Charge:
        charge = self.engine.charge_leg(state, leg, rider_category_id=category, fare_media_id=self.config.fare_media_id)
        last = charge.quote.legs[-1]
        return _Charge(charge.charge_minor, charge.state, last.match.fare_product_id if last.match else None)

    def _price(self, state: RiderFareState, leg: Leg, category: str | None, *, fallback_minor: int) -> _Charge:
        """Price an exit; a feed that cannot price it charges the hold (the maximum fare)."""
        try:
            return self._charge_leg(state, leg, category)
        except FareError as exc:
            log.error("exit could not be priced; charging the maximum fare", extra={"fields": {
                "reason": exc.reason, "error": exc.message}})
            return _Charge(fallback_minor, state, None, note=f"unpriceable ({exc.reason}); charged the maximum fare")

    # --- journeys with no exit ----------------------------------------------------------------

    def _close_incomplete(self, tx: AccountTx, journey: Journey, state: RiderFareState, last_transfer_id: str | None,
                          now: datetime, *, note: str) -> tuple[RiderFareState, str | None]:
        """Charge an open journey the maximum fare by posting its hold; the caller holds the
        lock. Returns the rider's fare state and last fare transfer afterwards."""
        leg = Leg(journey.entry_stop_id, journey.started_at, network_id=journey.network_id, incomplete=True)
        charge = self._price(state, leg, journey.rider_category, fallback_minor=journey.amount_held_minor)
        end = JourneyEnd(JourneyStatus.INCOMPLETE, now, charge.amount_minor, "", None, note=charge.note or note)
        try:
            end, _, _ = self._settle_hold(journey, end, refund_id="", last_transfer_id=None)
        except WalletRefusal as refusal:
            if refusal.reason not in HOLD_GONE:
                raise
            log.error("incomplete journey could not post its hold", extra={"fields": {
                "journey_id": journey.journey_id, "hold_id": journey.hold_id, "wallet_reason": refusal.reason}})
            end = replace(end, status=JourneyStatus.UNRESOLVED, fare_minor=0, transfer_id="",
                          note=f"hold not posted: wallet said {refusal.reason}")
            charge = replace(charge, state=state)
        last_transfer_id = end.transfer_id or last_transfer_id
        tx.close_journey(journey.journey_id, end)
        tx.save_fare_state(journey.account_id, charge.state, feed_version=self.engine.feed.version,
                           last_transfer_id=last_transfer_id)
        if end.status is JourneyStatus.INCOMPLETE:
            tx.enqueue(fare_events.journey_incomplete(journey, end))
        return charge.state, last_transfer_id

    def close_overdue_journeys(self, *, batch_max: int = 100) -> int:
        """Charge the maximum fare to open journeys whose exit is overdue; return how many."""
        now = self._clock()
        closed = 0
        for journey_id, account_id in self._repo.due_journeys(now, limit=batch_max):
            with self._repo.account_transaction(account_id, lock_timeout_ms=self.config.account_lock_timeout_ms) as tx:
                journey, state, last_transfer_id = tx.open_journey(account_id)
                if journey is None or journey.journey_id != journey_id or (
                        journey.incomplete_due_at is not None and journey.incomplete_due_at > now):
                    continue  # an exit or another worker got there first
                after_s = self.incomplete_after_s(journey.network_id)
                self._close_incomplete(tx, journey, state, last_transfer_id, now, note=f"no exit within {after_s} s")
                closed += 1
        return closed


def _in_order(state: RiderFareState, leg: Leg) -> Leg:
    """The leg, moved no earlier than the rider's last open leg: gate and validator clocks
    drift, and the engine prices legs in time order only."""
    if not state.open_legs:
        return leg
    latest = max(item.start_at for item in state.open_legs)
    if leg.start_at >= latest:
        return leg
    end_at = max(leg.end_at, latest) if leg.end_at is not None else None
    return replace(leg, start_at=latest, end_at=end_at)
