"""`crm up`: the stack plus every service, each its own OS process, restarted when it crashes."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.stack.servers import Stack, StackState, pid_alive, read_pid, start_process, stop_pid

# name -> default HTTP port. A service takes part once its package has an app module.
SERVICES = {"profile": 8101, "loyalty": 8102, "churn": 8103, "notify": 8104}


def available_services() -> list[str]:
    found = []
    for name in SERVICES:
        try:
            if importlib.util.find_spec(f"services.{name}.app") is not None:
                found.append(name)
        except ModuleNotFoundError:
            continue
    return found


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0


class Supervisor:
    def __init__(self, stack: Stack, children: list[Child], log=print):
        self.stack = stack
        self.children = children
        self.log = log

    @classmethod
    def for_services(
        cls, stack: Stack, state: StackState, names: list[str], extra_env: dict[str, str] | None = None, log=print
    ) -> Supervisor:
        children = []
        for name in names:
            port_var = f"CRM_{name.upper()}_HTTP_PORT"
            port = os.environ.get(port_var, str(SERVICES[name]))
            env = {**state.env(), port_var: port, **(extra_env or {})}
            if name == "notify" and "CRM_NOTIFY_PUBLIC_URL" not in os.environ:
                env["CRM_NOTIFY_PUBLIC_URL"] = f"http://127.0.0.1:{port}"  # where unsubscribe links point
            children.append(Child(name, [sys.executable, "-m", f"services.{name}"], env))
        return cls(stack, children, log)

    def start_all(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.proc = start_process(
            child.name,
            child.argv,
            run_dir=self.stack.run_dir,
            log_dir=self.stack.log_dir,
            env=child.env,
            cwd=Path.cwd(),
        )
        child.started_at = time.monotonic()
        self.log(f"{child.name:8} started (pid {child.proc.pid}, log {self.stack.log_dir / (child.name + '.log')})")

    def poll(self) -> None:
        """Restart crashed services with a growing delay (1 s doubling to 30 s, reset after a minute up)."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                if now >= child.next_start:
                    self._spawn(child)
                continue
            code = child.proc.poll()
            if code is None:
                if now - child.started_at > 60:
                    child.restarts = 0
                continue
            child.restarts += 1
            delay = min(2 ** (child.restarts - 1), 30)
            self.log(
                f"{child.name:8} exited with code {code}; restarting in {delay}s "
                f"(see {self.stack.log_dir / (child.name + '.log')})"
            )
            child.proc = None
            child.next_start = now + delay

    def stop_all(self, timeout: float = 20.0) -> None:
        # Longer than a service's own wait for guarded work (runtime.service.GUARDED_STOP_S).
        for child in self.children:
            if child.proc and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.log(f"{child.name:8} did not stop in {timeout:.0f}s; killing")
                child.proc.kill()
                child.proc.wait()
            (self.stack.run_dir / f"{child.name}.pid").unlink(missing_ok=True)
            self.log(f"{child.name:8} stopped")


def stop_services(stack: Stack) -> None:
    """Stop service processes left behind by a `crm up` that was killed (crm stack down calls this)."""
    for name in SERVICES:
        pid_path = stack.run_dir / f"{name}.pid"
        pid = read_pid(pid_path)
        if pid is not None and pid_alive(pid):
            stop_pid(pid)
        pid_path.unlink(missing_ok=True)
