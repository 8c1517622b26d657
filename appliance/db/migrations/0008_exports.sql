-- Conversation exports: one row per requested export, its progress and where its object is.

-- No foreign key to conversations: a purged conversation's exports stay until expire_exports
-- deletes their objects (a cascade would drop the rows and strand the objects).
CREATE TABLE exports (
    id           text        PRIMARY KEY,               -- a ULID
    conversation text        NOT NULL,
    requested_by text        NOT NULL,                  -- the principal
    state        text        NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'running', 'ready', 'failed', 'expired')),
    attempts     integer     NOT NULL DEFAULT 0,        -- runs started (a crashed worker retries)
    head_seq     bigint,                                -- the newest seq when the run started
    messages     bigint      NOT NULL DEFAULT 0,        -- messages written so far
    last_seq     bigint      NOT NULL DEFAULT 0,        -- the last seq written so far
    object_key   text        NOT NULL,
    upload_id    text,                                  -- the multipart upload in progress
    size         bigint,                                -- bytes of the object, once ready
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    expired_at   timestamptz
);

-- expire_exports: the rows past retention whose objects are still there.
CREATE INDEX exports_live_created ON exports (created_at) WHERE state <> 'expired';
