"""libs.signals: a stop signal that arrives while the main thread holds the stop event's lock.

Each case runs in a child process with a timeout, because the failure it guards against is a
process that hangs for ever.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The main thread takes the event's internal lock, as Event.wait() holds it on its way in and
# out, and signals itself: Python runs the handler in this same thread, lock held.
RACE = textwrap.dedent("""
    import os, signal, sys, threading
    {setup}
    with stop._cond:
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(200_000):
            pass
    sys.exit(0 if stop.wait(5) else 3)
""")

OURS = "from libs.signals import stop_event_on_signals\nstop = stop_event_on_signals((signal.SIGUSR1,))"
NAIVE = "stop = threading.Event()\nsignal.signal(signal.SIGUSR1, lambda *_: stop.set())"


def _run(setup: str, timeout_s: float) -> int | None:
    """The child's exit status, or None if it was still running after `timeout_s`."""
    try:
        done = subprocess.run([sys.executable, "-c", RACE.format(setup=setup)], cwd=ROOT, timeout=timeout_s,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return None
    assert not done.stderr, done.stderr
    return done.returncode


def test_the_stop_event_is_set_when_the_signal_lands_while_its_lock_is_held() -> None:
    assert _run(OURS, timeout_s=20) == 0


def test_a_handler_that_sets_the_event_itself_hangs_in_the_same_place() -> None:
    # Why libs.signals exists: the pattern every service used before never comes back.
    assert _run(NAIVE, timeout_s=3) is None
