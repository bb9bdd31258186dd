"""The committed gRPC code is exactly what `make proto` generates from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "clients" / "python" / "broker_client" / "proto"
GENERATED = Path("broker_client") / "proto"  # relative to generate()'s out_dir
FIX = (
    "the committed gRPC code in clients/python/broker_client/proto is stale: "
    "run `make proto` and commit the result"
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_committed_grpc_code_matches_protos(tmp_path: Path) -> None:
    # A subprocess, so protoc's global state (and its descriptor pool) stays
    # out of the test process.
    script = (
        "import sys; from pathlib import Path; "
        f"sys.path.insert(0, {str(ROOT / 'protos')!r}); "
        "from generate import generate; generate(Path(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"protos/generate.py failed:\n{result.stdout}{result.stderr}"

    fresh = _files(tmp_path / GENERATED)
    committed = _files(COMMITTED)
    assert fresh, f"protos/generate.py generated nothing under {tmp_path / GENERATED}"

    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    differ = sorted(name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name])
    problems = []
    if missing:
        problems.append(f"missing from the committed copy: {', '.join(missing)}")
    if extra:
        problems.append(f"not generated, but committed: {', '.join(extra)}")
    if differ:
        problems.append(f"different from what protos/ generates: {', '.join(differ)}")
    assert not problems, f"{FIX}\n" + "\n".join(problems)
