-- The strategy names are the trainer proto's RolloutStrategy enum (cyclone/rollout_strategies.py),
-- which the store's CreateRollout checks: the column no longer holds a second list of its own,
-- so a new strategy needs no migration.
ALTER TABLE rollouts DROP CONSTRAINT IF EXISTS rollouts_strategy_check;
