"""`crm up` on a fresh var/ dir: starts the stack, replays, is scraped by a real Prometheus, and leaves no process
behind on Ctrl-C. Also promtool on the shipped config and alert rules."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.stack.servers import pid_alive, read_pid
from tests.support.backends import free_port

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"


def _binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: `make test` installs Debian's prometheus package (see README, Monitoring)"
    return path


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


SERVICE_NAMES = ("profile", "loyalty", "churn", "notify")


def _env(ports: dict[str, int], var: Path) -> dict[str, str]:
    """`crm up` on its own HTTP ports, server ports and var/ dir, beside anything else running."""
    return {
        **os.environ,
        **{f"CRM_{name.upper()}_HTTP_PORT": str(port) for name, port in ports.items()},
        "CRM_STACK_SMTP_PORT": str(free_port()),
        "CRM_STACK_SMS_PORT": str(free_port()),
        "CRM_STACK_VAR_DIR": str(var),
        "CRM_STACK_KAFKA_PORT": str(free_port()),
        "CRM_STACK_MONGO_PORT": str(free_port()),
        "CRM_STACK_VALKEY_PORT": str(free_port()),
    }


@pytest.fixture(scope="module")
def crm_up(tmp_path_factory):
    """`crm up --replay cdnow` on its own ports and var/ dir, as a user starts it; stopped by the last test."""
    tmp_path = tmp_path_factory.mktemp("crm-up")
    ports = {name: free_port() for name in SERVICE_NAMES}
    # Force the embedded Valkey so that every server kind is started and stopped.
    env = {**_env(ports, tmp_path / "var"), "CRM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--replay", "cdnow", "--speed", "30"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its servers and services share its group: teardown can reach them all
    )
    lines: list[str] = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        lines.append(line)
        if "replay:" in line or time.monotonic() > deadline:
            break
    try:
        yield SimpleNamespace(proc=proc, ports=ports, var=tmp_path / "var", lines=lines)
    finally:
        # The last test stops it with Ctrl-C and checks that; if that test did not run or failed,
        # stop it the same way, then kill whatever of its group is left (a killed `crm up` leaves
        # its children running: seen after `pytest -k prom`).
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_real_prometheus_scrapes_every_service_and_loads_the_rules(crm_up, tmp_path: Path):
    """Prometheus from Debian's package scrapes the running services with the repo's rules; key series exist."""
    import httpx

    for name, port in crm_up.ports.items():
        assert _ready(port, 60), (crm_up.var / "log" / f"{name}.log").read_text()[-3000:]
    prometheus = _binary("prometheus")
    shutil.copy(RULES, tmp_path / "alerts.yml")
    targets = ", ".join(f'"127.0.0.1:{port}"' for port in crm_up.ports.values())
    config = (PROMETHEUS_DIR / "prometheus-local.yml").read_text()
    # The shipped local config, with this test's ports and a quick scrape.
    config = re.sub(r"targets: \[.*\]", f"targets: [{targets}]", config).replace("5s", "1s")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115 - closed with the process
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list[dict]:
        response = httpx.get(f"{api}/query", params={"query": expr}, timeout=5).json()
        assert response["status"] == "success", response
        return response["data"]["result"]

    wanted = {
        'up{job="crm"} == 1': 4,
        'crm_service_ready{job="crm"} == 1': 4,
        "sum by (service) (crm_events_consumed_total)": 4,
        "count by (service) (crm_consumer_lag)": 4,
        "sum by (service) (crm_store_writes_total)": 4,
        "count by (service) (crm_batch_seconds_bucket)": 4,
        "crm_state_cache_bytes > 0": 4,
        "crm_profile_customers": 1,
        "crm_loyalty_points_total": 1,
        "crm_churn_customers": 1,
        "crm_notify_notifications_total": 1,
    }
    seen: dict[str, int] = {}
    try:
        # Points appear once loyalty's event clock has passed the first purchases: on a slow machine
        # (2026-11-26: the store three times slower than usual) that took more than 90 s, while
        # loyalty's clock also waited for its own crm.loyalty topic, which the first day filled with
        # 10,000 TierChanged events (now on crm.tiers). Loyalty reads crm.referrals instead; the wait
        # stays generous.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                seen = {expr: len(query(expr)) for expr in wanted}
            except (httpx.HTTPError, ValueError):
                # Not listening yet, or starting: "Service Unavailable" in plain text (seen in CI).
                seen = {}
            if all(seen.get(expr, 0) >= n for expr, n in wanted.items()):
                break
            time.sleep(1)
        missing = {expr: seen.get(expr, 0) for expr, n in wanted.items() if seen.get(expr, 0) < n}
        assert not missing, (missing, (tmp_path / "prometheus.log").read_text()[-2000:])
        rules = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
        alerts = {rule["name"] for group in rules for rule in group["rules"] if rule["type"] == "alerting"}
        assert {
            "CrmServiceDown",
            "CrmDeadLetters",
            "CrmConsumerLagGrowing",
            "CrmNoShopEvents",
            "CrmChurnSweepStale",
            "CrmNotificationFailureRatio",
        } <= alerts
        health = {rule["name"]: rule["health"] for group in rules for rule in group["rules"]}
        assert set(health.values()) <= {"ok", "unknown"}, health
        firing = httpx.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
        assert not [a for a in firing if a["labels"]["alertname"] == "CrmServiceDown"], firing
    finally:
        proc.terminate()
        proc.wait(20)


def test_ctrl_c_leaves_no_stray_process(crm_up):
    proc, lines, run_dir = crm_up.proc, crm_up.lines, crm_up.var / "run"
    pids = {p.stem: read_pid(p) for p in run_dir.glob("*.pid")}
    assert {"kafka", "mongo", "valkey", "smtp", "sms", *SERVICE_NAMES} <= set(pids), "".join(lines)
    assert all(pid_alive(pid) for pid in pids.values())
    # The services really run under the supervisor (keys generated, consuming), not crash-looping.
    for name in SERVICE_NAMES:
        assert _ready(crm_up.ports[name], 45), (crm_up.var / "log" / f"{name}.log").read_text()[-3000:]
    assert (crm_up.var / "secrets.env").stat().st_mode & 0o077 == 0
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopping" in out
    assert not any(pid_alive(pid) for pid in pids.values()), pids
    assert list(run_dir.glob("*.pid")) == []


def test_exit_when_done_prints_a_summary_with_where_to_look(tmp_path: Path):
    ports = {name: free_port() for name in SERVICE_NAMES}
    env = _env(ports, tmp_path / "var")
    argv = ["up", "--replay", "cdnow", "--customers", "150", "--speed", "max", "--exit-when-done", "--plain"]
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *argv], env=env, capture_output=True, text=True, timeout=400
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    summary = out[out.index("replay done:") :]
    assert "every service caught up" in summary
    mails = len(list((tmp_path / "var" / "mail").glob("*.eml")))
    assert mails > 0
    assert f"({mails:,})" in summary  # the count shown is the count on disk
    for name, port in ports.items():
        assert f"{name}: http://127.0.0.1:{port}/metrics" in summary
        assert re.search(rf"│ {name}\s+│ ready", summary), summary
    assert "stopping" in out
    assert list((tmp_path / "var" / "run").glob("*.pid")) == []
    # Again in the same var/: the broker starts empty, so the previous run's store goes too.
    argv[argv.index("150")] = "20"
    again = subprocess.run(
        [sys.executable, "-m", "services.cli", *argv], env=env, capture_output=True, text=True, timeout=400
    )
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "emptied the previous run's store (crm_profile, crm_loyalty, crm_churn, crm_notify)" in out
    assert "every service caught up" in out


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path):
    promtool = _binary("promtool")
    for args in (
        ["check", "config", str(PROMETHEUS_DIR / "prometheus-local.yml")],
        ["check", "rules", str(RULES)],
        ["test", "rules", str(PROMETHEUS_DIR / "alerts.test.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=PROMETHEUS_DIR)
        assert result.returncode == 0, result.stdout + result.stderr
    # The compose config names hosts that only resolve inside compose; promtool checks its syntax all the same.
    result = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_catches_a_broken_rule(tmp_path: Path):
    """The check above can fail: a rule with a syntax error is refused."""
    (tmp_path / "bad.yml").write_text(RULES.read_text().replace("== 0", "== == 0", 1))
    result = subprocess.run([_binary("promtool"), "check", "rules", str(tmp_path / "bad.yml")], capture_output=True)
    assert result.returncode != 0


def test_stack_refuses_a_port_taken_by_someone_else(tmp_path: Path):
    import socket

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
