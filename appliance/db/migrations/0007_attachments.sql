-- Attachments: uploads presigned for a conversation, verified by a job before a message may
-- reference them.

-- One row per presigned upload. `size` and `content_type` are what the uploader declared (and
-- what the presigned POST policy makes S3 enforce); the verification job copies the upload to
-- the file key, checks the copy against them and moves the row from pending to verified or
-- rejected, once. Downloads read the file key, which no presigned POST can write. No foreign
-- key to conversations: a conversation's row outlives its deletion (deleted_at), and the purge
-- that removes it must delete the attachments' objects first, which a cascade would not.
CREATE TABLE attachments (
    id           text        PRIMARY KEY,          -- a ULID
    conversation text        NOT NULL,
    uploader     text        NOT NULL,             -- the principal that asked for the upload
    filename     text        NOT NULL,
    content_type text        NOT NULL,
    size         bigint      NOT NULL CHECK (size >= 1),
    upload_key   text        NOT NULL UNIQUE,      -- the S3 key the presigned POST writes
    key          text        NOT NULL UNIQUE,      -- the S3 key of the verified copy
    state        text        NOT NULL DEFAULT 'pending'
                             CHECK (state IN ('pending', 'verified', 'rejected')),
    reason       text,                             -- why it was rejected
    etag         text,                             -- the verified copy's ETag
    created_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,                      -- the last POST .../complete
    verified_at  timestamptz,
    CHECK ((state = 'verified') = (verified_at IS NOT NULL)),
    CHECK ((state = 'rejected') = (reason IS NOT NULL))
);

-- expire_uploads: uploads never verified, oldest first.
CREATE INDEX attachments_unverified ON attachments (created_at) WHERE state <> 'verified';
-- A conversation's attachments (its purge).
CREATE INDEX attachments_conversation ON attachments (conversation);
