"""A stream subscription's catch-up and its races, in-process over the real services: a hub
reconnect while catching up, an unsubscribe while catching up, a tail that lost messages, and a
membership removal racing the subscribe. The socket side is the session's own queue, read here
instead of a network socket (test_stream.py covers the wire)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from appliance.api.services import Services, open_services
from appliance.auth.principal import Principal
from appliance.config import Config
from appliance.conversations import service
from appliance.errors import ApplianceError, Forbidden
from appliance.invalidation import Invalidation, announce
from appliance.realtime.presence import Presence
from appliance.realtime.stream import Session, Subscription
from appliance.resources import Resources, open_resources
from tests.messaging import unique


@pytest.fixture
async def svc(resources: Resources) -> AsyncIterator[Services]:
    async with open_services(resources) as services:
        yield services


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


def session_for(svc: Services, principal: Principal | None = None) -> Session:
    principal = principal or Principal("key:t", frozenset({"subscribe"}))
    return Session(None, svc, principal, "unused")  # type: ignore[arg-type]


def message(conversation: str, seq: int, tag: str = "") -> str:
    return json.dumps(
        {"id": f"m{tag}{seq}", "conversation": conversation, "seq": seq, "body": {"n": seq}}
    )


def frame(conversation: str, seq: int, tag: str = "") -> str:
    return '{"event":"message","message":' + message(conversation, seq, tag) + "}"


async def append(svc: Services, conversation: str, *seqs: int, tag: str = "") -> None:
    """Tail entries as the publish script writes them."""
    for seq in seqs:
        entry = {"m": message(conversation, seq, tag)}
        await svc.redis.xadd(svc.keys.tail(conversation), entry, id=f"{seq}-0")


def sent(session: Session) -> list[dict[str, Any]]:
    frames = []
    while session.pending:
        frames.append(json.loads(session.pending.popleft()[0]))
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
        # The hub hears it over Redis.
        await until(lambda: svc.access.generation != generation, "the invalidation")
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


async def test_a_head_below_what_was_sent_after_a_resync_ends_with_seq_reset(
    svc: Services,
) -> None:
    """Redis lost the conversation (counter and tail) and seqs start again: the new 1, 2 would
    look like duplicates of what the socket already has, so the subscription ends, said."""
    conversation = unique("c")
    await append(svc, conversation, 1, 2)  # the tail after the loss: seqs restarted
    session = session_for(svc)
    sub = subscribed(session, conversation, 5)  # it had sent up to 5 before the loss
    sub.live = True
    sub.resync()  # what the hub does on reconnect
    await until(lambda: conversation not in session.subs, "the subscription to end")
    frames = sent(session)
    assert seqs(frames) == []
    assert [f["event"] for f in frames] == ["error"]
    error = frames[0]["error"]
    assert (error["code"], error["conversation"], error["seq"]) == ("seq_reset", conversation, 2)
    assert conversation not in session.subs


async def joined(
    svc: Services, session: Session, conversation: str, since: int | None
) -> Subscription:
    """A subscription as `Session._start` leaves it: the floor (and its message's id) read at the
    join, caught up and live."""
    head = await svc.history.head(conversation)
    sub = subscribed(session, conversation, head if since is None else since)
    sub.floor, sub.floor_id = head, await svc.history.tail_id(conversation, head)
    await sub.catch_up()
    return sub


@pytest.mark.parametrize("since", [None, 0, 3])
async def test_frames_from_before_the_join_dispatched_after_it_are_neither_lost_nor_reset(
    svc: Services, since: int | None
) -> None:
    """This process's hub already listened on the channel for another socket: frames published
    before the head was read reach the new subscription after its catch-up. They are what the
    client has (or did not ask for): dropped, and what follows goes on at the floor."""
    conversation = unique("c")
    await append(svc, conversation, 1, 2, 3, 4, 5)
    session = session_for(svc)
    sub = await joined(svc, session, conversation, since)
    caught_up = seqs(sent(session))
    assert caught_up == ([] if since is None else list(range(since + 1, 6)))
    for seq in (2, 3, 4, 5):  # the frames in flight at the join
        sub.on_frame(seq, None, frame(conversation, seq))
    await append(svc, conversation, 6)
    sub.on_frame(6, None, frame(conversation, 6))
    await until(lambda: not sub.checking or sub.heard == 6, "the check to settle")
    await asyncio.sleep(0.05)  # a wrong reset would be spawned by now
    assert seqs(sent(session)) == [6]
    assert sub.live and sub.last == 6 and conversation in session.subs


@pytest.mark.parametrize("first", [2, 5])
async def test_a_new_message_under_a_seq_below_the_floor_ends_with_seq_reset(
    svc: Services, first: int
) -> None:
    """Redis lost its data after the join, before anything above the floor was heard: seqs
    restart, and the first new frame at or below the floor ends the subscription, said (one at
    the floor by its id, one below it by the tail no longer holding the floor's message)."""
    conversation = unique("c")
    await append(svc, conversation, 1, 2, 3, 4, 5)
    session = session_for(svc)
    sub = await joined(svc, session, conversation, None)
    await svc.redis.delete(svc.keys.tail(conversation))
    await append(svc, conversation, *range(1, first + 1), tag="new")
    sub.on_frame(first, None, frame(conversation, first, tag="new"))
    await until(lambda: conversation not in session.subs, "the subscription to end")
    frames = sent(session)
    assert [f["event"] for f in frames] == ["error"]
    assert (frames[0]["error"]["code"], frames[0]["error"]["seq"]) == ("seq_reset", first)


class Recorder:
    """A hub listener that keeps what it is handed."""

    def __init__(self) -> None:
        self.frames: list[tuple[int | None, str]] = []
        self.arrived = asyncio.Event()

    def on_frame(self, seq: int | None, at: float | None, frame: str) -> None:
        self.frames.append((seq, frame))
        self.arrived.set()

    def resync(self) -> None:
        pass


async def test_frames_the_hub_cannot_read_are_skipped_and_it_reads_on(svc: Services) -> None:
    """The hub is the only feed of every socket of the process: a frame someone else published
    on a conversation's channel (bad JSON, a bad ts, the wrong shape) must not end it."""
    conversation = unique("c")
    channel = svc.keys.channel(conversation)
    recorder = Recorder()
    await svc.hub.join(channel, recorder)
    try:
        for bad in (
            b"not json",
            b'{"event":"message","message":{"seq":1,"ts":"not-a-time"}}',
            b'{"event":"message","message":{"seq":"one","ts":"2026-01-01T00:00:00Z"}}',
        ):
            await svc.redis.publish(channel, bad)
        good = '{"event":"message","message":{"seq":1,"ts":"2026-01-01T00:00:00.000Z"}}'
        await svc.redis.publish(channel, good)
        await asyncio.wait_for(recorder.arrived.wait(), 10)
        assert recorder.frames == [(1, good)]
    finally:
        await svc.hub.leave(channel, recorder)


async def until_time(at: float) -> None:
    """Wait until the wall clock passes `at` (presence expiries are wall-clock scores)."""
    while time.time() <= at:
        await asyncio.sleep(max(0.01, at - time.time()))


async def test_presence_fades_after_its_ttl_without_a_refresh(svc: Services) -> None:
    """A crashed process refreshes nothing: its sockets drop out of the list after the TTL.

    Nothing here depends on how fast the machine is: presence is "expiry score >= now", with
    now read when `online()` is called, so an answer that came back before the refreshed expiry
    must list the user, and one asked for after it must not; the refresh is read as a score."""
    ttl = 2.0
    presence = Presence(svc.redis, svc.keys, ttl=ttl, receipt_ttl=60)
    conversation, user = unique("c"), f"user:{unique('u')}"
    key, member = svc.keys.presence(conversation), f"{user}|socket1"
    await presence.join(conversation, user, "socket1")
    assert await presence.online(conversation) == [user]
    joined = await svc.redis.zscore(key, member)
    assert joined is not None
    await until_time(joined - ttl / 2)
    await presence.refresh([(conversation, user, "socket1")])
    refreshed = await svc.redis.zscore(key, member)
    assert refreshed is not None and refreshed >= joined + ttl / 2  # pushed back
    await until_time(joined)  # past the first expiry
    deadline = refreshed + 30
    while True:
        asked = time.time()
        online = await presence.online(conversation)
        answered = time.time()
        if answered < refreshed:
            assert online == [user], "gone before the refreshed expiry"
        if asked > refreshed:
            assert online == [], "still listed after the refreshed expiry"
        if not online:
            break
        assert answered < deadline, "presence never faded"
        await asyncio.sleep(0.05)


async def test_a_process_applies_its_own_announcement_once(svc: Services) -> None:
    """The hub hears this process's announcements too: they were applied when made, so they
    are skipped there, while another process's are applied."""
    before = svc.access.generation
    await svc.announce(Invalidation("conversation", unique("c")))
    applied_once = svc.access.generation - before
    assert applied_once > 0
    # Another process's event after it on the same channel: once it is applied, the hub has
    # read (and skipped) ours.
    await announce(svc.redis, svc.keys, Invalidation("conversation", unique("c")))
    await until(
        lambda: svc.access.generation - before == 2 * applied_once,
        "the other process's invalidation",
    )
    await asyncio.sleep(0.1)
    assert svc.access.generation - before == 2 * applied_once


# -- limits and broadcasts that must not happen --------------------------------------------------


@pytest.fixture
async def tight(settings: dict[str, Any], migrated: str) -> AsyncIterator[Services]:
    """Services of a process with small realtime limits: 2 subscriptions, a replay of 5."""
    settings["realtime"] = {"max_subscriptions": 2, "max_replay": 5}
    async with (
        open_resources(Config.model_validate(settings), "test") as res,
        open_services(res) as services,
    ):
        yield services


async def conversations(svc: Services, count: int) -> list[str]:
    names = [unique("c") for _ in range(count)]
    async with svc.resources.connection() as conn:
        for name in names:
            await service.create(conn, service.ConversationCreate(conversation=name), "key:t")
    return names


async def test_a_subscription_beyond_max_subscriptions_is_refused(tight: Services) -> None:
    a, b, c = await conversations(tight, 3)
    session = session_for(tight)
    try:
        await session.subscribe(a, None)
        await session.subscribe(b, None)
        with pytest.raises(ApplianceError) as refused:
            await session.subscribe(c, None)
        assert (refused.value.code, refused.value.field) == (
            "too_many_subscriptions",
            "conversation",
        )
        assert "2" in refused.value.message
        assert set(session.subs) == {a, b}
        # A slot freed is a slot to use.
        await session.unsubscribe(a, notify=False)
        await session.subscribe(c, None)
        assert set(session.subs) == {b, c}
    finally:
        for name in list(session.subs):
            await session.unsubscribe(name, notify=False)


async def test_a_resume_beyond_max_replay_is_refused_and_one_within_it_replays(
    tight: Services,
) -> None:
    (conversation,) = await conversations(tight, 1)
    await append(tight, conversation, *range(1, 11))  # head 10; max_replay 5
    session = session_for(tight)
    try:
        await session.subscribe(conversation, 4)  # 6 to replay
        frames = sent(session)
        assert [f["event"] for f in frames] == ["error"], frames
        error = frames[0]["error"]
        assert (error["code"], error["field"], error["conversation"], error["head"]) == (
            "resume_too_old",
            "since",
            conversation,
            10,
        )
        assert conversation not in session.subs
        await session.subscribe(conversation, 5)  # exactly max_replay: replayed
        frames = sent(session)
        assert frames[0] == {"event": "subscribed", "conversation": conversation, "seq": 10}
        assert seqs(frames) == [6, 7, 8, 9, 10]
    finally:
        await session.unsubscribe(conversation, notify=False)


async def channel_events(svc: Services, conversation: str, action: Any) -> list[dict[str, Any]]:
    """Every event published on the conversation's channel while `action()` ran, in order:
    a marker published after it bounds the read, so an extra event cannot go unseen."""
    pubsub = svc.redis.pubsub()
    await pubsub.subscribe(svc.keys.channel(conversation))
    try:
        await asyncio.wait_for(pubsub.get_message(timeout=10), 10)  # the confirmation
        await action()
        await svc.redis.publish(svc.keys.channel(conversation), '{"event":"marker"}')
        events = []
        async with asyncio.timeout(10):
            while True:
                frame = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
                if frame is None:
                    continue
                event = json.loads(frame["data"])
                if event["event"] == "marker":
                    return events
                events.append(event)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_online_is_announced_once_per_principal_and_offline_once_all_left(
    svc: Services,
) -> None:
    """A second socket of a principal, a refresh, and a re-subscribe while another socket is
    still there announce nothing: `online` when the first arrives, `offline` when the last
    leaves, and nothing else."""
    conversation, user, other = unique("c"), f"user:{unique('a')}", f"user:{unique('b')}"
    presence = svc.presence

    async def comings_and_goings() -> None:
        await presence.join(conversation, user, "s1")
        await presence.join(conversation, user, "s2")  # a second socket
        await presence.refresh([(conversation, user, "s1"), (conversation, user, "s2")])
        await presence.leave(conversation, user, "s1")
        await presence.join(conversation, user, "s1")  # a re-subscribe
        await presence.join(conversation, other, "s3")
        await presence.leave(conversation, user, "s1")
        await presence.leave(conversation, user, "s2")
        await presence.join(conversation, user, "s4")  # back after being offline

    events = await channel_events(svc, conversation, comings_and_goings)
    assert [(e["event"], e["principal"], e["status"]) for e in events] == [
        ("presence", user, "online"),
        ("presence", other, "online"),
        ("presence", user, "offline"),
        ("presence", user, "online"),
    ]
    assert all(e["conversation"] == conversation for e in events)
    assert await presence.online(conversation) == sorted([user, other])


async def test_a_receipt_is_broadcast_only_when_its_mark_rises(svc: Services) -> None:
    conversation, user = unique("c"), f"user:{unique('a')}"
    presence = svc.presence
    marks: list[int] = []

    async def receipts() -> None:
        marks.append(await presence.receipt(conversation, user, "read", 2))
        marks.append(await presence.receipt(conversation, user, "read", 1))  # lower
        marks.append(await presence.receipt(conversation, user, "read", 2))  # the same
        marks.append(await presence.receipt(conversation, user, "delivered", 2))  # another kind
        marks.append(await presence.receipt(conversation, user, "read", 3))

    events = await channel_events(svc, conversation, receipts)
    assert marks == [2, 2, 2, 2, 3]
    # Read implies delivered: each rise of read raises delivered with it (one event each);
    # the delivered receipt at 2 raised nothing and said nothing.
    assert [(e["event"], e["principal"], e["type"], e["seq"]) for e in events] == [
        ("receipt", user, "read", 2),
        ("receipt", user, "delivered", 2),
        ("receipt", user, "read", 3),
        ("receipt", user, "delivered", 3),
    ]


async def test_read_implies_delivered(svc: Services) -> None:
    """Raising read to n raises delivered to n in the same script; a delivered mark ahead of
    read stays where it is, and read never runs ahead of delivered."""
    conversation, user, other = unique("c"), f"user:{unique('a')}", f"user:{unique('b')}"
    presence = svc.presence

    async def receipts() -> None:
        assert await presence.receipt(conversation, user, "delivered", 5) == 5
        assert await presence.receipt(conversation, user, "read", 3) == 3  # delivered stays 5
        assert await presence.receipt(conversation, other, "read", 4) == 4  # delivered 0 → 4

    events = await channel_events(svc, conversation, receipts)
    assert [(e["principal"], e["type"], e["seq"]) for e in events] == [
        (user, "delivered", 5),
        (user, "read", 3),
        (other, "read", 4),
        (other, "delivered", 4),
    ]
    marks = {r.principal: (r.delivered, r.read) for r in await presence.receipts(conversation)}
    assert marks == {user: (5, 3), other: (4, 4)}
    assert all(delivered >= read for delivered, read in marks.values())
    # Both hashes carry the receipt TTL, refreshed by a read.
    for kind in ("delivered", "read"):
        assert await svc.redis.pttl(svc.keys.receipts(conversation, kind)) > 0
