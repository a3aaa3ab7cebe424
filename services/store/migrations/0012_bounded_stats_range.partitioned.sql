-- Plain PostgreSQL: prediction_stats_1m_range (0009) bounded to its window at plan time.
-- Its raw-row parts (pending minutes, the minutes after materialized_to) took their bounds
-- from rollup_state at run time, so the planner could not prune partitions and planned every
-- daily partition of the table for each part on every call: the dashboard's cost grew with the
-- days stored (2.5x per 10x rows in docs/performance.md) although it reads ~120 rollup rows.
-- Every raw row it needs lies in [p_start, p_end), and those are constants once the function
-- is inlined, so each raw part now also says so: one or two partitions are planned at any size.

-- prediction_stats_1m_raw (0009) restricted to [p_lo, p_hi) as well: p_lo/p_hi are the
-- window (plan-time constants), p_start/p_end the run-time part of it.
CREATE FUNCTION prediction_stats_1m_raw_within(
    p_model text, p_start timestamptz, p_end timestamptz, p_lo timestamptz, p_hi timestamptz)
RETURNS TABLE (model text, version text, bucket timestamptz, predictions bigint,
               avg_latency_ms double precision, p50_latency_ms double precision,
               max_latency_ms real, avg_value double precision)
LANGUAGE sql STABLE
AS $$
  SELECT p.model, p.version,
         date_bin(INTERVAL '1 minute', p.created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
         count(*), avg(p.latency_ms),
         percentile_cont(0.5) WITHIN GROUP (ORDER BY p.latency_ms),
         max(p.latency_ms),
         avg(CASE WHEN jsonb_typeof(p.output -> 'value') = 'number'
                  THEN (p.output -> 'value')::double precision END)
  FROM predictions p
  WHERE p.model = p_model AND p.created_at >= p_start AND p.created_at < p_end
    AND p.created_at >= p_lo AND p.created_at < p_hi
  GROUP BY 1, 2, 3
$$;

CREATE OR REPLACE FUNCTION prediction_stats_1m_range(
    p_model text, p_start timestamptz, p_end timestamptz)
RETURNS TABLE (model text, version text, bucket timestamptz, predictions bigint,
               avg_latency_ms double precision, p50_latency_ms double precision,
               max_latency_ms real, avg_value double precision)
LANGUAGE sql STABLE
AS $$
  WITH b AS (
    -- a: first whole minute; c: end of the whole minutes the rollup holds for this window.
    SELECT a, greatest(a, least(date_bin(INTERVAL '1 minute', p_end, o),
                                (SELECT materialized_to FROM rollup_state))) AS c
    FROM (SELECT TIMESTAMPTZ '2000-01-01 00:00:00+00' AS o) origin,
         LATERAL (SELECT date_bin(INTERVAL '1 minute',
                                  p_start + INTERVAL '1 minute' - INTERVAL '1 microsecond',
                                  o) AS a) first_minute
  ), pending AS (
    SELECT m FROM b, rollup_pending_minutes() AS m WHERE m >= b.a AND m < b.c
  )
  SELECT * FROM (
    SELECT h.* FROM b,
           prediction_stats_1m_raw_within(p_model, p_start, least(b.a, p_end), p_start, p_end) h
    UNION ALL
    SELECT r.model, r.version, r.bucket, r.predictions, r.avg_latency_ms, r.p50_latency_ms,
           r.max_latency_ms, r.avg_value
    FROM b, prediction_rollup_1m r
    WHERE r.model = p_model AND r.bucket >= b.a AND r.bucket < b.c
      AND r.bucket NOT IN (SELECT m FROM pending)
    UNION ALL
    SELECT x.* FROM pending,
           prediction_stats_1m_raw_within(p_model, pending.m, pending.m + INTERVAL '1 minute',
                                          p_start, p_end) x
    UNION ALL
    SELECT t.* FROM b, prediction_stats_1m_raw_within(p_model, b.c, p_end, p_start, p_end) t
  ) s
  ORDER BY 3, 2
$$;
