"""The phone: its Ed25519 key, its certificate from the wallet, its QR codes and NFC token.

A `Phone` is what a rider's wallet app keeps. It makes its own key pair (the private key
never leaves the phone, or here the state file), registers the public key with the wallet
(RegisterDevice, retried safely under the device id), and from then on makes a fresh signed
QR payload whenever the rider pays (libs.device_credentials.make_qr_payload). The state
file is JSON, written with mode 0600:

    {"device_id": ..., "account_id": ..., "label": ..., "seed": hex, "certificate": base64,
     "nfc_token": ...}
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from citytap.common.v1 import credential_pb2
from citytap.wallet.v1 import wallet_pb2
from libs import device_credentials as dc

STATE_VERSION = 1


class PhoneError(Exception):
    """A problem the user can fix: a missing or broken state file, a phone not registered."""


@dataclass
class Phone:
    device_id: str
    account_id: str
    key: Ed25519PrivateKey
    label: str = ""
    certificate: credential_pb2.DeviceCertificate | None = None
    nfc_token: str = ""
    path: Path | None = field(default=None, repr=False)

    # --- making and keeping ---------------------------------------------------------------

    @classmethod
    def new(cls, account_id: str, *, label: str = "", device_id: str | None = None,
            path: Path | None = None) -> Phone:
        """A phone with a fresh key pair, not yet registered."""
        if not account_id:
            raise PhoneError("an account id is required")
        return cls(device_id or str(uuid.uuid4()), account_id, dc.generate_key(), label, path=path)

    @property
    def public_key(self) -> bytes:
        return dc.public_bytes(self.key)

    @property
    def registered(self) -> bool:
        return self.certificate is not None

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "device_id": self.device_id, "account_id": self.account_id,
                "label": self.label, "seed": dc.seed_of(self.key).hex(),
                "certificate": base64.b64encode(self.certificate.SerializeToString()).decode()
                if self.certificate is not None else "",
                "nfc_token": self.nfc_token}

    def save(self, path: Path | None = None) -> Path:
        """Write the state file (mode 0600: it holds the private key) atomically."""
        target = Path(path or self.path or "")
        if not str(target):
            raise PhoneError("no state file given")
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(self.to_json(), handle, indent=2)
        os.replace(temporary, target)
        self.path = target
        return target

    @classmethod
    def load(cls, path: Path) -> Phone:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PhoneError(f"{path} does not exist: run `python -m phone_app register` first") from None
        except (OSError, ValueError) as exc:
            raise PhoneError(f"{path} is not a phone state file: {exc}") from None
        try:
            if data.get("version") != STATE_VERSION:
                raise PhoneError(f"{path}: unknown state version {data.get('version')!r}")
            certificate = None
            if data.get("certificate"):
                certificate = credential_pb2.DeviceCertificate.FromString(base64.b64decode(data["certificate"]))
            return cls(data["device_id"], data["account_id"], dc.key_from_seed(bytes.fromhex(data["seed"])),
                       data.get("label", ""), certificate, data.get("nfc_token", ""), path=Path(path))
        except PhoneError:
            raise
        except Exception as exc:  # noqa: BLE001 - any broken field is the same problem for the user
            raise PhoneError(f"{path} is damaged: {exc}") from None

    # --- talking to the wallet --------------------------------------------------------------

    def register(self, wallet_stub: Any, *, timeout_s: float = 5.0) -> None:
        """RegisterDevice; a retry (same device id, key, account and label) gets the same answer."""
        answer = wallet_stub.RegisterDevice(wallet_pb2.RegisterDeviceRequest(
            device_id=self.device_id, account_id=self.account_id, public_key=self.public_key, label=self.label),
            timeout=timeout_s)
        self.certificate, self.nfc_token = answer.certificate, answer.nfc_token

    def rotate(self, wallet_stub: Any, *, timeout_s: float = 5.0) -> None:
        """A new key pair certified in place of the old one; the old key's codes and token stop paying.
        The new key is kept before the call, so a lost answer is simply retried with it."""
        new_key = dc.generate_key()
        answer = wallet_stub.RotateDevice(wallet_pb2.RotateDeviceRequest(
            account_id=self.account_id, device_id=self.device_id, public_key=dc.public_bytes(new_key)),
            timeout=timeout_s)
        self.key, self.certificate, self.nfc_token = new_key, answer.certificate, answer.nfc_token

    # --- paying -----------------------------------------------------------------------------

    def qr_payload(self, now: datetime | None = None) -> bytes:
        """A fresh signed QR payload, valid for 30 seconds from `now`."""
        if self.certificate is None:
            raise PhoneError("this phone is not registered yet: run `python -m phone_app register`")
        return dc.make_qr_payload(self.key, self.certificate, device_id=self.device_id,
                                  issued_at=now or datetime.now(timezone.utc))


def qr_image(payload: bytes, path: Path, *, scale: int = 4) -> int:
    """Render `payload` as a PNG QR code (byte mode, medium error correction); return its version."""
    import segno  # only the CLI and the demo render images

    code = segno.make(payload, error="m", micro=False, boost_error=False)
    code.save(str(path), kind="png", scale=scale, border=4)
    return int(code.version)
