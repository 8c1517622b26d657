-- Messaging core: API keys, conversations and their members, the API activity log.

CREATE TABLE api_keys (
    id                  text        PRIMARY KEY,           -- the <id> of ak_<id>_<secret>
    name                text        NOT NULL UNIQUE,       -- the principal is key:<name>
    secret_hash         bytea       NOT NULL,              -- sha256 of the secret
    previous_hash       bytea,                             -- the secret before the last rotation
    previous_expires_at timestamptz,                       -- ... valid until then
    scopes              text[]      NOT NULL,
    conversation_prefix text,                              -- null: any conversation
    expires_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    rotated_at          timestamptz,
    revoked_at          timestamptz,
    last_used_at        timestamptz,
    CHECK (scopes <@ ARRAY['admin', 'manage', 'publish', 'read', 'subscribe', 'impersonate'])
);

-- A deleted conversation keeps its row (deleted_at set) until its history is purged, so its id
-- cannot be re-created over history that is still in S3 and its seq never restarts.
CREATE TABLE conversations (
    id          text        PRIMARY KEY,
    title       text,
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);

CREATE TABLE conversation_members (
    conversation text        NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    principal    text        NOT NULL,
    role         text        NOT NULL CHECK (role IN ('owner', 'member', 'reader')),
    added_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation, principal)
);

-- "Which conversations is this principal in" (membership listing per user).
CREATE INDEX conversation_members_principal ON conversation_members (principal);

-- Every authenticated request, one partition per month (dropped whole at retention). The DEFAULT
-- partition catches rows for months whose partition is missing, so a late maintenance run never
-- loses a record.
CREATE TABLE api_activity (
    at          timestamptz NOT NULL,
    principal   text        NOT NULL,
    method      text        NOT NULL,
    route       text        NOT NULL,
    status      smallint    NOT NULL,
    duration_ms real        NOT NULL,
    ip          inet,
    request_id  text        NOT NULL
) PARTITION BY RANGE (at);

CREATE TABLE api_activity_default PARTITION OF api_activity DEFAULT;

-- Creates the monthly partition of `parent` holding `month` (named <parent>_yYYYYmMM) if missing.
-- Months are UTC months whatever the session's time zone (the bounds carry their offset).
CREATE FUNCTION appliance_ensure_month_partition(parent regclass, month date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    first date := date_trunc('month', month)::date;
    part  text := format('%s_y%sm%s', parent::text, to_char(first, 'YYYY'), to_char(first, 'MM'));
    lo    timestamptz := first::timestamp AT TIME ZONE 'UTC';
    hi    timestamptz := (first + interval '1 month')::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(part) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                       part, parent, lo, hi);
    END IF;
    RETURN part;
END $$;

SELECT appliance_ensure_month_partition('api_activity', (now() AT TIME ZONE 'UTC')::date);
SELECT appliance_ensure_month_partition(
    'api_activity', ((now() AT TIME ZONE 'UTC') + interval '1 month')::date);

CREATE INDEX api_activity_principal ON api_activity (principal, at);
