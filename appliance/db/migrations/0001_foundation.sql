-- Foundation: schedule runs (one row per schedule tick, claimed once across all containers).
CREATE TABLE schedule_runs (
    name        text        NOT NULL,
    tick        timestamptz NOT NULL,
    instance    text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    status      text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'ok', 'failed')),
    counts      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error       text,
    PRIMARY KEY (name, tick)
);

CREATE INDEX schedule_runs_recent ON schedule_runs (name, started_at DESC);
