-- Per-minute rollup of predictions and their labels, kept by the store in both modes (see
-- services/store/db/rollup.py). GetStats reads it instead of counting raw rows; on plain
-- PostgreSQL prediction_stats_1m_range reads it too (TimescaleDB has its continuous aggregate).
-- Minutes before rollup_state.materialized_to come from here, later ones from raw rows, so a
-- reader sees the same numbers as a raw computation.
CREATE TABLE prediction_rollup_1m (
    model text NOT NULL,
    version text NOT NULL,
    bucket timestamptz NOT NULL,
    predictions bigint NOT NULL,
    labels bigint NOT NULL,
    avg_latency_ms double precision,
    p50_latency_ms double precision,
    max_latency_ms real,
    avg_value double precision,
    last_at timestamptz NOT NULL,
    PRIMARY KEY (model, bucket, version)
);

-- Time ranges whose minutes must be recomputed: every ingest batch adds one in its own
-- transaction, so a refresh that sees the range also sees the rows.
CREATE TABLE rollup_dirty (
    lo timestamptz NOT NULL,
    hi timestamptz NOT NULL
);

-- Labelled-prediction counts not yet folded into the rollup: a label batch adds, in its own
-- transaction, one row per (model, version, minute) it labelled for the first time. Readers add
-- them to the rollup's counts; a refresh folds them in. Cost: the labels, not the tables.
CREATE TABLE rollup_label_delta (
    model text NOT NULL,
    version text NOT NULL,
    bucket timestamptz NOT NULL,
    n bigint NOT NULL
);
CREATE INDEX rollup_label_delta_bucket ON rollup_label_delta (bucket);

CREATE TABLE rollup_state (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    materialized_to timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00'
);
INSERT INTO rollup_state DEFAULT VALUES;

-- Rows stored before this migration: one range, aggregated by the first refresh.
INSERT INTO rollup_dirty (lo, hi)
SELECT min(created_at), max(created_at) + INTERVAL '1 minute' FROM predictions
HAVING count(*) > 0;

-- Minutes before materialized_to whose rollup rows are stale (late rows not yet refreshed):
-- readers aggregate those from raw rows, so every answer equals a raw computation.
CREATE FUNCTION rollup_pending_minutes() RETURNS SETOF timestamptz
LANGUAGE sql STABLE
AS $$
  SELECT DISTINCT m
  FROM rollup_state s, rollup_dirty d,
       generate_series(date_bin(INTERVAL '1 minute', d.lo, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
                       d.hi - INTERVAL '1 microsecond', INTERVAL '1 minute') AS m
  WHERE d.lo < s.materialized_to AND m < s.materialized_to
$$;

-- Label coverage per minute for dashboards (Grafana): the rollup's whole minutes, raw rows
-- after materialized_to. Late rows and labels show after the store's next refresh.
CREATE FUNCTION label_coverage_1m_range(p_model text, p_start timestamptz, p_end timestamptz)
RETURNS TABLE (bucket timestamptz, predictions bigint, labels bigint)
LANGUAGE sql STABLE
AS $$
  SELECT u.bucket, sum(u.predictions)::bigint, sum(u.labels)::bigint
  FROM (
    SELECT r.bucket, r.predictions, r.labels
    FROM prediction_rollup_1m r
    WHERE r.model = p_model
      AND r.bucket >= date_bin(INTERVAL '1 minute', p_start, TIMESTAMPTZ '2000-01-01 00:00:00+00')
      AND r.bucket < least(p_end, (SELECT materialized_to FROM rollup_state))
    UNION ALL
    SELECT date_bin(INTERVAL '1 minute', p.created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
           1, (EXISTS (SELECT 1 FROM labels l WHERE l.prediction_id = p.prediction_id))::int
    FROM predictions p
    WHERE p.model = p_model AND p.created_at < p_end
      AND p.created_at >= greatest(p_start, (SELECT materialized_to FROM rollup_state))
  ) u
  GROUP BY u.bucket
  ORDER BY u.bucket
$$;
