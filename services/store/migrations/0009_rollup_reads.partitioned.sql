-- Plain PostgreSQL: prediction_stats_1m_range reads the rollup for the whole minutes it holds
-- and aggregates raw rows only for the edges: a partial first or last minute and the minutes
-- after rollup_state.materialized_to. Same columns and numbers as before, cost bounded by the
-- window instead of the table.

-- The former body: per-minute aggregate of raw rows in [p_start, p_end).
CREATE FUNCTION prediction_stats_1m_raw(p_model text, p_start timestamptz, p_end timestamptz)
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
    SELECT h.* FROM b, prediction_stats_1m_raw(p_model, p_start, least(b.a, p_end)) h
    UNION ALL
    SELECT r.model, r.version, r.bucket, r.predictions, r.avg_latency_ms, r.p50_latency_ms,
           r.max_latency_ms, r.avg_value
    FROM b, prediction_rollup_1m r
    WHERE r.model = p_model AND r.bucket >= b.a AND r.bucket < b.c
      AND r.bucket NOT IN (SELECT m FROM pending)
    UNION ALL
    SELECT x.* FROM pending,
           prediction_stats_1m_raw(p_model, pending.m, pending.m + INTERVAL '1 minute') x
    UNION ALL
    SELECT t.* FROM b, prediction_stats_1m_raw(p_model, b.c, p_end) t
  ) s
  ORDER BY 3, 2
$$;

-- uuid7_time is on every lookup by id (and every label): PostgreSQL 17 has it built in, ~30x
-- faster than the text arithmetic of 0001 and equal to the millisecond for every UUIDv7
-- (5x more labels/s). Plain mode only: TimescaleDB's compressed chunks were not matched with
-- it in the PGlite check, so that mode keeps 0001's definition.
DO $$
BEGIN
  IF current_setting('server_version_num')::int >= 170000 THEN
    CREATE OR REPLACE FUNCTION uuid7_time(id uuid) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS 'SELECT uuid_extract_timestamp(id)';
  END IF;
END
$$;
