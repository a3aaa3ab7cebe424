-- Plain PostgreSQL: declarative range partitioning by day on created_at. The store creates
-- daily partitions ahead of time (ensure_partitions); the DEFAULT partition catches anything
-- else so an insert is never rejected.

CREATE TABLE predictions (
    prediction_id uuid NOT NULL,
    created_at timestamptz NOT NULL,
    model text NOT NULL,
    version text NOT NULL,
    input jsonb NOT NULL,
    output jsonb NOT NULL,
    latency_ms real,
    trace_id text
) PARTITION BY RANGE (created_at);
CREATE TABLE predictions_default PARTITION OF predictions DEFAULT;
CREATE UNIQUE INDEX predictions_id ON predictions (prediction_id, created_at);
CREATE INDEX predictions_model_time ON predictions (model, created_at);
CREATE INDEX predictions_time_brin ON predictions USING brin (created_at);

CREATE TABLE metric_points (
    created_at timestamptz NOT NULL,
    model text NOT NULL,
    version text,
    metric text NOT NULL,
    value double precision,
    level text,
    details jsonb
) PARTITION BY RANGE (created_at);
CREATE TABLE metric_points_default PARTITION OF metric_points DEFAULT;
CREATE INDEX metric_points_model_metric_time ON metric_points (model, metric, created_at);
CREATE INDEX metric_points_time_brin ON metric_points USING brin (created_at);

-- Same columns as the TimescaleDB continuous aggregate, computed on read.
CREATE VIEW prediction_stats_1m AS
SELECT model,
       version,
       date_bin(INTERVAL '1 minute', created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
       count(*) AS predictions,
       avg(latency_ms) AS avg_latency_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_latency_ms,
       max(latency_ms) AS max_latency_ms,
       avg(CASE WHEN jsonb_typeof(output -> 'value') = 'number'
                THEN (output -> 'value')::double precision END) AS avg_value
FROM predictions
GROUP BY 1, 2, 3;

-- What the store queries: a range-limited form the planner can push down to created_at.
CREATE FUNCTION prediction_stats_1m_range(p_model text, p_start timestamptz, p_end timestamptz)
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
  ORDER BY 3, 2
$$;
