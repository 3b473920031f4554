"""The tap bench's CPU accounting (loadtests/stack_cpu.py) over a fake /proc tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.stack_cpu import StackCpu, call_cost


class FakeProc:
    """A /proc with just the stat lines the reader needs, and the stack's pid files."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.state = root / "state"
        self.proc.mkdir()
        (self.state / "run").mkdir(parents=True)

    def pid_file(self, component: str, pid: int) -> None:
        (self.state / "run" / f"{component}.pid").write_text(f"{pid}\n")

    def process(self, pid: int, ppid: int, *, utime: int, stime: int = 0, cutime: int = 0, cstime: int = 0,
                started: int = 1000, comm: str = "python") -> None:
        # Fields after "(comm) ": state ppid pgrp session tty tpgid flags minflt cminflt majflt
        # cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime ...
        rest = ["S", ppid, ppid, ppid, 0, -1, 0, 0, 0, 0, 0, utime, stime, cutime, cstime, 20, 0, 1, 0, started]
        folder = self.proc / str(pid)
        folder.mkdir(exist_ok=True)
        (folder / "stat").write_text(f"{pid} ({comm}) " + " ".join(str(v) for v in rest) + " 0 0\n")

    def gone(self, pid: int) -> None:
        (self.proc / str(pid) / "stat").unlink()
        (self.proc / str(pid)).rmdir()

    def stack(self) -> StackCpu:
        return StackCpu(self.state, proc=self.proc, components=("fare_gate", "postgres", "kafka"), ticks_per_s=100)


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def test_a_component_counts_its_process_and_every_descendant(fake: FakeProc) -> None:
    fake.pid_file("fare_gate", 10)
    fake.pid_file("postgres", 20)
    fake.process(10, 1, utime=500, stime=100)
    fake.process(20, 1, utime=50)
    fake.process(21, 20, utime=300, comm="postgres: citytap citytap 127.0.0.1(5) idle")
    fake.process(22, 21, utime=10)  # a grandchild
    fake.process(30, 1, utime=999)  # not part of the stack
    stack = fake.stack()
    before = stack.snapshot()
    fake.process(10, 1, utime=700, stime=150)  # +250 ticks
    fake.process(21, 20, utime=400, comm="postgres: citytap citytap 127.0.0.1(5) idle")  # +100
    fake.process(22, 21, utime=30)  # +20
    fake.process(30, 1, utime=5000)
    used = stack.used_s(before, stack.snapshot())
    assert used == {"fare_gate": 2.5, "postgres": 1.2}  # kafka has no pid file: left out


def test_a_child_born_and_reaped_inside_the_window_counts_once(fake: FakeProc) -> None:
    fake.pid_file("postgres", 20)
    fake.process(20, 1, utime=100)
    fake.process(21, 20, utime=40)  # lives across the start of the window
    stack = fake.stack()
    before = stack.snapshot()
    # 21 uses 60 more ticks and exits; its parent reaps its whole 100 into cutime. A new
    # backend 23 starts and uses 25.
    fake.gone(21)
    fake.process(20, 1, utime=110, cutime=100)
    fake.process(23, 20, utime=25, started=2000)
    used = stack.used_s(before, stack.snapshot())
    assert used == {"postgres": (10 + 60 + 25) / 100}


def test_a_reused_pid_is_another_process(fake: FakeProc) -> None:
    fake.pid_file("kafka", 40)
    fake.process(40, 1, utime=100)
    fake.process(41, 40, utime=500, started=1000)
    stack = fake.stack()
    before = stack.snapshot()
    # 41 exits unreaped by anything we read, and a new process gets its pid.
    fake.process(41, 40, utime=30, started=3000)
    fake.process(40, 1, utime=100)
    used = stack.used_s(before, stack.snapshot())
    # The old 41 is gone: its 500 ticks from before the window are taken off, expecting a
    # parent to have reaped them, which none did here. The new 41's 30 ticks are counted as
    # a new process (not as 30 - 500), and the total is floored at zero, never negative.
    assert used == {"kafka": 0.0}
    fake.process(40, 1, utime=100, cutime=500)  # the parent reaps the old 41 after all
    assert stack.used_s(before, stack.snapshot()) == {"kafka": 0.3}


def test_call_cost_spreads_the_cpu_over_the_calls_sent() -> None:
    cost = call_cost({"fare_gate": 4.0, "postgres": 3.0, "load generator": 1.0}, 1000, cpus=2)
    assert cost is not None
    assert cost.ms_per_call == {"fare_gate": 4.0, "postgres": 3.0, "load generator": 1.0}
    assert cost.total_ms == 8.0
    assert cost.capacity_per_s == 250.0  # 2 CPUs x 1000 ms / 8 ms
    assert "fare_gate 4.00" in cost.describe("tap") and "total 8.00" in cost.describe("tap")
    assert cost.to_dict()["capacity_per_s"] == 250.0


def test_call_cost_with_no_calls_is_none() -> None:
    assert call_cost({"fare_gate": 1.0}, 0) is None


def test_a_component_can_be_named_by_pid_instead_of_its_pid_file(fake: FakeProc) -> None:
    fake.pid_file("fare_gate", 10)
    fake.process(10, 1, utime=100)
    fake.process(50, 1, utime=200)  # a fare gate started by hand
    stack = StackCpu(fake.state, proc=fake.proc, components=("fare_gate",), pids={"fare_gate": 50}, ticks_per_s=100)
    before = stack.snapshot()
    fake.process(10, 1, utime=900)
    fake.process(50, 1, utime=260)
    assert stack.used_s(before, stack.snapshot()) == {"fare_gate": 0.6}
