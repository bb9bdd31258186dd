"""The Unix socket: never more open than listen.unix_mode, and reachable by listen.unix_group."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The public name of the asyncio servicer; the type stubs know only the sync one.
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from harness.brokerproc import BrokerProcess
from tests.rpc import open_stub, pb


def _start(start_broker, config, *, umask: int) -> BrokerProcess:
    """A broker under ``umask``, not waited for (the factory still stops it)."""
    process = BrokerProcess(config, workdir=start_broker.workdir(), umask=umask)
    start_broker.started.append(process)
    process.start(wait=False)
    return process


def _watch_modes(path: Path, process: BrokerProcess, timeout: float = 30.0) -> set[int]:
    """Every mode ``path`` had from before it appeared until the broker is ready."""
    seen: set[int] = set()
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.add(stat.S_IMODE(os.lstat(path).st_mode))

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        process.wait_ready(timeout)
        time.sleep(0.05)
    finally:
        done.set()
        watcher.join(5)
    return seen


@pytest.mark.parametrize("unix_mode", ["0660", "0600"])
def test_socket_is_never_more_open_than_unix_mode_even_under_umask_000(start_broker, unix_mode):
    config = start_broker.base_config()
    socket_path = Path(config["listen"]["unix"])
    # An existing directory that anyone may traverse: only the socket's own
    # mode stands between another uid and the broker.
    socket_path.parent.chmod(0o755)
    config["listen"]["unix_mode"] = unix_mode
    process = _start(start_broker, config, umask=0)
    seen = _watch_modes(socket_path, process)
    allowed = int(unix_mode, 8)
    assert seen, "the socket never appeared"
    too_open = {oct(mode) for mode in seen if mode & ~allowed}
    assert not too_open, f"the socket was {too_open} at some moment; unix_mode is {unix_mode}"
    assert seen == {allowed}
    with open_stub(process.unix_target) as stub:
        assert stub.Ping(pb.PingRequest(), timeout=10).databases[0].ok
    # Nothing of the staging is left beside the socket.
    assert sorted(p.name for p in socket_path.parent.iterdir() if p.name.startswith(".mb")) == []


# Run as another uid: connect to PATH as often as possible until STOP exists;
# print CONNECTED if a connection was ever accepted (and kept open a moment).
_INTRUDER = """
import os, socket, sys, time
path, stop = sys.argv[1], sys.argv[2]
print("READY", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < deadline:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        s.close()
        continue
    print("CONNECTED", flush=True)
    s.close()
    break
"""


def _system_python() -> str:
    """A Python another uid may run (this one may live in a private home directory)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no system python3 for a process of another uid")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another uid")
def test_another_uid_never_connects_during_startup(start_broker):
    config = start_broker.base_config()
    socket_path = Path(config["listen"]["unix"])
    socket_path.parent.chmod(0o755)
    stop = socket_path.parent / "stop"
    intruder = subprocess.Popen(
        [_system_python(), "-I", "-c", _INTRUDER, str(socket_path), str(stop)],
        user=65534,
        group=65534,
        extra_groups=[],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert intruder.stdout is not None
        assert intruder.stdout.readline().strip() == "READY"
        process = _start(start_broker, config, umask=0)
        process.wait_ready(30)
        time.sleep(0.1)
        stop.touch()
        out, _ = intruder.communicate(timeout=30)
    finally:
        if intruder.poll() is None:
            intruder.kill()
            intruder.wait()
    assert "CONNECTED" not in out, "a process of another uid connected to the socket during start-up"


def _another_group() -> int:
    """A group the broker may give files: any group for root, else a supplementary one."""
    if os.geteuid() == 0:
        for entry in grp.getgrall():
            if entry.gr_gid != os.getgid():
                return entry.gr_gid
    for gid in os.getgroups():
        if gid != os.getgid():
            return gid
    pytest.skip("needs a group other than the primary one that this user may give files")


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_created_socket_directory_belongs_to_unix_group(start_broker, umask):
    gid = _another_group()
    config = start_broker.base_config()
    base = Path(config["listen"]["unix"]).parent
    socket_path = base / "run" / "mongo-broker" / "broker.sock"
    config["listen"]["unix"] = str(socket_path)
    config["listen"]["unix_group"] = str(gid)
    process = _start(start_broker, config, umask=umask)
    process.wait_ready(30)
    for directory in (socket_path.parent, socket_path.parent.parent):
        info = os.stat(directory)
        assert (oct(stat.S_IMODE(info.st_mode)), info.st_gid) == (oct(0o750), gid), directory
    info = os.stat(socket_path)
    assert (oct(stat.S_IMODE(info.st_mode)), info.st_gid) == (oct(0o660), gid)
    with open_stub(process.unix_target) as stub:
        assert stub.Ping(pb.PingRequest(), timeout=10).databases[0].ok


def test_existing_socket_directory_is_left_as_it_is(start_broker):
    gid = _another_group()
    config = start_broker.base_config()
    socket_path = Path(config["listen"]["unix"])
    socket_path.parent.chmod(0o711)
    before = os.stat(socket_path.parent)
    config["listen"]["unix_group"] = str(gid)
    process = _start(start_broker, config, umask=0o022)
    process.wait_ready(30)
    after = os.stat(socket_path.parent)
    assert (after.st_mode, after.st_gid) == (before.st_mode, before.st_gid)
    assert os.stat(socket_path).st_gid == gid


def test_unknown_unix_group_is_refused_at_startup_with_exit_2(start_broker):
    config = start_broker.base_config()
    config["listen"]["unix_group"] = "no-such-group-mb"
    process = start_broker(config, wait=False)
    assert process.wait(timeout=30) == 2
    log = process.log_text()
    assert "listen.unix_group 'no-such-group-mb': no such group" in log
    assert "Traceback" not in log
    # The refused start leaves no staging directory and no socket behind.
    left = [p.name for p in Path(config["listen"]["unix"]).parent.iterdir()]
    assert not [name for name in left if name.startswith((".mb", "broker.sock"))], left


def test_grpc_listens_on_a_unix_socket_from_add_insecure_port_and_serves_after_a_rename(tmp_path):
    """What _StagedSocket relies on: the socket exists and accepts from add_insecure_port on
    (so its mode must be right before then, hence the private directory), and grpc
    keeps serving on it under a new name (it holds the listening fd)."""
    staged, final = tmp_path / "stage" / "s", tmp_path / "final.sock"
    staged.parent.mkdir()

    async def run() -> int:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        server.add_insecure_port(f"unix:{staged}")
        try:
            assert stat.S_ISSOCK(os.lstat(staged).st_mode), "grpc did not bind in add_insecure_port"
            early = socket.socket(socket.AF_UNIX)
            early.connect(str(staged))  # accepted on the backlog before start()
            early.close()
            await server.start()
            os.rename(staged, final)
            async with grpc.aio.insecure_channel(f"unix:{final}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                return int(reply.status)
        finally:
            await server.stop(0)

    assert asyncio.run(run()) == health_pb2.HealthCheckResponse.SERVING
