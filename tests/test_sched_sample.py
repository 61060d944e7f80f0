"""benchmarks.sched_sample reads a busy thread's CPU, run-queue wait, timeslices and faults."""

import os
import subprocess
import sys
import time

from benchmarks import sched_sample

SPIN = "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < 30: pass\n"


def test_a_spinning_process_reads_as_one_busy_thread_and_an_idle_one_does_not() -> None:
    tag = f"sched-sample-{os.getpid()}"
    busy = subprocess.Popen([sys.executable, "-c", SPIN, f"busy-{tag}"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", f"idle-{tag}"])
    try:
        time.sleep(1.5)  # both past Python's start-up
        before = sched_sample.snapshot(tag)
        time.sleep(1.0)
        rows = dict(sched_sample.rates(before, sched_sample.snapshot(tag), 1.0))
        by_pid = {pid: r for (pid, _), r in rows.items()}
        assert set(by_pid) == {busy.pid, idle.pid}
        assert by_pid[busy.pid].cpu_s > 0.3 and by_pid[busy.pid].slices >= 1
        assert by_pid[idle.pid].cpu_s < 0.05 and by_pid[idle.pid].slices <= 1
        assert 0.0 <= by_pid[busy.pid].wait_s <= 1.0
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()


def test_the_command_line_prints_the_busy_thread_of_the_matching_process(capsys) -> None:
    tag = f"sched-cli-{os.getpid()}"
    busy = subprocess.Popen([sys.executable, "-c", SPIN, tag])
    try:
        assert sched_sample.main(["--match", tag, "--window", "1"]) == 0
    finally:
        busy.kill()
        busy.wait()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["pid", "tid"]
    assert [line.split()[0] for line in lines[1:]] == [str(busy.pid)]
