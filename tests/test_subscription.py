"""A stream subscription's catch-up and its races, in-process over the real services: a hub
reconnect while catching up, an unsubscribe while catching up, a tail that lost messages, and a
membership removal racing the subscribe. The socket side is the session's own queue, read here
instead of a network socket (test_stream.py covers the wire)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from appliance.api.services import Services, open_services
from appliance.auth.principal import Principal
from appliance.conversations import service
from appliance.errors import Forbidden
from appliance.invalidation import Invalidation, announce
from appliance.realtime.stream import Session, Subscription
from appliance.resources import Resources
from tests.messaging import unique


@pytest.fixture
async def svc(resources: Resources) -> AsyncIterator[Services]:
    async with open_services(resources) as services:
        yield services


def session_for(svc: Services, principal: Principal | None = None) -> Session:
    principal = principal or Principal("key:t", frozenset({"subscribe"}))
    return Session(None, svc, principal, "unused")  # type: ignore[arg-type]


async def append(svc: Services, conversation: str, *seqs: int) -> None:
    """Tail entries as the publish script writes them."""
    for seq in seqs:
        message = json.dumps({"conversation": conversation, "seq": seq, "body": {"n": seq}})
        await svc.redis.xadd(svc.keys.tail(conversation), {"m": message}, id=f"{seq}-0")


def sent(session: Session) -> list[dict[str, Any]]:
    frames = []
    while not session.queue.empty():
        frames.append(json.loads(session.queue.get_nowait()[0]))
    return frames


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [f["message"]["seq"] for f in frames if f["event"] == "message"]


def subscribed(session: Session, conversation: str, last: int) -> Subscription:
    sub = Subscription(session, conversation, last)
    session.subs[conversation] = sub
    return sub


def after_replaying(
    monkeypatch: pytest.MonkeyPatch, session: Session, seq: int, action: Any
) -> None:
    """Run `action` once, right after the catch-up sent message `seq`."""
    original = session.send_replayed

    async def send_replayed(frame: str, at: float | None) -> None:
        await original(frame, at)
        if json.loads(frame)["message"]["seq"] == seq:
            await action()

    monkeypatch.setattr(session, "send_replayed", send_replayed)


async def test_a_hub_reconnect_while_catching_up_reads_the_tail_again(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation = unique("c")
    await append(svc, conversation, 1, 2, 3)
    session = session_for(svc)
    sub = subscribed(session, conversation, 0)

    async def reconnect() -> None:
        # Published while the hub's connection was down: in the tail, its frame lost.
        await append(svc, conversation, 4)
        sub.resync()

    after_replaying(monkeypatch, session, 3, reconnect)
    await sub.catch_up()
    assert seqs(sent(session)) == [1, 2, 3, 4]
    assert sub.live and sub.last == 4


async def test_an_unsubscribe_while_catching_up_stops_the_replay(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation = unique("c")
    await append(svc, conversation, *range(1, 11))
    session = session_for(svc)
    sub = subscribed(session, conversation, 0)

    async def unsubscribe() -> None:
        await session.unsubscribe(conversation, notify=False)

    after_replaying(monkeypatch, session, 3, unsubscribe)
    await sub.catch_up()
    assert seqs(sent(session)) == [1, 2, 3]
    assert not sub.live


async def test_messages_missing_from_the_tail_end_the_subscription(svc: Services) -> None:
    conversation = unique("c")
    await append(svc, conversation, 1, 2, 3, 4, 5, 6)
    await svc.redis.xtrim(
        svc.keys.tail(conversation), minid="4-0", approximate=False
    )  # 1..3 flushed away
    session = session_for(svc)
    sub = subscribed(session, conversation, 1)
    await sub.catch_up()
    frames = sent(session)
    assert seqs(frames) == []  # no silent jump from 1 to 4
    assert [f["event"] for f in frames] == ["error"]
    error = frames[0]["error"]
    assert (error["code"], error["field"], error["conversation"], error["seq"]) == (
        "resume_too_old",
        "since",
        conversation,
        1,
    )
    assert conversation not in session.subs


async def test_a_removal_racing_the_subscribe_is_caught(
    svc: Services, resources: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The member is removed after the subscribe checked access but before the subscription
    is in place (so the invalidation's recheck does not see it): the subscribe checks again."""
    conversation, user = unique("c"), f"user:{unique('u')}"
    async with resources.connection() as conn:
        await service.create(conn, service.ConversationCreate(conversation=conversation), "key:t")
        await service.put_member(conn, conversation, user, "member")
    session = session_for(svc, Principal(user, frozenset()))
    join = svc.hub.join

    async def removed_then_join(channel: str, listener: Any) -> None:
        generation = svc.access.generation
        async with resources.connection() as conn:
            await service.remove_member(conn, conversation, user)
        await announce(svc.redis, svc.keys, Invalidation("member", conversation, user))
        for _ in range(200):  # the hub hears it over Redis
            if svc.access.generation != generation:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the invalidation never arrived")
        await join(channel, listener)

    monkeypatch.setattr(svc.hub, "join", removed_then_join)
    with pytest.raises(Forbidden) as refused:
        await session.subscribe(conversation, None)
    assert refused.value.reason == "not_member"
    assert conversation not in session.subs
    assert [f["event"] for f in sent(session)] == []
    assert svc.hub.channels == 0


async def test_presence_tells_principals_apart_whatever_their_ids_hold(
    svc: Services,
) -> None:
    """`user:a|b` online does not make `user:a` look online: each gets its own events."""
    conversation, user = unique("c"), f"user:{unique('a')}"
    pubsub = svc.redis.pubsub()
    await pubsub.subscribe(svc.keys.channel(conversation))
    await pubsub.get_message(timeout=5)  # the subscribe confirmation
    try:
        await svc.presence.join(conversation, f"{user}|b", "socket1")
        await svc.presence.join(conversation, user, "socket2")
        await svc.presence.leave(conversation, user, "socket2")
        events = []
        for _ in range(3):
            frame = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert frame is not None
            event = json.loads(frame["data"])
            events.append((event["principal"], event["status"]))
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert events == [(f"{user}|b", "online"), (user, "online"), (user, "offline")]
    assert await svc.presence.online(conversation) == [f"{user}|b"]
