"""Static checks of image/Dockerfile and build.sh, and the image's HEALTHCHECK run for real.

No container engine is needed: the Dockerfile is parsed here, build.sh runs against a stub engine
that records its arguments, and the HEALTHCHECK command runs against a local HTTP server.
"""

from __future__ import annotations

import fnmatch
import http.server
import itertools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "image" / "Dockerfile"
BUILD_SH = ROOT / "build.sh"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by build stage (one list per FROM), continuation lines joined."""
    stages: list[list[Instruction]] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if logical and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
        logical = ""
    assert not logical, "Dockerfile ends inside a continued line"
    return stages


def exec_form(args: str) -> list[str]:
    """The JSON exec form of ENTRYPOINT/CMD/HEALTHCHECK CMD, asserting it is one."""
    value = json.loads(args)
    assert isinstance(value, list), f"not a JSON array: {args}"
    assert value, "empty exec form"
    assert all(isinstance(item, str) for item in value), f"non-string item in {args}"
    return value


def project() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        data: dict[str, Any] = tomllib.load(f)["project"]
    return data


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[list[Instruction]]) -> list[Instruction]:
    return stages[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for token in shlex.split(instruction.args):
                key, sep, value = token.partition("=")
                assert sep, f"use ENV key=value, not the legacy form: {instruction.args}"
                env[key] = value
    return env


def healthcheck_command(final: list[Instruction]) -> list[str]:
    args = only(final, "HEALTHCHECK").args
    options, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    assert all(opt.startswith("--") for opt in options.split()), options
    return exec_form(command)


def test_final_stage_is_slim_python_matching_requires_python(
    stages: list[list[Instruction]],
) -> None:
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    for stage in stages:
        image = stage[0].args.split()[0]
        assert image.startswith("python:3.11-slim"), image
    assert project()["requires-python"] == ">=3.11"


def test_entrypoint_is_tini_then_start_sh_in_exec_form(final: list[Instruction]) -> None:
    entrypoint = exec_form(only(final, "ENTRYPOINT").args)
    assert entrypoint[0] == "/usr/bin/tini"
    assert entrypoint[1] == "--"
    assert entrypoint[2:] == ["/app/start.sh"]
    for cmd in (i for i in final if i.keyword == "CMD"):
        exec_form(cmd.args)
    installs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert re.search(r"apt-get install [^&]*\btini\b", installs), "tini is not installed"


def test_runs_as_non_root_user_with_fixed_uid(final: list[Instruction]) -> None:
    user = [i for i in final if i.keyword == "USER"][-1].args
    uid, _, gid = user.partition(":")
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    if not uid.isdigit():
        created = re.search(rf"useradd\b[^&]*--uid (\d+)[^&]*\b{re.escape(uid)}\b", runs)
        assert created, f"USER {uid} is not created with a fixed --uid"
        uid = created.group(1)
    assert int(uid) >= 1000, "must not run as root or a system uid"
    if gid:
        assert gid.isdigit()
        assert int(gid) != 0
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", runs), "the uid has no passwd entry"
    assert re.search(rf"groupadd\b[^&]*--gid {gid or uid}\b", runs), "the gid has no group entry"


def test_stop_signal_and_port(final: list[Instruction]) -> None:
    assert only(final, "STOPSIGNAL").args == "SIGTERM"
    with (ROOT / "config.example.toml").open("rb") as f:
        port = tomllib.load(f)["api"]["port"]
    assert only(final, "EXPOSE").args.split() == [str(port)]


def test_healthcheck_is_exec_form_on_livez_without_curl(final: list[Instruction]) -> None:
    command = healthcheck_command(final)
    text = " ".join(command)
    assert command == ["python", "-m", "appliance.healthcheck"], "the venv's python runs it"
    assert not re.search(r"\b(curl|wget)\b", text)


def test_environment_paths_and_copied_files(final: list[Instruction]) -> None:
    env = env_of(final)
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert env["APPLIANCE_CONFIG"] == "/etc/appliance/config.toml"
    copies = {i.args for i in final if i.keyword == "COPY"}
    assert "--from=builder /opt/venv /opt/venv" in copies
    assert "config.example.toml /etc/appliance/config.toml" in copies
    assert "--chmod=0755 start.sh /app/start.sh" in copies
    assert "supervisor.conf /app/supervisor.conf" in copies
    # start.sh finds supervisor.conf beside itself.
    assert "$here/supervisor.conf" in (ROOT / "start.sh").read_text()


def test_oci_labels_carry_the_version(final: list[Instruction]) -> None:
    labels = " ".join(i.args for i in final if i.keyword == "LABEL")
    for key in ("title", "version", "revision", "created"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.version="$VERSION"' in labels
    assert any(i.keyword == "ARG" and i.args.startswith("VERSION") for i in final)


def test_supervisor_comes_from_pyprojects_pin(stages: list[list[Instruction]]) -> None:
    pins = [d for d in project()["dependencies"] if re.match(r"supervisor\s*==", d)]
    assert len(pins) == 1, "pyproject.toml must pin supervisor with =="
    pinned = pins[0].split("==")[1].strip()
    text = DOCKERFILE.read_text()
    # Any version the Dockerfile names itself must agree with pyproject.toml.
    for named in re.findall(r"supervisor\s*[=~<>!]=+\s*([0-9][\w.]*)", text):
        assert named == pinned
    builder = " ".join(i.args for i in stages[0] if i.keyword == "RUN")
    assert "['project']['dependencies']" in builder, "dependencies come from pyproject.toml"
    assert "pip install -r /tmp/requirements.txt" in builder
    assert "pip install --no-deps ." in builder
    assert "pip check" in builder


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the context (last matching pattern wins)."""
    ignore = ROOT / ".dockerignore"
    if not ignore.exists():
        return False
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for raw in ignore.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


def test_copied_sources_exist_and_are_in_the_build_context(
    stages: list[list[Instruction]],
) -> None:
    for stage in stages:
        for instruction in stage:
            if instruction.keyword != "COPY" or "--from=" in instruction.args:
                continue
            sources = [a for a in instruction.args.split() if not a.startswith("--")][:-1]
            for source in sources:
                matches = sorted(ROOT.glob(source))
                if not any(ch in source for ch in "*?["):
                    assert matches, f"COPY source {source} does not exist"
                for match in matches:
                    relative = match.relative_to(ROOT).as_posix()
                    assert not dockerignore_excludes(relative), f"{relative} is .dockerignored"
    for secret in (".git", ".venv", ".env", "tests"):
        assert dockerignore_excludes(secret), f"{secret} is sent with the build context"


# --- build.sh ---------------------------------------------------------------------------------


def run_build_sh(
    tmp_path: Path, engine: str, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run build.sh (from another directory) with a stub `engine` first on PATH."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    record = tmp_path / f"{engine}.args"
    stub = stubs / engine
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    stub.chmod(0o755)
    result = subprocess.run(
        ["bash", str(BUILD_SH), *args],
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    recorded = record.read_text().splitlines() if record.exists() else []
    return result, recorded


def test_build_sh_is_executable_and_strict() -> None:
    assert os.access(BUILD_SH, os.X_OK)
    assert "set -euo pipefail" in BUILD_SH.read_text()


def test_build_sh_tags_with_pyproject_version(tmp_path: Path) -> None:
    version = project()["version"]
    result, argv = run_build_sh(tmp_path, "docker", "--no-cache", "--pull")
    assert result.returncode == 0, result.stderr
    assert argv[0] == "build"
    pairs = list(itertools.pairwise(argv))
    assert ("-f", "image/Dockerfile") in pairs
    assert ("-t", f"appliance:{version}") in pairs
    assert ("-t", "appliance:latest") in pairs
    assert ("--build-arg", f"VERSION={version}") in pairs
    assert argv[-1] == ".", "the context is the repository root"
    assert argv[-3:-1] == ["--no-cache", "--pull"], "extra arguments are passed through"
    assert "--format" not in argv
    assert result.stdout.splitlines()[-1] == f"appliance:{version}"


def test_build_sh_engine_and_image_overrides(tmp_path: Path) -> None:
    version = project()["version"]
    result, argv = run_build_sh(
        tmp_path, "podman", env={"ENGINE": "podman", "IMAGE": "registry.example/appliance"}
    )
    assert result.returncode == 0, result.stderr
    assert f"registry.example/appliance:{version}" in argv
    # podman's default OCI format would drop HEALTHCHECK.
    assert ("--format", "docker") in itertools.pairwise(argv)
    assert result.stdout.splitlines()[-1] == f"registry.example/appliance:{version}"


def test_build_sh_fails_when_the_engine_fails(tmp_path: Path) -> None:
    result, _ = run_build_sh(tmp_path, "docker", env={"ENGINE": str(tmp_path / "missing")})
    assert result.returncode != 0
    assert "appliance:" not in result.stdout


# --- the HEALTHCHECK command, run for real ----------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str]

    def do_GET(self) -> None:
        self.paths.append(self.path)
        code = self.status if self.path == "/livez" else 404
        body = b'{"status":"ok"}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def livez_server() -> Iterator[tuple[int, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"paths": [], "status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_healthcheck(port: int, **env_extra: str) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's HEALTHCHECK command with the image's default config, port overridden."""
    command = healthcheck_command(parse_dockerfile(DOCKERFILE.read_text())[-1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_CONFIG"] = str(ROOT / "config.example.toml")
    env["APPLIANCE_API__PORT"] = str(port)
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthcheck_passes_on_livez_200(livez_server: tuple[int, type[_Handler]]) -> None:
    port, handler = livez_server
    result = run_healthcheck(port)
    assert result.returncode == 0, result.stderr
    assert handler.paths == ["/livez"]


def test_healthcheck_fails_on_livez_503(livez_server: tuple[int, type[_Handler]]) -> None:
    port, handler = livez_server
    handler.status = 503
    result = run_healthcheck(port)
    assert result.returncode == 1, "Docker reads exit 1 as unhealthy (2 is reserved)"
    assert handler.paths == ["/livez"]


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_healthcheck(port)
    assert result.returncode == 1


def test_healthcheck_healthy_without_api_role() -> None:
    """A worker-only container has no /livez; supervisord watches its programs instead."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_healthcheck(port, APPLIANCE_APPLIANCE__ROLES="worker,flusher")
    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_on_invalid_config(livez_server: tuple[int, type[_Handler]]) -> None:
    port, _ = livez_server
    result = run_healthcheck(port, APPLIANCE_API__PORTT="1")
    assert result.returncode == 1
    assert "APPLIANCE_API__PORTT" in result.stderr
