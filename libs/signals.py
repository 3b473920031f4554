"""Stopping on SIGTERM or SIGINT with no lock taken inside the signal handler.

Python runs a signal handler in the main thread, between two bytecodes of whatever that
thread is doing. If it is inside `threading.Event.wait()` at the moment it holds the event's
internal lock (entering or leaving the wait), a handler that calls `event.set()` waits for
that same lock, held by its own thread, for ever: the process then ignores every later signal
and never stops. CI saw it once as a service that had not even logged "stopping" 20 s after
its SIGTERM.

So no Python code of ours runs in the handler at all. The interpreter's own C-level handler
writes the signal's number to a pipe (`signal.set_wakeup_fd`), and a thread blocked reading
that pipe sets the event everything else waits on. Nothing polls. The process has one wake-up
fd: an asyncio loop on the main thread would take it over, and no service runs one there.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_event_on_signals(signals: Iterable[signal.Signals] = STOP_SIGNALS) -> threading.Event:
    """Install handlers for `signals` (from the main thread) and return the event that is set
    as soon as the first of them arrives."""
    stop = threading.Event()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # the C handler must never block on a full pipe
    signal.set_wakeup_fd(write_end)
    for sig in signals:
        # A Python handler must be installed for the interpreter to catch the signal (and so
        # write the wake-up byte); it does nothing itself.
        signal.signal(sig, lambda *_: None)

    def watch() -> None:
        os.read(read_end, 1)
        stop.set()

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()
    return stop
