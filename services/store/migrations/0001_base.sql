-- Tables shared by both modes. Time-series tables live in 0002_timeseries.<mode>.sql.

-- Prediction ids are UUIDv7: the first 48 bits are the Unix time in milliseconds, and the
-- store's invariant is predictions.created_at = uuid7_time(prediction_id). Lookups by id use it
-- to prune partitions/chunks. Integer interval arithmetic keeps it exact to the millisecond.
CREATE FUNCTION uuid7_time(id uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
  SELECT TIMESTAMPTZ '1970-01-01 00:00:00+00'
         + ('x' || substr(replace(id::text, '-', ''), 1, 12))::bit(48)::bigint
           * INTERVAL '1 millisecond'
$$;

-- Ground truth, separate from predictions so a late label never rewrites a compressed chunk.
-- A repeated label for the same prediction replaces the earlier one (last write wins).
-- A label may arrive before its prediction (prediction logging is asynchronous).
CREATE TABLE labels (
    prediction_id uuid PRIMARY KEY,
    label jsonb NOT NULL,
    labelled_at timestamptz NOT NULL DEFAULT now(),
    model text
);

CREATE TABLE model_versions (
    model text NOT NULL,
    version text NOT NULL,
    artifact_uri text,
    sha256 text,
    schema jsonb,
    task text,
    parent_version text,
    training_window_start timestamptz,
    training_window_end timestamptz,
    triggering_alert_id bigint,
    evaluation jsonb,
    reference_profile jsonb,
    status text NOT NULL DEFAULT 'staged'
        CHECK (status IN ('staged', 'canary', 'serving', 'retired')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);
-- At most one serving version per model; set_model_status retires the previous one.
CREATE UNIQUE INDEX model_versions_one_serving ON model_versions (model) WHERE status = 'serving';
CREATE INDEX model_versions_model_created ON model_versions (model, created_at);

-- Outbox: the monitor inserts in the same transaction as its state change; a dispatcher
-- delivers with retries.
CREATE TABLE alerts (
    id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    model text NOT NULL,
    version text,
    level text NOT NULL,
    previous_level text,
    reasons jsonb NOT NULL DEFAULT '[]',
    actions jsonb NOT NULL DEFAULT '[]',
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'failed', 'delivered', 'acknowledged', 'dead')),
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    delivered_at timestamptz,
    acknowledged_at timestamptz,
    last_error text
);
CREATE INDEX alerts_due ON alerts (next_attempt_at) WHERE status IN ('pending', 'failed');
CREATE INDEX alerts_model ON alerts (model, id);

CREATE TABLE monitoring_plans (
    model text NOT NULL,
    revision int NOT NULL,
    plan_yaml text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, revision)
);

CREATE TABLE rollouts (
    id bigserial PRIMARY KEY,
    model text NOT NULL,
    from_version text,
    to_version text NOT NULL,
    status text NOT NULL,
    weights jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rollouts_model ON rollouts (model, id);
