-- The monitor's current RAG level per model version. A level change and the alerts it
-- raises are written in one transaction (see StoreDB.record_evaluation), so an alert is
-- never lost and never raised twice for the same change.
CREATE TABLE model_health (
    model text NOT NULL,
    version text NOT NULL,
    level text NOT NULL CHECK (level IN ('GREEN', 'AMBER', 'RED')),
    reasons jsonb NOT NULL DEFAULT '[]',
    summary jsonb NOT NULL DEFAULT '{}',
    evaluated_at timestamptz NOT NULL DEFAULT now(),
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);
