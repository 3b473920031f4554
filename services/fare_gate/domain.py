"""The tap path's pure domain: vocabulary, tap validation, derived ids, and the decisions
that need no I/O (double taps, passback, exits without entry).

Nothing here imports grpc, redis, psycopg or kafka, and nothing reads a clock: callers pass
`now`. The service layer (taps.py) gathers the facts (the rider's open journey, the last
tap that opened this gate for this credential), asks `screen` what they mean, and carries
the answer out against the wallet and PostgreSQL.

Glossary (see also the architecture brief):
- *tap*: one read of a credential at a gate, with a client-generated `tap_id`;
- *journey*: what an entry tap begins and an exit tap ends (a validate tap on a bus is a
  whole journey by itself);
- *hold*: the maximum fare reserved in the wallet by an entry, later *posted* for the real
  fare (the rest is released) or *voided*;
- *transfer*: a posted movement of money in the wallet's ledger.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from libs import errors

# --- vocabulary (the numbers are the proto enums' numbers) ------------------------------


class Direction(enum.IntEnum):
    ENTRY = 1
    EXIT = 2
    VALIDATE = 3


class Decision(enum.IntEnum):
    OPEN = 1
    DENY = 2


class Reason(enum.IntEnum):
    """Why a tap opened or not; precedence is the order `screen` checks them in."""

    OK = 1
    DENIED_UNKNOWN_CREDENTIAL = 2
    DENIED_BLOCKED = 7
    DENIED_PASSBACK = 9
    DENIED_INSUFFICIENT_BALANCE = 10
    OK_DOUBLE_TAP = 12
    DENIED_NO_ENTRY = 13


class GateKind(enum.IntEnum):
    STATION_GATE = 1
    VEHICLE_VALIDATOR = 2


class CredentialKind(enum.IntEnum):
    CARD = 1
    PHONE_QR = 2
    NFC = 3
    FACE = 4


class JourneyStatus(enum.Enum):
    OPEN = "OPEN"  # entered, not yet exited; the maximum fare is held
    COMPLETED = "COMPLETED"  # exited (or validated on board) and charged
    INCOMPLETE = "INCOMPLETE"  # no exit in time: charged the maximum fare
    UNRESOLVED = "UNRESOLVED"  # the wallet's hold was no longer ours to post; support must look


# --- limits -------------------------------------------------------------------------------

CARD_UID_LENGTHS = (4, 7, 10)
# Phone credentials: a QR payload is about 340 bytes (libs/device_credentials.py); anything
# over this is refused unread. An NFC token is the wallet's "nfc_" + 32 characters.
PHONE_QR_BYTES_MAX = 1024
NFC_TOKEN_CHARS_MAX = 64
# Face credentials: the face service's model makes 128-d embeddings; a liveness burst is a
# few frames, each a JPEG or PNG of bounded size.
FACE_EMBEDDING_DIMENSIONS = 128
FACE_FRAMES_MAX = 16
FACE_FRAME_BYTES_MAX = 2 * 1024 * 1024
ID_CHARS_MAX = 64
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

# Derived ids live in their own UUID namespace, so they never collide with client ids.
_NAMESPACE = uuid.UUID("6f1d7f4e-2b0c-5c43-9a51-4f6d0c3e8a21")


# --- gates ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gate:
    """A barrier gate at a station, or a validator on board a vehicle (gates.py loads them)."""

    gate_id: str
    kind: GateKind
    network_id: str
    stop_id: str | None  # the station of a station gate; None for a vehicle validator
    route_id: str | None  # the default route of a vehicle validator
    source: str  # where the gate is defined, such as "demo_city.csv:4"


# --- a tap ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaceProbe:
    """A face as the gate sent it: an embedding computed on the gate, or camera frames."""

    embedding: tuple[float, ...] = ()
    frames: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class TapInput:
    """A tap as it arrived, before any check (the servicer fills it from the proto)."""

    tap_id: str
    gate_id: str
    stop_id: str
    direction: int
    tapped_at: datetime | None
    credential_kind: CredentialKind | None
    card_uid: bytes
    route_id: str
    phone_qr: bytes = b""  # the QR payload's bytes, for a PHONE_QR credential
    nfc_token: str = ""  # the virtual card token, for an NFC credential
    face: FaceProbe | None = None  # for a FACE credential


@dataclass(frozen=True, slots=True)
class Tap:
    """A checked tap: the gate is known, the stop and route agree with it, times are sane."""

    tap_id: str  # canonical lower-case UUID
    gate: Gate
    stop_id: str
    direction: Direction
    tapped_at: datetime  # UTC
    card_uid: bytes  # empty unless the credential is a card
    route_id: str | None
    network_id: str
    credential_kind: CredentialKind = CredentialKind.CARD
    phone_qr: bytes = b""
    nfc_token: str = ""
    face: FaceProbe | None = None

    @property
    def gate_id(self) -> str:
        return self.gate.gate_id


class Catalogue:
    """What validation needs to know about the feed: which stops and routes exist, and each
    route's network. Built from the engine's feed by the composition root."""

    def __init__(self, stops: frozenset[str], route_networks: dict[str, str | None]) -> None:
        self.stops = stops
        self.route_networks = route_networks


def _invalid(field: str, message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument("INVALID_ARGUMENT", message, field=field)


def check_tap_id(tap_id: str) -> str:
    """The tap id as a canonical lower-case UUID; anything else is INVALID_ARGUMENT."""
    if not isinstance(tap_id, str) or not _UUID.match(tap_id):
        raise _invalid("tap_id", "tap_id must be a UUID such as 0b6a3c1e-8f0d-4c1e-9a7b-2f4e5d6c7b8a")
    return tap_id.lower()


def validate_tap(raw: TapInput, gates: dict[str, Gate], catalogue: Catalogue, *, now: datetime,
                 tap_age_s_max: int, clock_skew_s_max: int) -> Tap:
    """Check everything about a tap that needs no account; raise the first problem found.

    Errors: INVALID_ARGUMENT (metadata `field`) for a malformed field, UNSUPPORTED_CREDENTIAL
    for a credential kind this version does not take, NOT_FOUND (metadata `resource`) for an
    unknown gate, stop or route. Nothing is recorded for a tap that fails here.
    """
    tap_id = check_tap_id(raw.tap_id)
    if not raw.gate_id:
        raise _invalid("gate_id", "gate_id is required")
    if not _ID.match(raw.gate_id):
        raise _invalid("gate_id", "gate_id must be 1 to 64 characters of letters, digits, '.', '_', ':' or '-'")
    gate = gates.get(raw.gate_id)
    if gate is None:
        raise errors.NotFound("NOT_FOUND", f"no gate {raw.gate_id!r}", resource="gate", field="gate_id")
    try:
        direction = Direction(raw.direction)
    except ValueError:
        raise _invalid("direction", "direction must be TAP_DIRECTION_ENTRY, TAP_DIRECTION_EXIT or "
                                    "TAP_DIRECTION_VALIDATE") from None
    if gate.kind is GateKind.STATION_GATE and direction is Direction.VALIDATE:
        raise _invalid("direction", f"gate {gate.gate_id} is a station gate: it takes entry and exit taps")
    if gate.kind is GateKind.VEHICLE_VALIDATOR and direction is not Direction.VALIDATE:
        raise _invalid("direction", f"gate {gate.gate_id} is a vehicle validator: it takes validate taps only")
    stop_id = _check_stop(raw.stop_id, gate, catalogue)
    route_id, network_id = _check_route(raw.route_id, gate, catalogue)
    tapped_at = _check_time(raw.tapped_at, now, tap_age_s_max, clock_skew_s_max)
    kind = _check_credential(raw)
    return Tap(tap_id, gate, stop_id, direction, tapped_at, raw.card_uid if kind is CredentialKind.CARD else b"",
               route_id, network_id, kind, raw.phone_qr if kind is CredentialKind.PHONE_QR else b"",
               raw.nfc_token if kind is CredentialKind.NFC else "", raw.face if kind is CredentialKind.FACE else None)


def _check_stop(stop_id: str, gate: Gate, catalogue: Catalogue) -> str:
    if gate.kind is GateKind.STATION_GATE:
        assert gate.stop_id is not None
        if stop_id and stop_id != gate.stop_id:
            raise _invalid("stop_id", f"gate {gate.gate_id} stands at stop {gate.stop_id}, not {stop_id!r}")
        return gate.stop_id
    if not stop_id:
        raise _invalid("stop_id", "a validate tap names the stop where the rider boarded")
    if stop_id not in catalogue.stops:
        raise errors.NotFound("NOT_FOUND", f"no stop {stop_id!r} in the fare feed", resource="stop", field="stop_id")
    return stop_id


def _check_route(route_id: str, gate: Gate, catalogue: Catalogue) -> tuple[str | None, str]:
    if not route_id:
        return gate.route_id, gate.network_id
    if route_id not in catalogue.route_networks:
        raise errors.NotFound("NOT_FOUND", f"no route {route_id!r} in the fare feed", resource="route", field="route_id")
    network = catalogue.route_networks[route_id]
    if network != gate.network_id:
        raise _invalid("route_id", f"route {route_id} is not in network {gate.network_id} of gate {gate.gate_id}")
    return route_id, gate.network_id


def _check_time(tapped_at: datetime | None, now: datetime, tap_age_s_max: int, clock_skew_s_max: int) -> datetime:
    if tapped_at is None:
        raise _invalid("tapped_at", "tapped_at is required")
    tapped_at = tapped_at.astimezone(timezone.utc)
    if tapped_at > now + timedelta(seconds=clock_skew_s_max):
        raise _invalid("tapped_at", f"tapped_at is more than {clock_skew_s_max} s ahead of the server's clock")
    if tapped_at < now - timedelta(seconds=tap_age_s_max):
        raise _invalid("tapped_at", f"tapped_at is more than {tap_age_s_max} s old; upload old taps as offline taps")
    return tapped_at


def _check_credential(raw: TapInput) -> CredentialKind:
    """The credential's shape only; whether it is genuine is credentials.py's question."""
    kind = raw.credential_kind
    if kind is None:
        raise _invalid("credential", "the tap must carry exactly one credential")
    if kind is CredentialKind.CARD:
        if len(raw.card_uid) not in CARD_UID_LENGTHS:
            raise _invalid("credential.card_uid", "a card UID is 4, 7 or 10 bytes")
    elif kind is CredentialKind.PHONE_QR:
        if not raw.phone_qr or len(raw.phone_qr) > PHONE_QR_BYTES_MAX:
            raise _invalid("credential.phone_qr", f"a phone QR payload is 1 to {PHONE_QR_BYTES_MAX} bytes")
    elif kind is CredentialKind.NFC:
        token = raw.nfc_token
        if not token or len(token) > NFC_TOKEN_CHARS_MAX or not token.isascii() or not token.isprintable():
            raise _invalid("credential.nfc_token", f"an NFC token is 1 to {NFC_TOKEN_CHARS_MAX} printable ASCII "
                                                   "characters")
    elif kind is CredentialKind.FACE:
        _check_face(raw.face)
    return kind


def _check_face(face: FaceProbe | None) -> None:
    if face is None or bool(face.embedding) == bool(face.frames):
        raise _invalid("credential", "a face credential carries an embedding or frames")
    if face.embedding:
        if len(face.embedding) != FACE_EMBEDDING_DIMENSIONS or not all(math.isfinite(v) for v in face.embedding):
            raise _invalid("credential.face_embedding", f"a face embedding is {FACE_EMBEDDING_DIMENSIONS} finite "
                                                        "numbers")
        return
    if len(face.frames) > FACE_FRAMES_MAX or any(not f or len(f) > FACE_FRAME_BYTES_MAX for f in face.frames):
        raise _invalid("credential.face_frames", f"a face burst is 1 to {FACE_FRAMES_MAX} frames of 1 byte to "
                                                 f"{FACE_FRAME_BYTES_MAX // (1024 * 1024)} MiB each")


# --- derived ids and fingerprints --------------------------------------------------------


def hold_id_for(tap_id: str) -> str:
    """The wallet id of the hold an entry tap places, or of the transfer a validate tap makes.

    Derived from the tap id alone, so a retried tap asks the wallet for the very same hold
    or transfer, and the wallet's own idempotency makes the retry harmless."""
    return f"fare:{tap_id}"


def journey_id_for(tap_id: str) -> str:
    """The id of the journey an entry or validate tap begins."""
    return str(uuid.uuid5(_NAMESPACE, f"journey:{tap_id}"))


def event_id_for(subject: str, kind: str) -> str:
    """The outbox event id of fact `kind` about `subject`: each fact is written once."""
    return str(uuid.uuid5(_NAMESPACE, f"event:{kind}:{subject}"))


def pseudonym(key: bytes, kind: str, value: bytes) -> bytes:
    """HMAC-SHA256(key, kind + ":" + value): a credential's stable, unlinkable name."""
    return hmac.new(key, kind.encode() + b":" + value, hashlib.sha256).digest()


def credential_hash(key: bytes, card_uid: bytes) -> bytes:
    """The pseudonym of a card under fare-gate's credential key.

    Used as the cache key, in the double-tap index and in fingerprints, so no card UID is
    ever stored or logged in clear."""
    return pseudonym(key, "card", card_uid)


def tap_fingerprint(tap: Tap, card_hash: bytes) -> bytes:
    """What a retry must repeat exactly: every field the gate chose, the card by its pseudonym."""
    tapped = tap.tapped_at
    parts = ["tap.v1", tap.tap_id, tap.gate_id, tap.stop_id, str(int(tap.direction)),
             f"{int(tapped.timestamp())}.{tapped.microsecond:06d}", card_hash.hex(), tap.route_id or ""]
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


# --- the answer ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TapOutcome:
    """The answer to a tap, as recorded and as replayed for a retry."""

    decision: Decision
    reason: Reason
    fare_charged_minor: int = 0
    amount_held_minor: int = 0
    balance_minor: int | None = None  # available balance after the tap; None when unknown
    journey_id: str = ""
    currency: str = ""

    def repeated(self) -> TapOutcome:
        """What a double tap of this opened tap answers: the same opening, nothing charged."""
        return TapOutcome(self.decision, Reason.OK_DOUBLE_TAP, 0, 0, self.balance_minor, self.journey_id, self.currency)


@dataclass(frozen=True, slots=True)
class RecordedTap:
    """A tap already in the database, with the fingerprint of the request that made it."""

    tap_id: str
    request_hash: bytes
    outcome: TapOutcome


def replay(recorded: RecordedTap, fingerprint: bytes) -> TapOutcome:
    """The original answer for a retried tap id, or IDEMPOTENCY_CONFLICT for another payload."""
    if recorded.request_hash != fingerprint:
        raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"tap {recorded.tap_id} was already recorded with another payload",
                              tap_id=recorded.tap_id)
    return recorded.outcome


# --- screening: what the facts mean before any money moves ------------------------------------


@dataclass(frozen=True, slots=True)
class OpenJourneyFacts:
    """The rider's open journey, as far as screening needs it."""

    journey_id: str
    started_at: datetime


class Verdict(enum.Enum):
    DENY = "deny"  # refuse with `reason`
    REPEAT = "repeat"  # a double tap: answer the earlier opening again
    PROCEED = "proceed"  # go on to the money: hold, post or charge
    CLOSE_STALE_THEN_PROCEED = "close-stale"  # charge the stale open journey as incomplete first


@dataclass(frozen=True, slots=True)
class Screen:
    verdict: Verdict
    reason: Reason | None = None
    repeat_of: TapOutcome | None = None


def within(earlier: datetime, later: datetime, window_s: int) -> bool:
    """True when the two moments are at most `window_s` apart (either order: gate clocks drift)."""
    return window_s > 0 and abs((later - earlier).total_seconds()) <= window_s


def screen(direction: Direction, *, blocked: bool, tapped_at: datetime,
           last_opening_here: tuple[datetime, TapOutcome] | None, open_journey: OpenJourneyFacts | None,
           double_tap_window_s: int, passback_window_s: int) -> Screen:
    """Decide what a tap of a known account means before money moves.

    Checks in order (the first that applies wins):
    1. blocked account: deny, except an exit that ends an open journey, which is let out
       and charged (the hold was placed before the block; the wallet lets it be posted);
    2. double tap: the same credential opened this gate in this direction within the
       window, so open again for nothing;
    3. entry with an open journey: passback within the window, else the stale journey is
       charged as incomplete before the new one begins;
    4. exit with no open journey: deny, no entry;
    5. otherwise proceed.
    `last_opening_here` is the latest opened tap of this credential at this gate in this
    direction, with its time.
    """
    if blocked and not (direction is Direction.EXIT and open_journey is not None):
        return Screen(Verdict.DENY, Reason.DENIED_BLOCKED)
    if last_opening_here is not None and within(last_opening_here[0], tapped_at, double_tap_window_s):
        return Screen(Verdict.REPEAT, repeat_of=last_opening_here[1].repeated())
    if direction is Direction.ENTRY and open_journey is not None:
        if passback_window_s > 0 and (tapped_at - open_journey.started_at).total_seconds() < passback_window_s:
            return Screen(Verdict.DENY, Reason.DENIED_PASSBACK)
        return Screen(Verdict.CLOSE_STALE_THEN_PROCEED)
    if direction is Direction.EXIT and open_journey is None:
        return Screen(Verdict.DENY, Reason.DENIED_NO_ENTRY)
    if direction is Direction.VALIDATE and open_journey is not None:
        # On board a vehicle with a station journey still open: the rider left the paid
        # area without an exit tap, so that journey is incomplete.
        return Screen(Verdict.CLOSE_STALE_THEN_PROCEED)
    return Screen(Verdict.PROCEED)


def hold_expiry(started_at: datetime, incomplete_after_s: int, grace_s: int) -> datetime:
    """When an entry hold lapses: grace after the journey is due to be charged as incomplete.

    A function of the tap alone, so a retried entry asks for exactly the same hold."""
    return started_at + timedelta(seconds=incomplete_after_s + grace_s)


# --- journeys -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Journey:
    """A journey as stored: what its entry (or validate) tap began."""

    journey_id: str
    account_id: str
    status: JourneyStatus
    network_id: str
    rider_category: str | None  # the category priced at entry; None: the feed's default
    currency: str
    entry_tap_id: str
    entry_gate_id: str
    entry_stop_id: str
    route_id: str | None
    started_at: datetime
    hold_id: str | None
    amount_held_minor: int
    incomplete_due_at: datetime | None

    def facts(self) -> OpenJourneyFacts:
        return OpenJourneyFacts(self.journey_id, self.started_at)


@dataclass(frozen=True, slots=True)
class JourneyEnd:
    """How a journey ended: what was charged and which wallet transfer moved it."""

    status: JourneyStatus
    closed_at: datetime
    fare_minor: int  # signed: negative when the journey refunded part of the one before
    transfer_id: str  # empty when nothing moved
    fare_product_id: str | None = None
    exit_tap_id: str | None = None
    exit_gate_id: str | None = None
    exit_stop_id: str | None = None
    ended_at: datetime | None = None
    note: str | None = None
