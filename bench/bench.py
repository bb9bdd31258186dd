"""The benchmark harness (`make bench`): every mode, every workload, one database server, one report.

    python -m bench.bench                  # the default run (about 20 minutes on 2 quiet cores)
    python -m bench.bench --full           # also every mode, 3 repeats, at W=1000
    python -m bench.bench --smoke          # a few seconds: proves the harness still runs
    python -m bench.bench --db-profiles plain,tls-latency   # also TLS + latency to the database
    python -m bench.report RAW.json        # re-render REPORT.md and the plots from raw figures

Modes (bench/modes.py): churn, per-process, mongobetween, broker-uds,
broker-tcp, direct-shared; every worker is harness/worker.py. Workloads
(bench/workloads.py): storm, steady, stream, ghz, profile. All of them run
against the same database server in the same run: ``MONGODB_URI`` when set,
else what harness/dbserver.py finds (mongod, Docker, FerretDB). Database
profiles (bench/dbprofiles.py) say how the modes reach it: ``plain``
loopback TCP, and ``tls-latency``, its TLS listener behind toxiproxy's
latency, for storm and steady. The raw
figures go to ``bench/results/raw/bench-<time>.json`` (git-ignored) and
``bench/report.py`` writes ``bench/results/REPORT.md`` and its PNG plots;
docs/BENCHMARKS.md says how each figure is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from bench import dbprofiles, modes, report, workloads
from harness.dbserver import KINDS, DatabaseServer, DatabaseServerError, database_server
from harness.process import short_tmpdir

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
WORKLOADS = ("storm", "steady", "stream", "ghz", "profile")


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(choices: Sequence[str]) -> Any:
    """argparse type: comma-separated names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--workloads", type=name_list(WORKLOADS), default=list(WORKLOADS), help="workloads to run")
    add("--modes", type=name_list(modes.MODES), default=list(modes.MODES), help="modes to run")
    add("--repeats", type=int, default=3, help="repeats of storm, stream and ghz runs")
    add("--storm-workers", type=int_list, default=[50, 200, 1000], help="W: short-lived workers per run")
    add("--storm-concurrency", type=int, default=20, help="worker processes alive at once")
    add("--storm-ops", type=int, default=4, help="operations per worker (insert, find it, ...)")
    add("--storm-hold-ms", type=int, default=200, help="a worker keeps its client this long after its ops")
    add("--large-w", type=int, default=1000, help="the W that runs fewer modes and repeats unless --full")
    add(
        "--large-modes",
        type=name_list(modes.MODES),
        default=[modes.PER_PROCESS, modes.BROKER_UDS, modes.DIRECT_SHARED],
        help="modes run at --large-w unless --full (mongobetween always stays)",
    )
    add("--large-repeats", type=int, default=1, help="repeats at --large-w unless --full")
    add("--full", action="store_true", help="every mode and --repeats at --large-w as well")
    add("--steady-concurrency", type=int_list, default=[1, 4, 16, 64], help="C: long-lived workers")
    add("--steady-seconds", type=float, default=4.0, help="length of one measured steady window")
    add("--steady-windows", type=int, default=3, help="consecutive steady windows (the repeats)")
    add("--stream-sizes", type=int_list, default=[20_000, 100_000], help="documents per find")
    add("--stream-batch-size", type=int, default=1000, help="batch size of the find")
    add("--ghz-seconds", type=float, default=5.0, help="length of one ghz run")
    add("--ghz-concurrency", type=int, default=16, help="ghz --concurrency")
    add("--ghz-connections", type=int, default=16, help="ghz --connections")
    add("--profile-seconds", type=float, default=10.0, help="py-spy recording under steady load")
    add("--profile-concurrency", type=int, default=16, help="steady C while profiling")
    add("--profile-stream-size", type=int, default=100_000, help="documents streamed while profiling")
    add(
        "--profile-native",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="py-spy --native: C frames too (pauses the broker per sample; idle waits filtered out)",
    )
    add("--max-pool-size", type=int, default=10, help="the broker's (and mongobetween's) pool bound")
    add(
        "--proxy-nice",
        type=int,
        default=0,
        help="nice value for the broker and mongobetween (e.g. -10: a bigger CPU share, like a CPU request)",
    )
    add("--results-dir", type=Path, default=RESULTS, help="where REPORT.md and the plots go")
    add("--no-report", action="store_true", help="write the raw JSON only")
    add(
        "--server",
        choices=["auto", *KINDS],
        default=os.environ.get("DBSERVER_KIND", "auto"),
        help="database server (env DBSERVER_KIND; MONGODB_URI wins under auto)",
    )
    add(
        "--db-profiles",
        type=dbprofiles.parse_profiles,
        default=[dbprofiles.PLAIN],
        help="how the modes reach the database: plain, and tls-latency (TLS + toxiproxy latency; "
        "storm and steady only, about 25 minutes more on 2 cores)",
    )
    add("--smoke", action="store_true", help="a few seconds of everything: W=5, C=1 for 1 s, 2k docs")
    add("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        given = sys.argv[1:] if argv is None else list(argv)
        _apply_smoke(args, {a.split("=", 1)[0] for a in given if a.startswith("--")})
    return args


def _apply_smoke(args: argparse.Namespace, given: set[str]) -> None:
    """Tiny sizes that exercise every code path; the numbers mean nothing. Explicit options win."""
    defaults = {
        "storm_workers": [5],
        "storm_concurrency": 3,
        "storm_ops": 2,
        "storm_hold_ms": 0,
        "repeats": 1,
        "steady_concurrency": [1],
        "steady_seconds": 1.0,
        "steady_windows": 1,
        "stream_sizes": [2000],
        "ghz_seconds": 1.0,
        "ghz_concurrency": 2,
        "ghz_connections": 1,
    }
    for name, value in defaults.items():
        if f"--{name.replace('_', '-')}" not in given:
            setattr(args, name, value)
    if "--workloads" not in given:
        args.workloads = ["storm", "steady", "stream", "ghz"]
    if "--modes" not in given:
        args.modes = [modes.PER_PROCESS, modes.MONGOBETWEEN, modes.BROKER_UDS]
    if "--db-profiles" not in given:
        args.db_profiles = list(dbprofiles.PROFILES)


# --- facts about the machine and the software -----------------------------------------------------


def _run(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip()


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": model or platform.processor(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
    }


def _go_module_version(go_mod: Path, module: str) -> str:
    with contextlib.suppress(OSError):
        match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(\S+)", go_mod.read_text(), re.M)
        if match:
            return match.group(1)
    return "?"


def software_versions(server_info: dict[str, Any]) -> dict[str, Any]:
    import broker_client
    import google.protobuf
    import grpc
    import matplotlib
    import pymongo

    py_spy = workloads.find_py_spy()
    git = ["git", "--no-optional-locks", "-C", str(REPO)]
    dirty = bool(_run([*git, "status", "--porcelain", "--untracked-files=no"]))
    return {
        "python": platform.python_version(),
        "pymongo": pymongo.version,
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "broker_client": broker_client.__version__,
        "matplotlib": matplotlib.__version__,
        "py-spy": _run([py_spy, "--version"]).replace("py-spy ", "") if py_spy else "not installed",
        "ghz": _go_module_version(REPO / "bench" / "ghz" / "go.mod", "github.com/bojand/ghz")
        if workloads.find_ghz()
        else "not built",
        "go": _run(["go", "version"]) if shutil.which("go") else "no go",
        "git_commit": _run([*git, "rev-parse", "--short", "HEAD"])
        + (" + uncommitted changes" if dirty else ""),
        **server_info,
    }


def _server_info(ctx: workloads.Context) -> dict[str, Any]:
    info: dict[str, Any] = {"server_kind": ctx.server.kind, "server_reason": ctx.server.reason}
    try:
        build = ctx.mongo.admin.command("buildInfo")
    except Exception as exc:
        info["server_version"] = f"? ({type(exc).__name__})"
        return info
    info["server_version"] = str(build.get("version", "?"))
    if "ferretdbVersion" in build:
        version = str(build["ferretdbVersion"])
        if version in ("", "unknown"):
            # bench/ferretdb wraps FerretDB as a library, so the binary has no version stamped in.
            pinned = _go_module_version(
                REPO / "bench" / "ferretdb" / "go.mod", "github.com/FerretDB/FerretDB"
            )
            version = f"{pinned} (bench/ferretdb/go.mod)"
        info["ferretdb"] = version
    return info


# --- the run --------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """What this run measures, for the report."""
    large = None if args.full else args.large_w
    return {
        "workloads": args.workloads,
        "modes": args.modes,
        "repeats": args.repeats,
        "storm": {
            "workers": args.storm_workers,
            "concurrency": args.storm_concurrency,
            "ops": args.storm_ops,
            "hold_ms": args.storm_hold_ms,
            "large_w": large,
            "large_modes": args.large_modes,
            "large_repeats": args.large_repeats,
        },
        "steady": {
            "concurrency": args.steady_concurrency,
            "seconds": args.steady_seconds,
            "windows": args.steady_windows,
            "insert_every": 4,
            "seed_docs": 1000,
        },
        "stream": {"sizes": args.stream_sizes, "batch_size": args.stream_batch_size, "doc_bytes": None},
        "ghz": {
            "seconds": args.ghz_seconds,
            "concurrency": args.ghz_concurrency,
            "connections": args.ghz_connections,
        },
        "profile": {
            "seconds": args.profile_seconds,
            "concurrency": args.profile_concurrency,
            "stream_size": args.profile_stream_size,
            "native": args.profile_native,
        },
        "max_pool_size": args.max_pool_size,
        "proxy_nice": args.proxy_nice,
        "db_profiles": {
            profile: dbprofiles.workloads_for(profile, args.workloads) for profile in args.db_profiles
        },
    }


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the plan, profile after profile; return the raw result (records, facts, versions)."""
    started = time.time()
    t0 = time.monotonic()
    facts = machine_facts()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f} s] {message}", flush=True)

    mongobetween = workloads.Mongobetween.obtain()
    progress(f"mongobetween: {mongobetween.reason}")
    workdir = short_tmpdir("mb-bench-")
    raw_dir = args.results_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    profiles: dict[str, dict[str, Any]] = {}
    brokers: list[dict[str, Any]] = []
    versions: dict[str, Any] = {}
    server_kind = None if args.server == "auto" else args.server
    pki = None
    if dbprofiles.TLS_LATENCY in args.db_profiles:
        pki = dbprofiles.make_pki(workdir / "pki")
    try:
        with database_server(server_kind, tls=pki.listener if pki else None) as server:
            progress(f"database: {server.kind} at {server.address} ({server.reason})")
            for profile in args.db_profiles:
                names = dbprofiles.workloads_for(profile, args.workloads)
                if not names:
                    continue
                with _endpoint(profile, server, pki) as (endpoint, about):
                    about["ping"] = dbprofiles.ping_ms(endpoint.uri)
                    profiles[profile] = about
                    tag = "" if profile == dbprofiles.PLAIN else f"[{profile}] "
                    progress(f"{tag}database profile {profile}: ping {about['ping']}")
                    (workdir / profile).mkdir()
                    ctx = workloads.Context(
                        server=endpoint,
                        workdir=workdir / profile,
                        raw_dir=raw_dir,
                        mongobetween=mongobetween,
                        max_pool_size=args.max_pool_size,
                        proxy_nice=args.proxy_nice,
                        progress=_tagged(progress, tag),
                    )
                    try:
                        versions = versions or software_versions(_server_info(ctx))
                        records += _run_profile(ctx, profile, names, args, timings)
                    finally:
                        ctx.close()
                    brokers.extend(ctx.brokers_started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    facts["loadavg_end"] = list(os.getloadavg())
    the_plan = plan(args)
    the_plan["stream"]["doc_bytes"] = workloads.stream_document_bytes()
    return {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "wall_s": time.monotonic() - t0,
        "workload_wall_s": timings,
        "machine": facts,
        "versions": {**versions, "broker": brokers[0]["version"] if brokers else "?"},
        "broker_config": brokers[0]["config"] if brokers else {},
        "mongobetween": {"binary": mongobetween.binary, "reason": mongobetween.reason},
        "db_profiles": profiles,
        "plan": the_plan,
        "records": records,
    }


def _run_profile(
    ctx: workloads.Context,
    profile: str,
    names: Sequence[str],
    args: argparse.Namespace,
    timings: dict[str, float],
) -> list[dict[str, Any]]:
    """Every workload of ``names`` in one profile; each record is tagged with the profile."""
    tag = "" if profile == dbprofiles.PLAIN else f"[{profile}] "
    records: list[dict[str, Any]] = []
    for name in names:
        began = time.monotonic()
        found = _run_workload(name, ctx, args, imports=profile == dbprofiles.PLAIN)
        records.extend({**r, "db_profile": profile} for r in found)
        timings[tag + name] = time.monotonic() - began
        ctx.progress(f"{name} done in {timings[tag + name]:.0f} s")
    ctx.mongo.drop_database(workloads.MONGO_DB)
    return records


def _tagged(progress: Callable[[str], None], tag: str) -> Callable[[str], None]:
    return lambda message: progress(tag + message)


@contextlib.contextmanager
def _endpoint(
    profile: str, server: DatabaseServer, pki: dbprofiles.PkiFiles | None
) -> Iterator[tuple[DatabaseServer, dict[str, Any]]]:
    """The server as ``profile`` reaches it, and what the report says about that."""
    if profile == dbprofiles.PLAIN:
        yield server, {"how": f"{server.kind}'s plain TCP listener on loopback"}
        return
    assert pki is not None
    with dbprofiles.tls_latency_endpoint(server, pki) as (endpoint, about):
        yield endpoint, about


def _run_workload(
    name: str, ctx: workloads.Context, args: argparse.Namespace, *, imports: bool
) -> list[dict[str, Any]]:
    if name == "storm":
        # A cold worker's imports do not touch the database: measured once, in the plain profile.
        records = workloads.run_imports(ctx, repeats=max(3, args.repeats)) if imports else []
        large = None if args.full else (args.large_w, args.large_modes, args.large_repeats)
        return records + workloads.run_storm(
            ctx,
            worker_counts=args.storm_workers,
            mode_list=args.modes,
            repeats=args.repeats,
            concurrency=args.storm_concurrency,
            ops=args.storm_ops,
            hold_ms=args.storm_hold_ms,
            large=large,
        )
    if name == "steady":
        return workloads.run_steady(
            ctx,
            concurrencies=args.steady_concurrency,
            mode_list=args.modes,
            duration=args.steady_seconds,
            windows=args.steady_windows,
        )
    if name == "stream":
        return workloads.run_stream(
            ctx,
            sizes=args.stream_sizes,
            mode_list=args.modes,
            repeats=args.repeats,
            batch_size=args.stream_batch_size,
        )
    if name == "ghz":
        return workloads.run_ghz(
            ctx,
            seconds=args.ghz_seconds,
            concurrency=args.ghz_concurrency,
            connections=args.ghz_connections,
            repeats=args.repeats,
        )
    return workloads.run_profile(
        ctx,
        steady_concurrency=args.profile_concurrency,
        seconds=args.profile_seconds,
        stream_size=args.profile_stream_size,
        batch_size=args.stream_batch_size,
        native=args.profile_native,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    shown = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "bench.bench", *shown])
    try:
        raw = run(args, command)
    except DatabaseServerError as exc:
        print(f"no database server: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: stopped every worker, broker and database server", file=sys.stderr)
        return 130
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw_path = args.results_dir / "raw" / f"bench-{stamp}.json"
    raw_path.write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    print(f"raw figures: {raw_path}")
    if not args.no_report:
        path = report.write_report(raw, args.results_dir, raw_path=raw_path)
        print(f"report: {path}")
        print(report.headline_text(raw))
    print(f"bench finished in {raw['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
