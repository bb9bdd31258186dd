"""The Go and Node.js clients: their own test suites against the session broker,
and the freshness of what they generate or copy from protos/.

pytest drives the other languages so that CI has one test command. Each
suite runs as a subprocess with ``MONGO_BROKER_TARGET`` set to the session
broker's Unix socket and ``MONGO_BROKER_DATABASE`` to its configured
database; their live tests skip without those variables, so here none may
skip. ``make clients`` installs what they need (``npm ci``, ``go mod
download``); a missing install fails loudly rather than skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo.errors import PyMongoError

from tests.toolchains import GO_DIR, MAKE_CLIENTS, NODE_DIR, ROOT, tool

PROTO_ROOT = ROOT / "protos"
SUITE_TIMEOUT_S = 280  # below pytest-timeout's 300 s, so the output is shown


def require_node_modules() -> None:
    # grpc-js for the client, typescript (a devDependency) for its type test.
    for package in (Path("@grpc", "grpc-js"), Path("typescript")):
        if not (NODE_DIR / "node_modules" / package).is_dir():
            pytest.fail(f"clients/node/node_modules is missing or incomplete: {MAKE_CLIENTS}", pytrace=False)


def live_env(broker) -> dict[str, str]:
    """The environment the clients' live tests read the broker from."""
    return {
        **os.environ,
        "MONGO_BROKER_TARGET": broker.unix_target,
        "MONGO_BROKER_DATABASE": broker.db_name,
    }


def run_suite(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    try:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SUITE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"`{' '.join(argv)}` did not finish in {SUITE_TIMEOUT_S} s:\n{out or ''}")
    return result.returncode, f"$ {' '.join(argv)}  (in {cwd})\n{result.stdout}{result.stderr}"


# --- the clients' own suites --------------------------------------------------


@pytest.fixture
def client_collections(broker, mongo) -> Iterator[None]:
    """Drops the collections a client suite made (``go_*``, ``node_*``) afterwards."""
    database = mongo[broker.mongo_db]
    before = set(database.list_collection_names())
    yield
    with contextlib.suppress(PyMongoError):
        for name in set(database.list_collection_names()) - before:
            if name.startswith(("go_", "node_")):
                database.drop_collection(name)


@pytest.mark.usefixtures("client_collections")
def test_go_client_suite(broker, record_property):
    go = tool("go")
    code, output = run_suite([go, "test", "-count=1", "-v", "./..."], GO_DIR, live_env(broker))
    passed = len(re.findall(r"^\s*--- PASS: ", output, re.MULTILINE))
    failed = len(re.findall(r"^\s*--- FAIL: ", output, re.MULTILINE))
    skipped = re.findall(r"^\s*--- SKIP: (\S+)", output, re.MULTILINE)
    record_property("go_tests_passed", passed)
    record_property("go_tests_failed", failed)
    assert code == 0, f"the Go client's tests failed:\n{output}"
    assert passed > 0, f"go test ran no test:\n{output}"
    assert not skipped, f"Go tests skipped although a broker was given: {skipped}\n{output}"


@pytest.mark.usefixtures("client_collections")
def test_node_client_suite(broker, record_property):
    node = tool("node")
    require_node_modules()
    code, output = run_suite([node, "--test", "--test-reporter=tap"], NODE_DIR, live_env(broker))
    counts = {
        key: int(value) for key, value in re.findall(r"^# (pass|fail|skipped) (\d+)$", output, re.MULTILINE)
    }
    record_property("node_tests_passed", counts.get("pass", 0))
    record_property("node_tests_failed", counts.get("fail", 0))
    assert code == 0, f"the Node client's tests failed:\n{output}"
    assert counts.get("pass", 0) > 0, f"node --test ran no test:\n{output}"
    # A skipped suite shows as "# SKIP" on its line, not in the skipped count.
    assert counts.get("skipped", 0) == 0 and "# SKIP" not in output, (
        f"Node tests skipped although a broker was given:\n{output}"
    )


# --- freshness of generated and copied code -----------------------------------


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob(pattern)) if p.is_file()}


def _compare(fresh: dict[str, bytes], committed: dict[str, bytes], fix: str) -> None:
    assert fresh, "nothing was generated"
    problems = []
    if missing := sorted(fresh.keys() - committed.keys()):
        problems.append(f"missing from the committed copy: {', '.join(missing)}")
    if extra := sorted(committed.keys() - fresh.keys()):
        problems.append(f"committed, but not generated: {', '.join(extra)}")
    if differ := sorted(k for k in fresh.keys() & committed.keys() if fresh[k] != committed[k]):
        problems.append(f"different from what protos/ gives: {', '.join(differ)}")
    assert not problems, f"{fix}\n" + "\n".join(problems)


def test_committed_go_code_matches_protos(tmp_path):
    tool("go")
    # A subprocess, as `make proto` runs it: protoc keeps global state.
    result = subprocess.run(
        [sys.executable, str(PROTO_ROOT / "generate_go.py"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"protos/generate_go.py failed:\n{result.stdout}{result.stderr}"
    _compare(
        _files(tmp_path, "*/*.pb.go"),
        _files(GO_DIR, "*/*.pb.go"),
        "the committed Go code in clients/go/brokerv1 is stale: run `make proto` and commit the result",
    )


def test_generated_go_code_says_so():
    for path in sorted((GO_DIR / "brokerv1").glob("*.pb.go")):
        head = path.read_text().split("\npackage ", 1)[0]
        # https://go.dev/s/generatedcode: before the package clause.
        assert re.search(r"^// Code generated .* DO NOT EDIT\.$", head, re.MULTILINE), path


def test_node_proto_copy_matches_protos():
    _compare(
        _files(PROTO_ROOT, "**/*.proto"),
        _files(NODE_DIR / "proto", "**/*.proto"),
        "clients/node/proto is stale: run `make proto` (or `npm run proto` in clients/node) and commit",
    )


# --- pins ---------------------------------------------------------------------


def test_node_dependencies_are_pinned_exactly_and_locked():
    package = json.loads((NODE_DIR / "package.json").read_text())
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    locked = lock["packages"]
    for section in ("dependencies", "devDependencies"):
        for name, spec in package.get(section, {}).items():
            assert re.fullmatch(r"\d+\.\d+\.\d+", spec), (
                f"{name}@{spec}: pin an exact version in package.json"
            )
            assert locked[f"node_modules/{name}"]["version"] == spec, f"{name}: package-lock.json disagrees"
    assert locked[""]["dependencies"] == package["dependencies"], (
        "package-lock.json is stale: run npm install"
    )


def test_go_tool_versions_are_pinned():
    # The protoc plugins are built from this module's go.mod and go.sum;
    # the generated code names their versions, which must be the pinned ones.
    tools_mod = (GO_DIR / "internal" / "tools" / "go.mod").read_text()
    pins = dict(re.findall(r"^\s*(google\.golang\.org/\S+) (v\S+)", tools_mod, re.MULTILINE))
    generated = (GO_DIR / "brokerv1" / "broker.pb.go").read_text()
    grpc_generated = (GO_DIR / "brokerv1" / "broker_grpc.pb.go").read_text()
    assert f"protoc-gen-go {pins['google.golang.org/protobuf']}" in generated
    assert f"protoc-gen-go-grpc {pins['google.golang.org/grpc/cmd/protoc-gen-go-grpc']}" in grpc_generated
    # The runtime the generated code is compiled against is the generator's.
    client_mod = (GO_DIR / "go.mod").read_text()
    assert f"google.golang.org/protobuf {pins['google.golang.org/protobuf']}" in client_mod
