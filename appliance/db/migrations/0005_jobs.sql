-- Job attempts: what pgqueuer does not keep. pgqueuer re-picks a dead worker's job with its own
-- attempt count unchanged, so a job that kills its worker would run forever; the worker counts
-- attempts here, keyed by pgqueuer's job id, before each run.

-- One row per job that has started at least once and is not finished: attempts started, whether
-- one is running now (still true when pgqueuer re-picks the job: the worker running it died),
-- the last error. A job that uses up its attempts is parked: parked_at is set and its payload
-- kept, until `appliance jobs retry` enqueues the payload again as a new job.
CREATE TABLE job_attempts (
    job_id           bigint      PRIMARY KEY,
    entrypoint       text        NOT NULL,
    attempts         integer     NOT NULL CHECK (attempts >= 0),
    running          boolean     NOT NULL,
    worker           text        NOT NULL,           -- instance and pid of the last attempt
    last_error       text,
    first_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz NOT NULL DEFAULT now(),
    parked_at        timestamptz,
    payload          bytea,                          -- kept once parked
    CHECK (parked_at IS NULL OR payload IS NOT NULL)
);

CREATE INDEX job_attempts_parked ON job_attempts (parked_at) WHERE parked_at IS NOT NULL;
