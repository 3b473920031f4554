"""`python -m services.fare_gate.emulator`: a gate emulator a gate vendor can point at the fare API.

    tap       --gate G --stop S --direction entry|exit|validate (--card HEX | --phone-qr HEX|STATE.json | --nfc TOKEN)
              [--tap-id ID] [--at ISO] [--route R]
    config    --gate G
    quote     --from S --to S [--at ISO] [--end-at ISO] [--category C] [--network N] [--route R] [--media M]
    scenario  FILE [--setup] [--fund MODULE:FACTORY] [--date YYYY-MM-DD|today] [--shift-to-now] [--pace-ms N]
    load      --rate R --duration S [--warmup S] [--riders N] [--gates G=S ...] [--setup] [--fund MODULE:FACTORY]

Every command takes --address HOST:PORT (default: $CITYTAP_FARE_GATE_ADDRESS, which
`source infra/env.sh` sets) and --deadline-ms (the deadline of each call). `--json` prints
answers as JSON. See services/fare_gate/EMULATOR.md for the scenario format and for how the
load mode measures.

Exit status:
  tap        0 the barrier opens (OPEN), 1 it stays closed (DENY), 2 the call failed
  config, quote   0 answered, 2 the call failed
  scenario   0 every tap answered and every expectation held, 1 some expectation failed,
             2 a call failed, the file is invalid, or riders could not be set up
  load       0 the run had no errors, 1 errors were counted, 2 the run could not start
  any        2 the command line is wrong
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from google.protobuf.message import Message

from citytap.common.v1 import credential_pb2, money_pb2
from citytap.fare_gate.v1 import fare_gate_pb2
from services.fare_gate.emulator import load as load_mode
from services.fare_gate.emulator import play as play_mode
from services.fare_gate.emulator.gate import CallFailed, FareGateClient, TapReply, WalletClient, tap_request, timestamp
from services.fare_gate.emulator.openloop import RATE_PER_S_MAX, DURATION_S_MAX
from services.fare_gate.emulator.provision import SetupError, load_funder, set_up_riders
from services.fare_gate.emulator.report import format_run, money, ms, run_to_dict
from services.fare_gate.emulator.riders import RiderError, RiderPool, parse_gates, station_gates
from services.fare_gate.emulator.scenario import ScenarioError, load_scenario, parse_card_uid
from services.fare_gate.emulator.settings import FARE_GATE_ADDRESS_ENV, WALLET_ADDRESS_ENV, defaults

EXIT_OK = 0
EXIT_DENIED = 1  # tap: DENY; scenario: an expectation failed; load: errors were counted
EXIT_FAILED = 2

DEADLINE_MS_DEFAULT = 1000
DEADLINE_MS_MAX = 60_000
SETUP_DEADLINE_S = 5.0
# The demo city's metro stations (services/fare_gate/feeds/demo_city/stops.txt).
DEMO_CITY_STATIONS = ("HBR", "OLD", "CEN", "UNI", "HSP", "NHL", "APT", "RIV", "MKT", "STD")
GATES_PER_STATION_DEFAULT = 2
RIDERS_DEFAULT = 400
RIDERS_MAX = 20_000
FUND_MINOR_DEFAULT = 500_000  # NT$5,000: thousands of metro rides, well under the stored-value limit
PNG_DEFAULT = ".local/bench/tap_latency.png"
SHIFT_MARGIN_S = 1.0  # --shift-to-now puts the last tap this long before now, never ahead of the server's clock


class UsageError(Exception):
    """The command line cannot be understood; the message says how to fix it."""


class Out:
    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self.stdout, self.stderr = stdout, stderr

    def out(self, line: str = "") -> None:
        print(line, file=self.stdout, flush=True)

    def err(self, line: str) -> None:
        print(line, file=self.stderr, flush=True)


def new_run_id(prefix: str = "emu") -> str:
    """Ids of one run: accounts, tap ids and funding ids all start with it."""
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def parse_moment(text: str, option: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected an ISO 8601 time such as 2026-12-01T08:00:00+08:00") from None
    if moment.tzinfo is None:
        raise UsageError(f"{option} {text!r}: give a UTC offset (2026-12-01T08:00:00+08:00, or ...Z for UTC)")
    return moment


def _address(args: argparse.Namespace) -> str:
    if not args.address:
        raise UsageError(f"no fare gate address: pass --address HOST:PORT or set {FARE_GATE_ADDRESS_ENV} "
                         "(`source infra/env.sh` sets it for the local stack)")
    return str(args.address)


def _deadline_s(args: argparse.Namespace) -> float:
    if not 1 <= args.deadline_ms <= DEADLINE_MS_MAX:
        raise UsageError(f"--deadline-ms must be in [1, {DEADLINE_MS_MAX}]")
    return float(args.deadline_ms) / 1000.0


def _client(args: argparse.Namespace) -> FareGateClient:
    return FareGateClient(_address(args), deadline_s=_deadline_s(args))


def _report_failure(out: Out, failure: CallFailed) -> int:
    out.err(f"error: {failure.describe()}")
    out.err(f"       status {failure.code}, reason {failure.reason or '(none)'}")
    return EXIT_FAILED


# --- rendering ------------------------------------------------------------------------------


def message_dict(message: Message) -> dict[str, Any]:
    """A proto message as plain JSON values: enums by name, Money as minor units + currency,
    timestamps as ISO 8601."""
    result: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.full_name == "google.protobuf.Timestamp":
            result[field.name] = value.ToDatetime(tzinfo=timezone.utc).isoformat()
        elif isinstance(value, money_pb2.Money):
            result[field.name] = {"amount_minor": value.amount_minor, "currency": value.currency}
        elif field.message_type is not None and field.label != field.LABEL_REPEATED:
            result[field.name] = message_dict(value)
        elif field.enum_type is not None:
            result[field.name] = field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
        else:
            result[field.name] = value
    return result


def _field_lines(message: Message) -> list[str]:
    lines = []
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if isinstance(value, money_pb2.Money):
            text = money(value.amount_minor, value.currency) if message.HasField(field.name) else "-"
        elif field.enum_type is not None:
            text = field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else str(value)
        elif field.message_type is not None and field.message_type.full_name == "google.protobuf.Timestamp":
            text = value.ToDatetime(tzinfo=timezone.utc).isoformat() if message.HasField(field.name) else "-"
        else:
            text = str(value) if value not in ("", None) else "-"
        lines.append(f"{field.name:<26} {text}")
    return lines


def _tap_dict(reply: TapReply, latency_ms: float, tap_id: str) -> dict[str, Any]:
    return {"tap_id": tap_id, "decision": reply.decision, "reason": reply.reason, "fare_minor": reply.fare_minor,
            "held_minor": reply.held_minor, "balance_minor": reply.balance_minor, "currency": reply.currency,
            "journey_id": reply.journey_id, "latency_ms": round(latency_ms, 3)}


# --- commands -------------------------------------------------------------------------------


def phone_credential(args: argparse.Namespace) -> credential_pb2.Credential | None:
    """The phone credential of `tap --phone-qr` or `tap --nfc`, or None for a card tap.

    --phone-qr takes the hex payload `python -m phone_app qr` prints, or the path of a
    phone_app state file (*.json), from which a fresh code is made for this very tap."""
    if args.nfc is not None:
        if not args.nfc:
            raise UsageError("--nfc: the token is empty")
        return credential_pb2.Credential(nfc_token=args.nfc)
    if args.phone_qr is None:
        return None
    text = args.phone_qr.strip()
    if text.endswith(".json"):
        from phone_app.device import Phone, PhoneError  # only phone taps need the phone emulator

        try:
            return credential_pb2.Credential(phone_qr=Phone.load(Path(text)).qr_payload())
        except PhoneError as exc:
            raise UsageError(f"--phone-qr: {exc}") from None
    try:
        payload = bytes.fromhex(text)
    except ValueError:
        raise UsageError("--phone-qr: expected the payload in hex, or a phone_app state file (*.json)") from None
    if not payload:
        raise UsageError("--phone-qr: the payload is empty")
    return credential_pb2.Credential(phone_qr=payload)


def cmd_tap(args: argparse.Namespace, out: Out) -> int:
    phone = phone_credential(args)
    card = b""
    if phone is None:
        try:
            card = parse_card_uid(args.card)
        except ValueError as exc:
            raise UsageError(f"--card: {exc}") from None
    at = parse_moment(args.at, "--at") if args.at else datetime.now(timezone.utc)
    tap_id = args.tap_id or str(uuid.uuid4())
    request = tap_request(tap_id=tap_id, gate_id=args.gate, stop_id=args.stop, direction=args.direction,
                          card_uid=card, tapped_at=at, route_id=args.route or "")
    if phone is not None:
        request.credential.CopyFrom(phone)
    with _client(args) as client:
        try:
            reply, latency_ms = client.tap(request)
        except CallFailed as exc:
            return _report_failure(out, exc)
    if args.json:
        out.out(json.dumps(_tap_dict(reply, latency_ms, tap_id)))
    else:
        for name, value in (("decision", reply.decision), ("reason", reply.reason),
                            ("fare", money(reply.fare_minor, reply.currency)),
                            ("held", money(reply.held_minor, reply.currency)),
                            ("balance", money(reply.balance_minor, reply.currency)),
                            ("journey", reply.journey_id or "-"), ("latency", f"{latency_ms:.1f} ms"),
                            ("tap id", tap_id)):
            out.out(f"{name:<9} {value}")
    return EXIT_OK if reply.opens else EXIT_DENIED


def cmd_config(args: argparse.Namespace, out: Out) -> int:
    with _client(args) as client:
        try:
            config = client.gate_config(args.gate)
        except CallFailed as exc:
            return _report_failure(out, exc)
    if args.json:
        out.out(json.dumps(message_dict(config)))
    else:
        for line in _field_lines(config):
            out.out(line)
    return EXIT_OK


def cmd_quote(args: argparse.Namespace, out: Out) -> int:
    fields: dict[str, Any] = {"from_stop_id": args.from_stop, "to_stop_id": args.to_stop,
                              "start_at": timestamp(parse_moment(args.at, "--at") if args.at else datetime.now(timezone.utc))}
    optional = {"rider_category": args.category, "network_id": args.network, "route_id": args.route,
                "fare_media_id": args.media}
    if args.end_at:
        optional["end_at"] = timestamp(parse_moment(args.end_at, "--end-at"))
    known = fare_gate_pb2.QuoteFareRequest.DESCRIPTOR.fields_by_name
    for name, value in optional.items():
        if value:
            if name not in known:
                raise UsageError(f"this build's QuoteFareRequest has no field {name}")
            fields[name] = value
    with _client(args) as client:
        try:
            response = client.quote(fare_gate_pb2.QuoteFareRequest(**fields))
        except CallFailed as exc:
            return _report_failure(out, exc)
    if args.json:
        out.out(json.dumps(message_dict(response)))
    else:
        for line in _field_lines(response):
            out.out(line)
    return EXIT_OK


def _wallet(args: argparse.Namespace) -> WalletClient:
    if not args.wallet_address:
        raise UsageError(f"--setup needs the wallet: pass --wallet-address HOST:PORT or set {WALLET_ADDRESS_ENV}")
    return WalletClient(args.wallet_address, deadline_s=SETUP_DEADLINE_S)


def _funder(args: argparse.Namespace) -> tuple[Any, Any]:
    if not args.fund:
        return None, (lambda: None)
    if not args.setup:
        raise UsageError("--fund works together with --setup (riders are funded as they are set up)")
    return load_funder(args.fund)


def _check_reachable(client: FareGateClient, out: Out) -> bool:
    try:
        status = client.health()
    except CallFailed as exc:
        _report_failure(out, exc)
        return False
    if status != "SERVING":
        out.err(f"error: the fare gate at {client.address} reports {status}, not SERVING")
        return False
    return True


def cmd_scenario(args: argparse.Namespace, out: Out) -> int:
    if not 0 <= args.pace_ms <= 60_000:
        raise UsageError("--pace-ms must be in [0, 60000]")
    on_date = None
    if args.date and args.date != "today":
        try:
            on_date = date.fromisoformat(args.date)
        except ValueError:
            raise UsageError(f"--date {args.date!r}: expected YYYY-MM-DD or today") from None
    try:
        scenario = load_scenario(args.file, on_date=on_date)
        if args.date == "today":  # today where the scenario happens, not where the emulator runs
            scenario = load_scenario(args.file, on_date=datetime.now(ZoneInfo(scenario.time_zone)).date())
        play_mode.check_reasons(scenario, args.file)
    except ScenarioError as exc:
        for problem in exc.problems:
            out.err(f"{exc.source}: {problem}")
        out.err(f"scenario INVALID: {len(exc.problems)} problem(s)")
        return EXIT_FAILED
    if args.shift_to_now:
        scenario = scenario.ending_at(datetime.now(timezone.utc) - timedelta(seconds=SHIFT_MARGIN_S))
    run_id = args.run_id or new_run_id("scn")
    cards = play_mode.rider_cards(scenario, seed=args.seed if args.seed is not None else secrets.randbits(32))
    client = _client(args)
    funder, close_funder = _funder(args)
    try:
        if not _check_reachable(client, out):
            return EXIT_FAILED
        out.out(f"scenario {scenario.name}: {len(scenario.riders)} riders, {len(scenario.taps)} taps over "
                f"{scenario.span}, against {client.address}, run {run_id}")
        if scenario.description:
            out.out(f"  {scenario.description}")
        if args.setup:
            wallet = _wallet(args)
            try:
                set_up_riders(wallet, play_mode.rider_setups(scenario, cards, run_id=run_id), funder=funder)
            except SetupError as exc:
                out.err(f"error: {exc}")
                return EXIT_FAILED
            finally:
                wallet.close()
            funded = " and funded" if funder is not None else ""
            out.out(f"  riders set up{funded}: accounts {play_mode.account_id(run_id, '<rider>')}")
        header = f"{'#':>3} {'time':<8} {'rider':<10} {'gate':<10} {'stop':<8} {'dir':<8} {'decision':<8} " \
                 f"{'reason':<28} {'fare':>10} {'held':>10} {'balance':>11} {'ms':>6}  check"
        out.out(header)

        zone = ZoneInfo(scenario.time_zone)

        def show(played: play_mode.PlayedTap) -> None:
            tap = played.tap
            local = tap.at.astimezone(zone).strftime("%H:%M:%S")
            prefix = f"{tap.index:>3} {local:<8} {tap.rider:<10} {tap.gate_id:<10} {tap.stop_id:<8} {tap.direction:<8}"
            if played.reply is None:
                assert played.failure is not None
                out.out(f"{prefix} ERROR    {played.failure.code}/{played.failure.reason or '-'}: {played.failure.message}")
                return
            r = played.reply
            check = "ok" if not played.mismatches else "FAILED: " + "; ".join(played.mismatches)
            if tap.expect.is_empty():
                check = "-"
            out.out(f"{prefix} {r.decision:<8} {r.reason:<28} {money(r.fare_minor, r.currency):>10} "
                    f"{money(r.held_minor, r.currency):>10} {money(r.balance_minor, r.currency):>11} "
                    f"{ms(played.latency_ms):>6}  {check}")

        try:
            results = play_mode.play(client, scenario, run_id=run_id, cards=cards, on_tap=show,
                                     pace_s=args.pace_ms / 1000.0)
        except CallFailed as exc:
            return _report_failure(out, exc)
    finally:
        client.close()
        close_funder()
    return _scenario_summary(results, out, args.json_out)


def _scenario_summary(results: list[play_mode.PlayedTap], out: Out, json_out: str | None) -> int:
    decisions = Counter(r.reply.decision for r in results if r.reply is not None)
    failures = [r for r in results if r.failure is not None]
    mismatched = [r for r in results if r.mismatches]
    checked = sum(1 for r in results if r.reply is not None and not r.tap.expect.is_empty())
    fares: Counter = Counter()
    currency = ""
    counted: set[str] = set()
    for r in results:
        if r.reply is not None and r.tap_id not in counted:  # a retry is answered, not charged, again
            counted.add(r.tap_id)
            fares[r.tap.rider] += r.reply.fare_minor
            currency = currency or r.reply.currency
    out.out("")
    out.out(f"taps {len(results)}: {', '.join(f'{k} {v}' for k, v in decisions.most_common()) or 'no answers'}, "
            f"errors {len(failures)}; expectations checked {checked}, failed {len(mismatched)}")
    out.out("fares charged (each tap id once): " + ", ".join(f"{rider} {money(total, currency)}" for rider, total in sorted(fares.items())))
    if json_out:
        document = [{"index": r.tap.index, "label": r.tap.tap_label, "tap_id": r.tap_id, "rider": r.tap.rider, "gate": r.tap.gate_id,
                     "stop": r.tap.stop_id, "direction": r.tap.direction, "at": r.tap.at.isoformat(),
                     "answer": _tap_dict(r.reply, r.latency_ms, r.tap_id) if r.reply else None,
                     "error": ({"code": r.failure.code, "reason": r.failure.reason, "message": r.failure.message}
                               if r.failure else None),
                     "mismatches": r.mismatches} for r in results]
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(document, indent=2) + "\n")
        out.out(f"results: {json_out}")
    if failures:
        return EXIT_FAILED
    return EXIT_DENIED if mismatched else EXIT_OK


def cmd_load(args: argparse.Namespace, out: Out) -> int:
    if not 0 < args.rate <= RATE_PER_S_MAX:
        raise UsageError(f"--rate must be in (0, {RATE_PER_S_MAX:.0f}]")
    if not 0 < args.duration <= DURATION_S_MAX or not 0 <= args.warmup <= DURATION_S_MAX:
        raise UsageError(f"--duration must be in (0, {DURATION_S_MAX:.0f}] and --warmup in [0, {DURATION_S_MAX:.0f}]")
    if not 1 <= args.riders <= RIDERS_MAX:
        raise UsageError(f"--riders must be in [1, {RIDERS_MAX}]")
    try:
        gates = parse_gates(args.gates) if args.gates else station_gates(DEMO_CITY_STATIONS, args.gates_per_station)
    except RiderError as exc:
        raise UsageError(str(exc)) from None
    shape = load_mode.LoadShape(args.rate, args.duration, args.warmup, _deadline_s(args))
    run_id = args.run_id or new_run_id("load")
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    riders = load_mode.synthetic_riders(args.riders, run_id=run_id, seed=seed, rider_category=args.category)
    try:
        pool = RiderPool(riders, gates, seed=seed)
    except RiderError as exc:
        raise UsageError(str(exc)) from None
    client = _client(args)
    funder, close_funder = _funder(args)
    try:
        if not _check_reachable(client, out):
            return EXIT_FAILED
        stations = len({g.stop_id for g in gates})
        out.out(f"load against {client.address}: run {run_id}, {len(riders)} riders, {len(gates)} gates at "
                f"{stations} stations, deadline {args.deadline_ms} ms, seed {seed}")
        if args.setup:
            wallet = _wallet(args)
            started = time.monotonic()
            try:
                set_up_riders(wallet, load_mode.rider_setups(riders, fund_minor=args.fund_minor), funder=funder)
            except SetupError as exc:
                out.err(f"error: {exc}")
                return EXIT_FAILED
            finally:
                wallet.close()
            out.out(f"riders set up{' and funded' if funder else ''} in {time.monotonic() - started:.1f} s")
        else:
            out.out("riders NOT set up (no --setup): their cards are unknown, so every tap is a denial")
        result = load_mode.run_taps(client, pool, shape, tap_id_prefix=run_id)
        baseline = None
        if args.baseline != "none":
            baseline = load_mode.run_baseline(client, shape, method=args.baseline, gate_id=gates[0].gate_id)
    finally:
        client.close()
        close_funder()
    for line in format_run(result):
        out.out(line)
    out.out(f"  riders: {pool.no_idle_rider} taps found every rider busy")
    if baseline is not None:
        out.out(f"baseline ({args.baseline}) at the same rate:")
        for line in format_run(baseline, what="calls")[1:]:
            out.out(line)
    if args.png:
        from services.fare_gate.emulator.plot import Series, write_latency_png

        series = [Series("Tap", result.latencies_ms(), result.error_count)]
        if baseline is not None:
            series.append(Series(f"baseline {args.baseline}", baseline.latencies_ms(), baseline.error_count))
        write_latency_png(args.png, series, title=f"Tap latency at {args.rate:g} taps/s, open loop, {args.duration:g} s",
                          subtitle=f"{client.address}, run {run_id}", budget_ms=args.budget_ms)
        out.out(f"picture: {args.png}")
    if args.json_out:
        document = {"run_id": run_id, "address": client.address, "riders": len(riders), "gates": len(gates),
                    "taps": run_to_dict(result), "baseline": run_to_dict(baseline) if baseline else None}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(document, indent=2) + "\n")
        out.out(f"results: {args.json_out}")
    return EXIT_OK if result.error_count == 0 else EXIT_DENIED


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    env = defaults()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=env.fare_gate_address,
                        help=f"host:port of the fare gate (default: ${FARE_GATE_ADDRESS_ENV}, now {env.fare_gate_address or 'unset'})")
    common.add_argument("--deadline-ms", type=int, default=DEADLINE_MS_DEFAULT,
                        help=f"deadline of each call in ms (default {DEADLINE_MS_DEFAULT})")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the answer as JSON")
    setup = argparse.ArgumentParser(add_help=False)
    setup.add_argument("--setup", action="store_true", help="open a wallet account and link the card of every rider first")
    setup.add_argument("--wallet-address", default=env.wallet_address,
                       help=f"host:port of the wallet, for --setup (default: ${WALLET_ADDRESS_ENV})")
    setup.add_argument("--fund", metavar="MODULE:FACTORY",
                       help="fund riders during --setup with FACTORY()'s funder, e.g. loadtests.taps:ledger_funder")
    setup.add_argument("--run-id", help="prefix of every id this run creates (default: a fresh one)")
    setup.add_argument("--seed", type=int, help="seed of the random card UIDs and stations (default: random)")

    parser = argparse.ArgumentParser(prog="python -m services.fare_gate.emulator", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    tap = commands.add_parser("tap", parents=[common, as_json], help="send one tap and print the decision")
    tap.add_argument("--gate", required=True, help="gate id")
    tap.add_argument("--stop", required=True, help="GTFS stop_id of the gate")
    tap.add_argument("--direction", required=True, choices=("entry", "exit", "validate"))
    credential = tap.add_mutually_exclusive_group(required=True)
    credential.add_argument("--card", help="card UID in hex (4, 7 or 10 bytes), e.g. 04a1b2c3d4e5f6")
    credential.add_argument("--phone-qr", help="a phone QR payload in hex (`python -m phone_app qr`), or a phone_app "
                                               "state file (*.json) to make a fresh code from")
    credential.add_argument("--nfc", help="a phone's NFC token (`python -m phone_app nfc`)")
    tap.add_argument("--tap-id", help="tap id, a UUID; reuse one to send a retry (default: a fresh one)")
    tap.add_argument("--at", help="tap time, ISO 8601 with a UTC offset (default: now)")
    tap.add_argument("--route", help="route_id, for validate taps on board")

    config = commands.add_parser("config", parents=[common, as_json], help="print a gate's settings (GetGateConfig)")
    config.add_argument("--gate", required=True, help="gate id")

    quote = commands.add_parser("quote", parents=[common, as_json], help="price a journey (QuoteFare); nothing is charged")
    quote.add_argument("--from", dest="from_stop", required=True, help="stop_id where the journey starts")
    quote.add_argument("--to", dest="to_stop", required=True, help="stop_id where it ends")
    quote.add_argument("--at", help="start time, ISO 8601 with a UTC offset (default: now)")
    quote.add_argument("--end-at", help="end time, ISO 8601 with a UTC offset")
    quote.add_argument("--category", help="rider_category_id (default: the feed's default)")
    quote.add_argument("--network", help="network_id")
    quote.add_argument("--route", help="route_id")
    quote.add_argument("--media", help="fare_media_id")

    scenario = commands.add_parser("scenario", parents=[common, setup], help="play a scenario file of riders and taps")
    scenario.add_argument("file", help="scenario JSON file (see EMULATOR.md); examples in services/fare_gate/emulator/scenarios/")
    scenario.add_argument("--date", help="run the scenario's clock times on this day (YYYY-MM-DD or today)")
    scenario.add_argument("--shift-to-now", action="store_true",
                          help="move every tap by the same amount so the last one is now (the fare gate refuses "
                               "taps older than its CITYTAP_FARE_GATE_TAP_AGE_S_MAX, 3600 s by default)")
    scenario.add_argument("--pace-ms", type=int, default=0, help="pause between taps, ms (default 0)")
    scenario.add_argument("--json-out", help="also write every tap and answer to this JSON file")

    load = commands.add_parser("load", parents=[common, setup], help="open-loop load at a fixed rate; latency percentiles and a PNG")
    load.add_argument("--rate", type=float, required=True, help="taps per second")
    load.add_argument("--duration", type=float, required=True, help="measured seconds")
    load.add_argument("--warmup", type=float, default=2.0, help="seconds of taps sent first and not counted (default 2)")
    load.add_argument("--riders", type=int, default=RIDERS_DEFAULT, help=f"synthetic riders (default {RIDERS_DEFAULT})")
    load.add_argument("--category", default="adult", help="rider category of the synthetic riders (default adult)")
    load.add_argument("--gates", nargs="+", metavar="GATE=STOP",
                      help="gates to tap at (default: the demo city's metro stations, --gates-per-station each)")
    load.add_argument("--gates-per-station", type=int, default=GATES_PER_STATION_DEFAULT,
                      help=f"gates STOP-G1.. at each default station (default {GATES_PER_STATION_DEFAULT})")
    load.add_argument("--fund-minor", type=int, default=FUND_MINOR_DEFAULT,
                      help=f"what --fund credits each rider, in minor units (default {FUND_MINOR_DEFAULT})")
    load.add_argument("--baseline", choices=("none", "config", "health"), default="none",
                      help="after the taps, the same schedule with GetGateConfig or the health check, for comparison")
    load.add_argument("--budget-ms", type=float, default=50.0, help="latency budget drawn on the picture (default 50)")
    load.add_argument("--png", default=PNG_DEFAULT, help=f"histogram picture to write (default {PNG_DEFAULT}; '' for none)")
    load.add_argument("--json-out", help="also write the results as JSON")
    return parser


HANDLERS = {"tap": cmd_tap, "config": cmd_config, "quote": cmd_quote, "scenario": cmd_scenario, "load": cmd_load}


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out = Out(stdout or sys.stdout, stderr or sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args, out)
    except UsageError as exc:
        out.err(f"usage error: {exc}")
        return EXIT_FAILED
    except SetupError as exc:
        out.err(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        out.err("interrupted")
        return EXIT_FAILED
