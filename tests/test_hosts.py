"""Is the holder of a lock alive: real processes, a dead pid and a reused pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from pipeline.core.hosts import holder_alive, holder_info, pid_alive, process_start_time
from pipeline.io.outputs import OutputLock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_own_process_is_alive_and_a_finished_one_is_not():
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())
    assert not pid_alive(0) and not pid_alive(-5) and not pid_alive(2**40)


def test_a_reused_pid_is_not_the_holder():
    me = holder_info()
    assert me["pid"] == os.getpid() and isinstance(me["pid_started"], float)
    assert holder_alive(me) is True
    # the same pid, but a process that started an hour earlier: the holder died, its pid was reused
    assert holder_alive({**me, "pid_started": me["pid_started"] - 3600}) is False
    assert not pid_alive(os.getpid(), started=me["pid_started"] + 3600)
    assert holder_alive({**me, "host": "another-host"}) is None  # cannot tell from here
    assert holder_alive({"host": me["host"]}) is False  # no pid recorded


def test_start_time_of_a_running_child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = process_start_time(proc.pid)
        assert started is not None and abs(started - time.time()) < 30
        assert pid_alive(proc.pid, started=started)
    finally:
        proc.kill()
        proc.wait()
    assert process_start_time(proc.pid) is None


def test_output_lock_records_the_start_time_and_sees_a_reused_pid(tmp_path):
    out = tmp_path / "o.zarr"
    with OutputLock(out) as lock:
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["pid_started"] == holder_info()["pid_started"]
    lock.path.write_text(json.dumps({**info, "pid_started": info["pid_started"] - 3600}))
    taken = OutputLock(out, take_over=True)
    taken.acquire()  # stale: this pid now belongs to a process that is not the holder
    taken.release()
    assert not lock.path.exists()
