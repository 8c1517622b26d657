"""The Celery side of bench/jobs.py: the same no-op, as a Celery app over RabbitMQ.

Started by bench/jobs.py as `celery -A celery_noop worker ...` with this directory on PYTHONPATH.
Everything comes from the environment that bench/jobs.py sets (BENCH_CELERY_*). Like the
appliance's `diagnostics.noop`, a task appends `"<enqueued> <started>"` to a Redis list, in one
round trip, before doing nothing. Two tasks differ only in acknowledgement: `bench.noop_late`
acks after running (at least once, as pgqueuer deletes a job only once it ran) and `bench.noop`
acks on receipt (Celery's default: a worker killed mid-task loses it).
"""

from __future__ import annotations

import os
import time
from functools import cache

import redis
from celery import Celery
from kombu import Exchange, Queue

QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench-jobs")
PREFIX = os.environ.get("BENCH_CELERY_KEY_PREFIX", "bench")
TTL = 300


def make_app(confirm_publish: bool = False) -> Celery:
    """The worker's app, or a client of it; `confirm_publish` makes each send wait until
    RabbitMQ has taken the message (for a persistent one, written it to disk), as pgqueuer's
    enqueue returns after PostgreSQL's commit."""
    made = Celery("bench_jobs", broker=os.environ.get("BENCH_CELERY_BROKER", "amqp://127.0.0.1//"))
    made.conf.update(
        # A durable queue and persistent messages: a RabbitMQ restart keeps queued jobs, as
        # PostgreSQL keeps pgqueuer's.
        task_queues=[Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE, durable=True)],
        task_default_queue=QUEUE,
        task_default_exchange=QUEUE,
        task_default_routing_key=QUEUE,
        task_default_delivery_mode="persistent",
        task_ignore_result=True,  # pgqueuer keeps no results either
        broker_connection_retry_on_startup=True,
        broker_transport_options={"confirm_publish": confirm_publish},
    )
    return made


app = make_app()


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/0"))


def _record(run: str, enqueued: float) -> None:
    started = time.time()
    key = f"{PREFIX}:diag:noop:{run}"  # the appliance's noop_starts(keys, run)
    for attempt in range(5):  # a shared Redis that stalls must not lose a measurement
        try:
            pipe = _redis().pipeline(transaction=False)
            pipe.rpush(key, f"{enqueued!r} {started!r}")
            pipe.expire(key, TTL)
            pipe.execute()
            return
        except redis.RedisError:
            if attempt == 4:
                raise
            time.sleep(0.1)


@app.task(name="bench.noop_late", acks_late=True)
def noop_late(run: str, enqueued: float) -> None:
    _record(run, enqueued)


@app.task(name="bench.noop", acks_late=False)
def noop(run: str, enqueued: float) -> None:
    _record(run, enqueued)
