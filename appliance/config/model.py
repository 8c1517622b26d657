"""The typed configuration: one frozen model per TOML section.

Every section forbids unknown keys. Secrets are `SecretStr` so they never print by accident; each
secret may instead come from a file (`<key>_file`), which the loader resolves before validation.
Every field here must be documented in config.example.toml (a test enforces it).
"""

from __future__ import annotations

import re
import socket
from typing import Annotated, Literal
from urllib.parse import urlsplit

import psycopg
from croniter import croniter
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

ALGORITHMS: tuple[Literal["RS256", "ES256"], ...] = ("RS256", "ES256")
TokenType = Literal["at+jwt", "bearer", "access-claims", "plain"]  # appliance.auth.oidc
TOKEN_TYPES: tuple[TokenType, ...] = ("at+jwt", "bearer", "access-claims")  # the default
Program = Literal["api", "worker", "flusher", "scheduler"]
PROGRAMS: tuple[Program, ...] = ("api", "worker", "flusher", "scheduler")

Seconds = Annotated[float, Field(gt=0, le=3600)]
LongSeconds = Annotated[float, Field(gt=0, le=366 * 86400)]
# An empty value (e.g. APPLIANCE_S3__SECRET_ACCESS_KEY=) unsets an optional secret, so the
# environment can switch a baked-in config to boto3's default credential chain.
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(lambda v: None if v == "" else v)]
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")


def _valid_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApplianceSection(Section):
    roles: list[Program] = Field(default_factory=lambda: list(PROGRAMS), min_length=1)
    instance: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    run_dir: str = "/tmp/appliance"  # noqa: S108 - runtime sockets and markers, per container
    wait_timeout: Seconds = 60.0
    stop_timeout: Seconds = 20.0
    heartbeat_interval: Seconds = 5.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("roles")
    @classmethod
    def _unique_roles(cls, roles: list[Program]) -> list[Program]:
        if len(set(roles)) != len(roles):
            raise ValueError("roles must not repeat a program")
        return roles


class ApiSection(Section):
    bind: str = "0.0.0.0"  # noqa: S104 - a container listens on all interfaces
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    # Slow clients (docs/operations.md): open connections per api worker (granian's
    # backpressure), seconds to send a request's headers (also an idle keep-alive's life) and
    # seconds a request body may take to arrive (then 408, connection closed).
    max_connections: int = Field(default=8192, ge=64, le=200_000)
    header_timeout: float = Field(default=5.0, ge=1, le=60)
    body_timeout: float = Field(default=10.0, ge=1, le=300)
    check_timeout: Seconds = 2.0
    metrics_token: OptionalSecret = None


class PostgresSection(Section):
    dsn: SecretStr = SecretStr("postgresql://appliance@127.0.0.1:5432/appliance")
    pool_min: int = Field(default=1, ge=0, le=100)
    pool_max: int = Field(default=10, ge=1, le=200)
    connect_timeout: Seconds = 5.0

    @field_validator("dsn")
    @classmethod
    def _dsn_scheme(cls, dsn: SecretStr) -> SecretStr:
        value = dsn.get_secret_value()
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        try:
            params = conninfo_to_dict(value)
        except psycopg.Error:
            # libpq's own message quotes the offending text, which may be the password.
            raise ValueError(
                "is not a valid libpq URL (percent-encode special characters in the password)"
            ) from None
        # libpq parses a port lazily, so `host:notaport` would pass until the first connect.
        ports = str(params.get("port") or "")
        if ports and not all(_valid_port(p) for p in ports.split(",") if p):
            raise ValueError("port must be a number from 1 to 65535")
        return dsn

    @model_validator(mode="after")
    def _pool_bounds(self) -> PostgresSection:
        if self.pool_min > self.pool_max:
            raise ValueError("pool_min must not exceed pool_max")
        return self


class RedisSection(Section):
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    key_prefix: str = "appliance"
    require_persistence: bool = False
    connect_timeout: Seconds = 5.0

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: SecretStr) -> SecretStr:
        value = url.get_secret_value()
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        # The shape redis-py's from_url needs, checked now rather than at the first connect.
        # Messages never quote the URL: it may hold the password.
        try:
            parts = urlsplit(value)
        except ValueError:
            raise ValueError("is not a valid URL (a bracketed IPv6 host must be closed)") from None
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("a unix:// URL needs the socket's path")
            return url
        try:
            port = parts.port
        except ValueError:
            raise ValueError("port must be a number from 1 to 65535") from None
        if port == 0:
            raise ValueError("port must be a number from 1 to 65535")
        db = parts.path.strip("/")
        if db and not (db.isascii() and db.isdigit()):
            raise ValueError("the path must be a database number (redis://host:6379/0)")
        return url

    @field_validator("key_prefix")
    @classmethod
    def _prefix_chars(cls, prefix: str) -> str:
        if not _PREFIX.match(prefix):
            raise ValueError("must be 1-64 characters of A-Z a-z 0-9 _ . : -")
        return prefix


class S3Section(Section):
    endpoint_url: str = ""
    region: str = "us-east-1"
    bucket: str = "appliance"
    path_style: bool = False
    access_key_id: str = ""
    secret_access_key: OptionalSecret = None
    create_bucket: bool = True
    timeout: Seconds = 5.0

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, bucket: str) -> str:
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ValueError("must be a valid S3 bucket name (3-63 of a-z 0-9 . -)")
        return bucket

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, url: str) -> str:
        if url and not url.startswith(("http://", "https://")):
            raise ValueError("must be empty (AWS) or an http:// or https:// URL")
        return url

    @model_validator(mode="after")
    def _keys_pair(self) -> S3Section:
        if bool(self.access_key_id) != (self.secret_access_key is not None):
            raise ValueError(
                "access_key_id and secret_access_key go together (or neither, for the "
                "default credential chain)"
            )
        return self


class WorkerSection(Section):
    # pgqueuer dequeues in batches of half this and needs room for two batches, hence >= 2.
    concurrency: int = Field(default=10, ge=2, le=1000)
    # A dead worker's job is picked again once its heartbeat (sent every heartbeat_timeout / 2)
    # is heartbeat_timeout old, at the next poll: recovery takes about the sum of the two.
    poll_interval: Seconds = 1.0
    job_timeout: Seconds = 300.0
    heartbeat_timeout: Seconds = 5.0
    # Attempts of a job whose entrypoint names no limit of its own, before it is parked as failed.
    max_attempts: int = Field(default=5, ge=1, le=100)
    # Back-off before attempt n+1: retry_delay * 2^(n-1), at most retry_max_delay, times 0.5-1.
    retry_delay: Seconds = 10.0
    retry_max_delay: Seconds = 3600.0


class SegmentsSection(Section):
    shards: int = Field(default=16, ge=1, le=1024)
    # A flusher cuts a segment when its buffered records reach max_bytes (raw) or the oldest has
    # waited max_age seconds, whichever first (defaults measured in docs/benchmarks.md).
    max_bytes: int = Field(default=8 * 1_048_576, ge=65536, le=256 * 1_048_576)
    max_age: Seconds = 60.0
    # Seconds a flusher's shard lease lasts without renewal: a dead flusher's shards are taken
    # over after it. Renewed every lease_ttl / 3.
    lease_ttl: float = Field(default=10.0, ge=2, le=600)
    # Bytes of decoded blocks each api process keeps for history reads (0: no cache).
    cache_bytes: int = Field(default=64 * 1_048_576, ge=0, le=64 * 1_073_741_824)


class AuthSection(Section):
    # Verified keys are cached per api process; revocation and rotation invalidate the cache on
    # every process at once through Redis, so this only bounds staleness when Redis pub/sub is down.
    key_cache_ttl: Seconds = 30.0
    # Seconds between batched `last_used_at` writes (never a write per request).
    last_used_interval: Seconds = 10.0
    # Default seconds a rotated key's old secret keeps working.
    rotate_grace: LongSeconds = 86400.0
    # Seconds a cached membership or conversation lookup may be served (invalidated on change).
    membership_cache_ttl: Seconds = 30.0
    # Seconds past their TTL that cached keys and grants keep serving while PostgreSQL cannot be
    # asked (an outage); invalidations still drop them. 0: never serve past the TTL.
    stale_window: float = Field(default=300.0, ge=0, le=86400)


class OidcSection(Section):
    enabled: bool = False
    issuer: str = ""
    audience: str = ""
    # Default: <issuer>/.well-known/openid-configuration
    discovery_url: str = ""
    algorithms: list[Literal["RS256", "ES256"]] = Field(
        default_factory=lambda: list(ALGORITHMS), min_length=1
    )
    leeway: float = Field(default=30.0, ge=0, le=600)
    user_claim: str = Field(default="sub", min_length=1)
    # Dotted path to a list of roles (Keycloak: "realm_access.roles"); a role named like a scope
    # grants that scope. Empty: users act only through membership.
    roles_claim: str = ""
    jwks_cache_ttl: Seconds = 3600.0
    # An unknown `kid` refetches the JWKS at most this often (a flood of forged kids cannot).
    jwks_min_refresh: Seconds = 10.0
    http_timeout: Seconds = 5.0
    # Which verified JWTs count as access tokens (appliance.auth.oidc.token_kinds); an ID token
    # never does. "plain" also passes an ID token that was issued without a nonce.
    token_types: list[TokenType] = Field(default_factory=lambda: list(TOKEN_TYPES), min_length=1)

    @model_validator(mode="after")
    def _issuer_when_enabled(self) -> OidcSection:
        if self.enabled and not self.issuer.startswith(("http://", "https://")):
            raise ValueError("issuer must be an http(s) URL when oidc is enabled")
        if self.enabled and not self.audience:
            raise ValueError("audience must be set when oidc is enabled")
        return self


class MessagesSection(Section):
    # Encoded size of one message's `body`.
    max_body_bytes: int = Field(default=65536, ge=64, le=16 * 1_048_576)
    max_batch: int = Field(default=500, ge=1, le=5000)
    max_attachments: int = Field(default=20, ge=0, le=100)
    # Seconds an Idempotency-Key is remembered (Redis keeps it with a millisecond PX).
    idempotency_window: Annotated[float, Field(ge=1, le=366 * 86400)] = 900.0
    # Per principal, across all api processes: sustained messages/s and burst.
    rate_per_second: float = Field(default=100.0, gt=0, le=1_000_000)
    rate_burst: int = Field(default=1000, ge=1, le=10_000_000)
    # Newest messages each conversation's Redis tail keeps once they are flushed (older pages
    # come from S3); a record not yet indexed is never trimmed.
    tail_max: int = Field(default=200, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _batch_fits_burst(self) -> MessagesSection:
        # A batch costs one token per message: a bigger batch than the burst could never pass.
        if self.max_batch > self.rate_burst:
            raise ValueError("max_batch must not exceed rate_burst")
        return self


class RealtimeSection(Section):
    # Seconds between server pings on an idle socket; presence is refreshed on the same beat.
    ping_interval: Seconds = 20.0
    # A socket is closed as a slow consumer (code 4008) when this many frames wait for it, or
    # when one send to it has not completed for `stall_timeout` seconds.
    queue_max: int = Field(default=5000, ge=10, le=1_000_000)
    stall_timeout: Seconds = 10.0
    # Seconds a close frame may take to be written (a peer that stopped reading leaves no room
    # for it) before the connection is reset; also bounds closing every socket at shutdown.
    close_timeout: Seconds = 5.0
    max_subscriptions: int = Field(default=100, ge=1, le=10_000)
    # Largest frame a client may send (ops are small JSON); larger ones close the socket 1009.
    max_frame_bytes: int = Field(default=65_536, ge=1024, le=16 * 1_048_576)
    # Open sockets one principal may hold across all api processes (close code 4029 beyond).
    max_sockets_per_principal: int = Field(default=100, ge=1, le=100_000)
    # Messages replayed for one `since` before the socket is told to page history instead.
    max_replay: int = Field(default=5000, ge=1, le=1_000_000)
    # Seconds presence survives without a refresh (a crashed process's sockets fade out).
    presence_ttl: Seconds = 60.0
    # Seconds receipts are kept after their last update.
    receipt_ttl: LongSeconds = 30 * 86400.0

    @model_validator(mode="after")
    def _presence_outlives_a_beat(self) -> RealtimeSection:
        # Presence is refreshed once per ping: a shorter TTL would drop live sockets between.
        if self.presence_ttl <= self.ping_interval:
            raise ValueError("presence_ttl must be longer than ping_interval")
        return self


class ActivitySection(Section):
    enabled: bool = True
    # Days the API activity log is kept; whole months past it are dropped by maintain_partitions.
    keep_days: int = Field(default=90, ge=1, le=3650)
    # Seconds between batched inserts of the API activity log.
    flush_interval: Seconds = 2.0
    # Records held in memory at most; beyond it new records are dropped and counted.
    queue_max: int = Field(default=50_000, ge=100, le=10_000_000)


class WebhooksSection(Section):
    # Seconds one delivery may take in all: connect, send, and read the answer.
    timeout: Seconds = 10.0
    # Bytes of a receiver's answer read at most; the rest is not read.
    max_response_bytes: int = Field(default=65_536, ge=0, le=16 * 1_048_576)
    # Attempts of one delivery (jittered exponential back-off between them) before it fails.
    max_attempts: int = Field(default=8, ge=1, le=100)
    # Seconds before the second attempt; each later wait doubles (at most an hour), jittered.
    retry_delay: Seconds = 30.0
    # Consecutive failed deliveries after which an endpoint is disabled (re-enabled by an admin).
    disable_after: int = Field(default=20, ge=1, le=100_000)
    # Events per delivery at most: message.created is batched per endpoint.
    batch_max: int = Field(default=100, ge=1, le=10_000)
    # Deliver to loopback, private, link-local and other non-public addresses (refused unless
    # true: a receiver URL must not reach into the appliance's own network).
    allow_private: bool = False
    # Seconds the message.created dispatcher may fall behind the flusher: past this, the
    # flusher trims the ingest entries it has not read (counted as lost events), so a dead
    # dispatcher cannot pin Redis memory. Size it against Redis: publish rate x message size.
    max_lag: float = Field(default=600.0, gt=0, le=86_400)


class AttachmentsSection(Section):
    # Largest upload, in bytes.
    max_bytes: int = Field(default=25 * 1_048_576, ge=1, le=5 * 1_073_741_824)
    # Content types an upload may declare; "type/*" matches a whole family.
    content_types: list[str] = Field(
        default_factory=lambda: ["image/*", "audio/*", "video/*", "application/pdf", "text/plain"],
        min_length=1,
    )
    # Seconds a presigned upload stays valid.
    upload_expires: Seconds = 900.0
    # Seconds a presigned download stays valid.
    download_expires: Seconds = 300.0


class ExportsSection(Section):
    # Seconds an export's presigned link stays valid (S3 allows at most 7 days).
    link_expires: float = Field(default=86_400.0, gt=0, le=7 * 86_400)


class Schedule(Section):
    enabled: bool = True
    cron: str

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, expr: str) -> str:
        if not croniter.is_valid(expr):
            raise ValueError("must be a 5-field cron expression (UTC)")
        return expr


class PruneJobLogSchedule(Schedule):
    cron: str = "17 * * * *"
    keep_days: int = Field(default=7, ge=1, le=3650)


class CompactSegmentsSchedule(Schedule):
    cron: str = "15 * * * *"
    # Minutes after a UTC day ends before it is compacted (flushes of that day still in flight).
    grace_minutes: int = Field(default=10, ge=1, le=1440)


class ExpireSegmentsSchedule(Schedule):
    cron: str = "45 * * * *"
    # Days of history kept: older segment objects and index rows are deleted, and conversations
    # deleted longer ago than grace_days are purged. At least a day: a flusher that crashed before
    # acknowledging gets that long to replay its entries before the id may be created again.
    days: int = Field(default=30, ge=1, le=3650)
    grace_days: int = Field(default=1, ge=1, le=3650)


class MaintainPartitionsSchedule(Schedule):
    cron: str = "5 0 * * *"
    # Monthly partitions created ahead of time, counting the current month.
    months_ahead: int = Field(default=2, ge=1, le=24)


class PruneWebhookDeliveriesSchedule(Schedule):
    cron: str = "25 * * * *"
    keep_days: int = Field(default=30, ge=1, le=3650)


class ExpireExportsSchedule(Schedule):
    cron: str = "35 * * * *"
    # Days an export object is kept (its link expires earlier, at exports.link_expires).
    keep_days: int = Field(default=7, ge=1, le=3650)


class ExpireUploadsSchedule(Schedule):
    cron: str = "55 * * * *"
    # Hours after which an upload never verified is deleted.
    max_age_hours: int = Field(default=24, ge=1, le=8760)


class BackupSchedule(Schedule):
    cron: str = "30 3 * * *"
    # Backups kept under backups/; older ones are deleted after a new one is complete.
    keep: int = Field(default=7, ge=1, le=1000)


class ReconcileSchedule(Schedule):
    cron: str = "50 * * * *"


class SchedulesSection(Section):
    prune_job_log: PruneJobLogSchedule = Field(default_factory=PruneJobLogSchedule)
    compact_segments: CompactSegmentsSchedule = Field(default_factory=CompactSegmentsSchedule)
    expire_segments: ExpireSegmentsSchedule = Field(default_factory=ExpireSegmentsSchedule)
    maintain_partitions: MaintainPartitionsSchedule = Field(
        default_factory=MaintainPartitionsSchedule
    )
    prune_webhook_deliveries: PruneWebhookDeliveriesSchedule = Field(
        default_factory=PruneWebhookDeliveriesSchedule
    )
    expire_exports: ExpireExportsSchedule = Field(default_factory=ExpireExportsSchedule)
    expire_uploads: ExpireUploadsSchedule = Field(default_factory=ExpireUploadsSchedule)
    backup: BackupSchedule = Field(default_factory=BackupSchedule)
    reconcile: ReconcileSchedule = Field(default_factory=ReconcileSchedule)


class Config(Section):
    appliance: ApplianceSection = Field(default_factory=ApplianceSection)
    api: ApiSection = Field(default_factory=ApiSection)
    postgres: PostgresSection = Field(default_factory=PostgresSection)
    redis: RedisSection = Field(default_factory=RedisSection)
    s3: S3Section = Field(default_factory=S3Section)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    segments: SegmentsSection = Field(default_factory=SegmentsSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    oidc: OidcSection = Field(default_factory=OidcSection)
    messages: MessagesSection = Field(default_factory=MessagesSection)
    realtime: RealtimeSection = Field(default_factory=RealtimeSection)
    activity: ActivitySection = Field(default_factory=ActivitySection)
    webhooks: WebhooksSection = Field(default_factory=WebhooksSection)
    attachments: AttachmentsSection = Field(default_factory=AttachmentsSection)
    exports: ExportsSection = Field(default_factory=ExportsSection)
    schedules: SchedulesSection = Field(default_factory=SchedulesSection)
