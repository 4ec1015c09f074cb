"""`crm up` on a fresh var/ dir: starts the stack, replays, and leaves no process behind on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.stack.servers import pid_alive, read_pid
from tests.support.backends import free_port


def _ready(port: int, timeout: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def test_crm_up_then_ctrl_c_leaves_no_stray_process(tmp_path: Path):
    profile_port, notify_port = free_port(), free_port()
    env = {
        **os.environ,
        "CRM_PROFILE_HTTP_PORT": str(profile_port),
        "CRM_NOTIFY_HTTP_PORT": str(notify_port),
        "CRM_CHURN_HTTP_PORT": str(free_port()),
        "CRM_LOYALTY_HTTP_PORT": str(free_port()),
        "CRM_STACK_SMTP_PORT": str(free_port()),
        "CRM_STACK_SMS_PORT": str(free_port()),
        "CRM_STACK_VAR_DIR": str(tmp_path / "var"),
        "CRM_STACK_KAFKA_PORT": str(free_port()),
        "CRM_STACK_MONGO_PORT": str(free_port()),
        "CRM_STACK_VALKEY_PORT": str(free_port()),
        # Force the embedded Valkey so that every server kind is started and stopped.
        "CRM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--replay", "cdnow", "--speed", "30"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir = tmp_path / "var" / "run"
    lines = []
    deadline = time.monotonic() + 60
    try:
        for line in proc.stdout:
            lines.append(line)
            if "replay:" in line or time.monotonic() > deadline:
                break
        pids = {p.stem: read_pid(p) for p in run_dir.glob("*.pid")}
        assert {"kafka", "mongo", "valkey", "smtp", "sms"} <= set(pids), "".join(lines)
        assert all(pid_alive(pid) for pid in pids.values())
        # The services really run under the supervisor (keys generated, consuming), not crash-looping.
        assert _ready(profile_port, 45), (tmp_path / "var" / "log" / "profile.log").read_text()[-3000:]
        assert _ready(notify_port, 45), (tmp_path / "var" / "log" / "notify.log").read_text()[-3000:]
        assert (tmp_path / "var" / "secrets.env").stat().st_mode & 0o077 == 0
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopping" in out
    assert not any(pid_alive(pid) for pid in pids.values()), pids
    assert list(run_dir.glob("*.pid")) == []


def test_stack_refuses_a_port_taken_by_someone_else(tmp_path: Path):
    import socket

    import pytest

    from services.stack.servers import Stack, StackError, StackSettings

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        # Kafka's port is free, MongoDB's is not: nothing may be left half-started.
        stack = Stack(
            StackSettings(var_dir=tmp_path / "var", kafka_port=free_port(), mongo_port=port), log=lambda _m: None
        )
        with pytest.raises(StackError, match=rf"127\.0\.0\.1:{port} is taken .* CRM_STACK_MONGO_PORT"):
            stack.up()
    assert list((tmp_path / "var" / "run").glob("*.pid")) == []
