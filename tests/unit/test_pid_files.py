"""Pid files name the process and its start time: a pid reused by another program is not ours."""

from __future__ import annotations

import subprocess
import sys

from services.stack.servers import Stack, StackSettings, pid_alive, read_pid, start_process


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_started_process_is_read_back(tmp_path):
    proc = start_process("kafka", [sys.executable, "-c", "import time; time.sleep(60)"],
                         run_dir=tmp_path / "run", log_dir=tmp_path / "log")  # fmt: skip
    try:
        pid_file = tmp_path / "run" / "kafka.pid"
        assert len(pid_file.read_text().split()) == 2
        assert read_pid(pid_file) == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_reused_pid_is_neither_stopped_nor_taken_for_a_server(tmp_path):
    stranger = _sleeper()  # stands for the program that got the pid after a reboot
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / "mongo.pid").write_text(f"{stranger.pid} 1\n")  # started at tick 1: another process
        stack = Stack(StackSettings(var_dir=tmp_path), log=lambda _: None)
        assert read_pid(run / "mongo.pid") is None
        assert stack.status()[1] == ("mongo", "stopped", "")
        stack.down(("mongo",))
        assert pid_alive(stranger.pid) and stranger.poll() is None
        assert not (run / "mongo.pid").exists()  # the stale file is cleared
    finally:
        stranger.kill()
        stranger.wait()


def test_a_pid_file_of_an_earlier_version_is_trusted(tmp_path):
    proc = _sleeper()
    try:
        (tmp_path / "smtp.pid").write_text(f"{proc.pid}\n")
        assert read_pid(tmp_path / "smtp.pid") == proc.pid
    finally:
        proc.kill()
        proc.wait()
