-- Running totals of the per-minute rollup, one row per model (both modes). GetStats summed every
-- stored minute of prediction_rollup_1m for its totals: its execution grew with the minutes
-- stored (12x per 10x rows in docs/performance.md). The statements that change the rollup keep
-- these totals in the same statement: a refresh subtracts the minutes it clears and adds the
-- ones it recomputes, a label fold adds what it folds, retention subtracts the minutes it drops
-- (services/store/db/rollup.py, retention.py). So a row here is always the sum of the model's
-- rollup rows, all of them before rollup_state.materialized_to, and status reads O(models) rows.
CREATE TABLE prediction_rollup_total (
    model text PRIMARY KEY,
    predictions bigint NOT NULL,
    labels bigint NOT NULL,
    -- The newest row counted. Only retention removes rows, oldest first, and a model none of
    -- whose rows is left loses its total row, so a maximum never needs undoing.
    last_at timestamptz NOT NULL
);

INSERT INTO prediction_rollup_total (model, predictions, labels, last_at)
SELECT model, sum(predictions), sum(labels), max(last_at)
FROM prediction_rollup_1m
GROUP BY model;

-- Status subtracts the stale minutes' rollup rows (late rows not yet refreshed) by minute, and
-- retention and refreshes clear by minute: without this, each would scan the whole rollup.
CREATE INDEX prediction_rollup_1m_bucket ON prediction_rollup_1m (bucket);
