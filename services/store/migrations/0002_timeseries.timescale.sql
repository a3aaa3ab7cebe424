-- TimescaleDB: hypertables on created_at, compression segmented by model, and a continuous
-- aggregate. Compression/retention/refresh policies depend on settings and are applied at
-- start-up by services/store/timescale.py (policy_statements), not here.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE predictions (
    prediction_id uuid NOT NULL,
    created_at timestamptz NOT NULL,
    model text NOT NULL,
    version text NOT NULL,
    input jsonb NOT NULL,
    output jsonb NOT NULL,
    latency_ms real,
    trace_id text
);
SELECT create_hypertable('predictions', by_range('created_at', INTERVAL '1 day'));
CREATE UNIQUE INDEX predictions_id ON predictions (prediction_id, created_at);
CREATE INDEX predictions_model_time ON predictions (model, created_at);
ALTER TABLE predictions SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'model',
    timescaledb.compress_orderby = 'created_at DESC, prediction_id'
);

CREATE TABLE metric_points (
    created_at timestamptz NOT NULL,
    model text NOT NULL,
    version text,
    metric text NOT NULL,
    value double precision,
    level text,
    details jsonb
);
SELECT create_hypertable('metric_points', by_range('created_at', INTERVAL '7 days'));
CREATE INDEX metric_points_model_metric_time ON metric_points (model, metric, created_at);
ALTER TABLE metric_points SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'model, metric',
    timescaledb.compress_orderby = 'created_at DESC'
);

-- Real-time aggregate (materialized_only = false): recent, not yet materialized minutes are
-- computed on read, so results match the plain-PostgreSQL view.
CREATE MATERIALIZED VIEW prediction_stats_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT model,
       version,
       time_bucket(INTERVAL '1 minute', created_at) AS bucket,
       count(*) AS predictions,
       avg(latency_ms) AS avg_latency_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_latency_ms,
       max(latency_ms) AS max_latency_ms,
       avg(CASE WHEN jsonb_typeof(output -> 'value') = 'number'
                THEN (output -> 'value')::double precision END) AS avg_value
FROM predictions
GROUP BY model, version, time_bucket(INTERVAL '1 minute', created_at)
WITH NO DATA;

CREATE FUNCTION prediction_stats_1m_range(p_model text, p_start timestamptz, p_end timestamptz)
RETURNS TABLE (model text, version text, bucket timestamptz, predictions bigint,
               avg_latency_ms double precision, p50_latency_ms double precision,
               max_latency_ms real, avg_value double precision)
LANGUAGE sql STABLE
AS $$
  SELECT s.model, s.version, s.bucket, s.predictions, s.avg_latency_ms, s.p50_latency_ms,
         s.max_latency_ms, s.avg_value
  FROM prediction_stats_1m s
  WHERE s.model = p_model AND s.bucket >= p_start AND s.bucket < p_end
  ORDER BY s.bucket, s.version
$$;
