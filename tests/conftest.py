"""The harness: real PostgreSQL, Redis and an S3 API (moto server), isolated per run.

PostgreSQL and Redis default to this machine's (override with TEST_PG_DSN, TEST_REDIS_URL).
Each run gets its own database, Redis key prefix and bucket, and starts its own moto server on a
free port, so runs never collide.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from psycopg import sql

from appliance.config import Config
from appliance.resources import Resources, open_resources
from tests.support import free_port, port_open, wait_for

PG_ADMIN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:10]


def dsn_for(database: str) -> str:
    parts = urlsplit(PG_ADMIN)
    return urlunsplit(parts._replace(path=f"/{database}"))


def create_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return dsn_for(name)


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


PROCESS_TEST_TIMEOUT = 300  # seconds; pytest-timeout's backstop for the `process` tests


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Process tests start and stop whole stacks: give them a longer backstop than the
    ini's `timeout`, unless a test names its own."""
    for item in items:
        if item.get_closest_marker("process") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(PROCESS_TEST_TIMEOUT))


# Files whose tests start whole stacks (start.sh, supervisord, every program) and time how they
# stop: under pytest-xdist they share one scope, so they run one after another on one worker.
STACK_FILES = frozenset(
    {
        "tests/test_processes.py",
        "tests/test_flusher_process.py",
        "tests/test_history_drill.py",
        "tests/test_outages.py",
        "tests/test_slow_clients.py",
    }
)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs the suite in several pytest-xdist workers, a file at a time (a
    module's fixtures are made once, and a test may read what the module's earlier tests left,
    as test_openapi's last one does), the stack files as one."""
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "stacks" if path in STACK_FILES else path

    return Scheduling(config, log)


@pytest.fixture(scope="session")
def database() -> Iterator[str]:
    """A database for this run (migrated by the tests that need it)."""
    name = f"appliance_test_{RUN_ID}"
    dsn = create_database(name)
    yield dsn
    drop_database(name)


@pytest.fixture
def fresh_database() -> Iterator[Callable[[], str]]:
    """Factory of extra empty databases, dropped after the test."""
    made: list[str] = []

    def make() -> str:
        name = f"appliance_test_{RUN_ID}_{len(made)}_{uuid.uuid4().hex[:6]}"
        made.append(name)
        return create_database(name)

    yield make
    for name in made:
        drop_database(name)


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    prefix = f"t{RUN_ID}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server of our own on a free port; its endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 30, "moto server")
        assert proc.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def base_settings(
    database: str, redis_prefix: str, s3_server: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The config tree every test starts from: this run's database, prefix and bucket."""
    return {
        "appliance": {
            "instance": f"test-{RUN_ID}",
            "run_dir": str(tmp_path_factory.mktemp("run")),
            "heartbeat_interval": 1.0,
            "stop_timeout": 5.0,
            "wait_timeout": 10.0,
            "log_format": "json",
        },
        "postgres": {"dsn": database, "pool_max": 4, "connect_timeout": 3.0},
        "redis": {"url": REDIS_URL, "key_prefix": redis_prefix},
        "s3": {
            "endpoint_url": s3_server,
            "bucket": f"test-{RUN_ID}",
            "path_style": True,
            "access_key_id": "test",
            "secret_access_key": "test-secret",
        },
        "worker": {"poll_interval": 1.0},
    }


@pytest.fixture
def settings(base_settings: dict[str, Any]) -> dict[str, Any]:
    """A per-test deep copy of the base settings, free to modify."""
    return copy.deepcopy(base_settings)


@pytest.fixture
def config(settings: dict[str, Any]) -> Config:
    return Config.model_validate(settings)


@pytest.fixture(scope="session")
def migrated(database: str) -> str:
    """The run's database with every migration applied (once per run)."""
    import asyncio

    from appliance.db.migrate import migrate

    async def run() -> None:
        conn = await psycopg.AsyncConnection.connect(database, autocommit=True)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(run())
    return database


@pytest.fixture
async def resources(config: Config, migrated: str) -> AsyncIterator[Resources]:
    """Open pool, Redis client and S3 facade on the run's (migrated) services, bucket created."""
    async with open_resources(config, "test") as res:
        await res.storage.init()
        yield res


@pytest.fixture
def private_redis(
    tmp_path: Path,
) -> Iterator[tuple[int, Callable[[], None], Callable[[], None]]]:
    """A Redis of this test's own on a free port: (port, start, kill) for fault tests."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is needed for fault tests (apt-get install redis-server)")
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(
            subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp_path)],
                stdout=subprocess.DEVNULL,
            )
        )  # fmt: skip
        wait_for(lambda: port_open(port), 10, "private redis")

    def kill() -> None:
        procs[-1].kill()
        procs[-1].wait(10)

    start()
    yield port, start, kill
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def private_postgres() -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A PostgreSQL of this test's own on a free port: (dsn, start, kill) for fault tests.

    An empty cluster (trust auth, user and database `postgres`). `kill` is an immediate shutdown:
    every backend ends at once, clients see their connections drop, and `start` brings the same
    cluster back on the same port after crash recovery. As root, the server runs as the
    `postgres` OS user (initdb refuses root), in a directory outside pytest's private tmp tree.
    """
    pg_ctl = shutil.which("pg_ctl") or max(
        map(str, Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")), default=None
    )
    if pg_ctl is None:
        pytest.fail("PostgreSQL's server binaries are needed for fault tests (pg_ctl, initdb)")
    bindir = Path(pg_ctl).resolve().parent
    as_root = os.geteuid() == 0
    directory = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
    if as_root:
        shutil.chown(directory, "postgres", "postgres")
    data, log = directory / "data", directory / "postgres.log"
    port = free_port()

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [str(bindir / argv[0]), *argv[1:]]
        if as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, cwd=directory, capture_output=True, text=True, check=False)

    def start() -> None:
        done = run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "30", "start")
        if done.returncode != 0:
            pytest.fail(f"private postgres did not start:\n{done.stderr}\n{log.read_text()}")
        wait_for(lambda: port_open(port), 10, "private postgres")

    def kill() -> None:
        done = run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        assert done.returncode == 0, done.stderr
        assert not port_open(port), "private postgres still listens after an immediate stop"

    try:
        options = ["--username=postgres", "--auth=trust", "--no-sync", "--encoding=UTF8"]
        made = run("initdb", "-D", str(data), "--locale=C", *options)
        if made.returncode != 0:
            pytest.fail(f"initdb failed:\n{made.stdout}\n{made.stderr}")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                "fsync = off\n"
            )
        start()
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", start, kill
    finally:
        if (data / "postmaster.pid").exists():
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def api(config: Config, resources: Resources) -> AsyncIterator[Any]:
    """The full app in-process (lifespan, hub, caches) over the run's real services."""
    from litestar.testing import AsyncTestClient

    from appliance.api.app import create_app

    async with AsyncTestClient(app=create_app(config)) as client:
        yield client
