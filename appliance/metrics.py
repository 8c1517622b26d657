"""Prometheus metrics shared by all four programs (prometheus-client multiprocess mode).

Each program writes its samples into `PROMETHEUS_MULTIPROC_DIR` (under `[appliance] run_dir`);
the api's `/metrics` merges them, so one endpoint serves the whole container. The variable must be
set before prometheus_client is imported: `appliance run` and start.sh set it (see `multiproc_dir`).
"""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from appliance.errors import Refused

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def multiproc_dir(run_dir: str) -> Path:
    return Path(run_dir) / "metrics"


HTTP_REQUESTS = Counter(
    "appliance_http_requests_total", "HTTP requests", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "appliance_http_request_duration_seconds",
    "HTTP request latency",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PROGRAM_UP = Gauge(
    "appliance_program_up", "1 while the program runs", ["program"], multiprocess_mode="livemax"
)
PROGRAM_RSS = Gauge(
    "appliance_process_resident_memory_bytes",
    "Resident memory of the program's processes",
    ["program"],
    multiprocess_mode="livesum",
)
PROGRAM_CPU = Gauge(
    "appliance_process_cpu_seconds",
    "CPU seconds used by the program's live processes",
    ["program"],
    multiprocess_mode="livesum",
)
HEARTBEATS = Counter("appliance_heartbeats_total", "Heartbeats written", ["program"])
# Jobs (programs/worker.py, appliance/job_attempts.py). An attempt ends as ok, error, timeout,
# lost (its worker died: counted when the job is picked again) or requeued (cut off by the drain
# deadline, enqueued again); a failed attempt is then retried or parked (out of attempts).
JOBS = Counter("appliance_jobs_total", "Job attempts by how they ended", ["entrypoint", "status"])
JOB_ATTEMPTS = Counter("appliance_job_attempts_total", "Job attempts started", ["entrypoint"])
JOB_FAILURES = Counter(
    "appliance_job_failures_total",
    "Failed attempts by what followed: retried after a back-off, or parked",
    ["entrypoint", "action"],
)
JOB_DURATION = Histogram(
    "appliance_job_duration_seconds",
    "Job run time",
    ["entrypoint"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
)
JOB_QUEUE = Gauge(
    "appliance_job_queue_depth",
    "Jobs by entrypoint and status (queued, running, parked), counted by the worker",
    ["entrypoint", "status"],
    multiprocess_mode="livemax",
)
SCHEDULE_RUNS = Counter("appliance_schedule_runs_total", "Schedule runs", ["schedule", "status"])
SCHEDULE_DURATION = Histogram(
    "appliance_schedule_duration_seconds",
    "Schedule run time",
    ["schedule"],
    buckets=(0.01, 0.1, 1, 10, 60, 600),
)
RETENTION_DELETED = Counter(
    "appliance_retention_deleted_total", "Rows or objects deleted by retention", ["kind"]
)
# Unix time of each schedule's last successful run in any container (read from schedule_runs at
# scheduler start, then set by each run): alert on `time() - this` past a few periods.
SCHEDULE_LAST_SUCCESS = Gauge(
    "appliance_schedule_last_success_timestamp_seconds",
    "When the schedule last finished ok",
    ["schedule"],
    multiprocess_mode="max",
)
S3_ERRORS = Counter("appliance_s3_errors_total", "S3 errors", ["operation"])

# The history tier: flushes, segments, the ingest backlog (per shard, set by its owner; 0 where
# a flusher no longer owns the shard, so livemax shows the owner's figure), history reads.
FLUSH_DURATION = Histogram(
    "appliance_flush_duration_seconds",
    "One cut: build, PUT, index, acknowledge and trim",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FLUSH_ERRORS = Counter(
    "appliance_flush_errors_total", "Flush steps that failed (and are retried)", ["dependency"]
)
SEGMENT_BYTES = Counter("appliance_segment_bytes_total", "Segment bytes written", ["tier"])
SEGMENT_RECORDS = Counter("appliance_segment_records_total", "Records written", ["tier"])
SEGMENTS = Counter("appliance_segments_total", "Segment objects written", ["tier"])
INGEST_BACKLOG = Gauge(
    "appliance_ingest_backlog",
    "Ingest stream entries not yet flushed, by shard",
    ["shard"],
    multiprocess_mode="livemax",
)
OLDEST_UNFLUSHED = Gauge(
    "appliance_oldest_unflushed_seconds",
    "Age of the oldest ingest entry not yet flushed, by shard",
    ["shard"],
    multiprocess_mode="livemax",
)
SHARDS_OWNED = Gauge(
    "appliance_flusher_shards_owned", "Shards this flusher holds", multiprocess_mode="livesum"
)
INGEST_TRIMMED_UNREAD = Counter(
    "appliance_ingest_trimmed_unread_total",
    "Ingest entries the flusher trimmed before another consumer group (webhooks) acknowledged "
    "them, because that group fell more than [webhooks] max_lag behind: events lost",
    ["group"],
)
WEBHOOK_DISPATCHED = Counter(
    "appliance_webhook_dispatched_total",
    "message.created events the dispatcher read from the ingest streams and emitted",
)
HISTORY_READS = Counter(
    "appliance_history_reads_total", "Messages read for history and resume, by tier", ["tier"]
)
BLOCK_CACHE = Counter(
    "appliance_block_cache_total", "Decoded-block cache lookups by outcome", ["outcome"]
)

MESSAGES_PUBLISHED = Counter(
    "appliance_messages_published_total", "Messages accepted (acknowledged with a seq)", ["mode"]
)
DELIVERY_LATENCY = Histogram(
    "appliance_delivery_latency_seconds",
    "Message server timestamp to WebSocket send",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
WS_CONNECTIONS = Gauge(
    "appliance_websocket_connections", "Open WebSocket connections", multiprocess_mode="livesum"
)
WS_CLOSED = Counter("appliance_websocket_closed_total", "WebSockets closed by reason", ["reason"])
AUTH_FAILURES = Counter("appliance_auth_failures_total", "401s and 403s by reason", ["reason"])
RATE_LIMITED = Counter("appliance_rate_limited_total", "Requests refused with 429", ["route"])
ACTIVITY_RECORDS = Counter(
    "appliance_activity_records_total", "API activity records by outcome", ["outcome"]
)
STALE_SERVED = Counter(
    "appliance_cache_stale_served_total",
    "Cached keys and grants served past their TTL while PostgreSQL could not be asked",
    ["cache"],
)
# Webhook delivery attempts by outcome (appliance/webhooks/client.py Outcome, or dropped: the
# endpoint was deleted or disabled before the attempt), and how long an attempt took.
WEBHOOK_DELIVERIES = Counter(
    "appliance_webhook_deliveries_total", "Webhook delivery attempts by outcome", ["outcome"]
)
WEBHOOK_DURATION = Histogram(
    "appliance_webhook_delivery_duration_seconds",
    "Webhook delivery attempt time (resolve, connect, send, read the answer)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# Attachment uploads the verification job settled, by outcome (verified or rejected).
ATTACHMENT_CHECKS = Counter(
    "appliance_attachment_checks_total", "Attachment uploads verified or rejected", ["outcome"]
)


def count_refused(error: Exception) -> None:
    """Count a 401 or 403 (an appliance Refused) by its reason; any other error is not one."""
    if isinstance(error, Refused):
        AUTH_FAILURES.labels(error.reason).inc()


def sample_process(program: str) -> None:
    """Record this process's RSS and CPU time (called with each heartbeat)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    PROGRAM_CPU.labels(program).set(usage.ru_utime + usage.ru_stime)
    PROGRAM_RSS.labels(program).set(rss_bytes())


def rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        # Not Linux: peak RSS is the best the standard library offers (kilobytes on Linux/BSD).
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return pages * os.sysconf("SC_PAGE_SIZE")


def _reap_dead(directory: Path) -> None:
    """Drop live-gauge files of processes that died without cleaning up (kill -9)."""
    for entry in directory.iterdir():
        match = _LIVE_FILE.match(entry.name)
        if not match:
            continue
        pid = int(match[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, str(directory))
        except PermissionError:
            continue


def render() -> bytes:
    """Prometheus text for the whole container (or this process alone outside multiprocess mode)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return generate_latest()
    _reap_dead(Path(directory))
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return generate_latest(registry)


def process_exited() -> None:
    """Remove this process's live gauges so they stop counting towards the container."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        multiprocess.mark_process_dead(os.getpid(), directory)
