"""Setting riders up before they tap: open a wallet account, link a card, fund it.

Accounts and cards go through the wallet's public API (CreateAccount, LinkCard). Funding
does not: a real top-up goes through Stripe and its webhook, which is heavy for a test run
and not what the emulator exercises. Funding is a pluggable function instead:

    --fund MODULE:FACTORY

`FACTORY()` is called once and returns a *funder*: a callable
`funder(account_id, amount_minor, funding_id)` that credits the account, idempotently under
`funding_id`. If the funder has a `close()` method it is called when the run ends.
`loadtests.taps:ledger_funder` is one: it credits through the wallet's in-process ledger on
the dev stack's PostgreSQL, the seam the Stripe top-up flow itself credits through.
Without `--fund`, riders start with whatever their accounts hold (nothing, for new ones),
so their entries are denied with DENIED_INSUFFICIENT_BALANCE.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from services.fare_gate.emulator.gate import CallFailed, WalletClient

SETUP_WORKERS_MAX = 16


class Funder(Protocol):
    def __call__(self, account_id: str, amount_minor: int, funding_id: str) -> None: ...


class SetupError(Exception):
    """Riders could not be set up; the message names the first failure and how many failed."""


@dataclass(frozen=True)
class RiderSetup:
    account_id: str
    card_uid: bytes
    rider_category: str
    label: str
    fund_minor: int


def load_funder(spec: str) -> tuple[Funder, Callable[[], None]]:
    """Import `MODULE:FACTORY`, call the factory, and return the funder and its closer."""
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise SetupError(f"--fund {spec!r}: expected MODULE:FACTORY, such as loadtests.taps:ledger_funder")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise SetupError(f"--fund {spec!r}: cannot load it: {exc}") from None
    try:
        funder = factory()
    except Exception as exc:  # noqa: BLE001 - a plug-in's failure, reported as a setup failure
        raise SetupError(f"--fund {spec!r}: the factory failed: {type(exc).__name__}: {exc}") from exc
    if not callable(funder):
        raise SetupError(f"--fund {spec!r}: the factory returned {type(funder).__name__}, not a callable funder")
    close = getattr(funder, "close", None)
    return funder, (close if callable(close) else (lambda: None))


def set_up_riders(wallet: WalletClient, riders: Sequence[RiderSetup], *, funder: Funder | None,
                  workers: int = 8, progress: Callable[[int], None] | None = None) -> None:
    """Open, link and fund every rider, `workers` at a time; raises SetupError if any fails.

    Every write is idempotent under the rider's ids, so running a setup twice is harmless."""
    workers = max(1, min(workers, SETUP_WORKERS_MAX, len(riders) or 1))
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()
    stop = threading.Event()  # after the first failure the rest are skipped: fail fast

    def one(rider: RiderSetup) -> None:
        if stop.is_set():
            return
        try:
            wallet.create_rider(rider.account_id, rider.rider_category)
            wallet.link_card(rider.account_id, rider.card_uid, rider.label)
            if funder is not None and rider.fund_minor > 0:
                funder(rider.account_id, rider.fund_minor, f"{rider.account_id}-fund")
        except CallFailed as exc:
            stop.set()
            with lock:
                failures.append(f"rider {rider.label} ({rider.account_id}): {exc.describe()}")
        except Exception as exc:  # noqa: BLE001 - a funder's own failure, reported with the rider
            stop.set()
            with lock:
                failures.append(f"rider {rider.label} ({rider.account_id}): funding failed: {type(exc).__name__}: {exc}")
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0])

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="emulator-setup") as pool:
        list(pool.map(one, riders))
    if failures:
        raise SetupError(f"rider setup stopped at the first failure ({done[0]} of {len(riders)} riders tried): "
                         f"{failures[0]}")
