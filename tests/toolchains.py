"""What the Go and Node.js client tests need from the machine, found or failed with the fix.

Shared by the suites that run those clients (test_polyglot, test_interop,
test_tier_polyglot): a missing toolchain or install fails loudly with the
command that provides it, never skips.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GO_DIR = ROOT / "clients" / "go"
NODE_DIR = ROOT / "clients" / "node"
MAKE_CLIENTS = "run `make clients` (npm ci in clients/node, go mod download in clients/go)"
# Below pytest-timeout's 300 s, so a slow build's output is shown.
GO_BUILD_TIMEOUT_S = 280


def tool(name: str) -> str:
    """The path of a required tool; a missing one fails the test with the fix."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not on PATH: {MAKE_CLIENTS}", pytrace=False)
    return found


def require_grpc_js() -> None:
    """Fails the test unless clients/node has its runtime dependency installed."""
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"clients/node/node_modules is missing: {MAKE_CLIENTS}", pytrace=False)


def build_go_program(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """``clients/go/cmd/NAME`` built once into a temp dir (a build per call would dominate a run)."""
    binary = tmp_path_factory.mktemp(f"go-{name}") / name
    result = subprocess.run(
        [tool("go"), "build", "-o", str(binary), f"./cmd/{name}"],
        cwd=GO_DIR,
        capture_output=True,
        text=True,
        timeout=GO_BUILD_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"building clients/go/cmd/{name} failed:\n{result.stdout}{result.stderr}"
    return binary
