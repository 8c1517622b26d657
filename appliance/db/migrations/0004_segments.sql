-- History tier: shard leases, flushed high-water marks, the block index, compactions.

-- One row per ingest shard (made by the first flusher). A flusher owns a shard while its lease
-- runs; another takes the shard over once the lease has expired.
CREATE TABLE segment_shards (
    shard       integer     PRIMARY KEY CHECK (shard >= 0),
    owner       text,
    lease_until timestamptz NOT NULL DEFAULT '-infinity',
    flushed_at  timestamptz,                      -- when the last cut of this shard was indexed
    cuts        bigint      NOT NULL DEFAULT 0    -- cuts indexed for this shard, ever
);

-- The highest seq of each conversation that is indexed (durable). A flush never indexes a
-- record at or below it, and a conversation whose Redis counter and tail are gone continues
-- after it.
CREATE TABLE segment_heads (
    conversation text   PRIMARY KEY,
    flushed_seq  bigint NOT NULL CHECK (flushed_seq >= 1)
);

-- Where each block of a conversation is: one row per block, in two tiers. Flush rows are
-- short-lived: compaction rewrites a day of them into one history object and drops that day's
-- partition whole. History rows stay until retention. A conversation's rows never overlap in
-- seq, whatever their tier.
CREATE TABLE segment_blocks (
    tier         text        NOT NULL CHECK (tier IN ('flush', 'history')),
    period       date        NOT NULL,   -- UTC day: flush rows, indexed on; history, compacted
    conversation text        NOT NULL,
    first_seq    bigint      NOT NULL,
    last_seq     bigint      NOT NULL,
    object_key   text        NOT NULL,
    byte_offset  bigint      NOT NULL,
    byte_length  integer     NOT NULL,
    records      integer     NOT NULL,
    min_ts       timestamptz NOT NULL,
    max_ts       timestamptz NOT NULL,
    CHECK (first_seq <= last_seq AND records >= 1)
) PARTITION BY LIST (tier);

CREATE TABLE segment_blocks_history PARTITION OF segment_blocks FOR VALUES IN ('history');
CREATE TABLE segment_blocks_flush PARTITION OF segment_blocks FOR VALUES IN ('flush')
    PARTITION BY RANGE (period);
-- Catches flush rows of a day whose partition is missing: nothing is ever refused.
CREATE TABLE segment_blocks_flush_default PARTITION OF segment_blocks_flush DEFAULT;

-- Readers: the blocks of a conversation around a seq.
CREATE INDEX segment_blocks_conversation ON segment_blocks (conversation, first_seq);
-- Compaction and its orphan sweep: the rows of given flush objects.
CREATE INDEX segment_blocks_flush_object ON segment_blocks_flush (object_key);

-- Creates the flush partition of `day` (segment_blocks_flush_dYYYYMMDD) if missing.
CREATE FUNCTION appliance_ensure_flush_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('segment_blocks_flush_d%s', to_char(day, 'YYYYMMDD'));
BEGIN
    IF to_regclass(part) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF segment_blocks_flush FOR VALUES FROM (%L) TO (%L)',
            part, day, day + 1);
    END IF;
    RETURN part;
END $$;

SELECT appliance_ensure_flush_partition((now() AT TIME ZONE 'UTC')::date);
SELECT appliance_ensure_flush_partition((now() AT TIME ZONE 'UTC')::date + 1);

-- One row per compacted day: its history object and what went into it.
CREATE TABLE segment_compactions (
    period       date        PRIMARY KEY,
    object_key   text        NOT NULL,
    blocks       integer     NOT NULL,
    records      bigint      NOT NULL,
    bytes        bigint      NOT NULL,
    flush_objects integer    NOT NULL,
    compacted_at timestamptz NOT NULL DEFAULT now()
);

-- Objects no index row points to any more (compacted flush segments), deleted from S3 after
-- the transaction that let go of them; a crash in between leaves them here for the next run.
CREATE TABLE segment_garbage (
    object_key text        PRIMARY KEY,
    since      timestamptz NOT NULL DEFAULT now()
);
