"""Start the real broker as a subprocess and wait until it is ready.

One place for what the test fixtures and the demo both do::

    config = broker_config(db_uri=server.uri, socket_path=workdir / "broker.sock")
    with BrokerProcess(config, workdir=workdir).start() as broker:
        BrokerClient(broker.unix_target)

The broker is run as ``python -m broker serve --config CFG --ready-file
READY``. Once its listeners are bound it writes READY atomically as JSON
``{"pid", "unix", "tcp", "version"}``. SIGTERM makes it drain and exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import tomli_w

from harness.process import short_tmpdir, spawn_logged, tail, terminate

__all__ = [
    "BrokerProcess",
    "BrokerStartError",
    "Ready",
    "broker_config",
    "render_toml",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
# The broker reads MONGO_BROKER_* variables on top of its config file; a
# stray one in the caller's environment would silently change what a test
# or the demo runs, so they are not passed on unless asked for.
ENV_PREFIX = "MONGO_BROKER_"


class BrokerStartError(RuntimeError):
    """The broker exited or timed out before it was ready."""

    def __init__(self, message: str, returncode: int | None, stderr_tail: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


@dataclass(frozen=True)
class Ready:
    """The broker's ready file."""

    pid: int
    unix: str | None
    tcp: str | None
    version: str


# --- config -----------------------------------------------------------------


def render_toml(config: Mapping[str, Any]) -> str:
    """Write a nested mapping as TOML; ``None`` values are left out, as TOML has no null."""

    def drop_none(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): drop_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list | tuple):
            return [drop_none(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return tomli_w.dumps(drop_none(config))


def broker_config(
    *,
    db_uri: str,
    socket_path: Path | str | None,
    tcp: str | None = "127.0.0.1:0",
    db_name: str = "appdb",
    mongo_db: str = "broker_test",
    max_pool_size: int = 10,
    **database_options: Any,
) -> dict[str, Any]:
    """A broker config with one database, as a dict (``render_toml`` writes it)."""
    listen: dict[str, Any] = {}
    if socket_path is not None:
        listen["unix"] = str(socket_path)
    if tcp is not None:
        listen["tcp"] = tcp
    database = {
        "uri": db_uri,
        "database": mongo_db,
        "max_pool_size": max_pool_size,
        **database_options,
    }
    return {"listen": listen, "databases": {db_name: database}}


# --- process ----------------------------------------------------------------


class BrokerProcess:
    """One broker subprocess with its config, ready file and stderr log.

    ``workdir`` holds ``broker.toml``, ``ready.json`` and ``broker.log``;
    when not given, a fresh short directory under /tmp is made (and removed
    by ``close``). Keep Unix sockets in it: it is short enough for sun_path.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | str,
        *,
        workdir: Path | None = None,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        name: str = "broker",
        umask: int = -1,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = workdir if workdir is not None else short_tmpdir("mb-")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config_path = self.workdir / f"{name}.toml"
        self.ready_path = self.workdir / f"{name}.ready.json"
        self.log_path = self.workdir / f"{name}.log"
        text = config if isinstance(config, str) else render_toml(config)
        self.config_path.write_text(text, encoding="utf-8")
        self.argv = [
            python,
            "-m",
            "broker",
            "serve",
            "--config",
            str(self.config_path),
            "--ready-file",
            str(self.ready_path),
            *extra_args,
        ]
        base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        self.env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
        # The broker's umask (-1: inherit); tests of file modes start it under 000.
        self.umask = umask
        self.ready: Ready | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    # -- lifecycle --

    def start(self, wait: bool = True, timeout: float = 30.0) -> Self:
        """Start the broker; with ``wait``, return once its ready file is there."""
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started (pid {self._proc.pid})")
        self.ready_path.unlink(missing_ok=True)
        self._proc = spawn_logged(self.argv, self.log_path, cwd=REPO, env=self.env, umask=self.umask)
        logger.info("started %s pid %d with %s", self.name, self._proc.pid, self.config_path)
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop(grace=5.0)
                raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> Ready:
        """Wait for the ready file; raise ``BrokerStartError`` if the broker
        exits first or ``timeout`` passes."""
        proc = self._require_proc()
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while True:
            ready = self._read_ready()
            if ready is not None:
                self.ready = ready
                logger.info(
                    "%s ready in %.2f s: unix=%s tcp=%s version=%s",
                    self.name,
                    time.monotonic() - started,
                    ready.unix,
                    ready.tcp,
                    ready.version,
                )
                return ready
            code = proc.poll()
            if code is not None:
                self.returncode = code
                raise BrokerStartError(
                    f"{self.name} exited with code {code} before it was ready; "
                    f"log {self.log_path} ends:\n{self.log_tail()}",
                    code,
                    self.log_tail(),
                )
            if time.monotonic() >= deadline:
                raise BrokerStartError(
                    f"{self.name} (pid {proc.pid}) wrote no ready file {self.ready_path} "
                    f"within {timeout:.0f} s; log {self.log_path} ends:\n{self.log_tail()}",
                    None,
                    self.log_tail(),
                )
            time.sleep(0.02)

    def _read_ready(self) -> Ready | None:
        try:
            data = json.loads(self.ready_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None  # not there yet (it is written atomically, but be lenient)
        return Ready(
            pid=int(data["pid"]),
            unix=data.get("unix"),
            tcp=data.get("tcp"),
            version=str(data.get("version", "")),
        )

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the broker to exit by itself; return its exit code."""
        self.returncode = self._require_proc().wait(timeout)
        return self.returncode

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM (the broker drains and exits 0), SIGKILL after ``grace`` s.

        Returns the exit code; None if it was never started. Idempotent.
        """
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self.returncode = terminate(self._proc, grace, name=self.name)
            logger.info("%s pid %d exited with %s", self.name, self._proc.pid, self.returncode)
        return self._proc.returncode

    def close(self) -> None:
        """Stop the broker and remove the work directory if this object made it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what tests and the demo read --

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._proc

    def _require_ready(self) -> Ready:
        if self.ready is None:
            raise RuntimeError(f"{self.name} is not ready (call start() or wait_ready())")
        return self.ready

    @property
    def pid(self) -> int:
        return self._require_proc().pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def unix_path(self) -> str | None:
        return self._require_ready().unix

    @property
    def unix_target(self) -> str:
        """``unix:///path/broker.sock``, a gRPC target."""
        path = self._require_ready().unix
        if path is None:
            raise RuntimeError(f"{self.name} has no Unix listener")
        return f"unix://{path}"

    @property
    def tcp_target(self) -> str:
        """``127.0.0.1:PORT``, a gRPC target."""
        address = self._require_ready().tcp
        if address is None:
            raise RuntimeError(f"{self.name} has no TCP listener")
        return address

    @property
    def version(self) -> str:
        return self._require_ready().version

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)
