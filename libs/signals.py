"""Stopping on SIGTERM or SIGINT with no lock taken inside the signal handler.

Python runs a signal handler in the main thread, between two bytecodes of whatever that
thread is doing. If it is inside `threading.Event.wait()` at the moment it holds the event's
internal lock (entering or leaving the wait), a handler that calls `event.set()` waits for
that same lock, held by its own thread, for ever: the process then ignores every later signal
and never stops. CI saw it once as a service that had not even logged "stopping" 20 s after
its SIGTERM.

So the handler here only records the signal, which takes no lock, and a watcher thread turns
that into the event everything else waits on.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WATCH_INTERVAL_S = 0.05


def stop_event_on_signals(signals: Iterable[signal.Signals] = STOP_SIGNALS, *,
                          interval_s: float = WATCH_INTERVAL_S) -> threading.Event:
    """Install handlers for `signals` (from the main thread) and return the event that is set
    within `interval_s` of the first of them arriving."""
    stop = threading.Event()
    received: list[int] = []

    def record(signum: int, _frame: object) -> None:
        received.append(signum)  # no lock: see the module's docstring

    for sig in signals:
        signal.signal(sig, record)

    def watch() -> None:
        while not received:
            time.sleep(interval_s)
        stop.set()

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()
    return stop
