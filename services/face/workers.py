"""The face service's background worker: retention expiry, re-encryption, index refresh.

Run by `BaseApp.add_worker` on its own thread. Each pass deletes templates whose retention
has ended (at most `EXPIRY_BATCHES_PER_PASS_MAX` batches, so one pass is bounded) and
re-encrypts templates still under a previous key (at most 20 batches of 500 per pass), and refreshes the
index with what other replicas enrolled or deleted. Failures are logged and retried after a
bounded backoff.
"""

from __future__ import annotations

import logging
import threading

from services.face.records import EXPIRY_BATCH_MAX, REENCRYPT_BATCH_MAX, FaceRecords

log = logging.getLogger("citytap.face.retention")

EXPIRY_BATCHES_PER_PASS_MAX = 10
REENCRYPT_BATCHES_PER_PASS_MAX = 20
BACKOFF_S_MAX = 60.0


class RetentionWorker:
    def __init__(self, records: FaceRecords, *, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._records = records
        self._interval_s = interval_s
        self.expired = 0
        self.reencrypted = 0

    def run_once(self) -> tuple[int, int]:
        """One pass: (templates expired, templates re-encrypted)."""
        expired = 0
        for _ in range(EXPIRY_BATCHES_PER_PASS_MAX):
            count = self._records.expire_due(EXPIRY_BATCH_MAX)
            expired += count
            if count < EXPIRY_BATCH_MAX:
                break
        reencrypted = 0
        for _ in range(REENCRYPT_BATCHES_PER_PASS_MAX):
            count = self._records.reencrypt(REENCRYPT_BATCH_MAX)
            reencrypted += count
            if count < REENCRYPT_BATCH_MAX:
                break
        self._records.refresh_index()
        self.expired += expired
        self.reencrypted += reencrypted
        return expired, reencrypted

    def run(self, stop: threading.Event) -> None:
        backoff_s = self._interval_s
        while not stop.is_set():
            try:
                expired, reencrypted = self.run_once()
                if expired or reencrypted:
                    log.info("retention pass", extra={"fields": {"expired": expired, "reencrypted": reencrypted}})
                backoff_s = self._interval_s
                stop.wait(self._interval_s)
            except Exception:  # noqa: BLE001 - keep sweeping after transient failures
                log.exception("retention pass failed; retrying", extra={"fields": {"backoff_s": backoff_s}})
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_S_MAX)
