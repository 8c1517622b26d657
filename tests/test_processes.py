"""The real programs under the real start.sh and supervisord: start-up, health, crashes, signals.

Each stack is `bash start.sh` with its own TOML (own api port, run_dir, instance name), started in
a session of its own so that everything it spawns (supervisord, granian and its workers, the
programs, the event listener) can be found by session id and is gone after the test.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from supervisor.xmlrpc import SupervisorTransport
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.api_process import ApiProcess, admin_key, api_settings
from tests.support import free_port, wait_for, write_toml

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent
START_SH = ROOT / "start.sh"
SUPERVISOR_CONF = ROOT / "supervisor.conf"
VENV_BIN = ROOT / ".venv" / "bin"
if not (VENV_BIN / "supervisorctl").exists():  # a venv elsewhere: the one running the tests
    VENV_BIN = Path(sys.executable).parent
PROGRAM_NAMES = ("api", "worker", "flusher", "scheduler")
STOP_TIMEOUT = 5.0
READY_TIMEOUT = 60.0


def proc_stat(pid: int | str) -> list[str] | None:
    """state, ppid, pgrp, session, ... of a process; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
    return stat[stat.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat(entry.name)
            if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
                pids.append(int(entry.name))
    return sorted(pids)


def patched_conf(directory: Path, program: str, **settings: str) -> Path:
    """supervisor.conf with some settings of one program replaced (e.g. its command)."""
    text = SUPERVISOR_CONF.read_text()
    header = f"[program:{program}]\n"
    head, found, rest = text.partition(header)
    assert found, header
    body, sep, tail = rest.partition("\n[")
    for key, value in settings.items():
        body, count = re.subn(rf"^{key}=.*$", f"{key}={value}", body, flags=re.M)
        assert count == 1, f"{key} not in {header}"
    path = directory / "supervisor.conf"
    path.write_text(head + header + body + sep + tail)
    return path


def describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        out.append(f"{pid}: {cmd.strip()}")
    return "\n".join(out)


def base_env(config_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without APPLIANCE_* (and other stack-level) variables, venv first."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("APPLIANCE_", "SUPERVISOR_", "GRANIAN_"))
        and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["APPLIANCE_CONFIG"] = str(config_path)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def configure(settings: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Give a settings tree its own port, run_dir and instance (heartbeats are per instance)."""
    run_dir = directory / "run"
    assert len(str(run_dir / "supervisor.sock")) < 100, f"run_dir too long: {run_dir}"
    appliance = settings.setdefault("appliance", {})
    appliance["run_dir"] = str(run_dir)
    appliance["stop_timeout"] = STOP_TIMEOUT
    appliance["heartbeat_interval"] = 1.0
    appliance["instance"] = f"{appliance.get('instance', 'test')}-{uuid.uuid4().hex[:6]}"
    api = settings.setdefault("api", {})
    api["port"] = free_port()
    api["bind"] = "127.0.0.1"
    return settings


class Stack:
    """One `bash start.sh` run and helpers to look at it."""

    def __init__(
        self, directory: Path, settings: dict[str, Any], env: dict[str, str] | None = None
    ) -> None:
        self.dir = directory
        self.settings = settings
        self.run_dir = Path(settings["appliance"]["run_dir"])
        self.instance = settings["appliance"]["instance"]
        self.port = settings["api"]["port"]
        self.config_path = write_toml(directory / "config.toml", settings)
        self.log_path = directory / "start.log"
        self.env = base_env(self.config_path, env)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                ["bash", str(START_SH)],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started = time.monotonic()

    # -- looking -------------------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"\n--- start.sh output (last {lines} lines) ---\n{text}\n---"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> httpx.Response | None:
        try:
            return httpx.get(self.url(path), timeout=5.0)
        except httpx.HTTPError:
            return None

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "SUPERVISOR_RUN_DIR": str(self.run_dir)}
        conf = self.env.get("SUPERVISOR_CONF", str(SUPERVISOR_CONF))
        return subprocess.run(
            [str(VENV_BIN / "supervisorctl"), "-c", conf, *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def programs(self) -> dict[str, tuple[str, int | None]]:
        """supervisorctl status as {program: (state, pid)}; empty while supervisord is not up."""
        out: dict[str, tuple[str, int | None]] = {}
        for line in self.supervisorctl("status").stdout.splitlines():
            parts = line.split()
            if len(parts) < 2 or not parts[0].startswith("appliance:"):
                continue
            pid = re.search(r"\bpid (\d+)", line)
            out[parts[0].split(":", 1)[1]] = (parts[1], int(pid[1]) if pid else None)
        return out

    def appliance(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "appliance"), *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def heartbeats(self) -> dict[str, int]:
        """{program: pid} of this instance's live heartbeats, from `appliance status --json`."""
        result = self.appliance("status", "--json")
        assert result.returncode == 0, f"status failed: {result.stderr}{self.tail()}"
        programs = json.loads(result.stdout).get("programs", [])
        return {p["program"]: p["pid"] for p in programs if p["instance"] == self.instance}

    def until(
        self,
        condition: Callable[[], Any],
        what: str,
        timeout: float = READY_TIMEOUT,
        interval: float = 0.25,
    ) -> Any:
        """Poll `condition` while start.sh runs; fail with the log tail on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            code = self.proc.poll()
            if code is not None:
                pytest.fail(f"start.sh exited {code} while waiting for {what}{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g}s waiting for {what}{self.tail()}")
            time.sleep(interval)

    def ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Wait until /readyz answers 200; its JSON body."""

        def check() -> dict[str, Any] | None:
            response = self.get("/readyz")
            if response is None or response.status_code != 200:
                return None
            body: dict[str, Any] = response.json()
            return body

        body: dict[str, Any] = self.until(check, "/readyz 200", timeout)
        return body

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"start.sh still running after {timeout:g}s{self.tail()}")

    # -- ending --------------------------------------------------------------------------------
    def leftovers(self) -> list[int]:
        return session_pids(self.proc.pid)

    def shutdown(self) -> None:
        """SIGTERM start.sh, then SIGKILL whatever of this session is still alive."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT + 20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # supervisord puts each program in a process group of its own, but not a new session.
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Factory: `launch(settings, env=None)` starts start.sh; every stack is torn down after."""
    stacks: list[Stack] = []

    def start(settings: dict[str, Any], env: dict[str, str] | None = None) -> Stack:
        directory = tmp_path / f"s{len(stacks)}"
        directory.mkdir()
        stack = Stack(directory, settings, env)
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        stack.shutdown()
        print(stack.tail(200))  # shown by pytest only when the test failed


@pytest.fixture
def stack_settings(settings: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return configure(settings, tmp_path / "s0")


@pytest.fixture(scope="module")
def stack(
    base_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One full stack (all four roles), ready, shared by the read-mostly tests."""
    directory = tmp_path_factory.mktemp("stack")
    running = Stack(directory, configure(copy.deepcopy(base_settings), directory))
    try:
        running.ready()
        yield running
    finally:
        running.shutdown()
        print(running.tail(200))


def metric_samples(text: str, name: str) -> dict[str, float]:
    """{program label: value} of the samples called `name`."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and "program" in sample.labels:
                out[sample.labels["program"]] = sample.value
    return out


# -- one shared stack ----------------------------------------------------------------------------


def test_start_brings_all_programs_up_and_ready(stack: Stack) -> None:
    programs = stack.until(
        lambda: (
            (p := stack.programs())
            and all(p.get(n, ("",))[0] == "RUNNING" for n in PROGRAM_NAMES)
            and p
        ),
        "all four programs RUNNING",
    )
    assert set(programs) == set(PROGRAM_NAMES), f"{programs}{stack.tail()}"

    response = stack.get("/readyz")
    assert response is not None and response.status_code == 200, stack.tail()
    body = response.json()
    assert body["status"] == "ok"
    checks = {c["name"]: c for c in body["checks"]}
    assert set(checks) >= {"postgres", "redis", "s3", "schema", "heartbeats"}, body
    assert all(c["ok"] for c in checks.values()), body
    for name in PROGRAM_NAMES:
        assert name in checks["heartbeats"]["detail"], body

    live = stack.get("/livez")
    assert live is not None
    assert live.status_code == 200

    # Each program heartbeats under this instance; the Python programs are the very processes
    # supervisord started (no re-exec under start.sh, so signals reach them directly).
    beats = stack.heartbeats()
    assert set(beats) == set(PROGRAM_NAMES), beats
    for name in ("worker", "flusher", "scheduler"):
        assert beats[name] == programs[name][1], (name, beats, programs)


def test_metrics_cover_all_four_programs(stack: Stack) -> None:
    stack.ready()

    def complete() -> tuple[dict[str, float], dict[str, float]] | None:
        response = stack.get("/metrics")
        if response is None or response.status_code != 200:
            return None
        up = metric_samples(response.text, "appliance_program_up")
        beats = metric_samples(response.text, "appliance_heartbeats_total")
        if all(up.get(n) == 1.0 and beats.get(n, 0) > 0 for n in PROGRAM_NAMES):
            return up, beats
        return None

    up, beats = stack.until(complete, "program_up and heartbeats of all programs", 20)
    assert {n: up[n] for n in PROGRAM_NAMES} == dict.fromkeys(PROGRAM_NAMES, 1.0)
    assert all(beats[n] >= 1 for n in PROGRAM_NAMES), beats
    response = stack.get("/metrics")
    assert response is not None
    assert response.headers["content-type"].startswith("text/plain")
    # Process metrics of every program, and HTTP metrics from the real granian worker.
    rss = metric_samples(response.text, "appliance_process_resident_memory_bytes")
    assert all(rss.get(n, 0) > 10_000_000 for n in PROGRAM_NAMES), rss
    cpu = metric_samples(response.text, "appliance_process_cpu_seconds")
    assert all(cpu.get(n, 0) > 0 for n in PROGRAM_NAMES), cpu
    assert 'appliance_http_requests_total{method="GET",route="/readyz",status="200"}' in (
        response.text
    )


def test_doctor_round_trips_a_job_through_the_worker(stack: Stack) -> None:
    stack.ready()
    # Ready can come before supervisord counts the worker as started (startsecs), and only then
    # does its status show the pid.
    worker_pid = stack.until(lambda: stack.programs().get("worker", ("", None))[1], "worker pid")
    result = stack.appliance("doctor")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"doctor exited {result.returncode}:\n{output}{stack.tail()}"
    for name in ("config", "postgres", "redis", "s3", "schema", "jobs"):
        assert re.search(rf"^{name}\s+ok\b", result.stdout, re.M), output
    jobs = re.search(r"^jobs\s+ok\s.*answered by pid (\d+)", result.stdout, re.M)
    assert jobs is not None, output
    assert int(jobs[1]) == worker_pid, f"ping answered by {jobs[1]}, worker is {worker_pid}"


def test_killed_program_is_restarted(stack: Stack) -> None:
    stack.ready()
    state, old_pid = stack.programs()["worker"]
    assert state == "RUNNING" and old_pid, stack.tail()
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> int | None:
        state, pid = stack.programs().get("worker", ("", None))
        return pid if state == "RUNNING" and pid not in (None, old_pid) else None

    new_pid = stack.until(restarted, "the worker RUNNING again with a new pid", 30)
    assert not alive(old_pid)
    stack.until(lambda: stack.heartbeats().get("worker") == new_pid, "the new worker's heartbeat")
    body = stack.ready(30)
    assert all(c["ok"] for c in body["checks"]), body
    # The other programs were left alone.
    programs = stack.programs()
    assert all(programs[n][0] == "RUNNING" for n in PROGRAM_NAMES), programs
    assert stack.proc.poll() is None, stack.tail()


def test_merged_output_is_one_json_object_per_line(stack: Stack) -> None:
    # A group restart makes all four programs log their stop and start at the same moment.
    for _ in range(2):
        result = stack.supervisorctl("restart", "appliance:*")
        assert result.returncode == 0, result.stdout + result.stderr + stack.tail()
        stack.until(
            lambda: all(s == "RUNNING" for s, _ in stack.programs().values()), "all RUNNING"
        )
    stack.ready()
    # From start.sh's first step on, the container log is JSON lines only.
    lines = stack.log().splitlines()
    bad = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(event, dict) or "process" not in event:
            bad.append(line)
    assert bad == [], "lines that are not one JSON object with `process`:\n" + "\n".join(
        repr(line[:300]) for line in bad[:10]
    )


# -- a stack of its own --------------------------------------------------------------------------


def test_sigterm_stops_everything_in_time(
    launch: Callable[..., Stack], stack_settings: dict[str, Any]
) -> None:
    running = launch(stack_settings)
    running.ready()
    running.until(
        lambda: all(s == "RUNNING" for s, _ in running.programs().values()), "all RUNNING"
    )
    before = running.leftovers()
    assert len(before) >= 6, describe(before)  # start.sh, supervisord, listener, 4 programs
    key = admin_key(running.settings)
    opened = contextlib.ExitStack()
    sockets = [
        opened.enter_context(
            connect(
                f"ws://127.0.0.1:{running.port}/v1/stream",
                additional_headers={"Authorization": f"Bearer {key}"},
                open_timeout=10,
            )
        )
        for _ in range(3)
    ]
    for ws in sockets:  # each is live before the stop
        ws.send(json.dumps({"op": "ping"}))
        assert json.loads(ws.recv(timeout=10))["event"] == "pong"

    started = time.monotonic()
    running.proc.send_signal(signal.SIGTERM)
    with opened:
        codes = [close_code(ws, deadline=started + STOP_TIMEOUT + 10) for ws in sockets]
    code = running.wait_exit(STOP_TIMEOUT + 30)
    elapsed = time.monotonic() - started
    assert codes == [1001] * len(sockets), f"close codes {codes}{running.tail()}"
    assert code == 0, f"start.sh exited {code} after SIGTERM{running.tail()}"
    assert elapsed < STOP_TIMEOUT + 10, f"stopping took {elapsed:.1f}s{running.tail()}"
    left = running.leftovers()
    assert left == [], f"still running after start.sh exited:\n{describe(left)}"
    assert not any(alive(pid) for pid in before), describe(before)
    assert running.get("/livez") is None  # the port is closed
    log = running.log()
    assert "program_fatal" not in log, running.tail()
    assert "drain_timeout" not in log, running.tail()
    assert "refused to gracefully stop" not in log, running.tail()


def close_code(ws: ClientConnection, deadline: float) -> int | None:
    """The close code `ws` receives (frames before it are skipped); None if none by `deadline`."""
    while (left := deadline - time.monotonic()) > 0:
        try:
            ws.recv(timeout=left)
        except TimeoutError:
            break
        except ConnectionClosed:
            return ws.close_code
    ws.close()
    return None


def fatal_events(stack: Stack) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The listener's `program_fatal` lines and start.sh's `start_sh_exit` lines."""
    events = []
    for line in stack.log().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return (
        [e for e in events if e.get("event") == "program_fatal"],
        [e for e in events if e.get("event") == "start_sh_exit"],
    )


def test_fatal_program_makes_start_sh_exit_1(
    launch: Callable[..., Stack], stack_settings: dict[str, Any], tmp_path: Path
) -> None:
    # The real supervisor.conf, except that the api's command fails at once, every time.
    conf = patched_conf(tmp_path, "api", command="false")
    started = time.monotonic()
    running = launch(stack_settings, {"SUPERVISOR_CONF": str(conf)})
    code = running.wait_exit(60)
    assert code == 1, f"start.sh exited {code}{running.tail()}"
    assert time.monotonic() - started < 60
    fatal, exits = fatal_events(running)
    assert [e["program"] for e in fatal] == ["api"], running.tail()
    assert [e["fatal_program"] for e in exits] == ["api"], running.tail()
    assert (running.run_dir / "fatal").read_text().strip() == "api"
    left = running.leftovers()
    assert left == [], f"still running after start.sh exited:\n{describe(left)}"


def test_api_port_taken_makes_start_sh_exit_1(
    launch: Callable[..., Stack], stack_settings: dict[str, Any]
) -> None:
    port = stack_settings["api"]["port"]
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        running = launch(stack_settings)
        code = running.wait_exit(60)
    assert code == 1, f"start.sh exited {code}{running.tail()}"
    fatal, exits = fatal_events(running)
    assert [e["program"] for e in fatal] == ["api"], running.tail()
    assert [e["fatal_program"] for e in exits] == ["api"], running.tail()
    assert "Address already in use" in running.log()
    left = running.leftovers()
    assert left == [], f"still running after start.sh exited:\n{describe(left)}"


def test_sigterm_while_a_program_backs_off_is_a_clean_stop(
    launch: Callable[..., Stack], stack_settings: dict[str, Any], tmp_path: Path
) -> None:
    conf = patched_conf(tmp_path, "api", command="false", startretries="100")
    running = launch(stack_settings, {"SUPERVISOR_CONF": str(conf)})

    def backing_off() -> bool:
        programs = running.programs()
        return programs.get("api", ("",))[0] == "BACKOFF" and all(
            programs.get(n, ("",))[0] == "RUNNING" for n in ("worker", "flusher", "scheduler")
        )

    running.until(backing_off, "api in BACKOFF, the others RUNNING")
    # By now each backoff window lasts 3 s or more (1 s longer each time). Signal early in one:
    # supervisorctl is too slow to aim with, so ask supervisord over its socket directly.
    transport = SupervisorTransport(serverurl=f"unix://{running.run_dir}/supervisor.sock")
    rpc: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    try:
        running.until(
            lambda: (
                (i := rpc.supervisor.getProcessInfo("appliance:api"))["statename"] == "BACKOFF"
                and i["now"] == i["stop"]  # whole seconds: it exited less than 1 s ago
            ),
            "the api entering BACKOFF",
            30,
            interval=0.05,
        )
    finally:
        transport.close()
    running.proc.send_signal(signal.SIGTERM)
    code = running.wait_exit(STOP_TIMEOUT + 30)
    assert running.leftovers() == []
    assert "Traceback" not in running.log(), running.tail()
    assert code == 0, f"start.sh exited {code}{running.tail()}"


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ({"api": {"port": "x"}}, {}, "api.port"),
        ({"postgres": {"bogus": 1}}, {}, "postgres.bogus"),
        ({}, {"APPLIANCE_API__PORT": "70000"}, "api.port"),
    ],
    ids=["port-not-int", "unknown-key", "env-port-range"],
)
def test_bad_config_exits_2_before_anything_starts(
    launch: Callable[..., Stack],
    stack_settings: dict[str, Any],
    toml: dict[str, Any],
    env: dict[str, str],
    key: str,
) -> None:
    for section, values in toml.items():
        stack_settings.setdefault(section, {}).update(values)
    running = launch(stack_settings, env)
    code = running.wait_exit(30)
    log = running.log()
    assert code == 2, f"start.sh exited {code}{running.tail()}"
    assert re.search(rf"(^|\W){re.escape(key)}(\W|$)", log), f"{key} not named{running.tail()}"
    # Nothing started: no supervisord files, no program output.
    for name in ("supervisord.pid", "supervisor.sock", "metrics"):
        assert not (running.run_dir / name).exists(), name
    for marker in ("program_starting", "api_ready", "worker_ready", "program_fatal"):
        assert marker not in log, running.tail()
    assert running.leftovers() == []


def test_roles_select_the_programs_that_run(
    launch: Callable[..., Stack], stack_settings: dict[str, Any]
) -> None:
    stack_settings["appliance"]["roles"] = ["api"]
    running = launch(stack_settings)
    body = running.ready()
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["heartbeats"]["ok"], body
    programs = running.until(
        lambda: (p := running.programs()) and p.get("api", ("",))[0] == "RUNNING" and p,
        "api RUNNING",
    )
    assert programs["api"][0] == "RUNNING", programs
    for name in ("worker", "flusher", "scheduler"):
        assert programs[name][0] == "STOPPED", programs
    # Still so a few heartbeats later: not started rather than slow to start.
    time.sleep(2)
    programs = running.programs()
    for name in ("worker", "flusher", "scheduler"):
        assert programs[name] == ("STOPPED", None), programs
    assert set(running.heartbeats()) == {"api"}
    response = running.get("/readyz")
    assert response is not None and response.status_code == 200, response and response.text


@pytest.mark.process
def test_sigterm_during_start_up_steps_is_a_clean_stop(
    launch: Callable[..., Stack], stack_settings: dict[str, Any]
) -> None:
    """A stop while `appliance wait` still waits for an absent Redis exits 0, leaving nothing."""
    stack_settings["redis"]["url"] = f"redis://127.0.0.1:{free_port()}/0"
    stack_settings["appliance"]["wait_timeout"] = 120.0
    running = launch(stack_settings)
    running.until(lambda: "dependency_waiting" in running.log(), "wait to be retrying")
    started = time.monotonic()
    running.proc.send_signal(signal.SIGTERM)
    code = running.wait_exit(20)
    assert code == 0, f"start.sh exited {code}{running.tail()}"
    assert time.monotonic() - started < 10
    assert running.leftovers() == [], describe(running.leftovers())
    assert not (running.run_dir / "supervisord.pid").exists()


# -- granian's own processes (`appliance run api`, no supervisord) --------------------------------


def granian_children(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat(entry.name)
            if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def start_api(base_settings: dict[str, Any], directory: Path, **sections: Any) -> ApiProcess:
    settings = api_settings(copy.deepcopy(base_settings), directory, **sections)
    return ApiProcess(directory, settings).start()


def test_workers_end_with_granian_main_killed_9(
    base_settings: dict[str, Any], migrated: str, tmp_path: Path
) -> None:
    api = start_api(base_settings, tmp_path, api={"workers": 2})
    try:
        assert api.proc is not None
        main = api.proc.pid
        workers = wait_for(
            lambda: len(w := granian_children(main)) == 2 and w, 30, "two granian workers"
        )
        os.kill(main, signal.SIGKILL)
        api.proc.wait(10)
        killed = time.monotonic()
        wait_for(
            lambda: not any(alive(w) for w in workers),
            10,
            f"workers {workers} to end after their parent was killed",
        )
        elapsed = time.monotonic() - killed
        # Nothing serves on the port any more: supervisord's next api can bind it.
        with socket.socket() as probe:
            probe.settimeout(2)
            assert probe.connect_ex(("127.0.0.1", api.port)) != 0, "a worker still listens"
        print(f"workers gone {elapsed:.2f}s after kill -9 of granian's main process")
    finally:
        api.stop()


def test_sigterm_to_granian_drains_every_worker_without_a_kill(
    base_settings: dict[str, Any], migrated: str, tmp_path: Path
) -> None:
    """Three stops of two workers, each with a request just answered and two slow clients.

    Every stop exits 0 within stop_timeout, granian kills no worker ("refused to gracefully
    stop"), the slow clients are let go by their deadlines, and the activity record of the last
    request is in PostgreSQL (flushed by the drain: the flush interval is longer than the test).
    """
    for attempt in range(3):
        api = start_api(
            base_settings,
            tmp_path / f"a{attempt}",
            api={"workers": 2, "header_timeout": 2.0, "body_timeout": 2.0},
            activity={"flush_interval": 600.0},
        )
        try:
            assert api.proc is not None
            key = admin_key(api.settings)
            request_id = f"drain-{uuid.uuid4().hex[:8]}"
            answer = httpx.get(
                f"{api.url}/v1/keys",
                headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
            with socket.create_connection(("127.0.0.1", api.port)) as headers_only:
                headers_only.sendall(b"GET /livez HTTP/1.1\r\nHost: t\r\n")
                with socket.create_connection(("127.0.0.1", api.port)) as slow_body:
                    slow_body.sendall(
                        b"POST /v1/conversations HTTP/1.1\r\nHost: t\r\n"
                        b"Authorization: Bearer " + key.encode() + b"\r\n"
                        b"Content-Length: 100\r\n\r\n{"
                    )
                    stopped = time.monotonic()
                    os.kill(api.proc.pid, signal.SIGTERM)  # granian's main process alone
                    code = api.proc.wait(STOP_TIMEOUT + 10)
                    elapsed = time.monotonic() - stopped
            log = api.log(400)
            assert code == 0, f"granian exited {code}\n{log}"
            # No worker was killed (granian says so when it kills one); the bound on time only
            # catches a hang, with room for a busy machine.
            assert elapsed < STOP_TIMEOUT + 5, f"stop took {elapsed:.1f}s\n{log}"
            assert "refused to gracefully stop" not in log, log
            assert "Stopped worker-1" in log and "Stopped worker-2" in log, log
            assert activity_count(api.settings, request_id) == 1, log
        finally:
            api.stop()


def activity_count(settings: dict[str, Any], request_id: str) -> int:
    with psycopg.connect(settings["postgres"]["dsn"]) as conn:
        row = conn.execute(
            "SELECT count(*) FROM api_activity WHERE request_id = %s", (request_id,)
        ).fetchone()
    return int(row[0]) if row else 0
