"""Toxiproxy between the broker and the database: latency, stalls, resets, cuts.

Starts the pinned `toxiproxy-server` (built by `make tools`) on a free
loopback port and drives it through its HTTP API. Used by the fault tests and
benchmarks; nothing here is part of the broker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

from harness.process import free_port

__all__ = ["Proxy", "Toxiproxy", "ToxiproxyError", "find_toxiproxy"]

log = logging.getLogger("mongo_broker.harness.toxiproxy")
_ROOT = Path(__file__).resolve().parent.parent


class ToxiproxyError(RuntimeError):
    pass


def find_toxiproxy() -> str | None:
    """The toxiproxy-server binary: on PATH or in the repository's .tools/bin."""
    local = _ROOT / ".tools" / "bin" / "toxiproxy-server"
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("toxiproxy-server")


class Proxy:
    """One proxied upstream, with helpers for the faults the tests need."""

    def __init__(self, api: Toxiproxy, name: str, listen_port: int) -> None:
        self._api = api
        self.name = name
        self.port = listen_port

    def add_toxic(self, kind: str, stream: str = "downstream", **attributes: Any) -> str:
        name = f"{kind}_{stream}_{time.monotonic_ns()}"
        self._api.request(
            "POST",
            f"/proxies/{self.name}/toxics",
            {"name": name, "type": kind, "stream": stream, "toxicity": 1.0, "attributes": attributes},
        )
        return name

    def remove_toxic(self, name: str) -> None:
        self._api.request("DELETE", f"/proxies/{self.name}/toxics/{name}")

    def clear(self) -> None:
        for toxic in self._api.request("GET", f"/proxies/{self.name}/toxics") or []:
            self.remove_toxic(toxic["name"])
        self.enable()

    def disable(self) -> None:
        """Close every connection and refuse new ones: the database is 'down'."""
        self._api.request("POST", f"/proxies/{self.name}", {"enabled": False})

    def enable(self) -> None:
        self._api.request("POST", f"/proxies/{self.name}", {"enabled": True})


class Toxiproxy:
    """A toxiproxy-server process and its API."""

    def __init__(self, binary: str) -> None:
        self._binary = binary
        self.api_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Self:
        self._process = subprocess.Popen(
            [self._binary, "-host", "127.0.0.1", "-port", str(self.api_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.request("GET", "/version")
                return self
            except (OSError, ToxiproxyError):
                if self._process.poll() is not None:
                    raise ToxiproxyError(f"toxiproxy-server exited with {self._process.returncode}") from None
                time.sleep(0.05)
        raise ToxiproxyError("toxiproxy-server did not answer within {timeout}s")

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as reply:
                text = reply.read()
        except urllib.error.HTTPError as exc:
            raise ToxiproxyError(f"{method} {path}: {exc.code} {exc.read()!r}") from exc
        return json.loads(text) if text.strip() else None

    def proxy(self, name: str, upstream: str) -> Proxy:
        port = free_port()
        self.request("POST", "/proxies", {"name": name, "listen": f"127.0.0.1:{port}", "upstream": upstream})
        return Proxy(self, name, port)

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
