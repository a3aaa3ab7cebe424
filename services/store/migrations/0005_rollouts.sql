-- Rollouts as the trainer's rollout controller drives them: state, weights, the plan section in
-- force, resumable progress, and every step/decision with its numbers (rollout_events), so a
-- restarted controller resumes or rolls back from what was recorded.
ALTER TABLE rollouts
    ADD COLUMN strategy text NOT NULL DEFAULT 'canary'
        CHECK (strategy IN ('canary', 'blue_green', 'red_black', 'shadow')),
    ADD COLUMN current_weight double precision NOT NULL DEFAULT 0
        CHECK (current_weight >= 0 AND current_weight <= 100),
    ADD COLUMN reason text NOT NULL DEFAULT '',
    ADD COLUMN spec jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN progress jsonb NOT NULL DEFAULT '{}',
    ADD CONSTRAINT rollouts_status CHECK (
        status IN ('pending', 'progressing', 'paused', 'promoted', 'rolled_back', 'failed'));

-- At most one active rollout per model: a second concurrent one fails on this index.
CREATE UNIQUE INDEX rollouts_one_active ON rollouts (model)
    WHERE status IN ('pending', 'progressing', 'paused');

CREATE TABLE rollout_events (
    rollout_id bigint NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    seq int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    state text NOT NULL,
    weight double precision NOT NULL,
    decision text NOT NULL,
    reason text NOT NULL DEFAULT '',
    numbers jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (rollout_id, seq)
);
