"""Model registry and monitoring plans (rollouts: `rollouts.py`)."""

from __future__ import annotations

from dataclasses import astuple, fields
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ._base import Conn, StoreBase
from .types import AlreadyExistsError, ModelStatus, ModelVersion, NotFoundError, Plan

_MV_COLS = [f.name for f in fields(ModelVersion)]
_MV_SELECT = "SELECT " + ", ".join(_MV_COLS) + " FROM model_versions"
_JSON_COLS = {
    "schema",
    "evaluation",
    "reference_profile",
    "weights",
    "hyperparameters",
    "holdout_metrics",
}
_STATUSES = ("staged", "canary", "serving", "retired")
# The same columns in the same order, the JSON ones as NULL: a listing of identities only.
_MV_SUMMARY_SELECT = (
    "SELECT "
    + ", ".join(f"NULL AS {c}" if c in _JSON_COLS else c for c in _MV_COLS)
    + " FROM model_versions"
)


def _mv(row: TupleRow) -> ModelVersion:
    return ModelVersion(*row)


class RegistryMixin(StoreBase):
    async def register_model_version(
        self, mv: ModelVersion, *, conn: Conn | None = None
    ) -> ModelVersion:
        """Insert a version (status as given, default 'staged'); AlreadyExistsError if present."""
        if mv.status == "serving":
            raise ValueError("register as staged/canary, then set_model_status(..., 'serving')")
        cols = [c for c in _MV_COLS if c != "created_at"]
        values: list[Any] = [
            Jsonb(v) if c in _JSON_COLS and v is not None else v
            for c, v in zip(_MV_COLS, astuple(mv), strict=True)
            if c != "created_at"
        ]
        q = (
            "INSERT INTO model_versions ("
            + ", ".join(cols)
            + ") VALUES ("
            + ", ".join(["%s"] * len(cols))
            + ") RETURNING "
            + ", ".join(_MV_COLS)
        )
        try:
            async with self._conn(conn) as c:
                cur = await c.execute(q, values)
                row = await cur.fetchone()
        except psycopg.errors.UniqueViolation as exc:
            raise AlreadyExistsError(f"model {mv.model!r} version {mv.version!r} exists") from exc
        assert row is not None
        return _mv(row)

    async def get_model_version(self, model: str, version: str) -> ModelVersion | None:
        async with self.pool.connection() as c:
            cur = await c.execute(
                _MV_SELECT + " WHERE model = %s AND version = %s", (model, version)
            )
            row = await cur.fetchone()
        return _mv(row) if row else None

    async def list_model_versions(
        self, model: str | None = None, *, status: ModelStatus | None = None, summary: bool = False
    ) -> list[ModelVersion]:
        """Versions of `model` (None: all) with `status` (None: any); `summary`: the JSON
        columns are not read (None), so a frequent poll moves kilobytes, not megabytes."""
        select = _MV_SUMMARY_SELECT if summary else _MV_SELECT
        async with self.pool.connection() as c:
            cur = await c.execute(
                select + " WHERE (%(m)s::text IS NULL OR model = %(m)s::text)"
                " AND (%(s)s::text IS NULL OR status = %(s)s::text)"
                " ORDER BY model, created_at, version",
                {"m": model, "s": status},
            )
            return [_mv(r) for r in await cur.fetchall()]

    async def latest_version(self, model: str) -> ModelVersion | None:
        """The most recently registered version of ``model`` (any status)."""
        async with self.pool.connection() as c:
            cur = await c.execute(
                _MV_SELECT + " WHERE model = %s ORDER BY created_at DESC, version DESC LIMIT 1",
                (model,),
            )
            row = await cur.fetchone()
        return _mv(row) if row else None

    async def serving_version(self, model: str) -> ModelVersion | None:
        async with self.pool.connection() as c:
            cur = await c.execute(_MV_SELECT + " WHERE model = %s AND status = 'serving'", (model,))
            row = await cur.fetchone()
        return _mv(row) if row else None

    async def set_model_status(
        self, model: str, version: str, status: ModelStatus, *, conn: Conn | None = None
    ) -> ModelVersion:
        """Change status; making a version 'serving' retires the previous serving one and,
        when it was not serving already, forgets the level it had before (see below)."""
        if status not in _STATUSES:
            raise ValueError(f"invalid status {status!r}")
        async with self._conn(conn) as c, c.transaction():
            if status == "serving":
                cur = await c.execute(
                    "SELECT status FROM model_versions WHERE model = %s AND version = %s"
                    " FOR UPDATE",
                    (model, version),
                )
                before = await cur.fetchone()
                if before is not None and before[0] != "serving":
                    # Serving again (rolled back to, or rolled out anew): its level starts
                    # afresh, so a RED it had before is news again (alerts, a retrain) rather
                    # than a RED nobody acts on because its alerts went out last time.
                    await c.execute(
                        "DELETE FROM model_health WHERE model = %s AND version = %s",
                        (model, version),
                    )
                await c.execute(
                    "UPDATE model_versions SET status = 'retired'"
                    " WHERE model = %s AND status = 'serving' AND version <> %s",
                    (model, version),
                )
            cur = await c.execute(
                "UPDATE model_versions SET status = %s WHERE model = %s AND version = %s"
                " RETURNING " + ", ".join(_MV_COLS),
                (status, model, version),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFoundError(f"model {model!r} version {version!r} not found")
        return _mv(row)

    # --- monitoring plans ---------------------------------------------------------------

    async def save_plan(self, model: str, plan_yaml: str) -> int:
        """Store a new revision of the model's plan; returns its number (1, 2, ...)."""
        async with self.pool.connection() as c, c.transaction():
            # Per-model lock so two concurrent saves get distinct revisions.
            await c.execute("SELECT pg_advisory_xact_lock(hashtext('plan:' || %s))", (model,))
            cur = await c.execute(
                "INSERT INTO monitoring_plans (model, revision, plan_yaml)"
                " SELECT %(m)s, coalesce(max(revision), 0) + 1, %(y)s"
                " FROM monitoring_plans WHERE model = %(m)s RETURNING revision",
                {"m": model, "y": plan_yaml},
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def get_plan(self, model: str, revision: int | None = None) -> Plan | None:
        """A given revision, or the latest one."""
        async with self.pool.connection() as c:
            cur = await c.execute(
                "SELECT model, revision, plan_yaml, created_at FROM monitoring_plans"
                " WHERE model = %(m)s AND (%(r)s::int IS NULL OR revision = %(r)s::int)"
                " ORDER BY revision DESC LIMIT 1",
                {"m": model, "r": revision},
            )
            row = await cur.fetchone()
        return Plan(*row) if row else None
