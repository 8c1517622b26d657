"""The api skeleton in-process: probes, metrics, OpenAPI, error shape, body limit, access log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog
from litestar.testing import AsyncTestClient

from appliance.api.app import create_app
from appliance.config import PROGRAMS, Config
from appliance.heartbeat import beat
from appliance.resources import Resources

Client = AsyncTestClient[Any]


@pytest.fixture
async def client(config: Config, resources: Resources) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(config)) as c:
        yield c


async def beat_others(res: Resources, programs: list[str]) -> None:
    """Heartbeats as the worker, flusher and scheduler would write them."""
    for program in programs:
        await beat(res.redis, res.keys, program, res.config.appliance.instance, 1.0, 0.0)


async def test_livez(client: Client) -> None:
    response = await client.get("/livez")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_fails_without_program_heartbeats(
    client: Client, resources: Resources
) -> None:
    for program in PROGRAMS:
        await resources.redis.delete(
            resources.keys.heartbeat(program, resources.config.appliance.instance)
        )
    await beat_others(resources, ["api"])
    response = await client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    checks = {c["name"]: c for c in body["checks"]}
    assert set(checks) == {"postgres", "redis", "s3", "schema", "heartbeats", "flush_backlog"}
    assert all(checks[n]["ok"] for n in ("postgres", "redis", "s3", "schema"))
    assert checks["heartbeats"]["ok"] is False
    assert "worker" in checks["heartbeats"]["detail"]
    assert all(isinstance(c["latency_ms"], float) for c in body["checks"])


async def test_readyz_ok_with_all_heartbeats(client: Client, resources: Resources) -> None:
    await beat_others(resources, list(PROGRAMS))
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"


async def test_a_flush_backlog_is_reported_by_readyz_but_never_fails_it(
    client: Client, resources: Resources
) -> None:
    """Redis absorbs a backlog while S3 or PostgreSQL is away: /readyz says so and stays 200."""
    await beat_others(resources, list(PROGRAMS))
    ingest = resources.keys.ingest(0)
    added = await resources.redis.xadd(ingest, {"c": "x", "s": 1, "m": "{}"})
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    detail = {c["name"]: c for c in response.json()["checks"]}["flush_backlog"]
    assert detail["ok"] is True
    assert "waiting to be flushed, oldest" in detail["detail"], detail
    await resources.redis.xdel(ingest, added)


async def test_readyz_only_requires_enabled_roles(
    settings: dict[str, Any], resources: Resources
) -> None:
    settings["appliance"]["roles"] = ["api"]
    settings["appliance"]["instance"] = "api-only-instance"
    config = Config.model_validate(settings)
    async with AsyncTestClient(app=create_app(config)) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200, response.text


async def test_readyz_fails_on_old_schema(
    settings: dict[str, Any], fresh_database: Callable[[], str], resources: Resources
) -> None:
    settings["postgres"]["dsn"] = fresh_database()
    await beat_others(resources, list(PROGRAMS))
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    schema = next(c for c in response.json()["checks"] if c["name"] == "schema")
    assert schema["ok"] is False
    assert "appliance migrate" in schema["detail"]


async def test_metrics_text(client: Client) -> None:
    await client.get("/livez")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'appliance_http_requests_total{method="GET",route="/livez",status="200"}' in (
        response.text
    )
    assert 'appliance_program_up{program="api"} 1.0' in response.text


async def test_metrics_token(settings: dict[str, Any], resources: Resources) -> None:
    settings["api"] = {"metrics_token": "m-token"}
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        denied = await client.get("/metrics")
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        allowed = await client.get("/metrics", headers={"Authorization": "Bearer m-token"})
        bare = await client.get("/metrics", headers={"Authorization": "m-token"})
        lower = await client.get("/metrics", headers={"Authorization": "bearer m-token"})
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "metrics_token"
    assert denied.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401
    assert allowed.status_code == 200
    assert 'appliance_auth_failures_total{reason="metrics_token"} 2.0' in allowed.text
    assert bare.status_code == 401, "a token without the Bearer scheme is refused"
    assert lower.status_code == 200, "the auth scheme is case-insensitive"


async def test_openapi_schema(client: Client) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["info"]["title"] == "Messaging appliance"
    assert "/livez" in spec["paths"]
    assert "/readyz" in spec["paths"]


async def test_unknown_route_error_shape(client: Client) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "Not Found", "field": None}
    }


async def test_wrong_method_error_shape(client: Client) -> None:
    response = await client.delete("/livez")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_body_over_limit_is_413_before_parsing(
    settings: dict[str, Any], resources: Resources
) -> None:
    settings["api"] = {"max_body_bytes": 2048}
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        response = await client.post("/livez", content=b"x" * 4096)
        small = await client.post("/livez", content=b"x" * 100)
    assert response.status_code == 413
    assert response.json() == {
        "error": {"code": "too_large", "message": "request body exceeds 2048 bytes",
                  "field": "body"}
    }  # fmt: skip
    assert "x-request-id" in response.headers
    assert small.status_code == 405


async def test_request_id_echoed_or_generated(client: Client) -> None:
    given = await client.get("/livez", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = await client.get("/livez", headers={"X-Request-ID": "bad id with spaces"})
    assert made.headers["x-request-id"] != "bad id with spaces"
    assert len(made.headers["x-request-id"]) == 32


async def test_access_log_line_per_request_probes_excluded(client: Client) -> None:
    with structlog.testing.capture_logs() as logs:
        await client.get("/livez")
        await client.get("/nope", headers={"X-Request-ID": "req-1"})
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 1
    line = lines[0]
    assert line["route"] == "unmatched"
    assert line["status"] == 404
    assert line["request_id"] == "req-1"
    assert isinstance(line["duration_ms"], float)


# Fault test: a private Redis that dies while the api runs.


async def test_readyz_503_while_redis_is_down_then_recovers(
    settings: dict[str, Any],
    resources: Resources,
    private_redis: tuple[int, Callable[[], None], Callable[[], None]],
) -> None:
    port, start, kill = private_redis
    settings["redis"]["url"] = f"redis://127.0.0.1:{port}/0"
    settings["redis"]["connect_timeout"] = 0.5
    settings["appliance"]["roles"] = ["api"]
    config = Config.model_validate(settings)
    async with AsyncTestClient(app=create_app(config)) as client:
        assert (await client.get("/readyz")).status_code == 200
        kill()
        down = await client.get("/readyz")
        assert down.status_code == 503
        redis_check = next(c for c in down.json()["checks"] if c["name"] == "redis")
        assert redis_check["ok"] is False
        assert redis_check["latency_ms"] < 2500
        start()
        for _ in range(50):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("/readyz did not recover after Redis came back")


async def test_readyz_503_once_shutdown_began(
    config: Config, resources: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lifespan itself flags the shutdown: /readyz asked while it runs (once the heartbeat
    is told to stop, services and Redis still open) answers 503 with a `shutdown` check."""
    import httpx

    from appliance.api import app as app_module

    start_heartbeat = app_module.start_heartbeat
    during: list[httpx.Response] = []

    async def heartbeat_that_asks(*args: Any) -> asyncio.Task[None]:
        stop: asyncio.Event = args[-1]
        beats = await start_heartbeat(*args)

        async def ask_then_stop() -> None:
            await stop.wait()
            transport = httpx.ASGITransport(app=app)  # no lifespan: the running app's
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                during.append(await client.get("/readyz"))
            await beats

        return asyncio.create_task(ask_then_stop())

    monkeypatch.setattr(app_module, "start_heartbeat", heartbeat_that_asks)
    app = create_app(config)
    async with AsyncTestClient(app=app) as client:
        await beat_others(resources, list(PROGRAMS))
        before = await client.get("/readyz")
    assert before.status_code == 200, before.text
    assert [r.status_code for r in during] == [503], [r.text for r in during]
    assert {"name": "shutdown", "ok": False, "latency_ms": 0.0, "detail": "shutting down"} in (
        during[0].json()["checks"]
    )


def test_appliance_errors_map_to_their_status_and_shape() -> None:
    from appliance.api.errors import handle_appliance_error
    from appliance.storage import StorageError

    response = handle_appliance_error(None, StorageError("put_object", "SlowDown"))  # type: ignore[arg-type]
    assert response.status_code == 503
    assert response.content == {
        "error": {"code": "storage", "message": "S3 put_object failed: SlowDown", "field": None}
    }
