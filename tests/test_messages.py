"""Publishing and recent history against real Redis and PostgreSQL: seqs, the one-script write
(tail, ingest stream, channel), idempotency, re-seeding, batches, pages and cursors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from litestar.testing import AsyncTestClient

from appliance.api.app import create_app
from appliance.config import Config
from appliance.messages import history
from appliance.messages.blocks import BlockCache
from appliance.messages.history import History
from appliance.redis_keys import shard_of
from appliance.resources import Resources
from tests.messaging import bearer, body, issue_key, unique

Client = AsyncTestClient[Any]


async def conversation_with_key(api: Client, resources: Resources) -> tuple[str, str]:
    key = await issue_key(resources, ["admin"])
    conversation = unique("c")
    created = await api.post(
        "/v1/conversations", json={"conversation": conversation}, headers=bearer(key)
    )
    assert created.status_code == 201, created.text
    return conversation, key


async def publish(api: Client, conversation: str, key: str, **fields: Any) -> dict[str, Any]:
    response = await api.post(
        f"/v1/conversations/{conversation}/messages", json=body(**fields), headers=bearer(key)
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_publish_acks_and_writes_tail_ingest_and_channel(
    api: Client, resources: Resources
) -> None:
    conversation, key = await conversation_with_key(api, resources)
    keys = resources.keys
    pubsub = resources.redis.pubsub()
    await pubsub.subscribe(keys.channel(conversation))
    await pubsub.get_message(timeout=5)  # the subscribe confirmation
    try:
        ack = await publish(api, conversation, key, reply_to=None)
        assert set(ack) == {"conversation", "seq", "id", "ts"}
        assert ack["conversation"] == conversation and ack["seq"] == 1
        assert len(ack["id"]) == 26 and ack["ts"].endswith("Z")
        frame = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert frame is not None
    event = json.loads(frame["data"])
    assert event["event"] == "message"
    message = event["message"]
    assert message == {
        "conversation": conversation,
        "seq": 1,
        "id": ack["id"],
        "ts": ack["ts"],
        "sender": message["sender"],
        "type": "text",
        "body": {"text": "hi"},
    }
    assert message["sender"].startswith("key:")
    tail = await resources.redis.xrange(keys.tail(conversation))
    assert [(entry_id, json.loads(f[b"m"])) for entry_id, f in tail] == [(b"1-0", message)]
    ingest = await resources.redis.xrange(keys.ingest(shard_of(conversation, keys.shards)))
    mine = [f for _, f in ingest if f[b"c"] == conversation.encode()]
    assert len(mine) == 1 and mine[0][b"s"] == b"1" and json.loads(mine[0][b"m"]) == message
    # Every key of the conversation shares its shard's hash tag (Redis Cluster: one slot).
    tag = keys.tag(shard_of(conversation, keys.shards))
    for name in (keys.seq(conversation), keys.tail(conversation), keys.channel(conversation)):
        assert tag in name


async def test_concurrent_publishes_get_gapless_unique_seqs(
    api: Client, resources: Resources
) -> None:
    conversation, key = await conversation_with_key(api, resources)
    acks = await asyncio.gather(*(publish(api, conversation, key) for _ in range(100)))
    assert sorted(a["seq"] for a in acks) == list(range(1, 101))
    tail = await resources.redis.xrange(resources.keys.tail(conversation))
    assert [json.loads(f[b"m"])["seq"] for _, f in tail] == list(range(1, 101))


async def test_a_missing_counter_is_reseeded_from_the_tail(
    api: Client, resources: Resources
) -> None:
    conversation, key = await conversation_with_key(api, resources)
    for _ in range(3):
        await publish(api, conversation, key)
    await resources.redis.delete(resources.keys.seq(conversation))
    assert (await publish(api, conversation, key))["seq"] == 4
    assert await resources.redis.get(resources.keys.seq(conversation)) == b"4"


async def test_reseeding_survives_a_trimmed_tail(api: Client, resources: Resources) -> None:
    """The newest entries may be trimmed away (flushed to segments): the stream's last generated
    id still holds the top seq, so the next publish neither fails nor reuses a seq."""
    conversation, key = await conversation_with_key(api, resources)
    for _ in range(3):
        await publish(api, conversation, key)
    keys, redis = resources.keys, resources.redis
    await redis.xtrim(keys.tail(conversation), maxlen=0, approximate=False)
    await redis.delete(keys.seq(conversation))
    path = f"/v1/conversations/{conversation}/messages"
    # What a subscribe reports as the head, from the empty tail's last generated id.
    reader = History(redis, keys, resources.connection, BlockCache(resources.storage, 0))
    assert await reader.head(conversation) == 3
    assert (await publish(api, conversation, key))["seq"] == 4
    assert [entry_id for entry_id, _ in await redis.xrange(keys.tail(conversation))] == [b"4-0"]
    # A refused publish (reply_to beyond the head) re-seeds nothing half-way either.
    await redis.delete(keys.seq(conversation))
    refused = await api.post(path, json=body(reply_to=9), headers=bearer(key))
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "reply_to"
    assert await redis.get(keys.seq(conversation)) is None
    assert (await publish(api, conversation, key))["seq"] == 5


async def test_without_counter_and_tail_seqs_go_on_after_the_indexed_head(
    api: Client, resources: Resources
) -> None:
    """Redis lost a conversation (counter and tail gone) whose history was flushed up to seq 7:
    the next publish is 8, never 1 again; a refused publish seeds nothing; a conversation with
    nothing indexed starts at 1."""
    conversation, key = await conversation_with_key(api, resources)
    fresh, _ = await conversation_with_key(api, resources)
    async with resources.connection() as conn:
        await conn.execute(
            "INSERT INTO segment_heads (conversation, flushed_seq) VALUES (%s, 7)", (conversation,)
        )
    keys, redis = resources.keys, resources.redis
    path = f"/v1/conversations/{conversation}/messages"
    refused = await api.post(path, json=body(reply_to=8), headers=bearer(key))
    assert refused.status_code == 400, refused.text
    assert "at most 7" in refused.json()["error"]["message"]
    assert await redis.exists(keys.seq(conversation), keys.tail(conversation)) == 0
    assert (await publish(api, conversation, key, reply_to=7))["seq"] == 8
    assert (await publish(api, conversation, key))["seq"] == 9
    assert (await publish(api, fresh, key))["seq"] == 1


async def test_before_zero_is_an_empty_page(api: Client, resources: Resources) -> None:
    conversation, key = await conversation_with_key(api, resources)
    await publish(api, conversation, key)
    path = f"/v1/conversations/{conversation}/messages"
    empty = {"messages": [], "next_cursor": None, "prev_cursor": None}
    cursor = "YjA"  # base64url of "b0": continue before seq 0
    for query in ("before=0", f"cursor={cursor}"):
        response = await api.get(f"{path}?{query}", headers=bearer(key))
        assert response.status_code == 200, (query, response.text)
        assert response.json() == empty


async def test_batch_is_ordered_and_acked_in_order(api: Client, resources: Resources) -> None:
    conversation, key = await conversation_with_key(api, resources)
    await publish(api, conversation, key)
    messages = [body(body={"n": i}) for i in range(5)]
    response = await api.post(
        f"/v1/conversations/{conversation}/messages/batch",
        json={"messages": messages},
        headers=bearer(key),
    )
    assert response.status_code == 201
    acks = response.json()["messages"]
    assert [a["seq"] for a in acks] == [2, 3, 4, 5, 6]
    page = (await api.get(f"/v1/conversations/{conversation}/messages?after=1",
                          headers=bearer(key))).json()  # fmt: skip
    assert [m["body"]["n"] for m in page["messages"]] == [0, 1, 2, 3, 4]


async def test_a_rejected_batch_writes_nothing(api: Client, resources: Resources) -> None:
    conversation, key = await conversation_with_key(api, resources)
    response = await api.post(
        f"/v1/conversations/{conversation}/messages/batch",
        json={"messages": [body(), body(reply_to=99)]},
        headers=bearer(key),
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "messages[1].reply_to"
    assert await resources.redis.xlen(resources.keys.tail(conversation)) == 0
    assert (await publish(api, conversation, key))["seq"] == 1


async def test_idempotency_key_replays_and_conflicts(api: Client, resources: Resources) -> None:
    conversation, key = await conversation_with_key(api, resources)
    path = f"/v1/conversations/{conversation}/messages"
    headers = bearer(key, **{"Idempotency-Key": "order-77"})
    first = await api.post(path, json=body(), headers=headers)
    again = await api.post(path, json=body(), headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == first.json()
    other = await api.post(path, json=body(body={"different": True}), headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["field"] == "Idempotency-Key"
    assert await resources.redis.xlen(resources.keys.tail(conversation)) == 1
    stored = await resources.redis.get(resources.keys.seq(conversation))
    assert stored == b"1"
    message = (await api.get(f"{path}/1", headers=bearer(key))).json()
    assert message["idempotency_key"] == "order-77"


async def test_idempotency_keys_of_principals_never_run_into_each_other(
    api: Client, resources: Resources
) -> None:
    """`user:a` with Idempotency-Key `b:x` and `user:a:b` with `x` are two publishes, not a
    replay (or a 409) of one another, though both pairs join to `user:a:b:x`."""
    conversation, admin = await conversation_with_key(api, resources)
    user = unique("user:u")
    for member in (user, f"{user}:b"):
        added = await api.put(
            f"/v1/conversations/{conversation}/members/{member}",
            json={"role": "member"},
            headers=bearer(admin),
        )
        assert added.status_code == 200, added.text
    agent = await issue_key(resources, ["impersonate"])
    path = f"/v1/conversations/{conversation}/messages"
    first = await api.post(
        path,
        json=body(),
        headers=bearer(agent, **{"X-On-Behalf-Of": user, "Idempotency-Key": "b:x"}),
    )
    second = await api.post(
        path,
        json=body(body={"other": 1}),
        headers=bearer(agent, **{"X-On-Behalf-Of": f"{user}:b", "Idempotency-Key": "x"}),
    )
    assert (first.status_code, second.status_code) == (201, 201), second.text
    assert [first.json()["seq"], second.json()["seq"]] == [1, 2]


async def test_idempotency_window_is_configurable(
    settings: dict[str, Any], resources: Resources
) -> None:
    """The window is the idempotency record's TTL: read from Redis, not waited out (a window
    short enough to wait for would make "a repeat within it" a race on a loaded machine)."""
    settings["messages"] = {"idempotency_window": 30.0}
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        conversation, key = await conversation_with_key(client, resources)
        path = f"/v1/conversations/{conversation}/messages"
        headers = bearer(key, **{"Idempotency-Key": "k"})
        assert (await client.post(path, json=body(), headers=headers)).json()["seq"] == 1
        sender = (await client.get(f"{path}/1", headers=bearer(key))).json()["sender"]
        record = resources.keys.idempotency(conversation, sender, "k")
        assert 1000 < await resources.redis.pttl(record) <= 30_000  # not the default day
        again = await client.post(path, json=body(), headers=headers)
        assert again.status_code == 200 and again.json()["seq"] == 1  # within the window
        await resources.redis.pexpire(record, 1)  # the window ends
        deadline = asyncio.get_running_loop().time() + 10
        while await resources.redis.exists(record):
            assert asyncio.get_running_loop().time() < deadline, "the record never expired"
            await asyncio.sleep(0.01)
        later = await client.post(path, json=body(), headers=headers)
        assert later.status_code == 201 and later.json()["seq"] == 2


async def test_history_pages_newest_first_with_cursors(api: Client, resources: Resources) -> None:
    conversation, key = await conversation_with_key(api, resources)
    response = await api.post(
        f"/v1/conversations/{conversation}/messages/batch",
        json={"messages": [body(body={"n": i}) for i in range(1, 26)]},
        headers=bearer(key),
    )
    assert response.status_code == 201
    path = f"/v1/conversations/{conversation}/messages"
    seen: list[int] = []
    page = (await api.get(f"{path}?limit=10", headers=bearer(key))).json()
    assert set(page) == {"messages", "next_cursor", "prev_cursor"}
    while True:
        seen += [m["seq"] for m in page["messages"]]
        if page["next_cursor"] is None:
            break
        assert len(seen) < 25, seen  # a cursor that never ends
        page = (await api.get(f"{path}?limit=10&cursor={page['next_cursor']}",
                              headers=bearer(key))).json()  # fmt: skip
    assert seen == list(range(25, 0, -1))
    # Forward from a point, oldest first; prev_cursor turns around.
    forward = (await api.get(f"{path}?after=20&limit=3", headers=bearer(key))).json()
    assert [m["seq"] for m in forward["messages"]] == [21, 22, 23]
    back = (await api.get(f"{path}?cursor={forward['prev_cursor']}&limit=3",
                          headers=bearer(key))).json()  # fmt: skip
    assert [m["seq"] for m in back["messages"]] == [20, 19, 18]
    before = (await api.get(f"{path}?before=3", headers=bearer(key))).json()
    assert [m["seq"] for m in before["messages"]] == [2, 1] and before["next_cursor"] is None
    one = await api.get(f"{path}/7", headers=bearer(key))
    assert one.status_code == 200 and one.json()["body"] == {"n": 7}
    missing = await api.get(f"{path}/99", headers=bearer(key))
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "seq"
    empty = (await api.get(f"{path}?after=25", headers=bearer(key))).json()
    assert empty == {"messages": [], "next_cursor": None, "prev_cursor": None}


async def test_history_pages_forward_to_the_end_by_their_cursors(
    api: Client, resources: Resources
) -> None:
    """Oldest first from `after`, then by each page's `next_cursor`: every cursor is the one
    for its page's edge, and the pages chain to the head with no gap and no duplicate."""
    conversation, key = await conversation_with_key(api, resources)
    response = await api.post(
        f"/v1/conversations/{conversation}/messages/batch",
        json={"messages": [body(body={"n": i}) for i in range(1, 26)]},
        headers=bearer(key),
    )
    assert response.status_code == 201
    path = f"/v1/conversations/{conversation}/messages"
    for start, query in ((0, "after=0"), (0, f"cursor={history.encode_cursor('after', 0)}"),
                         (7, "after=7")):  # fmt: skip
        pages: list[list[int]] = []
        url = f"{path}?{query}&limit=10"
        while True:
            page = (await api.get(url, headers=bearer(key))).json()
            seqs = [m["seq"] for m in page["messages"]]
            assert [m["body"]["n"] for m in page["messages"]] == seqs
            pages.append(seqs)
            assert page["prev_cursor"] == history.encode_cursor("before", seqs[0])
            if len(seqs) < 10:
                assert page["next_cursor"] is None, (query, pages)
                break
            assert page["next_cursor"] == history.encode_cursor("after", seqs[-1]), (query, pages)
            assert len(pages) < 10, pages  # a cursor that never ends
            url = f"{path}?cursor={page['next_cursor']}&limit=10"
        assert [seq for seqs in pages for seq in seqs] == list(range(start + 1, 26)), pages
        assert all(len(seqs) == 10 for seqs in pages[:-1]), pages
    # A last page that ends exactly at the head still points on; the page after it is empty.
    page = (await api.get(f"{path}?after=15&limit=10", headers=bearer(key))).json()
    assert [m["seq"] for m in page["messages"]] == list(range(16, 26))
    assert page["next_cursor"] == history.encode_cursor("after", 25)
    last = (await api.get(f"{path}?cursor={page['next_cursor']}", headers=bearer(key))).json()
    assert last == {"messages": [], "next_cursor": None, "prev_cursor": None}


async def test_deleting_a_conversation_makes_history_unreadable_everywhere_at_once(
    config: Config, resources: Resources
) -> None:
    async with (
        AsyncTestClient(app=create_app(config)) as one,
        AsyncTestClient(app=create_app(config)) as two,
    ):
        conversation, key = await conversation_with_key(one, resources)
        await publish(one, conversation, key)
        path = f"/v1/conversations/{conversation}/messages"
        assert (await two.get(path, headers=bearer(key))).status_code == 200  # cached on two
        assert (await one.delete(f"/v1/conversations/{conversation}",
                                 headers=bearer(key))).status_code == 204  # fmt: skip
        assert (await one.get(path, headers=bearer(key))).status_code == 404
        deadline = asyncio.get_running_loop().time() + 1.0
        while (await two.get(path, headers=bearer(key))).status_code != 404:
            assert asyncio.get_running_loop().time() < deadline, "two still serves history"
            await asyncio.sleep(0.02)
        recreate = await one.post(
            "/v1/conversations", json={"conversation": conversation}, headers=bearer(key)
        )
        assert recreate.status_code == 409


async def test_publish_metrics_count(api: Client, resources: Resources) -> None:
    conversation, key = await conversation_with_key(api, resources)
    await publish(api, conversation, key)
    text = (await api.get("/metrics")).text
    assert 'appliance_messages_published_total{mode="single"}' in text
    route = "/v1/conversations/{conversation}/messages"
    assert f'appliance_http_request_duration_seconds_count{{method="POST",route="{route}"}}' in text


async def test_authenticated_requests_land_in_the_activity_log(
    settings: dict[str, Any], resources: Resources
) -> None:
    settings["activity"] = {"flush_interval": 0.1}
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        conversation, key = await conversation_with_key(client, resources)
        sent = await client.post(
            f"/v1/conversations/{conversation}/messages",
            json=body(),
            headers=bearer(key, **{"X-Request-ID": "req-activity-1"}),
        )
        assert sent.status_code == 201
        principal = (await client.get(f"/v1/conversations/{conversation}/messages/1",
                                      headers=bearer(key))).json()["sender"]  # fmt: skip
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with resources.connection() as conn:
                cur = await conn.execute(
                    "SELECT method, route, status, request_id, duration_ms >= 0"
                    " FROM api_activity WHERE principal = %s ORDER BY at",
                    (principal,),
                )
                rows = await cur.fetchall()
            if len(rows) >= 3:
                break
            assert asyncio.get_running_loop().time() < deadline, rows
            await asyncio.sleep(0.05)
    assert rows[1] == (
        "POST", "/v1/conversations/{conversation}/messages", 201, "req-activity-1", True
    )  # fmt: skip
    assert rows[0][:3] == ("POST", "/v1/conversations", 201)


async def test_an_impersonated_request_is_logged_as_the_user_via_the_key(
    settings: dict[str, Any], resources: Resources
) -> None:
    settings["activity"] = {"flush_interval": 0.1}
    user = f"user:{unique('alice')}"
    name = unique("bridge")
    impersonator = await issue_key(resources, ["impersonate"], name=name)
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        admin = await issue_key(resources, ["admin"])
        conversation = unique("c")
        created = await client.post(
            "/v1/conversations",
            json={"conversation": conversation, "members": [{"principal": user, "role": "member"}]},
            headers=bearer(admin),
        )
        assert created.status_code == 201, created.text
        sent = await client.post(
            f"/v1/conversations/{conversation}/messages",
            json=body(),
            headers=bearer(impersonator, **{"X-On-Behalf-Of": user}),
        )
        assert sent.status_code == 201, sent.text
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with resources.connection() as conn:
                cur = await conn.execute(
                    "SELECT via, route, status FROM api_activity WHERE principal = %s", (user,)
                )
                rows = await cur.fetchall()
            if rows:
                break
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    assert rows == [(f"key:{name}", "/v1/conversations/{conversation}/messages", 201)]


async def test_a_query_parameter_a_route_does_not_take_is_400_naming_it(
    api: Client, resources: Resources
) -> None:
    """litestar ignores undeclared query parameters: `?befor=9` would be a silent 200 of the
    newest page. Every route refuses them, naming the parameter (and what the route takes)."""
    conversation, key = await conversation_with_key(api, resources)
    path = f"/v1/conversations/{conversation}/messages"
    for query, field in (("befor=9", "befor"), ("limit=5&x=1", "x"), ("=", "query")):
        refused = await api.get(f"{path}?{query}", headers=bearer(key))
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["field"]) == ("invalid", field)
        assert "(it takes after, before, cursor, limit)" in error["message"]
    other = await api.get(f"/v1/conversations/{conversation}?page=2", headers=bearer(key))
    assert other.status_code == 400 and other.json()["error"]["field"] == "page", other.text
    assert (await api.get(f"{path}?limit=5", headers=bearer(key))).status_code == 200
