-- TimescaleDB: prediction_stats_1m_range reads the continuous aggregate (0002); the plain-mode
-- change of this version (raw parts bounded to the window at plan time) has nothing to change.
SELECT 1;
