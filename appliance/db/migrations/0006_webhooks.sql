-- Webhooks: the endpoints an admin registers and the log of every delivery attempt.

-- The secret signs deliveries (HMAC-SHA256), so it is kept as is, not hashed; it is shown once at
-- creation and never returned or logged again.
CREATE TABLE webhook_endpoints (
    id              text        PRIMARY KEY,
    url             text        NOT NULL,
    description     text,
    events          text[]      NOT NULL,
    secret          text        NOT NULL,
    enabled         boolean     NOT NULL DEFAULT true,
    disabled_reason text        CHECK (disabled_reason IN ('admin', 'failures')),
    failures        integer     NOT NULL DEFAULT 0,        -- consecutive failed deliveries
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (events <@ ARRAY['message.created', 'conversation.created', 'conversation.updated',
                           'conversation.deleted', 'member.added', 'member.removed',
                           'export.ready']),
    CHECK (enabled = (disabled_reason IS NULL))
);

-- emit() asks "which enabled endpoints take any of these types" on every emitting transaction.
CREATE INDEX webhook_endpoints_subscribed ON webhook_endpoints USING gin (events) WHERE enabled;

-- One row per delivery attempt, one partition per month (rows deleted past keep_days by the
-- prune_webhook_deliveries schedule). The DEFAULT partition catches months not yet created.
CREATE TABLE webhook_deliveries (
    at          timestamptz NOT NULL,
    endpoint    text        NOT NULL,
    delivery    text        NOT NULL,       -- the Webhook-Id header, the same on every attempt
    attempt     smallint    NOT NULL,
    event_count integer     NOT NULL,
    event_types text[]      NOT NULL,
    outcome     text        NOT NULL,       -- appliance/webhooks/client.py Outcome
    status      smallint,                   -- the receiver's HTTP status, if it answered
    error       text,
    duration_ms real        NOT NULL,
    retry_at    timestamptz                 -- when the next attempt runs; null once final
) PARTITION BY RANGE (at);

CREATE TABLE webhook_deliveries_default PARTITION OF webhook_deliveries DEFAULT;

SELECT appliance_ensure_month_partition('webhook_deliveries', (now() AT TIME ZONE 'UTC')::date);
SELECT appliance_ensure_month_partition(
    'webhook_deliveries', ((now() AT TIME ZONE 'UTC') + interval '1 month')::date);

-- The delivery log of one endpoint, newest first.
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint, at DESC);
-- Retention deletes by age.
CREATE INDEX webhook_deliveries_at ON webhook_deliveries (at);
