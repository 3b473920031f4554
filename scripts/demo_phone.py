"""The demo's phone rider: a rider pays a metro journey with signed QR codes from a phone.

`run(env)` runs against the running stack (`make demo` calls it from scripts/demo.py; on
its own: `source infra/env.sh && python scripts/demo_phone.py`):

1. open a rider account and fund it (as a succeeded top-up does);
2. the phone (phone_app) makes its Ed25519 key, registers it with the wallet, and renders
   its first QR code as a PNG under .local/demo/;
3. the gate emulator taps in with that code (`tap --phone-qr HEX`) and out with a fresh one
   the phone makes for the tap (`tap --phone-qr STATE.json`): the
   fare gate verifies each code with the issuer key alone, accepts its nonce once, holds
   the maximum fare on entry and charges the distance fare on exit;
4. a screenshot of the entry's code is replayed at another gate and refused (CREDENTIAL_REPLAYED);
5. the rider's balance is what was funded minus the fare.

It raises RuntimeError with the reason when something does not go as shown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc

from citytap.common.v1 import credential_pb2
from citytap.fare_gate.v1 import fare_gate_pb2, fare_gate_pb2_grpc
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs.grpc_client import connect, error_reason
from phone_app.device import Phone, qr_image

ROOT = Path(__file__).resolve().parents[1]
FUND_MINOR = 20_000  # NT$200
ENTRY_GATE, ENTRY_STOP = "HBR-G1", "HBR"  # Harbour
EXIT_GATE, EXIT_STOP = "UNI-G2", "UNI"  # University, 8.0 km away: NT$25


def _emulator_tap(env: Mapping[str, str], phone_qr: str, gate: str, stop: str, direction: str, at: datetime
                  ) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "services.fare_gate.emulator", "tap", "--gate", gate, "--stop", stop,
         "--direction", direction, "--phone-qr", phone_qr, "--at", at.isoformat(), "--json"],
        cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=60)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"the gate emulator failed: {done.stderr.strip() or done.stdout.strip()}")
    return json.loads(done.stdout)


def run(env: Mapping[str, str]) -> None:
    print("\n== a phone rider: signed QR codes at the metro gates", flush=True)
    wallet_channel = connect(env["CITYTAP_WALLET_ADDRESS"], default_timeout_s=5)
    fare_gate_channel = connect(env["CITYTAP_FARE_GATE_ADDRESS"], default_timeout_s=5)
    wallet = wallet_pb2_grpc.WalletServiceStub(wallet_channel)
    gate = fare_gate_pb2_grpc.FareGateServiceStub(fare_gate_channel)
    try:
        account_id = f"demo-phone-{uuid.uuid4().hex[:10]}"
        wallet.CreateAccount(wallet_pb2.CreateAccountRequest(account_id=account_id))
        from loadtests.taps import LedgerFunder  # credits as a succeeded top-up does

        funder = LedgerFunder(dict(env), pool_size=1)
        try:
            funder(account_id, FUND_MINOR, f"fund-{account_id}")
        finally:
            funder.close()
        print(f"  rider {account_id} funded with TWD {FUND_MINOR / 100:.2f}")

        with tempfile.TemporaryDirectory() as scratch:
            state = Path(scratch) / "phone.json"
            phone = Phone.new(account_id, label="demo phone", path=state)
            phone.save()
            phone.register(wallet)
            phone.save()
            first = phone.qr_payload()
            out_dir = ROOT / ".local" / "demo"
            out_dir.mkdir(parents=True, exist_ok=True)
            version = qr_image(first, out_dir / "phone-qr.png")
            assert phone.certificate is not None
            print(f"  phone {phone.device_id} registered; issuer key {phone.certificate.issuer_key_id}")
            print(f"  a QR code is {len(first)} bytes: QR version {version} at medium error correction "
                  f"({out_dir / 'phone-qr.png'})")

            now = datetime.now(timezone.utc)
            entry = _emulator_tap(env, first.hex(), ENTRY_GATE, ENTRY_STOP, "entry", now - timedelta(minutes=18))
            print(f"  entry at {ENTRY_GATE:<7} {entry['decision']:<5} held TWD {entry['held_minor'] / 100:.2f}"
                  f"  ({entry['latency_ms']:.1f} ms)")
            exit_ = _emulator_tap(env, str(state), EXIT_GATE, EXIT_STOP, "exit", now)
            print(f"  exit at  {EXIT_GATE:<7} {exit_['decision']:<5} fare TWD {exit_['fare_minor'] / 100:.2f}"
                  f"  ({exit_['latency_ms']:.1f} ms)")
            if (entry["decision"], exit_["decision"]) != ("OPEN", "OPEN"):
                raise RuntimeError(f"the phone rider was refused: {entry['reason']} / {exit_['reason']}")

            # A screenshot of the entry's code, shown at another gate moments later.
            replayed = fare_gate_pb2.TapRequest(
                tap_id=str(uuid.uuid4()), gate_id="CEN-G1", direction=fare_gate_pb2.TAP_DIRECTION_ENTRY,
                credential=credential_pb2.Credential(phone_qr=first))
            replayed.tapped_at.GetCurrentTime()
            try:
                gate.Tap(replayed)
            except grpc.RpcError as exc:
                status = exc.code().name  # type: ignore[attr-defined]
                print(f"  the entry's code replayed at CEN-G1: refused, {status} {error_reason(exc)}")
                if error_reason(exc) != "CREDENTIAL_REPLAYED":
                    raise RuntimeError(f"a replayed code was refused for the wrong reason: {error_reason(exc)}"
                                       ) from exc
            else:
                raise RuntimeError("a replayed phone code was accepted")

        balance = wallet.GetBalance(wallet_pb2.GetBalanceRequest(account_id=account_id))
        expected = FUND_MINOR - exit_["fare_minor"]
        print(f"  balance TWD {balance.balance.amount_minor / 100:.2f} = TWD {FUND_MINOR / 100:.2f} funded"
              f" - TWD {exit_['fare_minor'] / 100:.2f} fare")
        if balance.balance.amount_minor != expected or balance.held.amount_minor != 0:
            raise RuntimeError(f"the phone rider's balance is {balance.balance.amount_minor}, expected {expected}")
    finally:
        wallet_channel.close()
        fare_gate_channel.close()


if __name__ == "__main__":
    try:
        run(os.environ)
    except RuntimeError as exc:
        print(f"demo_phone: {exc}", file=sys.stderr)
        sys.exit(1)
