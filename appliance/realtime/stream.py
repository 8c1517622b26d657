"""The WebSocket `/v1/stream`: subscriptions with resume, replay-then-live, pings, slow consumers.

No gap and no duplicate at the seam: a subscription joins the channel first (frames arriving
from then on are held), then reads what was published after its resume point (History.replay:
segments in S3 for what the tail no longer holds, then the tail), then releases the held frames
with a seq above what it sent. A frame whose seq skips ahead (a frame lost while the hub's
connection was down) sends the subscription back to history for the missing range.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import msgspec
import structlog

from appliance import metrics
from appliance.api.body import parse
from appliance.auth.principal import Principal
from appliance.errors import OUTAGES, ApplianceError, Unavailable, known
from appliance.logthrottle import Throttle

if TYPE_CHECKING:
    from litestar import WebSocket

    from appliance.api.services import Services

log = structlog.get_logger()
# Every socket meets the same outage: one line per window and error type, with the count.
_OUTAGE_LOG = Throttle()


def _outage_log(exc: BaseException) -> None:
    _OUTAGE_LOG(
        log.warning,
        "stream_dependency_unavailable",
        type(exc).__name__,
        error=str(exc),
        type=type(exc).__name__,
    )


CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_SLOW_CONSUMER = 4008  # resubscribe with `since` = the last seq received
CLOSE_TOO_MANY_SOCKETS = 4029  # [realtime] max_sockets_per_principal are open already
CLOSE_TRY_AGAIN = 1013  # a dependency is away: reconnect later
CLOSE_GOING_AWAY = 1001  # the api is stopping: reconnect (to another instance)
CLOSE_TOO_BIG = 1009  # a frame over [realtime] max_frame_bytes, or one granian refused
REPLAY_PAGE = 500
# What a catch-up in the background waits out: Redis, PostgreSQL or S3 away (StorageError).
_RECOVERABLE: tuple[type[Exception], ...] = (*OUTAGES, Unavailable)
REPLAY_AHEAD = 200  # replayed frames queued ahead of the socket at most


class Subscribe(msgspec.Struct, tag="subscribe", tag_field="op", forbid_unknown_fields=True):
    conversation: str
    since: int | None = None


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="op", forbid_unknown_fields=True):
    conversation: str


class Ping(msgspec.Struct, tag="ping", tag_field="op", forbid_unknown_fields=True):
    pass


_decode_op = msgspec.json.Decoder(Subscribe | Unsubscribe | Ping).decode


def error_frame(code: str, message: str, field: str | None = None, **extra: object) -> str:
    error = {"code": code, "message": message, "field": field, **extra}
    return msgspec.json.encode({"event": "error", "error": error}).decode()


def too_big(raw: str | bytes, limit: int) -> bool:
    """More than `limit` bytes (UTF-8 for text), without encoding a text that surely is."""
    if len(raw) > limit:  # a character is at least one byte
        return True
    if isinstance(raw, bytes) or raw.isascii() or len(raw) * 4 <= limit:
        return False
    return len(raw.encode()) > limit


class _MessageId(msgspec.Struct):
    id: str


class _MessageFrame(msgspec.Struct):
    message: _MessageId


_decode_message_frame = msgspec.json.Decoder(_MessageFrame).decode


def _frame_id(frame: str) -> str:
    return _decode_message_frame(frame).message.id


def message_frame(message: bytes) -> str:
    return '{"event":"message","message":' + message.decode() + "}"


class Subscription:
    def __init__(self, session: Session, conversation: str, last: int) -> None:
        self.session = session
        self.conversation = conversation
        self.last = last
        self.live = False
        # A hub reconnect while catching up: frames may have been lost, read the tail once more.
        self.stale = False
        self.held: list[tuple[int, str, float | None]] = []
        self.present = False  # announced online: leaving announces offline
        self.floor = 0  # the head when the channel was joined
        self.floor_id: str | None = None  # the id of message `floor` then (None: not in the tail)
        self.heard = 0  # the last seq heard on the channel
        self.checking = False  # a frame below the floor is being looked into (check_floor)

    @property
    def current(self) -> bool:
        """Still wanted: not unsubscribed (or replaced) and the socket not closing."""
        session = self.session
        return session.closing is None and session.subs.get(self.conversation) is self

    def on_frame(self, seq: int | None, at: float | None, frame: str) -> None:
        if seq is None:  # receipt and presence events
            self.session.send(frame, None)
            return
        if self.heard < self.floor and seq <= self.floor:
            # Nothing at or above the floor heard yet. When this process's hub already listened
            # on the channel (for another socket), frames published before the head was read
            # may still be dispatched after the join: up to and including the floor's own
            # message. Or Redis lost its data since, and this is a new message under an old seq.
            return self.below_floor(seq, frame, at)
        # One script takes a seq and publishes it, so the channel brings seqs in order: one the
        # client has had, at or below one heard before, means Redis lost its data.
        went_back = seq <= self.heard
        self.heard = seq
        if went_back and seq <= self.last:
            self.live = False
            self.session.spawn(self.reset(seq))
        elif not self.live:
            self.held.append((seq, frame, at))
            if len(self.held) > self.session.queue_max:  # live outruns the catch-up
                self.session.slow()
        elif seq == self.last + 1:
            self.last = seq
            self.session.send(frame, at)
        elif seq > self.last + 1:
            self.held.append((seq, frame, at))
            self.resync()

    def below_floor(self, seq: int, frame: str, at: float | None) -> None:
        """A frame at or below the floor before the floor's message was heard: the floor's
        message itself (the same id as at the join) ends the frames from before the join; one
        below it is from before the join only if the tail still holds the floor's message."""
        if seq == self.floor:
            self.heard = seq
            if _frame_id(frame) != self.floor_id:
                self.live = False
                self.session.spawn(self.reset(seq))
                return
        elif not self.checking:
            self.checking = True
            self.session.spawn(self.check_floor())
        if seq > self.last:  # a resume point below the floor: catch-up may still need it
            if self.live and seq == self.last + 1:
                self.last = seq
                self.session.send(frame, at)
            else:
                self.held.append((seq, frame, at))

    async def check_floor(self) -> None:
        """Whether the frame below the floor came from before the join: if Redis lost its data
        since, the tail no longer holds the floor's message (or holds another)."""
        svc = self.session.svc
        try:
            if await svc.history.tail_id(self.conversation, self.floor) == self.floor_id:
                return
            head = await svc.history.head(self.conversation)
        except _RECOVERABLE:
            return  # Redis away: the hub reconnects and resyncs, and the resync decides
        if self.current:
            self.live = False
            await self.reset(head)

    def resync(self) -> None:
        if self.live:
            self.live = False
            self.session.spawn(self.recover())
        else:
            self.stale = True

    async def recover(self) -> None:
        """`catch_up` after a gap or a hub reconnect, retried while Redis (or PostgreSQL and S3,
        for a range the tail no longer holds) is still away (the pool's connections may be stale
        just after a restart): the socket lives on."""
        delay = 0.1
        while self.current:
            try:
                return await self.catch_up(resynced=True)
            except _RECOVERABLE as exc:
                log.warning("stream_catch_up_failed", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def catch_up(self, resynced: bool = False) -> None:
        """Send what history has after `last` (segments, then the tail), then the held frames,
        then go live. Messages no tier holds any more (past retention, or lost with Redis) end
        the subscription with `resume_too_old`, and a head gone below `last` after a resync
        with `seq_reset`: never a silent gap."""
        svc = self.session.svc
        gap = False
        while self.current:
            resynced = resynced or self.stale
            self.stale = False
            while True:
                entries = await svc.history.replay(self.conversation, self.last, REPLAY_PAGE)
                if (entries and entries[0][0] > self.last + 1) or (gap and not entries):
                    return await self.lost()
                if resynced and not entries and not gap:
                    head = await svc.history.head(self.conversation)
                    if head < self.last:
                        return await self.reset(head)
                for seq, message in entries:
                    if not self.current:
                        return
                    self.last = seq
                    await self.session.send_replayed(message_frame(message), None)
                if len(entries) < REPLAY_PAGE:
                    break
            held, self.held = sorted(self.held, key=lambda h: h[0]), []
            gap = False
            for seq, frame, at in held:
                if seq == self.last + 1:
                    self.last = seq
                    await self.session.send_replayed(frame, at)
                elif seq > self.last + 1:
                    gap = True
                    self.held.append((seq, frame, at))
            # Frames held while we waited, or a reconnect meanwhile: one more round.
            if not gap and not self.held and not self.stale:
                self.live = True
                return

    async def lost(self) -> None:
        await self._end(
            "resume_too_old",
            f"messages after seq {self.last} are no longer kept (past retention, or lost): "
            "page the history over HTTP, then resubscribe with a newer since",
            self.last,
        )

    async def reset(self, head: int) -> None:
        """The conversation's head is below what the client has (what was sent, or its resume
        point): Redis lost its data and seqs start again. Frames with those seqs would look like
        duplicates: end the subscription instead."""
        await self._end(
            "seq_reset",
            f"the conversation's seqs restarted below {self.last} (Redis lost data): page the "
            "history over HTTP, then resubscribe",
            head,
        )

    async def _end(self, code: str, message: str, seq: int) -> None:
        if not self.current:
            return
        await self.session.unsubscribe(self.conversation, notify=False)
        self.session.send(
            error_frame(code, message, "since", conversation=self.conversation, seq=seq), None
        )


class Session:
    def __init__(
        self,
        ws: WebSocket[Any, Any, Any],
        svc: Services,
        principal: Principal,
        credential: str,
    ) -> None:
        self.ws = ws
        self.svc = svc
        self.principal = principal
        self.credential = credential
        self.id = uuid.uuid4().hex[:16]
        self.subs: dict[str, Subscription] = {}
        # Frames for the socket, and when the sender began the send it is waiting on.
        self.pending: deque[tuple[str, float | None]] = deque()
        self.ready = asyncio.Event()  # set when a frame is queued for the sender
        self.sending_since: float | None = None
        self.queue_max = svc.config.realtime.queue_max
        self.stall_timeout = svc.config.realtime.stall_timeout
        self.max_frame = svc.config.realtime.max_frame_bytes
        self.peer_code: int | None = None  # the code of the peer's close, once it came
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing: tuple[int, str] | None = None
        self.done = asyncio.Event()
        self.ended = asyncio.Event()  # set by the route once the socket is closed
        self.room = asyncio.Event()  # set by the sender whenever it takes a frame
        self.expirer: asyncio.TimerHandle | None = None

    def send(self, frame: str, at: float | None) -> None:
        """Queue a frame. A socket is a slow consumer once `queue_max` frames wait or its send
        has not completed for `stall_timeout`: a burst that a reading client drains is not."""
        if self.closing is not None:
            return
        since = self.sending_since
        if len(self.pending) >= self.queue_max or (
            since is not None and time.monotonic() - since > self.stall_timeout
        ):
            self.slow()
            return
        self.pending.append((frame, at))
        self.ready.set()

    async def send_replayed(self, frame: str, at: float | None) -> None:
        """A catch-up frame: waits for the socket instead of filling the queue (a long replay
        is not a slow consumer), so live frames and pings never queue behind much of it."""
        ahead = min(REPLAY_AHEAD, self.queue_max // 2)
        while self.closing is None and len(self.pending) >= ahead:
            self.room.clear()
            await self.room.wait()
        self.send(frame, at)

    def slow(self) -> None:
        # Frames still queued are dropped with the socket: the client resumes from the last
        # seq it received, which only it knows.
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer: resubscribe with since=<last seq received>")

    def close(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (code, reason)
            self.done.set()

    def spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if isinstance(known(exc), Unavailable):  # e.g. a recheck that could not ask
            _outage_log(exc)
            self.close(CLOSE_TRY_AGAIN, "unavailable")
        else:
            log.warning("stream_task_failed", error=str(exc))
            self.close(1011, "internal error")

    async def sender(self) -> None:
        send, pending, ready = self.ws.send, self.pending, self.ready
        observe = metrics.DELIVERY_LATENCY.observe
        while True:
            if not pending:
                ready.clear()
                await ready.wait()
                continue
            frame, at = pending.popleft()
            self.room.set()
            self.sending_since = time.monotonic()
            await send({"type": "websocket.send", "text": frame, "bytes": None})
            self.sending_since = None
            if at is not None:
                observe(time.time() - at)

    async def pinger(self) -> None:
        interval = self.svc.config.realtime.ping_interval
        while True:
            await asyncio.sleep(interval)
            self.send('{"event":"ping"}', None)
            entries = [
                (c, self.principal.id, self.id) for c, sub in self.subs.items() if sub.present
            ]
            try:
                await self.svc.slots.renew(self.principal.id, self.id)
                await self.svc.presence.refresh(entries)
                # An unsubscribe while the refresh was out: it may have put the entry back.
                gone = [entry for entry in entries if entry[0] not in self.subs]
                await self.svc.presence.forget(gone)
            except OUTAGES as exc:  # presence fades; the socket lives on
                log.warning("presence_refresh_failed", error=str(exc))

    async def receiver(self) -> None:
        while True:
            event = await self.ws.receive()
            if event["type"] == "websocket.disconnect":
                self.peer_code = event.get("code", 1005)
                self.close(1000, "")
                return
            raw = cast("str | bytes", event.get("text") or event.get("bytes") or b"")
            if too_big(raw, self.max_frame):  # refused unread
                self.close(CLOSE_TOO_BIG, f"frames are at most {self.max_frame} bytes")
                return
            op: Subscribe | Unsubscribe | Ping | None = None
            try:
                op = parse(_decode_op, raw, "op")
                if isinstance(op, Subscribe):
                    await self.subscribe(op.conversation, op.since)
                elif isinstance(op, Unsubscribe):
                    await self.unsubscribe(op.conversation, notify=True)
                else:
                    self.send('{"event":"pong"}', None)
            except Exception as exc:
                error = known(exc)
                if error is None:
                    raise
                if error is not exc:
                    _outage_log(exc)
                metrics.count_refused(error)
                conversation = getattr(op, "conversation", None)
                self.send(
                    error_frame(error.code, error.message, error.field, conversation=conversation),
                    None,
                )

    async def subscribe(self, conversation: str, since: int | None) -> None:
        svc = self.svc
        if conversation in self.subs:
            raise ApplianceError(
                "already subscribed", field="conversation", code="already_subscribed"
            )
        if len(self.subs) >= svc.config.realtime.max_subscriptions:
            raise ApplianceError(
                f"at most {svc.config.realtime.max_subscriptions} subscriptions per socket",
                field="conversation",
                code="too_many_subscriptions",
            )
        generation = svc.access.generation
        await svc.access.require(self.principal, conversation, "subscribe")
        sub = Subscription(self, conversation, 0)
        self.subs[conversation] = sub
        try:
            await self._start(sub, since, generation)
        except Exception:
            if self.subs.get(conversation) is sub:
                await self.unsubscribe(conversation, notify=False)
            raise

    async def _start(self, sub: Subscription, since: int | None, generation: int) -> None:
        svc, conversation = self.svc, sub.conversation
        # Read before joining: every seq the channel brings from the join on is above it. (A
        # client knows of a seq only once it was published, so `since` is never above it.)
        head = sub.floor = await svc.history.head(conversation)
        sub.floor_id = await svc.history.tail_id(conversation, head)
        await svc.hub.join(svc.keys.channel(conversation), sub)
        if svc.access.generation != generation:
            # Access changed while it was checked: from here on a change rechecks this
            # subscription (it is in `subs`), but one that came before must be looked at again.
            await svc.access.require(self.principal, conversation, "subscribe")
        if since is not None and since > head:
            # No seq above the head was handed out, unless Redis lost its data and seqs started
            # again: resuming there would skip, unseen, whatever takes those seqs next.
            sub.last = since
            return await sub.reset(head)
        problem = None
        if since is not None and since < 0:
            problem = error_frame(
                "invalid", "must not be negative", "since", conversation=conversation
            )
        elif since is not None and head - since > svc.config.realtime.max_replay:
            problem = error_frame(
                "resume_too_old",
                "page the history over HTTP, then resubscribe with a newer since",
                "since",
                conversation=conversation,
                head=head,
            )
        if problem is not None:
            await self.unsubscribe(conversation, notify=False)
            self.send(problem, None)
            return
        sub.last = head if since is None else since
        self.send(
            msgspec.json.encode(
                {"event": "subscribed", "conversation": conversation, "seq": head}
            ).decode(),
            None,
        )
        try:
            await svc.presence.join(conversation, self.principal.id, self.id)
            sub.present = True
        except OUTAGES as exc:  # presence is best effort; the messages are not
            log.warning("presence_join_failed", error=str(exc))
        await sub.catch_up()

    async def unsubscribe(self, conversation: str, notify: bool) -> None:
        sub = self.subs.pop(conversation, None)
        if sub is None:
            if notify:
                raise ApplianceError("not subscribed", field="conversation", code="not_subscribed")
            return
        await self.svc.hub.leave(self.svc.keys.channel(conversation), sub)
        try:
            if sub.present:  # a refused subscribe never went online
                await self.svc.presence.leave(conversation, self.principal.id, self.id)
        except OUTAGES as exc:  # the entry fades after presence_ttl
            log.warning("presence_leave_failed", error=str(exc))
        if notify:
            self.send(
                msgspec.json.encode(
                    {"event": "unsubscribed", "conversation": conversation}
                ).decode(),
                None,
            )

    async def recheck(self, conversation: str | None) -> None:
        """After a membership or conversation change: drop what is no longer allowed."""
        for name in [conversation] if conversation else list(self.subs):
            if name in self.subs and not await self.svc.access.allowed(
                self.principal, name, "subscribe"
            ):
                await self.unsubscribe(name, notify=False)
                metrics.AUTH_FAILURES.labels("access_ended").inc()
                self.send(
                    error_frame(
                        "forbidden",
                        "access to this conversation ended",
                        "conversation",
                        conversation=name,
                    ),
                    None,
                )

    async def reauthenticate(self) -> None:
        """After the key changed (rotation, revocation): check it again, and its new expiry."""
        try:
            principal = await self.svc.auth.authenticate(f"Bearer {self.credential}", None, None)
        except ApplianceError as exc:
            if self.closing is not None:
                return  # a concurrent recheck (two changes to the key) closed it already
            metrics.count_refused(exc)
            self.close(CLOSE_UNAUTHORIZED, exc.code)
            return
        self.expire_at(principal.expires_at)

    def expire_at(self, at: float | None) -> None:
        """Close with 4001 when the credential expires (a JWT's exp, a key's expiry, the end of
        a rotated secret's grace): the client reconnects with a fresh one."""
        if self.expirer is not None:
            self.expirer.cancel()
            self.expirer = None
        if at is not None:
            self.expirer = asyncio.get_running_loop().call_at(
                asyncio.get_running_loop().time() + max(0.0, at - time.time()), self._expired
            )

    def _expired(self) -> None:
        metrics.AUTH_FAILURES.labels("credentials_expired").inc()
        self.close(CLOSE_UNAUTHORIZED, "credentials_expired")

    async def run(self) -> None:
        for coro in (self.sender(), self.pinger(), self.receiver()):
            self.spawn(coro)
        self.expire_at(self.principal.expires_at)
        try:
            await self.done.wait()
        finally:
            self.expire_at(None)
            pending = set(self.tasks)
            while pending:
                # Cancel again until done: on Python 3.11 asyncio.wait_for (inside redis-py
                # commands) swallows a cancellation that lands as its inner call completes.
                for task in pending:
                    task.cancel()
                _, pending = await asyncio.wait(pending, timeout=0.1)
            for conversation in list(self.subs):
                try:
                    await self.unsubscribe(conversation, notify=False)
                except Exception as exc:
                    log.warning("stream_cleanup_failed", error=str(exc))
