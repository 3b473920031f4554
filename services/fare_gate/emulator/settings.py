"""The emulator's defaults from the environment: the only module of the emulator that reads it.

`source infra/env.sh` sets both for the local stack; `--address` and `--wallet-address`
override them. Nothing is required here, so `--help` works in an empty environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

FARE_GATE_ADDRESS_ENV = "CITYTAP_FARE_GATE_ADDRESS"
WALLET_ADDRESS_ENV = "CITYTAP_WALLET_ADDRESS"


@dataclass(frozen=True)
class Defaults:
    fare_gate_address: str | None
    wallet_address: str | None


def defaults(environ: Mapping[str, str] | None = None) -> Defaults:
    env = os.environ if environ is None else environ
    return Defaults(env.get(FARE_GATE_ADDRESS_ENV) or None, env.get(WALLET_ADDRESS_ENV) or None)
