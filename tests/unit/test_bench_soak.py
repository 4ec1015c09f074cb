"""The soak's verdicts: RSS growth measured after the warm-up, lag bounded unless it keeps climbing;
and the CPU share per process the e2e phase reports."""

import argparse
import os

import pytest

from services.bench import summarize_soak
from services.cli import _soak_seconds


def samples(rss, lags):
    return [
        {"t": 10.0 * i, "rss_mb": {"profile": r}, "lag": lag} for i, (r, lag) in enumerate(zip(rss, lags, strict=True))
    ]


def test_growth_counts_from_the_first_sample_after_the_warm_up():
    # 0..50 s: warm-up (from 80 to 100 MB is not growth); 60 s on: 100 -> 105 MB.
    s = summarize_soak(samples([80, 90, 95, 98, 99, 100, 100, 102, 103, 105], [0] * 10), 50.0, 100, 5000)
    assert s["rss_mb_after_warmup"] == {"profile": 100}
    assert s["rss_growth_percent"] == {"profile": 5.0}
    assert s["rss_growth_under_10_percent"]
    assert s["sent_events_per_s"] == 50.0  # 5,000 events in 100 s, as offered
    behind = summarize_soak(samples([100] * 10, [0] * 10), 50.0, 100, 4220)
    assert (behind["offered_events_per_s"], behind["sent_events_per_s"]) == (50.0, 42.2)


def test_a_leak_and_a_climbing_lag_are_reported():
    s = summarize_soak(
        samples([100] * 6 + [110, 120, 130, 140], [10, 20, 10, 30, 20, 100, 400, 800, 1200, 1600]), 50.0, 100, 5000
    )
    assert s["rss_growth_percent"] == {"profile": 27.3}  # from 110 MB at 60 s to 140 MB
    assert not s["rss_growth_under_10_percent"]
    assert (s["lag_max_first_half"], s["lag_max_second_half"]) == (30, 1600)
    assert not s["lag_bounded"]
    steady = summarize_soak(samples([100] * 10, [10, 40, 10, 30, 20, 100, 40, 80, 120, 60]), 50.0, 100, 5000)
    assert steady["lag_bounded"]  # 120 <= 30 + 5 s x 50 events/s


def test_growth_beyond_the_cache_leaves_out_what_the_packed_histories_grew():
    s = samples([100] * 6 + [104, 108, 112, 116], [0] * 10)
    for i, sample in enumerate(s):
        sample["cache_mb"] = {"profile": 2.0 + max(0, i - 5) * 3.0}  # 14 MB at the end
    summary = summarize_soak(s, 50.0, 100, 5000)
    assert summary["rss_growth_percent"] == {"profile": 11.5}  # 104 -> 116 MB
    assert summary["rss_growth_beyond_cache_percent"] == {"profile": 2.9}  # 12 MB, of which the cache 9
    assert not summary["rss_growth_under_10_percent"]  # the goal still counts all of it
    assert summarize_soak(samples([100] * 10, [0] * 10), 50.0, 100, 5000)["rss_growth_beyond_cache_percent"] is None


def test_soak_seconds_are_zero_or_enough_for_samples():
    assert _soak_seconds("0") == 0 and _soak_seconds("600") == 600
    for bad in ("3", "-5", "ten"):
        with pytest.raises(argparse.ArgumentTypeError):
            _soak_seconds(bad)


def test_a_second_bench_on_the_same_directory_is_refused(tmp_path):
    from services.bench import _only_bench
    from services.stack.servers import StackError

    held = _only_bench(tmp_path)
    try:
        with pytest.raises(StackError, match="another crm bench is running"):
            _only_bench(tmp_path)
    finally:
        os.close(held)
    os.close(_only_bench(tmp_path))  # the first one is over: the directory is free again


class _FakeStack:
    """Records what `bench.run` asks of its stack; starts nothing."""

    def __init__(self, settings, log=None, fail_up=False):
        self.calls: list = []
        self.fail_up = fail_up

    def down(self, names=("sms", "smtp", "valkey", "mongo", "kafka")):
        self.calls.append(("down", names))

    def up(self):
        self.calls.append(("up",))
        if self.fail_up:
            raise OSError("a server binary is missing")
        return object()


@pytest.mark.parametrize("fail_up", [False, True])
def test_a_bench_holds_its_directory_from_clean_up_to_clean_up(tmp_path, monkeypatch, fail_up):
    from services import bench
    from services.stack.servers import StackError

    stacks: list[_FakeStack] = []
    monkeypatch.setenv("CRM_BENCH_VAR_DIR", str(tmp_path))

    def make_stack(*args, **kwargs):
        stacks.append(_FakeStack(*args, fail_up=fail_up, **kwargs))
        return stacks[-1]

    monkeypatch.setattr(bench, "Stack", make_stack)

    async def measure(*_args):
        with pytest.raises(StackError):
            bench._only_bench(tmp_path)  # a second bench meanwhile is refused
        return {"measured": True}

    monkeypatch.setattr(bench, "_measure", measure)
    if fail_up:
        with pytest.raises(OSError):
            bench.run(10, 10, 1.0, True)
    else:
        assert bench.run(10, 10, 1.0, True) == {"measured": True}
    first, *_, last = stacks[0].calls
    services = tuple(f"bench-{n}" for n in bench.SERVICES)
    # Leftovers and its own processes are stopped services first, also when the start-up failed.
    assert first[0] == "down" and last[0] == "down" and first[1][:4] == services and last[1] == first[1]
    os.close(bench._only_bench(tmp_path))  # and the directory is free again


def test_cpu_used_is_cores_over_the_phase_and_skips_processes_that_went():
    from services.bench import _cpu_seconds, _cpu_used

    mine = _cpu_seconds(os.getpid())
    assert mine is not None and mine > 0
    assert _cpu_seconds(2**22 + 12345) is None  # no such process
    before = {"store": 10.0, "churn": 4.0, "gone": 1.0, "late": None}
    after = {"store": 25.0, "churn": 4.5, "gone": None, "late": 3.0}
    assert _cpu_used(before, after, 20.0) == {"store": 0.75, "churn": 0.025}


def test_a_bench_started_with_sigint_ignored_still_stops_on_it(monkeypatch, tmp_path):
    """A background job of a script inherits SIGINT ignored; the bench must still stop through its clean-up."""
    import signal

    from services import bench
    from services.cli import build_parser

    seen = []
    monkeypatch.setattr(bench, "run", lambda *a, **k: seen.append(signal.getsignal(signal.SIGINT)) or {"ok": True})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        args = build_parser().parse_args(["bench", "--quick", "--json", str(tmp_path / "b.json")])
        assert args.func(args) == 0
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.default_int_handler]
