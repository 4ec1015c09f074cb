"""The `crm` command: embedded stack, running everything, dead letters, contracts."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from services.stack.servers import Stack, StackError, StackSettings


def _stack() -> Stack:
    return Stack(StackSettings())


def cmd_stack(args: argparse.Namespace) -> int:
    stack = _stack()
    if args.action == "up":
        state = stack.up()
        print(f"stack ready: kafka {state.kafka_bootstrap}, mongo {state.mongo_url}, redis {state.redis_url}")
        _ensure_topics(state)
    elif args.action == "down":
        from services.stack.supervisor import stop_services

        stop_services(stack)
        stack.down()
        print("stack stopped")
    else:
        for name, status, url in stack.status():
            print(f"{name:8} {status:22} {url}")
    return 0


def _ensure_topics(state) -> None:
    from services.runtime.kafka import ensure_topics
    from services.runtime.settings import CommonSettings

    common = CommonSettings(kafka_bootstrap=state.kafka_bootstrap)
    created = asyncio.run(ensure_topics(common))
    if created:
        print(f"created {len(created)} topics with {common.topic_partitions} partitions")


def cmd_up(args: argparse.Namespace) -> int:
    from services.stack.supervisor import Supervisor, available_services

    stack = _stack()
    names = available_services()
    state = stack.up()
    _ensure_topics(state)
    supervisor = Supervisor(stack, state, names)
    stop = False

    def on_signal(signum, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor.start_all()
    if not names:
        print("no service packages found; the stack runs alone")
    print("running; Ctrl-C stops everything")
    try:
        while not stop:
            supervisor.poll()
            time.sleep(0.5)
    finally:
        print("\nstopping")
        supervisor.stop_all()
        stack.down()
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from services.runtime.deadletters import list_dead_letters, replay_dead_letters
    from services.runtime.settings import CommonSettings

    common = _settings_from_stack(CommonSettings)
    if args.action == "list":
        letters = asyncio.run(list_dead_letters(common, args.topic))
        if args.json:
            print(json.dumps([dl.summary() for dl in letters], indent=2))
        else:
            print(f"{len(letters)} dead letter(s) in {common.topic(args.topic)}.dlq")
            for dl in letters:
                s = dl.summary()
                print(
                    f"  [{s['dlq_partition']}@{s['dlq_offset']}] from {args.topic}[{s['source_partition']}]"
                    f"@{s['source_offset']} key={s['key']} by {s['consumer']}: {s['reason']}"
                )
    else:
        n = asyncio.run(replay_dead_letters(common, args.topic, from_beginning=args.from_beginning))
        print(f"replayed {n} dead letter(s) to {common.topic(args.topic)}")
    return 0


def _settings_from_stack(cls):
    """Settings from the environment, falling back to the running embedded stack's addresses."""
    import os

    from services.stack.servers import StackState

    state = StackState.load(_stack().state_file)
    overrides = {}
    if state:
        for key, value in state.env().items():
            if key not in os.environ:
                overrides[key.removeprefix("CRM_").lower()] = value
    return cls(**overrides)


def cmd_contracts(args: argparse.Namespace) -> int:
    from contracts import generate

    if args.action == "generate":
        for path in generate.generate():
            print(f"wrote {path}")
        return 0
    problems = generate.drift()
    for p in problems:
        print(f"drift: {p}")
    if problems:
        print("run `make contracts` and commit the result", file=sys.stderr)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm", description="CRM event backbone")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start, stop or show the embedded servers")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("up", help="run the stack and every service until Ctrl-C")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("dlq", help="list or replay dead letters of a topic")
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("topic", help="the source topic, e.g. shop.purchases")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.add_argument("--from-beginning", action="store_true", help="replay every dead letter again")
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("contracts", help="generate or check the AsyncAPI document and JSON Schemas")
    p.add_argument("action", choices=["generate", "check"])
    p.set_defaults(func=cmd_contracts)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StackError as exc:
        print(f"crm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
