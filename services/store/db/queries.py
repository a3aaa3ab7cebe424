"""SQL text shared by StoreDB and the TimescaleDB check (psycopg ``%(name)s`` parameters).

Only fixed fragments are concatenated; every value, including model names, feature names and
page cursors, is a bound parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

COPY_COLUMNS = "prediction_id, created_at, model, version, input, output, latency_ms, trace_id"
COPY_TYPES = ["uuid", "timestamptz", "text", "text", "jsonb", "jsonb", "float4", "text"]

# One round trip: store/replace the labels and report the ones without a stored prediction.
# The join uses uuid7_time(id) = created_at so each lookup touches one partition/chunk.
UPSERT_LABELS = """
WITH u AS (
    SELECT id, label FROM unnest(%(ids)s::uuid[], %(labels)s::jsonb[]) AS t(id, label)
), m AS (
    SELECT u.id, u.label, p.model, p.version
    FROM u
    LEFT JOIN LATERAL (
        SELECT pr.model, pr.version FROM predictions pr
        WHERE pr.prediction_id = u.id AND pr.created_at = uuid7_time(u.id)
        LIMIT 1
    ) p ON true
), foreign_ AS (
    -- Ids of another model's predictions: the caller checks the labels against the model it
    -- names, so storing them would put unchecked labels on that other model.
    SELECT id, model FROM m WHERE %(model)s::text IS NOT NULL AND model <> %(model)s::text
), ins AS (
    INSERT INTO labels AS l (prediction_id, label, labelled_at, model)
    SELECT id, label, now(), coalesce(model, %(model)s::text) FROM m
    WHERE NOT EXISTS (SELECT 1 FROM foreign_)
    ON CONFLICT (prediction_id) DO UPDATE
        SET label = EXCLUDED.label,
            labelled_at = EXCLUDED.labelled_at,
            model = coalesce(EXCLUDED.model, l.model)
    RETURNING l.prediction_id, (xmax = 0) AS inserted
), delta AS (
    -- The rollup counts labelled predictions per minute: a first label for a stored
    -- prediction adds one (a replaced label changes nothing).
    INSERT INTO rollup_label_delta (model, version, bucket, n)
    SELECT m.model, m.version,
           date_bin(INTERVAL '1 minute', uuid7_time(m.id), TIMESTAMPTZ '2000-01-01 00:00:00+00'),
           count(*)
    FROM m JOIN ins ON ins.prediction_id = m.id
    WHERE ins.inserted AND m.model IS NOT NULL
    GROUP BY 1, 2, 3
)
SELECT (SELECT count(*) FROM ins) AS stored,
       coalesce(array_agg(id) FILTER (WHERE model IS NULL), '{}') AS unmatched,
       (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM foreign_) AS foreign_ids,
       (SELECT coalesce(array_agg(model ORDER BY id), '{}') FROM foreign_) AS foreign_models
FROM m
"""

GET_PREDICTION = """
SELECT p.prediction_id, p.created_at, p.model, p.version, p.input, p.output, p.latency_ms,
       p.trace_id, l.label, l.labelled_at
FROM predictions p LEFT JOIN labels l ON l.prediction_id = p.prediction_id
WHERE p.prediction_id = %(id)s AND p.created_at = uuid7_time(%(id)s::uuid)
"""

_TRAINING_SELECT = """
SELECT p.prediction_id, p.created_at, p.input::text, p.output::text, l.label::text
FROM predictions p JOIN labels l ON l.prediction_id = p.prediction_id
WHERE p.model = %(model)s
"""


def _window_clauses(
    q: str, *, window: bool, last_n: bool, version: bool, include_unlabelled: bool
) -> str:
    if include_unlabelled:
        q = q.replace("JOIN labels", "LEFT JOIN labels")
    if window:
        q += " AND p.created_at >= %(start)s AND p.created_at < %(end)s"
    if version:
        q += " AND p.version = %(version)s"
    if not last_n:
        return q + " ORDER BY p.created_at, p.prediction_id"
    q += " ORDER BY p.created_at DESC, p.prediction_id DESC LIMIT %(last_n)s"
    return "SELECT * FROM (" + q + ") t ORDER BY 2, 1"


def training_columns_query(
    features: Sequence[tuple[str, str]],
    task: str,
    class_labels: Sequence[str],
    *,
    window: bool,
    last_n: bool,
    version: bool,
    include_unlabelled: bool = False,
) -> tuple[str, dict[str, str]]:
    """Like `training_query`, but PostgreSQL extracts each feature, the prediction and the
    label into its own typed column, so the reader never parses JSON in Python.

    Columns: id text, created_at as Unix microseconds, labelled, latency in ms, then one per
    feature (float8 for numeric, text otherwise), then prediction, [one float8 per class], label.
    Feature and class names are parameters, never SQL text.
    """
    select = [
        "p.prediction_id::text",
        "(extract(epoch FROM p.created_at) * 1000000)::int8",
        "l.prediction_id IS NOT NULL",
        "p.latency_ms::float8",
    ]
    params: dict[str, str] = {}
    for i, (name, kind) in enumerate(features):
        params[f"feature_{i}"] = name
        extract = f"p.input->>%(feature_{i})s"
        select.append(f"({extract})::float8" if kind == "numeric" else extract)
    if task == "classification":
        select.append("p.output->>'label'")
        for i, label in enumerate(class_labels):
            params[f"class_{i}"] = label
            select.append(f"(p.output->'probabilities'->>%(class_{i})s)::float8")
        select.append("l.label#>>'{}'")
    else:
        select.append("(p.output->>'value')::float8")
        select.append("(l.label#>>'{}')::float8")
    q = (
        "SELECT " + ", ".join(select) + " FROM predictions p"
        " JOIN labels l ON l.prediction_id = p.prediction_id WHERE p.model = %(model)s"
    )
    return (
        _window_clauses(
            q, window=window, last_n=last_n, version=version, include_unlabelled=include_unlabelled
        ),
        params,
    )


def training_query(
    *, window: bool, last_n: bool, version: bool, include_unlabelled: bool = False
) -> str:
    """Labelled rows of a model, time ordered: a window, the last N, or the last N of a window.

    With ``include_unlabelled`` (monitoring windows) unlabelled rows come too, label NULL.
    """
    return _window_clauses(
        _TRAINING_SELECT,
        window=window,
        last_n=last_n,
        version=version,
        include_unlabelled=include_unlabelled,
    )


PREDICTION_STATS = """
SELECT model, version, bucket, predictions, avg_latency_ms, p50_latency_ms, max_latency_ms,
       avg_value
FROM prediction_stats_1m_range(%(model)s, %(start)s, %(end)s)
"""

# Whether a prediction row has a label: one index lookup per row, so aggregating a minute
# never hashes the whole labels table.
HAS_LABEL = "EXISTS (SELECT 1 FROM labels l WHERE l.prediction_id = p.prediction_id)"

# The label counts not yet folded in, and raw rows for the pending minutes and after the
# watermark: the parts both status queries share.
_STATS_RAW_PARTS = """delta AS (
    SELECT model, 0::bigint AS predictions, sum(n) AS labels, NULL::timestamptz AS last_at
    FROM rollup_label_delta
    WHERE bucket < %(since)s AND bucket NOT IN (SELECT unnest(%(pending)s::timestamptz[]))
      AND (%(model)s::text IS NULL OR model = %(model)s::text)
    GROUP BY model
), late AS (
    SELECT x.* FROM unnest(%(pending)s::timestamptz[]) AS d(m)
    CROSS JOIN LATERAL (
        SELECT p.model, count(*) AS predictions, count(*) FILTER (WHERE {has_label})
                   AS labels, max(p.created_at) AS last_at
        FROM predictions p
        WHERE p.created_at >= d.m AND p.created_at < d.m + INTERVAL '1 minute'
          AND p.created_at >= %(pending_lo)s AND p.created_at < %(pending_hi)s
          AND (%(model)s::text IS NULL OR p.model = %(model)s::text)
        GROUP BY p.model
    ) x
), recent AS (
    SELECT p.model, count(*) AS predictions, count(*) FILTER (WHERE {has_label})
               AS labels, max(p.created_at) AS last_at
    FROM predictions p
    WHERE p.created_at >= %(since)s
      AND (%(model)s::text IS NULL OR p.model = %(model)s::text)
    GROUP BY p.model
)""".replace("{has_label}", HAS_LABEL)

# Per model: the rollup's running totals (migration 0013; every rollup row, all before the
# watermark %(since)s), less the rollup rows of the %(pending)s minutes (late rows not yet
# refreshed, so stale), plus the label counts not yet folded in, plus raw rows for the pending
# minutes, which also span [%(pending_lo)s, %(pending_hi)s), and after the watermark. The
# watermark and the pending minutes are values read first in the same snapshot (see
# reads.stats), so the planner prunes the raw parts to their partitions and the totals match
# them. The cost follows the models, the pending minutes and the labels since the last refresh:
# not the rows, nor the minutes stored.
STATS = """
WITH total AS (
    SELECT model, predictions, labels, last_at
    FROM prediction_rollup_total
    WHERE (%(model)s::text IS NULL OR model = %(model)s::text)
), stale AS (
    SELECT model, -sum(predictions) AS predictions, -sum(labels) AS labels,
           NULL::timestamptz AS last_at
    FROM prediction_rollup_1m
    WHERE bucket = ANY(%(pending)s::timestamptz[])
      AND (%(model)s::text IS NULL OR model = %(model)s::text)
    GROUP BY model
), {raw_parts}
SELECT model, sum(predictions)::bigint AS predictions, sum(labels)::bigint AS labels,
       max(last_at) AS last_prediction_at
FROM (SELECT * FROM total UNION ALL SELECT * FROM stale UNION ALL SELECT * FROM delta
      UNION ALL SELECT * FROM late UNION ALL SELECT * FROM recent) u
GROUP BY model
HAVING sum(predictions) > 0
ORDER BY model
""".replace("{raw_parts}", _STATS_RAW_PARTS)

# The status query before the running totals: every rollup minute before the watermark summed
# on each call, so its execution grew with the minutes stored. Kept as the reference the totals
# are checked against (tests, benchmark); same parameters as STATS.
STATS_ROLLUP_SCAN = """
WITH r AS (
    SELECT model, sum(predictions) AS predictions, sum(labels) AS labels, max(last_at) AS last_at
    FROM prediction_rollup_1m
    WHERE bucket < %(since)s AND bucket NOT IN (SELECT unnest(%(pending)s::timestamptz[]))
      AND (%(model)s::text IS NULL OR model = %(model)s::text)
    GROUP BY model
), {raw_parts}
SELECT model, sum(predictions)::bigint AS predictions, sum(labels)::bigint AS labels,
       max(last_at) AS last_prediction_at
FROM (SELECT * FROM r UNION ALL SELECT * FROM delta
      UNION ALL SELECT * FROM late UNION ALL SELECT * FROM recent) u
GROUP BY model
ORDER BY model
""".replace("{raw_parts}", _STATS_RAW_PARTS)

MATERIALIZED_TO = """
SELECT materialized_to, now(), ARRAY(SELECT rollup_pending_minutes() ORDER BY 1)
FROM rollup_state
"""

# The same figures from raw rows only: what the rollup must agree with (tests, benchmark).
STATS_RAW = """
SELECT p.model, count(*) AS predictions, count(l.prediction_id) AS labels,
       max(p.created_at) AS last_prediction_at
FROM predictions p LEFT JOIN labels l ON l.prediction_id = p.prediction_id
WHERE (%(model)s::text IS NULL OR p.model = %(model)s::text)
GROUP BY p.model
ORDER BY p.model
"""
