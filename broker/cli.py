"""The `mongo-broker` command: serve | ping. Only wires things together."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from broker import __version__
from broker.settings import CONFIG_ENV, ConfigError, load_settings

__all__ = ["main"]

TARGET_ENV = "MONGO_BROKER_TARGET"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mongo-broker",
        description="A sidecar connection broker for MongoDB, served over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"mongo-broker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument(
        "--config",
        default=os.environ.get(CONFIG_ENV),
        help=f"TOML config file (env {CONFIG_ENV}; default: none, environment only)",
    )
    serve.add_argument(
        "--ready-file",
        help="write JSON {pid, unix, tcp, version} here once listening; removed on exit",
    )

    ping = commands.add_parser("ping", help="ping a running broker and its databases")
    _add_target_arguments(ping)
    ping.add_argument("--database", default="", help="ping only this configured database")
    ping.add_argument("--json", action="store_true", help="print JSON instead of text")

    stats = commands.add_parser("stats", help="show pools, queues and errors of a running broker")
    _add_target_arguments(stats)
    stats.add_argument("--database", default="", help="only this configured database")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    health = commands.add_parser(
        "health", help="check a running broker's gRPC health service (exit 0 when SERVING)"
    )
    _add_target_arguments(health, default_hint="the health listener, else the unix socket, from --config")
    health.add_argument(
        "--service", default="", help="service to check: '' (overall, default) or a database name"
    )
    return parser


def _add_target_arguments(
    parser: argparse.ArgumentParser, default_hint: str = "the unix socket from --config"
) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV),
        help=f"broker address, e.g. unix:///run/mongo-broker/broker.sock or 127.0.0.1:50051 "
        f"(env {TARGET_ENV}; default: {default_hint})",
    )
    parser.add_argument(
        "--config", default=os.environ.get(CONFIG_ENV), help="config file to find the target in"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")


def _target(args: argparse.Namespace, health: bool = False) -> str:
    if args.target:
        return str(args.target)
    settings = load_settings(args.config)
    if health and settings.health.tcp:
        host, port = settings.health.tcp.rsplit(":", 1)
        return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]') else host}:{port}"
    if settings.listen.unix:
        return f"unix://{settings.listen.unix}"
    if settings.listen.tcp:
        return str(settings.listen.tcp)
    raise ConfigError("no listener configured to ping")


class _Unreachable(Exception):
    """The call to the running broker failed; the message says how."""


def _call(command: str, target: str, make_stub: Any, method: str, request: Any, *, timeout: float) -> Any:
    """One unary call to a running broker. Raises _Unreachable with a printable message."""
    # Imported here so `serve` does not pay for a synchronous gRPC stack.
    import grpc

    with grpc.insecure_channel(target) as channel:
        try:
            return getattr(make_stub(channel), method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _Unreachable(f"{command} {target}: {exc.code().name}: {exc.details()}") from None


def _as_json(reply: Any) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True))


def _ping(args: argparse.Namespace) -> int:
    from broker_client.proto.broker.v1 import broker_pb2, broker_pb2_grpc

    target = _target(args)
    request = broker_pb2.PingRequest(database=args.database)
    reply = _call("ping", target, broker_pb2_grpc.BrokerStub, "Ping", request, timeout=args.timeout)
    healthy = all(db.ok for db in reply.databases)
    if args.json:
        print(_as_json(reply))
        return 0 if healthy else 1
    print(f"mongo-broker {reply.version} at {target}")
    for db in reply.databases:
        pool = db.pool
        state = f"ok  rtt {db.rtt_ms:.2f} ms" if db.ok else f"DOWN  {db.error}"
        print(
            f"  {db.database:<20} {state}  pool {pool.connections_in_use}/"
            f"{pool.connections_open} in use/open, max {pool.max_pool_size}"
        )
    return 0 if healthy else 1


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = _target(args, health=True)
    request = health_pb2.HealthCheckRequest(service=args.service)
    reply = _call("health", target, health_pb2_grpc.HealthStub, "Check", request, timeout=args.timeout)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.service or '(overall)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _stats(args: argparse.Namespace) -> int:
    from broker_client.proto.broker.v1 import broker_pb2, broker_pb2_grpc

    target = _target(args)
    request = broker_pb2.StatsRequest(database=args.database)
    reply = _call("stats", target, broker_pb2_grpc.BrokerStub, "Stats", request, timeout=args.timeout)
    if args.json:
        print(_as_json(reply))
        return 0
    print(f"mongo-broker {reply.version} at {target} ({reply.instance}), up {reply.uptime_s:.0f}s")
    print(f"callers  {format_callers(reply)}")
    for db in reply.databases:
        print(format_stats_table(db))
    return 0


def format_callers(reply: Any) -> str:
    """Calls by calling host, most recently seen first, as one line."""
    callers = ", ".join(f"{p.host} {p.calls}" for p in reply.peers) or "none"
    if reply.peers_dropped:
        callers += f" (+{reply.peers_dropped} hosts not kept)"
    return callers


def _counts(values: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(values.items()) if v) or "none"


def format_stats_table(db: Any) -> str:
    """A human-readable table of one database's Stats."""
    state = "up" if db.available else f"DOWN ({db.last_error or 'no server found yet'})"
    rows = [
        ("server", f"{state}, {db.server_type}, rtt {db.server_rtt_ms:.2f} ms"),
        (
            "connections",
            f"{db.connections_open} open, {db.connections_in_use} in use, {db.connections_idle} idle "
            f"(max {db.max_pool_size}); {db.connections_created} created, "
            f"{db.connections_closed} closed, {db.pool_clears} pool clears",
        ),
        (
            "wait queue",
            f"{db.wait_queue_length} waiting now, {db.wait_queue_max} at most (limit {db.max_waiting})",
        ),
        (
            "queue wait",
            f"p50 {db.wait_p50_ms:.2f} ms, p99 {db.wait_p99_ms:.2f} ms, max {db.wait_max_ms:.2f} ms",
        ),
        ("checkout failures", _counts(db.checkout_failures)),
        (
            "calls",
            f"{_counts(db.rpcs)}; {db.rpcs_in_flight} in flight, {db.open_cursors} open cursors",
        ),
        ("errors", _counts(db.errors)),
        ("commands", _counts(db.operations)),
        (
            "pool advice",
            f"max_pool_size {db.recommended_max_pool_size} (peak demand {db.demand_connections:.2f} "
            f"connections, {db.round_trips_per_second:.1f} round trips/s, "
            f"mean hold {db.mean_hold_ms:.2f} ms)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"database {db.database}"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            from broker.logs import configure_logging
            from broker.server import serve

            settings = load_settings(args.config)
            configure_logging(settings.log.level, settings.log.format)
            return asyncio.run(serve(settings, ready_file=args.ready_file, config_path=args.config))
        if args.command == "stats":
            return _stats(args)
        if args.command == "health":
            return _health(args)
        return _ping(args)
    except ConfigError as exc:
        print(f"mongo-broker: {exc}", file=sys.stderr)
        return 2
    except _Unreachable as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
