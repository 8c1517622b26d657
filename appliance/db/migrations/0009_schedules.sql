-- Schedules and retention: who started a run, and the indexes retention and the scheduler read.

-- A run is started by the scheduler at its tick, or by `appliance retention run` (an operator).
ALTER TABLE schedule_runs
    ADD COLUMN source text NOT NULL DEFAULT 'scheduler' CHECK (source IN ('scheduler', 'cli'));

-- Reconciliation looks at the runs still marked running (a handful at most).
CREATE INDEX schedule_runs_running ON schedule_runs (name, tick) WHERE status = 'running';

-- The last successful run of each schedule (the last-success metric, `appliance status`).
CREATE INDEX schedule_runs_last_ok ON schedule_runs (name, finished_at DESC) WHERE status = 'ok';

-- expire_segments deletes the history rows of whole days: without this, a scan of every row.
CREATE INDEX segment_blocks_history_period ON segment_blocks_history (period);
