"""The store's one set of request checks and its JSON policy (services/store/domain/checks.py),
and the domain refusing bad requests before it touches the database."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyclone.errors import InvalidArgument, NotFound
from services.store.db import Alert, ModelVersion, StoreDB
from services.store.db.rollouts import RolloutEventRow, RolloutRow
from services.store.domain import EvaluationRecord, JobUpdate, RolloutUpdate, Store, checks

# JSON values PostgreSQL's jsonb stores and gives back: finite doubles, no NUL in any text.
_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_every_value_jsonb_keeps_loads_back_as_itself(value: Any) -> None:
    assert checks.load_json(json.dumps(value), "f") == value


@given(st.one_of(st.text(), st.binary()))
def test_any_text_loads_as_a_jsonb_safe_value_or_is_refused_naming_the_field(
    text: str | bytes,
) -> None:
    try:
        value = checks.load_json(text, "records[3].input_json")
    except InvalidArgument as exc:
        assert exc.message.startswith("records[3].input_json: ")
        return
    # What it took, jsonb takes back: strict JSON, no NUL.
    assert "\\u0000" not in json.dumps(value, allow_nan=False)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "not valid JSON (Expecting property name enclosed in double quotes)"),
        ("NaN", "not valid JSON (NaN is not a JSON value)"),
        ('{"a": -Infinity}', "not valid JSON (-Infinity is not a JSON value)"),
        ('{"a": 1e999}', "not valid JSON (1e999 is out of range for a double)"),
        ("[-1.5e400]", "not valid JSON (-1.5e400 is out of range for a double)"),
        ('{"a": "x\\u0000y"}', "\\u0000 is not allowed (PostgreSQL refuses it)"),
        ('{"\\u0000": 1}', "\\u0000 is not allowed (PostgreSQL refuses it)"),
        (b"\xff", "not valid JSON"),
    ],
)
def test_json_jsonb_would_refuse_is_refused_naming_the_field(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        checks.load_json(text, "spec_json")
    assert info.value.message.startswith(f"spec_json: {reason}")


def test_an_escaped_backslash_before_u0000_is_text_not_a_nul() -> None:
    assert checks.load_json('"\\\\u0000"', "f") == "\\u0000"


def test_empty_text_is_the_default() -> None:
    assert checks.load_json("", "f") is None
    assert checks.load_json("", "f", []) == []
    assert checks.load_json_object("", "f") is None
    assert checks.load_metrics("", "f") == {}


@pytest.mark.parametrize(
    ("text", "kind"),
    [("[1]", "an array"), ('"x"', "a string"), ("3", "a number"), ("null", "null")],
)
def test_a_json_object_field_names_what_it_got(text: str, kind: str) -> None:
    with pytest.raises(
        InvalidArgument, match=f"^weights_json: expected a JSON object, got {kind}$"
    ):
        checks.load_json_object(text, "weights_json")


@given(st.dictionaries(_text, st.integers(-(2**53), 2**53) | st.floats(-1e300, 1e300)))
def test_metrics_are_an_object_of_numbers_as_floats(metrics: dict[str, float]) -> None:
    loaded = checks.load_metrics(json.dumps(metrics), "f")
    assert loaded == {k: float(v) for k, v in metrics.items()}
    assert all(type(v) is float for v in loaded.values())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"auc": "high"}', "expected a JSON object of numbers, 'auc' is a string"),
        ('{"auc": true}', "expected a JSON object of numbers, 'auc' is a boolean"),
        ('{"auc": null}', "expected a JSON object of numbers, 'auc' is null"),
        ('{"auc": [1]}', "expected a JSON object of numbers, 'auc' is an array"),
        ('{"auc": ' + "9" * 400 + "}", "a number is too large for a double"),
        ("[0.9]", "expected a JSON object, got an array"),
        ('{"auc": NaN}', "not valid JSON (NaN is not a JSON value)"),
    ],
)
def test_bad_metrics_are_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        checks.load_metrics(text, "champion_metrics_json")
    assert info.value.message == f"champion_metrics_json: {message}"


# --- the value checks ----------------------------------------------------------------------


@given(st.integers())
def test_positive_and_not_negative(value: int) -> None:
    for check, ok, wording in (
        (checks.positive, value > 0, "must be positive"),
        (checks.not_negative, value >= 0, "must not be negative"),
    ):
        if ok:
            assert check("job_id", value) == value
        else:
            with pytest.raises(InvalidArgument, match=f"^job_id: {wording}$"):
                check("job_id", value)


@given(st.integers(-5, 1005))
def test_limit_zero_is_the_default_and_the_rest_must_be_in_range(value: int) -> None:
    if 0 <= value <= 1000:
        assert checks.limit("limit", value, 1000, 50) == (value or 50)
    else:
        with pytest.raises(InvalidArgument, match=r"^limit: must be between 1 and 1000$"):
            checks.limit("limit", value, 1000, 50)


@given(st.floats())
def test_percent_takes_0_to_100_and_refuses_nan(value: float) -> None:
    if 0 <= value <= 100:
        assert checks.percent("current_weight", value) == value
    else:
        with pytest.raises(InvalidArgument, match=r"^current_weight: must be between 0 and 100"):
            checks.percent("current_weight", value)


@given(st.floats())
def test_a_not_negative_number_is_finite_and_at_least_zero(value: float) -> None:
    if math.isfinite(value) and value >= 0:
        assert checks.not_negative_number("tolerance", value) == value
    else:
        with pytest.raises(InvalidArgument, match=r"^tolerance: must be a finite number >= 0"):
            checks.not_negative_number("tolerance", value)


def test_finite_numbers_names_the_key() -> None:
    assert checks.finite_numbers("numbers", {"p": 0.5}) == {"p": 0.5}
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(InvalidArgument, match=r"^events\[2\]\.numbers\[p99\]: must be finite"):
            checks.finite_numbers("events[2].numbers", {"ok": 1.0, "p99": bad})


def test_found_is_the_value_or_not_found_naming_the_field() -> None:
    assert checks.found(0, "job_id: 0 not found") == 0  # falsy is still found
    with pytest.raises(NotFound, match=r"^job_id: 7 not found$"):
        checks.found(None, "job_id: 7 not found")


def test_traceparent_is_w3c_or_empty() -> None:
    good = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert checks.traceparent("alerts[0].traceparent", good) == good
    assert checks.traceparent("alerts[0].traceparent", "") == ""
    with pytest.raises(InvalidArgument, match=r"^alerts\[0\]\.traceparent: not a W3C traceparent"):
        checks.traceparent("alerts[0].traceparent", "00-not-a-trace-01")


def test_one_of_lists_the_choices() -> None:
    assert checks.one_of("state", "paused", ("paused", "done")) == "paused"
    with pytest.raises(InvalidArgument, match=r"^state: expected one of paused, done, got 'x'$"):
        checks.one_of("state", "x", ("paused", "done"))


def test_require_name_uuid_and_window() -> None:
    with pytest.raises(InvalidArgument, match=r"^owner: empty$"):
        checks.require("owner", "")
    assert checks.name("model", "credit-1.2") == "credit-1.2"
    for bad in ("", "a b", "-x", "x" * 129, "é"):
        with pytest.raises(InvalidArgument, match=r"^model: .* is not a valid name"):
            checks.name("model", bad)
    with pytest.raises(InvalidArgument, match="is not a UUID"):
        checks.parse_uuid7("nope", "labels[0].prediction_id")
    with pytest.raises(InvalidArgument, match="is not a time-ordered UUIDv7"):
        checks.parse_uuid7(str(uuid.uuid4()), "labels[0].prediction_id")
    now = datetime.now(UTC)
    checks.check_window(now, now + timedelta(seconds=1))
    checks.check_window(None, now)
    with pytest.raises(InvalidArgument, match=r"^end: must be after start$"):
        checks.check_window(now, now)


# --- the domain checks before it calls the database ----------------------------------------


class Untouchable:
    """A database the domain must not reach: every attribute access fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the domain reached the database ({name}) with a bad request")


def refusing_store() -> Store:
    return Store(cast(StoreDB, Untouchable()))


def _event(**overrides: Any) -> RolloutEventRow:
    fields: dict[str, Any] = {"state": "paused", "weight": 10.0, "decision": "hold", **overrides}
    return RolloutEventRow(**fields)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda s: s.create_rollout(
                RolloutRow(model="m", to_version="2", strategy="ramp", state="pending"), _event()
            ),
            "rollout.strategy: expected one of canary, blue_green, red_black, shadow, got 'ramp'",
        ),
        (
            lambda s: s.create_rollout(
                RolloutRow(model="m", to_version="2", strategy="canary", state="pending"), None
            ),
            "event: missing (a rollout starts with its first event)",
        ),
        (
            lambda s: s.update_rollout(
                RolloutUpdate(7, "paused", 10.0, events=[_event(), _event(weight=-1.0)])
            ),
            "events[1].weight: must be between 0 and 100, got -1.0",
        ),
        (
            lambda s: s.update_training_job(JobUpdate(7, {"window_rows": -1})),
            "window_rows: must not be negative",
        ),
        (
            lambda s: s.update_training_job(JobUpdate(7, {"state": "done"})),
            "state: expected one of queued, running, succeeded, failed, cancelled,"
            " not_enough_data, rejected, got 'done'",
        ),
        (
            lambda s: s.register_trained_version(
                7, ModelVersion(model="m", version="2", sha256="ab", task="ranking")
            ),
            "model_version.task: expected one of regression, classification, got 'ranking'",
        ),
        (
            lambda s: s.register_trained_version(
                7, ModelVersion(model="m", version="2", sha256="ab", status="serving")
            ),
            "model_version.status: a retrained version starts as staged",
        ),
        (lambda s: s.register_trained_version(7, None), "model_version: missing"),
        (
            lambda s: s.register_model_version(
                ModelVersion(model="m", version="2", training_rows=-5), if_not_exists=False
            ),
            "model_version.training_rows: must not be negative",
        ),
        (
            lambda s: s.register_trained_version(
                7, ModelVersion(model="m", version="2", sha256="ab", triggering_alert_id=-1)
            ),
            "model_version.triggering_alert_id: must not be negative",
        ),
        (lambda s: s.fail_orphaned_training_jobs("", ""), "owner: empty"),
        (lambda s: s.list_rollouts("", False, 1001), "limit: must be between 1 and 1000"),
        (lambda s: s.get_training_job(0), "job_id: must be positive"),
        (
            lambda s: s.record_evaluation(
                EvaluationRecord(
                    "m", "1", "RED", [], {}, [], [Alert("m", "RED", "1", traceparent="00-x-01")]
                )
            ),
            "alerts[0].traceparent: not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)",
        ),
    ],
)
async def test_the_domain_refuses_bad_requests_before_the_database(call: Any, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await call(refusing_store())
    assert info.value.message == message
