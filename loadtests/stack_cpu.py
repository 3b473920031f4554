"""CPU time each process of the local stack used over a stretch of time, read from /proc.

Latency on the shared 2-core box moves with whatever else the machine is doing; the CPU a
tap costs moves less (a contended host still makes every instruction dearer), and it says
where the time goes. The tap bench samples the stack before and after each phase and
divides what each component used by the calls answered: "fare gate 4.0 ms, PostgreSQL 3.5 ms,
... 13.3 ms of CPU per tap", and so "two cores give at most about 150 taps/s at this cost".

A component is the process named by its pid file under `$CITYTAP_STATE_DIR/run/` (written
by infra/components.sh and infra/services.sh) together with all its descendants, so
PostgreSQL counts every backend. A child that exits inside the window is still counted:
its parent's `cutime`/`cstime` take its whole CPU when it is reaped, and what it had used
before the window began is taken off again.

Linux only (it reads /proc); elsewhere `StackCpu.from_environment()` is None and the tap bench
leaves it out. loadtests/wallet_transfers.py uses it too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# In the order the report lists them; the names are the pid files' (infra/*.sh).
COMPONENTS = ("fare_gate", "wallet", "postgres", "kafka", "redis", "settlement", "merchant", "face", "stripe-mock")
LOAD_GENERATOR = "load generator"


@dataclass(frozen=True, slots=True)
class _Stat:
    ppid: int
    own_ticks: int  # utime + stime
    reaped_ticks: int  # cutime + cstime: children waited for
    started: int  # starttime, to tell a reused pid from the same process


def _read_stat(proc: Path, pid: int) -> _Stat | None:
    try:
        text = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name sits in parentheses and may itself hold spaces or parentheses.
    fields = text[text.rindex(")") + 2:].split()
    return _Stat(ppid=int(fields[1]), own_ticks=int(fields[11]) + int(fields[12]),
                 reaped_ticks=int(fields[13]) + int(fields[14]), started=int(fields[19]))


def _all_stats(proc: Path) -> dict[int, _Stat]:
    stats = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = _read_stat(proc, int(entry.name))
            if stat is not None:
                stats[int(entry.name)] = stat
    return stats


def _tree(root: int, stats: Mapping[int, _Stat]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return found


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Per component: each live process's (pid, start) -> own ticks, and the ticks its
    processes have reaped from children so far."""

    own: Mapping[str, Mapping[tuple[int, int], int]]
    reaped: Mapping[str, Mapping[tuple[int, int], int]]


class StackCpu:
    def __init__(self, state_dir: Path, *, proc: Path = Path("/proc"), components: Iterable[str] = COMPONENTS,
                 pids: Mapping[str, int] | None = None, ticks_per_s: int | None = None) -> None:
        """`pids` names a component's process instead of its pid file (a service started by
        hand, for a profiling run)."""
        self._run_dir = state_dir / "run"
        self._proc = proc
        self._components = tuple(components)
        self._pids = dict(pids or {})
        self._hz = ticks_per_s or os.sysconf("SC_CLK_TCK")

    @classmethod
    def from_environment(cls) -> StackCpu | None:
        """The stack `infra/env.sh` describes, or None when it cannot be measured here."""
        state_dir = os.environ.get("CITYTAP_STATE_DIR")
        if not state_dir or not Path("/proc/self/stat").exists():
            return None
        return cls(Path(state_dir))

    def _root_pid(self, component: str) -> int | None:
        if component in self._pids:
            return self._pids[component]
        try:
            text = (self._run_dir / f"{component}.pid").read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def snapshot(self) -> Snapshot:
        stats = _all_stats(self._proc)
        own: dict[str, dict[tuple[int, int], int]] = {}
        reaped: dict[str, dict[tuple[int, int], int]] = {}
        for component in self._components:
            root = self._root_pid(component)
            pids = _tree(root, stats) if root is not None else []
            own[component] = {(pid, stats[pid].started): stats[pid].own_ticks for pid in pids}
            reaped[component] = {(pid, stats[pid].started): stats[pid].reaped_ticks for pid in pids}
        return Snapshot(own, reaped)

    def used_s(self, before: Snapshot, after: Snapshot) -> dict[str, float]:
        """CPU seconds each component used between two snapshots (components with no
        process in either are left out)."""
        used: dict[str, float] = {}
        for component in self._components:
            own_a, own_b = before.own.get(component, {}), after.own.get(component, {})
            if not own_a and not own_b:
                continue
            ticks = sum(t - own_a.get(key, 0) for key, t in own_b.items())
            # A process gone by the end: its CPU reached a parent's reaped ticks whole, so
            # what it had used before the window is taken off.
            ticks -= sum(t for key, t in own_a.items() if key not in own_b)
            reaped_a, reaped_b = before.reaped.get(component, {}), after.reaped.get(component, {})
            ticks += sum(t - reaped_a.get(key, 0) for key, t in reaped_b.items())
            used[component] = max(ticks, 0) / self._hz
        return used


@dataclass(frozen=True, slots=True)
class CallCost:
    """CPU milliseconds per call by component, their total, and the call rate the machine's
    CPUs could carry at that cost if nothing else ran."""

    ms_per_call: dict[str, float]
    total_ms: float
    capacity_per_s: float | None

    def describe(self, what: str = "call") -> str:
        parts = ", ".join(f"{name} {ms:.2f}" for name, ms in self.ms_per_call.items() if ms >= 0.005)
        capacity = (f"; {os.cpu_count()} CPUs carry at most {self.capacity_per_s:.0f} {what}s/s at this cost"
                    if self.capacity_per_s else "")
        return f"CPU per {what} (ms): {parts}; total {self.total_ms:.2f}{capacity}"

    def to_dict(self) -> dict[str, object]:
        return {"ms_per_call": {k: round(v, 3) for k, v in self.ms_per_call.items()},
                "total_ms": round(self.total_ms, 3),
                "capacity_per_s": round(self.capacity_per_s, 1) if self.capacity_per_s else None}


def call_cost(used_s: Mapping[str, float], calls: int, *, cpus: int | None = None) -> CallCost | None:
    """Spread what each component used over `calls` (the bench passes the answered ones);
    None when there were none."""
    if calls <= 0:
        return None
    per_call = {name: seconds * 1000.0 / calls for name, seconds in used_s.items()}
    total = sum(per_call.values())
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return CallCost(per_call, total, cpus * 1000.0 / total if total > 0 else None)
