-- TimescaleDB: prediction_stats_1m_range already reads the real-time continuous aggregate
-- (0002); the rollup of 0008 serves GetStats there too. Nothing to change.
SELECT 1;
