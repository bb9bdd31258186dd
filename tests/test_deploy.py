"""The container image and the Kubernetes manifests, checked without Docker or a cluster.

- The Dockerfile is parsed, and its facts that matter are asserted: a slim base
  pinned by tag, wheels built with the constraints and installed only from
  them, no compilers in the final stage, a fixed non-root uid, a HEALTHCHECK
  that runs ``mongo-broker health``.
- ``test_image_install_path`` replays the Dockerfile's own COPY and pip steps
  (the commands are read from the file, so the test follows it): the build
  context filtered by .dockerignore, ``pip wheel`` with the constraints, a
  fresh virtualenv, ``pip install --no-index`` from those wheels, then the
  installed command: ``--version``, ``serve --help``, and a real ``serve``
  with the image's default config answering the HEALTHCHECK's command.
- deploy/kubernetes/: every YAML document is parsed and cross-checked against
  the broker.toml embedded in the ConfigMap, which must load with the
  broker's own ``load_settings``.
- deploy/kubernetes/tier/, the shared tier: the same, with its Secret files
  (and a certificate made for the Certificate's names) written where they
  are mounted; the Service, HPA, PDB and NetworkPolicy against the pod's
  labels and ports; and ``test_tier_replica_drains_without_losing_a_call``
  runs two replicas from the ConfigMap's config against the test database
  and drains one under a balanced client's calls.

- ``test_source_install_command_from_the_readme`` runs the README's install
  from a checkout (``pip install ./clients/python .``), exactly as written,
  in a fresh virtualenv, and the installed ``mongo-broker --help``.

The two install tests get packages from the package index (the Docker
builder stage does the same); everything else is offline, and only the
tier's drain test needs the test database server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import bson
import grpc
import pytest
import tomli_w
from broker_client.proto.broker.v1 import broker_pb2 as pb
from broker_client.proto.broker.v1 import broker_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.settings import Settings, load_settings
from tests.rpc import eventually

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_DIR = ROOT / "deploy" / "kubernetes"
TIER_DIR = K8S_DIR / "tier"

# The image's two install commands. The install-path test runs whatever the
# Dockerfile says; these keep the Dockerfile from drifting unnoticed.
WHEEL_COMMAND = "pip wheel -c constraints.txt --wheel-dir /wheels ./clients/python ."
INSTALL_COMMAND = "pip install --no-index --find-links /wheels mongo-broker"
# The README's install from a source checkout: both packages in one command,
# as the client package (the server's generated stubs) is not on PyPI.
SOURCE_INSTALL_COMMAND = "pip install ./clients/python ."

# Anything that would put a compiler or a build toolchain into the final image.
BUILD_TOOLS = {
    "gcc",
    "g++",
    "cc",
    "clang",
    "make",
    "build-essential",
    "python3-dev",
    "libc6-dev",
    "libc-dev",
    "linux-libc-dev",
}


# --- a small Dockerfile reader ---------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: RUN, COPY, ...
    args: str  # continuation lines joined, comments dropped
    heredoc: str | None = None  # the body of a `<<EOF` here-document, if any

    def words(self) -> list[str]:
        return shlex.split(self.args)

    def exec_form(self) -> list[str]:
        """The JSON (exec) form of CMD, ENTRYPOINT and HEALTHCHECK CMD."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text[text.index(" CMD ") + len(" CMD ") :] if " CMD " in text else text
        value = json.loads(text)
        assert isinstance(value, list), f"{self.keyword} is not in exec form: {self.args}"
        return [str(item) for item in value]


@dataclass
class Stage:
    base: str  # the image after ARG substitution
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in instruction.words():
                key, sep, value = word.partition("=")
                assert sep, f"ENV {instruction.args!r}: use the KEY=VALUE form"
                values[key] = value
        return values

    def run_commands(self) -> list[list[str]]:
        """Each RUN's shell words, without its --mount/--network flags."""
        commands = []
        for instruction in self.all("RUN"):
            words = instruction.words()
            while words and words[0].startswith("--"):
                words.pop(0)
            commands.append(words)
        return commands


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"no stage named {name!r}")


def _logical_lines(text: str) -> Iterator[tuple[str, str | None]]:
    """Instructions with continuations joined, and the here-document after each."""
    lines = iter(text.splitlines())
    for raw in lines:
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = []
        current = raw.rstrip()
        while current.endswith("\\"):
            parts.append(current[:-1].strip())
            current = next(lines).rstrip()
            # Comment and empty lines inside a continuation are dropped, as Docker does.
            while not current.strip() or current.lstrip().startswith("#"):
                current = next(lines).rstrip()
        parts.append(current.strip())
        line = " ".join(p for p in parts if p)
        heredoc = None
        marker = re.search(r"<<-?(['\"]?)(\w+)\1", line)
        if marker:
            body = []
            for nxt in lines:
                if nxt.strip() == marker.group(2):
                    break
                body.append(nxt)
            heredoc = "\n".join(body) + "\n"
            line = line.replace(marker.group(0), "").strip()
        yield line, heredoc


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, heredoc in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            arg, _, default = rest.partition("=")
            args[arg.strip()] = default.strip()
        elif keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=stage))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, rest, heredoc))
    assert stages, "the Dockerfile has no FROM"
    return Dockerfile(args, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile()


def _pip_command(stage: Stage, subcommand: str) -> list[str]:
    found = [words for words in stage.run_commands() if words[:2] == ["pip", subcommand]]
    assert len(found) == 1, f"expected one `pip {subcommand}` RUN in {stage.name or 'the final stage'}"
    return found[0]


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def _final_uid_gid(dockerfile: Dockerfile) -> tuple[int, int]:
    user = dockerfile.final.last("USER").args
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert match, f"USER {user!r}: use a numeric uid (and gid), so runAsNonRoot can verify it"
    uid = int(match.group(1))
    gid = int(match.group(2) or uid)
    return uid, gid


def _clear_broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MONGO_BROKER_"):
            monkeypatch.delenv(key)


# --- the Dockerfile's facts ------------------------------------------------------


def test_base_image_is_slim_python_pinned_by_tag(dockerfile: Dockerfile) -> None:
    stage_names = {s.name for s in dockerfile.stages if s.name}
    for stage in dockerfile.stages:
        if stage.base in stage_names:
            continue
        assert re.fullmatch(r"python:3\.\d+(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", stage.base), (
            f"FROM {stage.base}: expected a python:3.X-slim image pinned by tag"
        )
    assert dockerfile.stages[0].name == "builder"
    assert dockerfile.final.base == dockerfile.stage("builder").base, "build and run on the same base"
    major_minor = re.match(r"python:(3\.\d+)", dockerfile.final.base)
    assert major_minor is not None
    requires = _pyproject()["project"]["requires-python"]
    assert requires == f">={major_minor.group(1)}", f"base image {dockerfile.final.base} vs {requires}"


def test_builder_builds_wheels_with_the_constraints(dockerfile: Dockerfile) -> None:
    wheel = _pip_command(dockerfile.stage("builder"), "wheel")
    assert shlex.join(wheel) == WHEEL_COMMAND


def test_final_stage_installs_only_from_the_wheels(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    install = _pip_command(final, "install")
    assert shlex.join(install) == INSTALL_COMMAND
    # The wheels come from the builder: bind-mounted for that RUN, or copied.
    run = next(i for i in final.all("RUN") if "pip install" in i.args)
    mounted = re.search(r"--mount=type=bind,from=builder,source=/wheels,target=/wheels", run.args)
    copied = any(i.args.startswith("--from=builder") and "/wheels" in i.args for i in final.all("COPY"))
    assert mounted or copied, "the final stage must get /wheels from the builder stage"
    assert final.env().get("PIP_NO_CACHE_DIR") == "1" or "--no-cache-dir" in install, "no pip cache"


def test_final_stage_has_no_build_tools(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    for words in final.run_commands():
        assert not BUILD_TOOLS & set(words), f"build tools in the final stage: {shlex.join(words)}"
        assert "apt-get" not in words or "install" not in words, f"packages installed: {shlex.join(words)}"
        assert words[:2] != ["pip", "wheel"], "wheels are built in the builder stage only"


def test_final_stage_runs_as_a_fixed_non_root_user(dockerfile: Dockerfile) -> None:
    uid, gid = _final_uid_gid(dockerfile)
    assert uid != 0 and gid != 0
    setup = " ".join(shlex.join(words) for words in dockerfile.final.run_commands())
    assert f"--uid {uid}" in setup and f"--gid {gid}" in setup, "create the user with that uid/gid"
    assert re.search(rf"install -d -o {uid} -g {gid} .*/run/mongo-broker", setup), (
        "the socket directory /run/mongo-broker must belong to the broker's user"
    )


def test_healthcheck_entrypoint_and_labels(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    healthcheck = final.last("HEALTHCHECK").exec_form()
    assert healthcheck[:2] == ["mongo-broker", "health"]
    assert final.last("ENTRYPOINT").exec_form() == ["mongo-broker"]
    assert final.last("CMD").exec_form() == ["serve"]
    assert final.last("STOPSIGNAL").args == "SIGTERM"
    labels = dict(
        word.partition("=")[::2] for instruction in final.all("LABEL") for word in instruction.words()
    )
    project = _pyproject()["project"]
    version_arg = next(i.args for i in final.all("ARG") if i.args.startswith("VERSION="))
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert version_arg == f"VERSION={project['version']}", "image version label vs pyproject version"
    assert labels["org.opencontainers.image.title"] == project["name"]
    license_ = project["license"]
    assert labels["org.opencontainers.image.licenses"] == (
        license_ if isinstance(license_, str) else license_["text"]
    )


def _image_default_config(dockerfile: Dockerfile) -> tuple[str, str]:
    """The MONGO_BROKER_CONFIG path the image sets, and the file it ships there."""
    path = dockerfile.final.env()["MONGO_BROKER_CONFIG"]
    for instruction in dockerfile.final.all("COPY"):
        if instruction.heredoc is not None and instruction.words()[-1] == path:
            return path, instruction.heredoc
    raise AssertionError(f"the image sets MONGO_BROKER_CONFIG={path} but ships no file there")


def test_image_default_config_matches_exposed_ports(
    dockerfile: Dockerfile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, text = _image_default_config(dockerfile)
    config = tmp_path / "broker.toml"
    config.write_text(text)
    # `docker run -e MONGO_BROKER_DATABASES__appdb__URI=...` is all it takes.
    _clear_broker_env(monkeypatch)
    monkeypatch.setenv("MONGO_BROKER_DATABASES__appdb__URI", "mongodb://db.example:27017")
    settings = load_settings(config)
    assert list(settings.databases) == ["appdb"]
    assert settings.listen.unix is not None
    assert PurePosixPath(settings.listen.unix).parent == PurePosixPath("/run/mongo-broker")
    assert settings.health.tcp is not None and settings.metrics.listen is not None
    ports = {int(settings.health.tcp.rsplit(":", 1)[1]), int(settings.metrics.listen.rsplit(":", 1)[1])}
    exposed = {int(port.split("/")[0]) for i in dockerfile.final.all("EXPOSE") for port in i.words()}
    assert exposed == ports


# --- the build context -------------------------------------------------------------


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?|\[[^]]*\])", line):
            if part in ("**", "**/"):
                regex += "(.*/)?" if part == "**/" else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            elif part.startswith("["):
                regex += part.replace("[^", "[!").replace("[!", "[^", 1)
            else:
                regex += re.escape(part)
        patterns.append((negate, re.compile(regex)))
    return patterns


def _ignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: a path is out if it or a parent matches; the last match wins."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, pattern in patterns:
        if any(pattern.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def _copy_context(
    sources: list[str], dest: Path, into_dir: bool, patterns: list[tuple[bool, re.Pattern[str]]]
) -> None:
    """COPY SRC... DEST from the build context (the repository less .dockerignore).

    As Docker does: a directory's contents go into DEST; a file goes into DEST
    when DEST ends in "/" (or there are several sources), else it becomes DEST.
    """
    for source in sources:
        origin = ROOT / source
        assert origin.exists(), f"COPY {source}: not in the repository (the build would fail)"
        assert not _ignored(source.strip("/"), patterns), f"COPY {source}: excluded by .dockerignore"
        if origin.is_file():
            target = dest / origin.name if into_dir or len(sources) > 1 else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)
            continue
        for path in sorted(origin.rglob("*")):
            relative = path.relative_to(ROOT).as_posix()
            if path.is_file() and not _ignored(relative, patterns):
                target = dest / path.relative_to(origin)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = _dockerignore_patterns()
    for path in (
        ".venv",
        ".tools",
        ".git",
        "tests",
        "harness",
        "bench",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
    ):
        assert _ignored(path, patterns), f".dockerignore must exclude {path}"
    for path in (
        "bench/results/raw/x.json",
        "broker/__pycache__/cli.cpython-311.pyc",
        "broker/cli.pyc",
        "clients/python/mongo_broker_client.egg-info/PKG-INFO",
    ):
        assert _ignored(path, patterns), f".dockerignore must exclude {path}"
    for path in ("broker/cli.py", "clients/python/pyproject.toml", "constraints.txt", "pyproject.toml"):
        assert not _ignored(path, patterns), f".dockerignore must keep {path}"


# --- the install path: the Dockerfile's steps, without Docker ----------------------


def _run(command: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{shlex.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout}\n"
        f"--- stderr\n{result.stderr}"
    )
    return result.stdout


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _wait_for_file(path: Path, process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the installed broker exited {process.returncode} at start:\n{err}")
        time.sleep(0.05)
    pytest.fail(f"the installed broker wrote no ready file within {timeout:.0f}s")


def _builder_context(builder: Stage, src: Path) -> Path:
    """The source tree the builder's COPY lines lay out in its WORKDIR, at ``src``."""
    patterns = _dockerignore_patterns()
    workdir = PurePosixPath(builder.last("WORKDIR").args)
    for instruction in builder.all("COPY"):
        words = [w for w in instruction.words() if not w.startswith("--")]
        dest = PurePosixPath(words[-1])
        dest = dest if dest.is_absolute() else workdir / dest
        target = src / dest.relative_to(workdir)
        _copy_context(words[:-1], target, words[-1].endswith("/"), patterns)
    return src


def _install_env() -> dict[str, str]:
    """This environment without MONGO_BROKER_* and without this machine's wheel dirs and import paths."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONGO_BROKER_")}
    for key in ("PIP_FIND_LINKS", "PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    return env


def test_image_install_path(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """Replay the builder's COPY + `pip wheel` and the final stage's `pip install`."""
    builder, final = dockerfile.stage("builder"), dockerfile.final
    # The image has no local wheel directories and no extra import paths:
    # take nothing from this machine's.
    env = _install_env()
    env.update(builder.env())

    # 1. The build context, as the builder's COPY lines lay it out.
    src = _builder_context(builder, tmp_path / "src")

    # 2. The builder's `pip wheel`, with /wheels moved into the temp dir.
    wheels = tmp_path / "wheels"
    wheel = [str(wheels) if w == "/wheels" else w for w in _pip_command(builder, "wheel")]
    _run([sys.executable, "-m", *wheel], cwd=src, env=env)
    built = sorted(p.name for p in wheels.glob("*.whl"))
    assert any(n.startswith("mongo_broker-") for n in built), built
    assert any(n.startswith("mongo_broker_client-") for n in built), built

    # 3. A fresh virtualenv, and the final stage's `pip install` into it. The
    #    install is --no-index: only the wheels just built can satisfy it.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--isolated"]
    install = [str(wheels) if w == "/wheels" else w for w in _pip_command(final, "install")]
    _run([*pip, *install[1:]], cwd=tmp_path, env={**env, **final.env()})
    _run([*pip, "check"], cwd=tmp_path, env=env)
    installed = {
        re.sub(r"[-_.]+", "-", d["name"]).lower(): d["version"]
        for d in json.loads(_run([*pip, "list", "--format=json"], cwd=tmp_path, env=env))
    }
    wrong = {n: (v, _constraints()[n]) for n, v in installed.items() if _constraints().get(n, v) != v}
    assert not wrong, f"installed versions differ from constraints.txt: {wrong}"

    # 4. The installed command, as the image runs it.
    command = venv / "bin" / "mongo-broker"
    version = _pyproject()["project"]["version"]
    assert _run([str(command), "--version"], cwd=tmp_path, env=env).strip() == f"mongo-broker {version}"
    assert "--config" in _run([str(command), "serve", "--help"], cwd=tmp_path, env=env)
    healthcheck = final.last("HEALTHCHECK").exec_form()
    health_help = _run([str(command), *healthcheck[1:2], "--help"], cwd=tmp_path, env=env)
    for flag in (w for w in healthcheck if w.startswith("--")):
        assert flag in health_help, f"HEALTHCHECK uses {flag}, which `mongo-broker health` lacks"

    # 5. Serve with the image's default config (ports and socket moved into the
    #    temp dir) and answer the HEALTHCHECK's command. No database is needed:
    #    the overall health service does not follow the databases.
    _, default_config = _image_default_config(dockerfile)
    config = tmp_path / "broker.toml"
    config.write_text(default_config)
    ready = tmp_path / "ready.json"
    serve_env = {
        **env,
        **final.env(),
        "MONGO_BROKER_CONFIG": str(config),
        "MONGO_BROKER_LISTEN__UNIX": str(tmp_path / "b.sock"),
        "MONGO_BROKER_HEALTH__TCP": "127.0.0.1:0",
        "MONGO_BROKER_METRICS__LISTEN": "127.0.0.1:0",
        "MONGO_BROKER_SERVER__SHUTDOWN_GRACE_S": "1",
        "MONGO_BROKER_DATABASES__appdb__URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500",
    }
    process = subprocess.Popen(
        [str(command), *final.last("CMD").exec_form(), "--ready-file", str(ready)],
        cwd=tmp_path,
        env=serve_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        listeners = _wait_for_file(ready, process, timeout=60)
        assert listeners.get("health"), f"no health listener in {listeners}"
        _run(
            [str(command), *healthcheck[1:], "--target", str(listeners["health"])],
            cwd=tmp_path,
            env=serve_env,
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


def test_source_install_command_from_the_readme(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """The README's install from a checkout, exactly as written, in a fresh virtualenv.

    `pip install .` alone cannot work: the server depends on mongo-broker-client,
    which is not on PyPI. Dependencies come from the package index (pip's
    --isolated ignores this machine's pip settings; its cache is reused).
    """
    readme = (ROOT / "README.md").read_text()
    assert f"\n  {SOURCE_INSTALL_COMMAND}\n" in readme, f"the README lacks {SOURCE_INSTALL_COMMAND!r}"
    env = _install_env()
    # The same files a source checkout has for the two packages (what the image's builder copies).
    src = _builder_context(dockerfile.stage("builder"), tmp_path / "src")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=env)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--isolated"]
    words = shlex.split(SOURCE_INSTALL_COMMAND)
    assert words[0] == "pip"
    _run([*pip, *words[1:]], cwd=src, env=env)
    _run([*pip, "check"], cwd=tmp_path, env=env)
    usage = _run([str(venv / "bin" / "mongo-broker"), "--help"], cwd=tmp_path, env=env)
    for command in ("serve", "ping", "stats", "health"):
        assert command in usage, usage


# --- deploy/kubernetes ---------------------------------------------------------------


@dataclass
class Manifests:
    documents: list[tuple[Path, dict[str, Any]]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for _, doc in self.documents if doc.get("kind") == kind]

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        for doc in self.of_kind(kind):
            if doc["metadata"]["name"] == name:
                return doc
        return None


def _load_manifests(directory: Path, skip: Path | None = None) -> Manifests:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read deploy/kubernetes (dev extra)")
    documents = []
    files = [
        path
        for path in sorted(directory.rglob("*.yaml")) + sorted(directory.rglob("*.yml"))
        if skip is None or skip not in path.parents
    ]
    assert files, f"no manifests in {directory}"
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path}: a document has no {key}"
            documents.append((path, doc))
    return Manifests(documents)


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    """The sidecar example: deploy/kubernetes without the shared tier's directory."""
    return _load_manifests(K8S_DIR, skip=TIER_DIR)


@dataclass
class Pod:
    deployment: dict[str, Any]
    spec: dict[str, Any]
    broker: dict[str, Any]
    apps: list[dict[str, Any]]
    broker_toml: str
    toml: dict[str, Any]

    def volume(self, name: str) -> dict[str, Any]:
        for volume in self.spec.get("volumes", []):
            if volume["name"] == name:
                return dict(volume)
        raise AssertionError(f"no volume {name!r} in the pod")

    def mount_at(self, container: dict[str, Any], path: str) -> dict[str, Any] | None:
        for mount in container.get("volumeMounts", []):
            if PurePosixPath(mount["mountPath"]) == PurePosixPath(path):
                return dict(mount)
        return None


def _env_value(container: dict[str, Any], name: str) -> str | None:
    for item in container.get("env", []):
        if item["name"] == name:
            return str(item["value"]) if "value" in item else None
    return None


@pytest.fixture(scope="module")
def pod(manifests: Manifests, dockerfile: Dockerfile) -> Pod:
    deployments = manifests.of_kind("Deployment")
    assert len(deployments) == 1, "expected one example Deployment"
    deployment = deployments[0]
    spec = deployment["spec"]["template"]["spec"]
    sidecars = [c for c in spec.get("initContainers", []) if "mongo-broker" in c.get("image", "")]
    assert len(sidecars) == 1, "the broker must be one of the initContainers (a native sidecar)"
    broker = sidecars[0]
    apps = spec["containers"]
    assert all(c["name"] != broker["name"] for c in apps)
    # The broker's config: the ConfigMap key mounted where MONGO_BROKER_CONFIG points.
    config_path = PurePosixPath(
        _env_value(broker, "MONGO_BROKER_CONFIG") or dockerfile.final.env()["MONGO_BROKER_CONFIG"]
    )
    for mount in broker.get("volumeMounts", []):
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        if "configMap" in volume and config_path.parent == PurePosixPath(mount["mountPath"]):
            configmap = manifests.named("ConfigMap", volume["configMap"]["name"])
            assert configmap is not None, f"ConfigMap {volume['configMap']['name']} is not in the manifests"
            text = configmap["data"][config_path.name]
            return Pod(deployment, spec, broker, apps, text, tomllib.loads(text))
    raise AssertionError(f"no ConfigMap is mounted at {config_path.parent} in the broker container")


@pytest.fixture(scope="module")
def k8s_settings(pod: Pod, manifests: Manifests, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """broker.toml loaded by the broker's own loader, with env and secret files as in the pod."""
    tmp = tmp_path_factory.mktemp("k8s")
    config = tmp / "broker.toml"
    config.write_text(pod.broker_toml)
    env = {
        item["name"]: str(item["value"])
        for item in pod.broker.get("env", [])
        if "value" in item and item["name"].startswith("MONGO_BROKER_")
    }
    env["MONGO_BROKER_CONFIG"] = str(config)
    # Secret values from env (secretKeyRef) and files (secret volumes), moved to tmp.
    for item in pod.broker.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            env[item["name"]] = _secret_value(manifests, ref["name"], ref["key"])
    for name, database in pod.toml.get("databases", {}).items():
        if "password_file" in database:
            secret, key = _secret_file(pod, database["password_file"])
            local = tmp / f"{name}-password"
            local.write_text(_secret_value(manifests, secret, key))
            env[f"MONGO_BROKER_DATABASES__{name}__PASSWORD_FILE"] = str(local)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _clear_broker_env(monkeypatch)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return load_settings(config)


def _secret_value(manifests: Manifests, name: str, key: str) -> str:
    secret = manifests.named("Secret", name)
    assert secret is not None, f"Secret {name!r} is referenced but not in the manifests"
    values = {**secret.get("data", {}), **secret.get("stringData", {})}
    assert key in values, f"Secret {name!r} has no key {key!r}"
    return str(values[key])


def _secret_file(pod: Pod, path: str) -> tuple[str, str]:
    """The Secret and key behind a file path in the broker container."""
    file = PurePosixPath(path)
    for mount in pod.broker.get("volumeMounts", []):
        volume = pod.volume(mount["name"])
        if "secret" in volume and file.parent == PurePosixPath(mount["mountPath"]):
            items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
            return volume["secret"]["secretName"], items.get(file.name, file.name)
    raise AssertionError(f"{path} is not in a Secret mounted into the broker")


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_broker_is_a_native_sidecar(pod: Pod) -> None:
    assert pod.broker.get("restartPolicy") == "Always", "a native sidecar needs restartPolicy: Always"
    assert pod.broker.get("args", ["serve"])[:1] == ["serve"]
    assert pod.apps, "the example has an app container"


def test_probes_are_grpc_on_the_health_port(pod: Pod, k8s_settings: Settings) -> None:
    assert k8s_settings.health.tcp is not None, "[health] tcp is needed for the kubelet's gRPC probes"
    health_port = _port(k8s_settings.health.tcp)
    assert k8s_settings.health.tcp.startswith("0.0.0.0:"), "the kubelet probes the pod IP"
    services = {"", *k8s_settings.databases}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = pod.broker.get(kind)
        assert probe is not None, f"the broker has no {kind}"
        assert set(probe) & {"exec", "httpGet", "tcpSocket"} == set(), f"{kind} must be gRPC"
        assert probe["grpc"]["port"] == health_port, f"{kind} port vs [health] tcp"
        assert probe["grpc"].get("service", "") in services, f"{kind} asks an unknown service"
    ports = {p["containerPort"]: p.get("name") for p in pod.broker.get("ports", [])}
    assert health_port in ports


def test_metrics_port_is_scraped(pod: Pod, k8s_settings: Settings, manifests: Manifests) -> None:
    assert k8s_settings.metrics.listen is not None
    metrics_port = _port(k8s_settings.metrics.listen)
    ports = {p.get("name"): p["containerPort"] for p in pod.broker.get("ports", [])}
    assert metrics_port in ports.values()
    annotations = pod.deployment["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert annotations["prometheus.io/port"] == str(metrics_port)
    for monitor in manifests.of_kind("PodMonitor"):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert ports.get(endpoint["port"]) == metrics_port, "PodMonitor port name vs the metrics port"


def test_socket_is_shared_through_an_emptydir(pod: Pod, k8s_settings: Settings) -> None:
    socket = k8s_settings.listen.unix
    assert socket is not None, "the pod talks over the Unix socket"
    directory = str(PurePosixPath(socket).parent)
    broker_mount = pod.mount_at(pod.broker, directory)
    assert broker_mount is not None, f"the broker does not mount {directory}"
    assert "emptyDir" in pod.volume(broker_mount["name"]), f"{directory} must be an emptyDir"
    assert not broker_mount.get("readOnly"), "the broker creates the socket there"
    for app in pod.apps:
        assert _env_value(app, "MONGO_BROKER_TARGET") == f"unix://{socket}", app["name"]
        app_mount = pod.mount_at(app, directory)
        assert app_mount is not None and app_mount["name"] == broker_mount["name"], (
            f"{app['name']} must mount the broker's emptyDir at {directory}"
        )


def test_socket_permissions_let_the_app_in(pod: Pod, k8s_settings: Settings, dockerfile: Dockerfile) -> None:
    """The socket is unix_mode; an app with another uid needs the socket's group."""
    broker_uid, broker_gid = _final_uid_gid(dockerfile)
    context = pod.broker.get("securityContext", {})
    broker_uid = context.get("runAsUser", broker_uid)
    socket_gid = context.get("runAsGroup", broker_gid)
    mode = int(k8s_settings.listen.unix_mode, 8)
    pod_context = pod.spec.get("securityContext", {})
    for app in pod.apps:
        app_context = {**pod_context, **app.get("securityContext", {})}
        if app_context.get("runAsUser") == broker_uid or mode & 0o006 == 0o006:
            continue
        groups = {
            app_context.get("runAsGroup"),
            pod_context.get("fsGroup"),
            *pod_context.get("supplementalGroups", []),
        }
        assert socket_gid in groups and mode & 0o060 == 0o060, (
            f"{app['name']} runs as uid {app_context.get('runAsUser')} and cannot connect to a "
            f"{oct(mode)} socket of gid {socket_gid}: add that gid to fsGroup or supplementalGroups"
        )


def test_security_context(pod: Pod, dockerfile: Dockerfile) -> None:
    assert pod.spec.get("securityContext", {}).get("runAsNonRoot") is True
    for container in (pod.broker, *pod.apps):
        context = container.get("securityContext", {})
        name = container["name"]
        assert context.get("runAsNonRoot", True) is True, name
        assert context.get("readOnlyRootFilesystem") is True, name
        assert context.get("allowPrivilegeEscalation") is False, name
        assert "ALL" in context.get("capabilities", {}).get("drop", []), name
        assert not context.get("privileged", False), name
    uid, gid = _final_uid_gid(dockerfile)
    assert pod.broker["securityContext"].get("runAsUser", uid) == uid, "the image's uid"
    assert pod.broker["securityContext"].get("runAsGroup", gid) == gid, "the image's gid"


def test_broker_resources(pod: Pod) -> None:
    resources = pod.broker.get("resources", {})
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert resource in resources.get(kind, {}), f"the broker has no {kind}.{resource}"


def test_grace_period_outlasts_the_drain(pod: Pod, k8s_settings: Settings) -> None:
    grace = pod.spec.get("terminationGracePeriodSeconds", 30)
    assert grace > k8s_settings.server.shutdown_grace_s


def test_references_exist(pod: Pod, manifests: Manifests) -> None:
    for volume in pod.spec.get("volumes", []):
        if "secret" in volume:
            assert manifests.named("Secret", volume["secret"]["secretName"]) is not None, volume
        if "configMap" in volume:
            assert manifests.named("ConfigMap", volume["configMap"]["name"]) is not None, volume
    for container in (pod.broker, *pod.apps):
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                _secret_value(manifests, ref["name"], ref["key"])


def test_example_secrets_are_placeholders(manifests: Manifests) -> None:
    _check_placeholders(manifests)


def _check_placeholders(manifests: Manifests) -> None:
    assert manifests.of_kind("Secret"), "the examples include their Secrets"
    for secret in manifests.of_kind("Secret"):
        assert "data" not in secret, "example Secrets use stringData with a visible placeholder"
        for key, value in secret.get("stringData", {}).items():
            assert "CHANGE-ME" in value, f"Secret {secret['metadata']['name']}.{key} must be a placeholder"


def test_broker_toml_loads_as_the_pod_would(pod: Pod, k8s_settings: Settings, manifests: Manifests) -> None:
    assert k8s_settings.databases, "the ConfigMap configures a database"
    for name, database in pod.toml["databases"].items():
        uri = k8s_settings.databases[name].uri.get_secret_value()
        if "password_file" in database:
            secret, key = _secret_file(pod, database["password_file"])
            assert f":{quote(_secret_value(manifests, secret, key), safe='')}@" in uri
    # The worked example in the comments uses the configured pool size.
    configmap = next(p for p, doc in manifests.documents if doc.get("kind") == "ConfigMap")
    comments = configmap.read_text()
    for database in k8s_settings.databases.values():
        assert f"x {database.max_pool_size} max_pool_size" in comments, "pool arithmetic vs max_pool_size"


def test_manifests_match_the_kubernetes_schema(manifests: Manifests) -> None:
    """Offline schema validation (native sidecars need Kubernetes 1.29)."""
    _check_schemas(manifests)


def _check_schemas(manifests: Manifests) -> None:
    validator = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is optional: offline Kubernetes schemas"
    )
    checked = 0
    for path, doc in manifests.documents:
        group = doc["apiVersion"].rpartition("/")[0]
        if "." in group and not group.endswith(".k8s.io"):
            continue  # a CRD (PodMonitor): no schema ships for it
        try:
            validator.validate(doc, "1.29.0", strict=True)
        except validator.ValidationError as exc:
            where = ".".join(str(part) for part in exc.absolute_path)
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']} {where}: {exc.message}", pytrace=False)
        checked += 1
    assert checked


# --- deploy/kubernetes/tier: the shared broker tier ----------------------------------

# The label a pod needs for the tier's NetworkPolicy to let it call.
CLIENT_LABEL = ("mongo-broker/client", "true")
# Where cert-manager's Certificate puts the files of a kubernetes.io/tls Secret.
TLS_SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}


@pytest.fixture(scope="module")
def tier_manifests() -> Manifests:
    return _load_manifests(TIER_DIR)


@dataclass
class Tier:
    manifests: Manifests
    deployment: dict[str, Any]
    spec: dict[str, Any]
    broker: dict[str, Any]
    configmap: Path
    broker_toml: str
    toml: dict[str, Any]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.manifests.of_kind(kind)
        assert len(found) == 1, f"expected one {kind} in {TIER_DIR.relative_to(ROOT)}, found {len(found)}"
        return found[0]

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.deployment["spec"]["template"]["metadata"]["labels"])

    @property
    def namespace(self) -> str:
        return str(self.deployment["metadata"].get("namespace", "default"))

    def volume(self, name: str) -> dict[str, Any]:
        for volume in self.spec.get("volumes", []):
            if volume["name"] == name:
                return dict(volume)
        raise AssertionError(f"no volume {name!r} in the tier's pod")

    def port(self, ref: int | str) -> int:
        """A container port of the broker, by number or by name."""
        for port in self.broker.get("ports", []):
            if ref in (port["containerPort"], port.get("name")):
                return int(port["containerPort"])
        raise AssertionError(f"the broker container has no port {ref!r}")

    def secret_file(self, path: str) -> tuple[str, str, dict[str, Any]]:
        """The Secret and key behind a file in the broker container, and its mount."""
        file = PurePosixPath(path)
        for mount in self.broker.get("volumeMounts", []):
            volume = self.volume(mount["name"])
            if "secret" in volume and file.parent == PurePosixPath(mount["mountPath"]):
                items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
                if items:
                    assert file.name in items, f"{path}: the volume {volume['name']} has no item {file.name}"
                return volume["secret"]["secretName"], items.get(file.name, file.name), mount
        raise AssertionError(f"{path} is not in a Secret mounted into the broker")

    def certificate_for(self, secret: str) -> dict[str, Any] | None:
        """The cert-manager Certificate that writes this kubernetes.io/tls Secret, if any."""
        for certificate in self.manifests.of_kind("Certificate"):
            if certificate["spec"]["secretName"] == secret:
                return certificate
        return None

    def secret_keys(self, secret: str) -> set[str]:
        """The keys the Secret will hold: from the example Secret, or cert-manager's."""
        if self.certificate_for(secret) is not None:
            return set(TLS_SECRET_KEYS)
        found = self.manifests.named("Secret", secret)
        assert found is not None, f"Secret {secret!r} is mounted: neither an example nor a Certificate's"
        return {*found.get("data", {}), *found.get("stringData", {})}

    def config_files(self) -> dict[str, str]:
        """Every file the config names, by its key: TLS, tokens, passwords."""
        files: dict[str, str] = {}
        listen = self.toml.get("listen", {})
        for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            if listen.get(key):
                files[f"listen.{key}"] = listen[key]
        for token in self.toml.get("auth", {}).get("tokens", []):
            if "token_file" in token:
                files[f"auth.tokens.{token['name']}.token_file"] = token["token_file"]
        for name, database in self.toml.get("databases", {}).items():
            if "password_file" in database:
                files[f"databases.{name}.password_file"] = database["password_file"]
        return files


@pytest.fixture(scope="module")
def tier(tier_manifests: Manifests, dockerfile: Dockerfile) -> Tier:
    deployments = tier_manifests.of_kind("Deployment")
    assert len(deployments) == 1, "expected one Deployment for the tier"
    deployment = deployments[0]
    spec = deployment["spec"]["template"]["spec"]
    brokers = [c for c in spec["containers"] if "mongo-broker" in c.get("image", "")]
    assert len(brokers) == 1 and len(spec["containers"]) == 1, "the tier's pod runs the broker alone"
    assert not spec.get("initContainers"), "the tier's pod needs no init or sidecar containers"
    broker = brokers[0]
    config_path = PurePosixPath(
        _env_value(broker, "MONGO_BROKER_CONFIG") or dockerfile.final.env()["MONGO_BROKER_CONFIG"]
    )
    for mount in broker.get("volumeMounts", []):
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        if "configMap" in volume and config_path.parent == PurePosixPath(mount["mountPath"]):
            name = volume["configMap"]["name"]
            for path, doc in tier_manifests.documents:
                if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name:
                    text = doc["data"][config_path.name]
                    return Tier(tier_manifests, deployment, spec, broker, path, text, tomllib.loads(text))
            raise AssertionError(f"ConfigMap {name} is not in {TIER_DIR.relative_to(ROOT)}")
    raise AssertionError(f"no ConfigMap is mounted at {config_path.parent} in the broker container")


def _openssl(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60
    ).stdout


def _new_key_args(certificate: dict[str, Any]) -> list[str]:
    """openssl's -newkey for the key the Certificate asks cert-manager for."""
    key = certificate["spec"].get("privateKey", {})
    if key.get("algorithm", "RSA") == "ECDSA":
        curve = {256: "P-256", 384: "P-384", 521: "P-521"}[int(key.get("size", 256))]
        return ["-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{curve}"]
    return ["-newkey", f"rsa:{int(key.get('size', 2048))}"]


def _issue_tls_secret(certificate: dict[str, Any], directory: Path) -> None:
    """What cert-manager would write: tls.crt for the Certificate's dnsNames, tls.key, ca.crt."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the tier's test certificate")
    directory.mkdir(parents=True)
    new_key = _new_key_args(certificate)
    _openssl("req", "-x509", *new_key, "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=test-ca", cwd=directory)  # fmt: skip
    names = certificate["spec"]["dnsNames"]
    (directory / "san.ext").write_text(
        "subjectAltName=" + ",".join(f"DNS:{name}" for name in names) + "\nextendedKeyUsage=serverAuth\n"
    )
    _openssl("req", *new_key, "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", f"/CN={names[0]}",
             cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "tls.crt", "-days", "2", "-extfile", "san.ext", cwd=directory)  # fmt: skip
    for leftover in ("ca.key", "ca.srl", "tls.csr", "san.ext"):
        (directory / leftover).unlink(missing_ok=True)


@dataclass
class TierFiles:
    """The broker container's Secret mounts, written under a local directory."""

    mounts: dict[PurePosixPath, Path]  # mountPath in the container -> local directory

    def local(self, value: Any) -> Any:
        """``value`` (a config, or part of one) with every path under a mount moved to its copy."""
        if isinstance(value, dict):
            return {key: self.local(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.local(item) for item in value]
        if isinstance(value, str) and value.startswith("/"):
            path = PurePosixPath(value)
            for mount, directory in self.mounts.items():
                if mount in path.parents:
                    return str(directory / path.relative_to(mount))
        return value

    def tls_dir(self, tier: Tier) -> Path:
        mount = PurePosixPath(tier.toml["listen"]["tls_cert_file"]).parent
        return self.mounts[mount]


@pytest.fixture(scope="module")
def tier_files(tier: Tier, tmp_path_factory: pytest.TempPathFactory) -> TierFiles:
    root = tmp_path_factory.mktemp("tier-secrets")
    mounts: dict[PurePosixPath, Path] = {}
    for index, mount in enumerate(tier.broker.get("volumeMounts", [])):
        volume = tier.volume(mount["name"])
        if "secret" not in volume:
            continue
        secret = volume["secret"]["secretName"]
        directory = root / f"{index}-{volume['name']}"
        certificate = tier.certificate_for(secret)
        if certificate is not None:
            _issue_tls_secret(certificate, directory)
        else:
            directory.mkdir()
            items = {i["key"]: i["path"] for i in volume["secret"].get("items", [])}
            for key in tier.secret_keys(secret):
                if not items or key in items:
                    (directory / items.get(key, key)).write_text(_secret_value(tier.manifests, secret, key))
        mounts[PurePosixPath(mount["mountPath"])] = directory
    return TierFiles(mounts)


def _load_tier_config(config: dict[str, Any], directory: Path) -> Settings:
    path = directory / "broker.toml"
    path.write_text(tomli_w.dumps(config))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _clear_broker_env(monkeypatch)
        return load_settings(path)


@pytest.fixture(scope="module")
def tier_settings(tier: Tier, tier_files: TierFiles, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The tier's broker.toml through the broker's own loader, its Secret files as mounted."""
    return _load_tier_config(tier_files.local(tier.toml), tmp_path_factory.mktemp("tier-config"))


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) matches ``labels``."""
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return False  # an empty selector matches every pod: never what the tier means
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def _service_target(tier: Tier) -> str:
    service = tier.one("Service")
    namespace = service["metadata"].get("namespace", "default")
    port = service["spec"]["ports"][0]["port"]
    return f"dns:///{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}"


def test_tier_config_loads_with_the_broker_loader(tier: Tier, tier_settings: Settings) -> None:
    listen = tier_settings.listen
    assert listen.unix is None, "the tier's callers are other pods: no Unix socket"
    assert listen.tcp is not None and listen.tcp.startswith("0.0.0.0:"), "clients call the pod IP"
    assert listen.tls_cert_file is not None and listen.tls_key_file is not None, "the tier serves TLS"
    assert not tier.toml["listen"].get("allow_plaintext_tcp", False), "no plaintext data port in the tier"
    assert tier_settings.auth.tokens, "the tier takes calls from many pods: tokens are required"
    assert tier_settings.databases
    # Every token is one of the tier's Secret's files, and the example's
    # placeholders are what the loader read.
    for token in tier_settings.auth.tokens:
        assert token.token_file is not None, f"token {token.name}: from a Secret file, never inline"
        assert "CHANGE-ME" in token.secret()
    for name, database in tier_settings.databases.items():
        if "password_file" in tier.toml["databases"][name]:
            assert ":CHANGE-ME" in database.uri.get_secret_value(), f"{name}: the password file was not read"


def test_tier_drain_outlasts_the_readiness_probe(tier: Tier, tier_settings: Settings) -> None:
    """The endpoint leaves (readiness fails) before the listener stops (drain_delay_s)."""
    readiness = tier.broker["readinessProbe"]
    noticed = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
    drain = tier_settings.server.drain_delay_s
    assert drain > noticed, f"drain_delay_s {drain} must outlast the readiness probe's {noticed} s"
    grace = tier.spec.get("terminationGracePeriodSeconds", 30)
    # A preStop hook runs before SIGTERM and counts against the same budget.
    pre_stop = tier.broker.get("lifecycle", {}).get("preStop", {})
    pre_stop_s = pre_stop.get("sleep", {}).get("seconds", 0)
    assert "exec" not in pre_stop and "httpGet" not in pre_stop, "a preStop the test cannot time"
    assert grace > pre_stop_s + drain + tier_settings.server.shutdown_grace_s
    # A call within its default time limit finishes inside the drain's grace.
    for name, database in tier_settings.databases.items():
        assert database.default_timeout_ms / 1000 <= tier_settings.server.shutdown_grace_s, name
    # The config's comments quote these numbers; keep them true.
    comments = tier.broker_toml
    assert f"terminationGracePeriodSeconds ({grace})" in comments
    assert f"({readiness['periodSeconds']} s x {readiness['failureThreshold']}" in comments


def test_tier_container_ports_are_the_configured_ones(tier: Tier, tier_settings: Settings) -> None:
    assert tier_settings.listen.tcp and tier_settings.health.tcp and tier_settings.metrics.listen
    configured = {
        _port(tier_settings.listen.tcp),
        _port(tier_settings.health.tcp),
        _port(tier_settings.metrics.listen),
    }
    assert len(configured) == 3, "the data, health and metrics listeners need their own ports"
    assert {p["containerPort"] for p in tier.broker["ports"]} == configured
    assert tier_settings.health.tcp.startswith("0.0.0.0:"), "the kubelet probes the pod IP"
    assert tier_settings.metrics.listen.startswith("0.0.0.0:"), "Prometheus scrapes the pod IP"
    annotations = tier.deployment["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert annotations["prometheus.io/port"] == str(_port(tier_settings.metrics.listen))
    for monitor in tier.manifests.of_kind("PodMonitor"):
        assert _selects(monitor["spec"]["selector"], tier.labels)
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert tier.port(endpoint["port"]) == _port(tier_settings.metrics.listen)


def test_tier_probes_are_grpc_on_the_health_port(tier: Tier, tier_settings: Settings) -> None:
    assert tier_settings.health.tcp is not None
    services = {"", *tier_settings.databases}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = tier.broker.get(kind)
        assert probe is not None, f"the broker has no {kind}"
        assert set(probe) & {"exec", "httpGet", "tcpSocket"} == set(), f"{kind} must be gRPC"
        # The kubelet's gRPC probe speaks plaintext: the health listener, never the TLS port.
        assert tier.port(probe["grpc"]["port"]) == _port(tier_settings.health.tcp), f"{kind} port"
        assert probe["grpc"].get("service", "") in services, f"{kind} asks an unknown service"
    # The overall service does not follow the database: an outage must not
    # restart every replica.
    assert tier.broker["livenessProbe"]["grpc"].get("service", "") == ""


def test_tier_secret_files_are_mounted_read_only(tier: Tier) -> None:
    files = tier.config_files()
    assert {"listen.tls_cert_file", "listen.tls_key_file"} <= set(files)
    assert any(key.startswith("auth.tokens.") for key in files)
    for key, path in files.items():
        secret, item, mount = tier.secret_file(path)
        assert mount.get("readOnly") is True, f"{key}: {mount['mountPath']} must be mounted readOnly"
        assert item in tier.secret_keys(secret), f"{key}: Secret {secret} has no key {item!r}"
        mode = tier.volume(mount["name"])["secret"].get("defaultMode", 0o644)
        assert mode & 0o007 == 0, f"{key}: the Secret's files must not be world-readable"
    # kubernetes.io/tls: the certificate and key are the Secret's tls.crt and tls.key.
    cert_secret, cert_key, _ = tier.secret_file(files["listen.tls_cert_file"])
    key_secret, key_key, _ = tier.secret_file(files["listen.tls_key_file"])
    assert cert_secret == key_secret and (cert_key, key_key) == ("tls.crt", "tls.key")
    if "listen.tls_client_ca_file" in files:
        assert tier.secret_file(files["listen.tls_client_ca_file"])[1] == "ca.crt"
    assert tier.certificate_for(cert_secret) is not None, "examples/ shows how the TLS Secret is made"
    # Every Secret and ConfigMap the pod mounts is one the tier's files make.
    for volume in tier.spec["volumes"]:
        if "secret" in volume:
            assert tier.secret_keys(volume["secret"]["secretName"]), volume
        if "configMap" in volume:
            assert tier.manifests.named("ConfigMap", volume["configMap"]["name"]) is not None, volume


def test_tier_certificate_names_the_service(tier: Tier, tier_files: TierFiles) -> None:
    """Clients check the certificate against their target's host, the Service's DNS name."""
    host = _service_target(tier).removeprefix("dns:///").rpartition(":")[0]
    secret = tier.secret_file(tier.toml["listen"]["tls_cert_file"])[0]
    certificate = tier.certificate_for(secret)
    assert certificate is not None
    assert host in certificate["spec"]["dnsNames"]
    assert "server auth" in certificate["spec"].get("usages", ["server auth"])
    # The certificate made from it is one a client of that name accepts.
    tls = tier_files.tls_dir(tier)
    names = _openssl("x509", "-noout", "-ext", "subjectAltName", "-in", "tls.crt", cwd=tls)
    assert f"DNS:{host}" in names


def test_tier_objects_share_one_namespace(tier: Tier) -> None:
    namespaces = {doc["metadata"].get("namespace") for _, doc in tier.manifests.documents}
    assert namespaces == {tier.namespace}, f"every tier object in one namespace, found {namespaces}"


def test_tier_service_is_headless_and_ready_only(tier: Tier, tier_settings: Settings) -> None:
    service = tier.one("Service")
    spec = service["spec"]
    assert spec.get("clusterIP") == "None", "headless: DNS names every replica for round_robin"
    assert spec.get("publishNotReadyAddresses", False) is False, "a draining replica must leave DNS"
    assert spec["selector"] == {k: tier.labels[k] for k in spec["selector"]}, "selector vs pod labels"
    assert tier.deployment["spec"]["selector"]["matchLabels"].items() <= tier.labels.items()
    assert tier_settings.listen.tcp is not None
    data_port = _port(tier_settings.listen.tcp)
    (port,) = spec["ports"]
    assert tier.port(port.get("targetPort", port["port"])) == data_port
    # DNS returns pod IPs, so clients dial the container port itself: the
    # Service cannot map one port to another for them.
    assert port["port"] == data_port
    assert port.get("appProtocol") in (None, "grpc")


def test_tier_clients_are_told_the_service_target(tier: Tier) -> None:
    target = _service_target(tier)
    for readme in (ROOT / "README.md", K8S_DIR / "README.md"):
        assert target in readme.read_text(), f"{readme.relative_to(ROOT)} must name the target {target}"
    assert target.removeprefix("dns:///") in (TIER_DIR / "deployment.yaml").read_text()


def test_tier_selectors_match_the_pods(tier: Tier) -> None:
    labels = tier.labels
    assert _selects(tier.deployment["spec"]["selector"], labels)
    assert _selects(tier.one("PodDisruptionBudget")["spec"]["selector"], labels)
    assert _selects(tier.one("NetworkPolicy")["spec"]["podSelector"], labels)
    target = tier.one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        tier.deployment["apiVersion"],
        tier.deployment["kind"],
        tier.deployment["metadata"]["name"],
    )
    # Spread across nodes, by a selector that sees the tier's own pods.
    spreads = tier.spec.get("topologySpreadConstraints", [])
    anti = tier.spec.get("affinity", {}).get("podAntiAffinity", {})
    terms = [
        term.get("podAffinityTerm", term)
        for when in ("required", "preferred")
        for term in anti.get(f"{when}DuringSchedulingIgnoredDuringExecution", [])
    ]
    by_host = [rule for rule in spreads + terms if rule["topologyKey"] == "kubernetes.io/hostname"]
    assert by_host, "replicas must be spread across nodes"
    for rule in spreads + terms:
        assert _selects(rule["labelSelector"], labels), rule


def test_tier_network_policy_admits_clients_to_grpc_only(tier: Tier, tier_settings: Settings) -> None:
    policy = tier.one("NetworkPolicy")["spec"]
    assert "Ingress" in policy.get("policyTypes", ["Ingress"])
    assert tier_settings.listen.tcp and tier_settings.metrics.listen and tier_settings.health.tcp
    data, metrics = _port(tier_settings.listen.tcp), _port(tier_settings.metrics.listen)
    client_key, client_value = CLIENT_LABEL
    opened: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["ingress"]:
        assert rule.get("from"), "every ingress rule names who may connect"
        assert rule.get("ports"), "every ingress rule names its ports"
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP"
            opened.setdefault(tier.port(port["port"]), []).extend(rule["from"])
    assert set(opened) == {data, metrics}, f"only the gRPC and metrics ports: {sorted(opened)}"
    for peer in opened[data]:
        assert "ipBlock" not in peer, "the gRPC port by pod label, not by address"
        assert peer.get("podSelector", {}).get("matchLabels", {}).get(client_key) == client_value, peer
        assert _selects(peer["podSelector"], {client_key: client_value})
        assert not _selects(peer["podSelector"], {}), "an unlabelled pod must not get in"
    for peer in opened[metrics]:
        namespaces = peer.get("namespaceSelector", {}).get("matchLabels", {})
        assert namespaces.get("kubernetes.io/metadata.name") == "monitoring", peer


def test_tier_scaling_and_disruption_budget(tier: Tier) -> None:
    hpa = tier.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    low, high = spec.get("minReplicas", 1), spec["maxReplicas"]
    assert 2 <= low <= high, "at least two replicas, so one can drain while another serves"
    (metric,) = spec["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # Utilization is usage over the request: it must be set.
    assert "cpu" in tier.broker["resources"]["requests"]
    # The HPA owns the count: a replicas field would reset it on every apply.
    assert "replicas" not in tier.deployment["spec"]
    rolling = tier.deployment["spec"].get("strategy", {}).get("rollingUpdate", {})
    assert rolling.get("maxUnavailable") == 0, "a rollout adds a replica before it drains one"
    pdb = tier.one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    if "maxUnavailable" in pdb["spec"]:
        allowed = pdb["spec"]["maxUnavailable"]
        assert isinstance(allowed, int) and 1 <= allowed < low, "drains proceed, one replica stays"
    else:
        kept = pdb["spec"]["minAvailable"]
        assert isinstance(kept, int) and 1 <= kept < low, "drains proceed, one replica stays"


def test_tier_pool_arithmetic_uses_the_hpa_bound(tier: Tier, tier_settings: Settings) -> None:
    high = tier.one("HorizontalPodAutoscaler")["spec"]["maxReplicas"]
    comments = tier.configmap.read_text()
    for name, database in tier_settings.databases.items():
        pool = database.max_pool_size
        assert f"{high} replicas x {pool} max_pool_size    =    {high * pool}" in comments, name
        assert f"{high} replicas x 2 monitoring" in comments, name
        total = high * (pool + 2)
        assert f"at most                                 {total} on the primary" in comments, name
        assert f"{high} x ({pool} + 2) = {total}" in (TIER_DIR / "hpa.yaml").read_text(), name


def test_tier_security_context_and_resources(tier: Tier, dockerfile: Dockerfile) -> None:
    pod_context = tier.spec.get("securityContext", {})
    assert pod_context.get("runAsNonRoot") is True
    assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    context = tier.broker.get("securityContext", {})
    assert context.get("readOnlyRootFilesystem") is True
    assert context.get("allowPrivilegeEscalation") is False
    assert "ALL" in context.get("capabilities", {}).get("drop", [])
    assert not context.get("privileged", False)
    uid, gid = _final_uid_gid(dockerfile)
    assert (context.get("runAsUser", uid), context.get("runAsGroup", gid)) == (uid, gid), "the image's user"
    # Secret files at mode 0440 are readable by the broker through fsGroup.
    assert pod_context.get("fsGroup") == gid
    resources = tier.broker.get("resources", {})
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert resource in resources.get(kind, {}), f"the broker has no {kind}.{resource}"
    # Nothing writes to a volume: the read-only root filesystem holds.
    for mount in tier.broker.get("volumeMounts", []):
        assert mount.get("readOnly") is True, mount


def test_tier_example_secrets_are_placeholders(tier_manifests: Manifests) -> None:
    _check_placeholders(tier_manifests)


def test_tier_manifests_match_the_kubernetes_schema(tier_manifests: Manifests) -> None:
    _check_schemas(tier_manifests)


TIER_README_SECTION = "## Shared broker tier on Kubernetes"


def _readme_service_config() -> dict[str, Any]:
    """The gRPC service config the README tells the tier's clients to use."""
    section = (ROOT / "README.md").read_text().partition(TIER_README_SECTION)[2].partition("\n## ")[0]
    match = re.search(r"```json\n(.*?)```", section, re.DOTALL)
    assert match, f"README's {TIER_README_SECTION!r} has no ```json service config"
    config = json.loads(match.group(1))
    assert isinstance(config, dict)
    return config


def test_tier_replica_drains_without_losing_a_call(
    tier: Tier,
    tier_files: TierFiles,
    start_broker: Any,
    collection_name: str,
    mongo: Any,
) -> None:
    """Two replicas from the tier's config behind one balanced client; one is stopped.

    What a rollout or a scale-down does to a replica, with the client set up
    as the README says (round_robin, client-side health checks, TLS against
    the Service's name, a token). On SIGTERM the replica's health turns
    NOT_SERVING at once; the client stops sending it calls while its listener
    still serves (drain_delay_s), and no call fails. The delay is shortened
    to keep the test quick; everything else is the ConfigMap's.
    """
    drain_delay_s = 4.0
    database_name = next(iter(tier.toml["databases"]))
    mongo_db = "broker_test"  # the test suite's database (tests/conftest.py)
    mongo[mongo_db][collection_name].insert_one({"_id": 1, "sku": "a1"})
    config = tier_files.local(tier.toml)
    config["listen"]["tcp"] = "127.0.0.1:0"
    config["health"]["tcp"] = "127.0.0.1:0"
    config["metrics"]["listen"] = "127.0.0.1:0"
    database = config["databases"][database_name]
    database.pop("password_file", None)
    database.update(uri=start_broker.db_server.uri, database=mongo_db)
    text = tomli_w.dumps(config)
    env = {
        "MONGO_BROKER_SERVER__DRAIN_DELAY_S": str(drain_delay_s),
        "MONGO_BROKER_SERVER__SHUTDOWN_GRACE_S": "2",
    }
    replicas = [start_broker(text, env=env) for _ in range(2)]
    health = [json.loads(r.ready_path.read_text())["health"] for r in replicas]
    ports = [r.tcp_target.rpartition(":")[2] for r in replicas]

    tls = tier_files.tls_dir(tier)
    credentials = grpc.ssl_channel_credentials((tls / "ca.crt").read_bytes())
    server_name = _service_target(tier).removeprefix("dns:///").rpartition(":")[0]
    token_file = config["auth"]["tokens"][0]["token_file"]
    metadata = (("authorization", f"Bearer {Path(token_file).read_text().strip()}"),)
    tls_options = [("grpc.ssl_target_name_override", server_name)]

    def stats(port: str) -> Any:
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=tls_options) as channel:
            reply = broker_pb2_grpc.BrokerStub(channel).Stats(
                pb.StatsRequest(database=database_name), metadata=metadata, timeout=5
            )
            return reply.databases[0]

    def health_status(address: str) -> int:
        with grpc.insecure_channel(address) as channel:
            request = health_pb2.HealthCheckRequest(service="")
            return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status)

    # The client: both replicas' addresses stand for the Service's DNS answer.
    channel = grpc.secure_channel(
        "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports),
        credentials,
        options=[*tls_options, ("grpc.service_config", json.dumps(_readme_service_config()))],
    )
    stub = broker_pb2_grpc.BrokerStub(channel)
    lookup = bson.encode({"_id": 1})
    request = pb.FindRequest(database=database_name, collection=collection_name, filter=lookup)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def call_in_a_loop() -> None:
        while not stop.is_set():
            try:
                reply = stub.FindOne(request, metadata=metadata, timeout=5)
                assert bson.decode(reply.documents[0])["sku"] == "a1"
                answered[0] += 1
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")
            time.sleep(0.005)

    caller = threading.Thread(target=call_in_a_loop, daemon=True)
    caller.start()
    try:
        assert eventually(lambda: all(stats(port).rpcs.get("FindOne", 0) >= 5 for port in ports), 15), (
            "round_robin should send calls to both replicas"
        )
        first, second = replicas
        stopped_at = time.monotonic()
        os.kill(first.pid, signal.SIGTERM)
        assert eventually(lambda: health_status(health[0]) == health_pb2.HealthCheckResponse.NOT_SERVING, 2)
        time.sleep(0.5)  # the client's health watch hears it as quickly
        before = stats(ports[0]).rpcs.get("FindOne", 0)
        other_before = stats(ports[1]).rpcs.get("FindOne", 0)
        time.sleep(1.0)
        # Still within drain_delay_s: the draining replica answers a new
        # connection, but the balanced client has moved every call away.
        assert time.monotonic() - stopped_at < drain_delay_s, "the machine was too slow for this window"
        assert stats(ports[0]).rpcs.get("FindOne", 0) == before, "calls still sent to a draining replica"
        assert stats(ports[1]).rpcs.get("FindOne", 0) > other_before
        assert first.wait(timeout=drain_delay_s + 15) == 0
        assert time.monotonic() - stopped_at >= drain_delay_s, "the listener closed before drain_delay_s"
        still = answered[0]
        assert eventually(lambda: answered[0] > still + 10, 5), "calls stop after the replica left"
        assert second.is_running()
    finally:
        stop.set()
        caller.join(timeout=10)
        channel.close()
    assert not failures, f"{len(failures)} of {answered[0] + len(failures)} calls failed: {failures[:3]}"
