"""Generate the Go gRPC code from protos/ (the one command: `make proto`).

The output is ``clients/go/brokerv1/*.pb.go``, the package named by the
proto's ``go_package`` option. protoc is the one bundled with grpcio-tools
(pinned in constraints.txt), the same compiler that makes the Python code;
the plugins, protoc-gen-go and protoc-gen-go-grpc, are built from the
versions pinned (with go.sum) by ``clients/go/internal/tools/go.mod``. So
the same inputs give the same bytes on every machine, which is what the
freshness test in tests/test_polyglot.py checks. Nothing is edited after
generation.

Usage: python protos/generate_go.py [OUT_DIR]   (default: clients/go, the
Go module root; files are written to OUT_DIR/brokerv1/)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
TOOLS_MODULE = ROOT / "clients" / "go" / "internal" / "tools"
# The Go module whose import path prefixes every go_package in protos/:
# protoc-gen-go's `module=` option strips it, so files land in OUT_DIR/brokerv1.
GO_MODULE = "github.com/mongo-broker/mongo-broker/clients/go"
PLUGINS = {
    "protoc-gen-go": "google.golang.org/protobuf/cmd/protoc-gen-go",
    "protoc-gen-go-grpc": "google.golang.org/grpc/cmd/protoc-gen-go-grpc",
}
GENERATED_SUFFIX = ".pb.go"


def build_plugins(bin_dir: Path) -> dict[str, Path]:
    """Build the pinned protoc plugins into ``bin_dir``; return name -> path."""
    env = dict(os.environ)
    # The tools module's go.mod and go.sum are the pins: never let the build
    # change them, and never build from a workspace that would override them.
    env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -mod=readonly").strip()
    env["GOWORK"] = "off"
    result = subprocess.run(
        ["go", "build", "-o", f"{bin_dir}{os.sep}", *PLUGINS.values()],
        cwd=TOOLS_MODULE,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"building the protoc plugins failed:\n{result.stdout}{result.stderr}")
    return {name: bin_dir / name for name in PLUGINS}


def _is_generated(path: Path) -> bool:
    """The file says "Code generated ... DO NOT EDIT." before its package clause.

    (https://go.dev/s/generatedcode; protoc-gen-go puts the proto's own
    leading comment above that line.)
    """
    header = path.read_text(errors="replace").split("\npackage ", 1)[0]
    lines = header.splitlines()
    return any(line.startswith("// Code generated ") and line.endswith(" DO NOT EDIT.") for line in lines)


def generate(out_dir: Path) -> list[Path]:
    """Write the Go code for every proto under protos/ into ``out_dir``."""
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory(prefix="mb-protoc-go-") as tmp:
        plugins = build_plugins(Path(tmp))
        # Stale files of a proto that was removed or renamed go too.
        for old in sorted(out_dir.glob(f"*/*{GENERATED_SUFFIX}")):
            if _is_generated(old):
                old.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            *(f"--plugin={name}={path}" for name, path in plugins.items()),
            f"--go_out={out_dir}",
            f"--go_opt=module={GO_MODULE}",
            f"--go-grpc_out={out_dir}",
            f"--go-grpc_opt=module={GO_MODULE}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    return sorted(out_dir.glob(f"*/*{GENERATED_SUFFIX}"))


if __name__ == "__main__":
    written = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "clients" / "go")
    sys.stdout.write("".join(f"{path}\n" for path in written))
