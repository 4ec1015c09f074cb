"""`crm up` restarts a service that crashes, and stops it cleanly."""

from __future__ import annotations

import os
import signal
import sys
import time

import httpx

from services.stack.servers import Stack, StackSettings, pid_alive
from services.stack.supervisor import Child, Supervisor
from tests.support.backends import free_port


def test_a_killed_service_is_restarted_and_stopped_cleanly(common, tmp_path):
    stack = Stack(StackSettings(var_dir=tmp_path / "var"), log=lambda _m: None)
    env = {
        "CRM_KAFKA_BOOTSTRAP": common.kafka_bootstrap,
        "CRM_MONGO_URL": common.mongo_url,
        "CRM_TOPIC_PREFIX": common.topic_prefix,
        "CRM_DB_PREFIX": common.db_prefix,
        "CRM_PROBE_HTTP_PORT": str(port := free_port()),
    }
    child = Child("probe", [sys.executable, "-m", "tests.support.probe_service"], env)
    messages: list[str] = []
    sup = Supervisor(stack, [child], log=messages.append)
    sup.start_all()
    try:
        first = child.proc.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (child.proc is None or child.proc.pid == first):
            sup.poll()
            time.sleep(0.2)
        assert child.proc is not None and child.proc.pid != first, messages
        assert any("exited with code -9; restarting in 1s" in m for m in messages), messages
        assert child.proc.poll() is None
        second = child.proc.pid
        # Stop it once it is up: a SIGTERM during interpreter start-up would kill it before its handlers exist.
        while time.monotonic() < deadline + 20:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    finally:
        sup.stop_all()
    assert not pid_alive(second)
    # It stopped on SIGTERM by itself (exit 0), not by the SIGKILL fallback.
    assert child.proc.returncode == 0, messages
    assert not (stack.run_dir / "probe.pid").exists()
