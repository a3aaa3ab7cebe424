-- Monitors share the models through leases: a model is evaluated by the one monitor holding
-- its unexpired lease. Holders renew their leases and take free ones up to a fair share
-- (models / live holders) once per tick (StoreDB.lease_models); a holder is live while its
-- heartbeat has not expired, so a monitor that joins with no lease yet still counts.
CREATE TABLE lease_holders (
    holder text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);

CREATE TABLE model_leases (
    model text PRIMARY KEY,
    holder text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX model_leases_holder ON model_leases (holder);
