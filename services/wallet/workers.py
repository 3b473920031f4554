"""The wallet's background worker: expire due holds and keep the deny list rebuilt.

Run by `BaseApp.add_worker` on its own thread. Each pass expires due holds in bounded
batches (at most `SWEEP_BATCHES_PER_PASS_MAX` x 100 per pass, so one pass never runs
unbounded) and, every `deny_list_rebuild_interval_s`, rebuilds the Redis deny list from
PostgreSQL. Failures are logged and retried after a bounded backoff; expiry is also done
lazily by any write that touches an account with due holds, so a stalled sweeper delays
HoldExpired events but never keeps a rider's funds reserved past expiry.
"""

from __future__ import annotations

import logging
import threading
import time

from services.wallet.ledger import SWEEP_BATCH_MAX, Ledger

log = logging.getLogger("citytap.wallet.sweeper")

SWEEP_BATCHES_PER_PASS_MAX = 10
BACKOFF_S_MAX = 5.0


class Sweeper:
    def __init__(self, ledger: Ledger, *, interval_s: float, deny_list_rebuild_interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._ledger = ledger
        self._interval_s = interval_s
        self._rebuild_interval_s = deny_list_rebuild_interval_s
        self._last_rebuild = time.monotonic()
        self.expired = 0

    def run_once(self) -> int:
        """One pass: expire due holds (bounded), rebuild the deny list when it is time."""
        expired = 0
        for _ in range(SWEEP_BATCHES_PER_PASS_MAX):
            count = self._ledger.expire_due_holds(batch_max=SWEEP_BATCH_MAX)
            expired += count
            if count < SWEEP_BATCH_MAX:
                break
        self.expired += expired
        if self._rebuild_interval_s and time.monotonic() - self._last_rebuild >= self._rebuild_interval_s:
            self._ledger.rebuild_deny_list()
            self._last_rebuild = time.monotonic()
        return expired

    def run(self, stop: threading.Event) -> None:
        backoff_s = self._interval_s
        while not stop.is_set():
            try:
                if self.run_once():
                    log.info("holds expired", extra={"fields": {"total": self.expired}})
                backoff_s = self._interval_s
                stop.wait(self._interval_s)
            except Exception:  # noqa: BLE001 - keep sweeping after transient failures
                log.exception("hold sweep failed; retrying", extra={"fields": {"backoff_s": backoff_s}})
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_S_MAX)
