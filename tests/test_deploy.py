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

- ``test_source_install_command_from_the_readme`` runs the README's install
  from a checkout (``pip install ./clients/python .``), exactly as written,
  in a fresh virtualenv, and the installed ``mongo-broker --help``.

The two install tests get packages from the package index (the Docker
builder stage does the same); everything else is offline.
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
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import pytest

from broker.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_DIR = ROOT / "deploy" / "kubernetes"

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


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read deploy/kubernetes (dev extra)")
    documents = []
    files = sorted(K8S_DIR.rglob("*.yaml")) + sorted(K8S_DIR.rglob("*.yml"))
    assert files, f"no manifests in {K8S_DIR}"
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path}: a document has no {key}"
            documents.append((path, doc))
    return Manifests(documents)


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
