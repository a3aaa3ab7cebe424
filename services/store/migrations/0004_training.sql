-- Retraining jobs and the lineage of retrained versions. One job per alert (the trainer's
-- Retrain is idempotent per alert id); `owner` names the trainer process running a job so a
-- restarted trainer can fail the jobs its predecessor left behind.
CREATE TABLE training_jobs (
    id bigserial PRIMARY KEY,
    model text NOT NULL,
    state text NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled',
                         'not_enough_data', 'rejected')),
    alert_id bigint,
    reason text NOT NULL DEFAULT '',
    stage text NOT NULL DEFAULT 'queued',
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    message text NOT NULL DEFAULT '',
    new_version text,
    window_start timestamptz,
    window_end timestamptz,
    window_rows bigint,
    train_rows bigint,
    holdout_rows bigint,
    champion_metrics jsonb,
    challenger_metrics jsonb,
    decision text NOT NULL DEFAULT '',
    rollout_id text,
    champion_version text,
    family text,
    owner text NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX training_jobs_alert ON training_jobs (alert_id) WHERE alert_id IS NOT NULL;
CREATE INDEX training_jobs_model ON training_jobs (model, id);
CREATE INDEX training_jobs_active ON training_jobs (state) WHERE state IN ('queued', 'running');

-- Lineage of a retrained version (window, parent and alert columns exist since 0001).
ALTER TABLE model_versions
    ADD COLUMN training_rows bigint,
    ADD COLUMN family text,
    ADD COLUMN hyperparameters jsonb,
    ADD COLUMN holdout_metrics jsonb;
