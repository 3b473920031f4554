"""`python -m phone_app register|qr|nfc|rotate`: a rider's phone, emulated.

    register  --account ID [--label L] [--device-id UUID]   make a key pair, register it, keep it
    qr        [--png FILE] [--format hex|base64]             print a fresh QR payload (and render it)
    nfc                                                      print the phone's NFC token
    rotate                                                   certify a new key in place of the old one

Common options: --state FILE (default .local/phone.json), --wallet-address HOST:PORT
(default $CITYTAP_WALLET_ADDRESS). Exit status: 0 done, 1 the wallet refused or is down,
2 bad usage or a missing/damaged state file.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

import grpc

from citytap.wallet.v1 import wallet_pb2_grpc
from libs.grpc_client import connect, error_reason
from phone_app.device import Phone, PhoneError, qr_image

DEFAULT_STATE = Path(".local/phone.json")


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, wallet_pb2_grpc.WalletServiceStub]:
    address = args.wallet_address or os.environ.get("CITYTAP_WALLET_ADDRESS", "")
    if not address:
        raise PhoneError("no wallet address: pass --wallet-address or set CITYTAP_WALLET_ADDRESS")
    channel = connect(address, default_timeout_s=5.0)
    return channel, wallet_pb2_grpc.WalletServiceStub(channel)


def cmd_register(args: argparse.Namespace) -> int:
    state = Path(args.state)
    if state.exists():
        phone = Phone.load(state)  # a retry after a lost answer: same id, same key
        if phone.account_id != args.account:
            raise PhoneError(f"{state} belongs to account {phone.account_id}; use another --state file")
    else:
        phone = Phone.new(args.account, label=args.label or "", device_id=args.device_id, path=state)
        phone.save()  # keep the key before the wallet sees it, so a retry reuses it
    channel, stub = _stub(args)
    with channel:
        phone.register(stub)
    phone.save()
    print(f"device {phone.device_id} registered for account {phone.account_id}")
    print(f"issuer key {phone.certificate.issuer_key_id}; state in {state}")  # type: ignore[union-attr]
    return 0


def cmd_qr(args: argparse.Namespace) -> int:
    phone = Phone.load(Path(args.state))
    payload = phone.qr_payload()
    text = payload.hex() if args.format == "hex" else base64.b64encode(payload).decode()
    print(text)
    if args.png:
        version = qr_image(payload, Path(args.png))
        print(f"{len(payload)} bytes, QR version {version} (medium error correction) written to {args.png}",
              file=sys.stderr)
    return 0


def cmd_nfc(args: argparse.Namespace) -> int:
    phone = Phone.load(Path(args.state))
    if not phone.nfc_token:
        raise PhoneError("this phone is not registered yet: run `python -m phone_app register`")
    print(phone.nfc_token)
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    phone = Phone.load(Path(args.state))
    channel, stub = _stub(args)
    with channel:
        phone.rotate(stub)
    phone.save()
    print(f"device {phone.device_id}: new key certified; the old key's codes and NFC token no longer pay")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", default=str(DEFAULT_STATE), help="the phone's state file (holds its private key)")
    common.add_argument("--wallet-address", help="wallet host:port (default $CITYTAP_WALLET_ADDRESS)")
    parser = argparse.ArgumentParser(prog="python -m phone_app", description="A rider's phone, emulated.")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", parents=[common], help="make a key pair and register it")
    register.add_argument("--account", required=True, help="the rider account the phone pays from")
    register.add_argument("--label", help="a name for the phone")
    register.add_argument("--device-id", help="the device id, a UUID (default: a fresh one)")
    qr = commands.add_parser("qr", parents=[common], help="print a fresh QR payload")
    qr.add_argument("--png", help="also render the QR code as a PNG image here")
    qr.add_argument("--format", choices=("hex", "base64"), default="hex", help="how to print the payload")
    commands.add_parser("nfc", parents=[common], help="print the NFC token")
    commands.add_parser("rotate", parents=[common], help="certify a new key in place of the old one")
    return parser


COMMANDS = {"register": cmd_register, "qr": cmd_qr, "nfc": cmd_nfc, "rotate": cmd_rotate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PhoneError as exc:
        print(f"phone_app: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code, details = exc.code().name, exc.details()  # type: ignore[attr-defined]
        print(f"phone_app: the wallet refused: {code} {error_reason(exc) or ''} {details}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
