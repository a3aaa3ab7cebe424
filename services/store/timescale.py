"""TimescaleDB policies, which depend on settings and so are re-applied at every start-up.

Statements are plain SQL strings (intervals are rendered from integers, never user text) so the
store and the PGlite/TimescaleDB test run exactly the same text.
"""

from __future__ import annotations

from datetime import timedelta


def _interval(td: timedelta) -> str:
    return f"INTERVAL '{int(td.total_seconds())} seconds'"


def policy_statements(
    compress_after: timedelta = timedelta(days=7),
    retain_for: timedelta | None = timedelta(days=30),
    aggregate_lookback: timedelta = timedelta(hours=2),
) -> list[str]:
    """Compression, retention and continuous-aggregate refresh policies (idempotent).

    ``retain_for`` None keeps everything. The continuous aggregate is kept as long as the raw
    rows, so it never reports minutes whose predictions are gone.
    """
    stmts: list[str] = []
    for table in ("predictions", "metric_points"):
        stmts.append(f"SELECT remove_compression_policy('{table}', if_exists => true)")
        stmts.append(
            f"SELECT add_compression_policy('{table}', compress_after => {_interval(compress_after)})"
        )
        stmts.append(f"SELECT remove_retention_policy('{table}', if_exists => true)")
        if retain_for is not None:
            stmts.append(
                f"SELECT add_retention_policy('{table}', drop_after => {_interval(retain_for)})"
            )
    stmts.append(
        "SELECT remove_continuous_aggregate_policy('prediction_stats_1m', if_exists => true)"
    )
    stmts.append(
        "SELECT add_continuous_aggregate_policy('prediction_stats_1m',"
        f" start_offset => {_interval(aggregate_lookback)},"
        " end_offset => INTERVAL '60 seconds', schedule_interval => INTERVAL '60 seconds')"
    )
    stmts.append("SELECT remove_retention_policy('prediction_stats_1m', if_exists => true)")
    if retain_for is not None:
        stmts.append(
            "SELECT add_retention_policy('prediction_stats_1m',"
            f" drop_after => {_interval(retain_for)})"
        )
    return stmts
