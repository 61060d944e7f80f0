"""What the scheduler does to a job's threads: CPU, run-queue wait, timeslices and page faults.

Linux keeps, per thread, the time it ran and the time it sat runnable on a run queue while
something else held its core (``/proc/PID/task/TID/schedstat``), how many timeslices it got,
and its minor page faults (``stat``). Two snapshots ``--window`` seconds apart give rates. Used to
find where a training step's time goes beside Ray's processes (README, "Measured here"):

    python -m benchmarks.sched_sample --match '^ray::RayTrainWorker' --after 20 --window 8

waits for a process whose command line matches, then ``--after`` seconds (past start-up), and
prints its busy threads. ``--match .`` with ``--top 30`` ranks every thread on the machine by
timeslices a second: which processes wake up most often.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ThreadTimes:
    process: str  # the process's command line, cut short
    thread: str  # the thread's name (comm)
    cpu_s: float  # user + system time
    wait_s: float  # runnable, waiting for a core
    slices: int
    minor_faults: int


def processes(pattern: str) -> Iterator[tuple[int, str]]:
    """(pid, command line) of each process whose command line matches `pattern`."""
    regex = re.compile(pattern)
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = " ".join(f.read().replace(b"\0", b" ").decode(errors="replace").split())
            except OSError:
                continue
            if cmdline and regex.search(cmdline):
                yield int(name), cmdline


def read_thread(pid: int, tid: int, process: str) -> ThreadTimes | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            _, wait_ns, slices = f.read().split()
    except (OSError, ValueError):
        return None  # the thread ended
    fields = stat[stat.rindex(")") + 2:].split()  # fields from the 3rd (state) on
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ThreadTimes(process[:60], stat[stat.index("(") + 1: stat.rindex(")")], ticks / CLOCK_TICKS,
                       int(wait_ns) / 1e9, int(slices), int(fields[7]))


def snapshot(pattern: str) -> dict[tuple[int, int], ThreadTimes]:
    out = {}
    for pid, cmdline in processes(pattern):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            if (times := read_thread(pid, tid, cmdline)) is not None:
                out[(pid, tid)] = times
    return out


def rates(before: dict, after: dict, window_s: float) -> list[tuple[tuple[int, int], ThreadTimes]]:
    """Per thread seen in both snapshots: its times over the window, per second."""
    return [(key, ThreadTimes(b.process, b.thread, (b.cpu_s - a.cpu_s) / window_s, (b.wait_s - a.wait_s) / window_s,
                              round((b.slices - a.slices) / window_s), round((b.minor_faults - a.minor_faults) / window_s)))
            for key, b in after.items() if (a := before.get(key)) is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match", required=True, help="regular expression on the process's command line")
    parser.add_argument("--after", type=float, default=0.0, help="seconds to wait once a process matches")
    parser.add_argument("--window", type=float, default=8.0, help="seconds between the two snapshots")
    parser.add_argument("--top", type=int, default=0, help="the N threads with most timeslices, busy or not")
    args = parser.parse_args(argv)
    while not any(True for _ in processes(args.match)):
        time.sleep(0.5)
    time.sleep(args.after)
    before = snapshot(args.match)
    time.sleep(args.window)
    rows = rates(before, snapshot(args.match), args.window)
    if args.top:
        rows = sorted(rows, key=lambda r: -r[1].slices)[: args.top]
    else:
        rows = [r for r in rows if r[1].cpu_s >= 0.2]  # the threads that train
    print(f"{'pid':>7} {'tid':>7}  {'cpu':>5} {'rq wait':>7} {'slices/s':>8} {'faults/s':>8}  thread / process")
    for (pid, tid), r in rows:
        print(f"{pid:>7} {tid:>7}  {r.cpu_s:>5.0%} {r.wait_s:>7.1%} {r.slices:>8} {r.minor_faults:>8}  "
              f"{r.thread} / {r.process}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
