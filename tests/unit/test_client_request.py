"""`build_request`: how rows of Python values become a PredictRequest's columns."""

from __future__ import annotations

import math

from cyclone.client import build_request, categorical_features
from cyclone.inference.v1 import inference_service_pb2 as pb


def test_numbers_and_text_by_value_type() -> None:
    request = build_request("m", [{"age": 30, "city": "porto"}, {"age": None, "city": None}])
    assert request.features["age"].numbers[0] == 30.0
    assert math.isnan(request.features["age"].numbers[1])
    assert list(request.features["city"].strings) == ["porto", ""]  # missing category: ""


def test_nan_among_text_is_a_missing_category_not_the_word_nan() -> None:
    """What pandas gives for an empty CSV field in a text column."""
    request = build_request("m", {"plan": ["a", math.nan, "b"]})
    assert list(request.features["plan"].strings) == ["a", "", "b"]


def test_categorical_features_are_text_whatever_their_values() -> None:
    rows = [{"zip": 2134, "plan": None, "age": 41}, {"zip": 10001, "plan": None, "age": 52}]
    request = build_request("m", rows, categorical={"zip", "plan"})
    assert list(request.features["zip"].strings) == ["2134", "10001"]
    assert list(request.features["plan"].strings) == ["", ""]  # all missing: still text
    assert list(request.features["age"].numbers) == [41.0, 52.0]
    without = build_request("m", rows)
    assert list(without.features["zip"].numbers) == [2134.0, 10001.0]


def test_categorical_features_of_a_model_info() -> None:
    info = pb.ModelInfo(
        features=[
            pb.FeatureSpec(name="age", kind=pb.FEATURE_KIND_NUMERIC),
            pb.FeatureSpec(name="zip", kind=pb.FEATURE_KIND_CATEGORICAL),
        ]
    )
    assert categorical_features(info) == {"zip"}


def test_a_prediction_says_which_version_answered() -> None:
    from cyclone.client import predictions_from_response
    from cyclone.inference.v1 import inference_service_pb2 as pb

    regression = pb.PredictResponse(version="2", prediction_ids=["a", "b"], values=[1.0, 2.0])
    assert [p.version for p in predictions_from_response(regression)] == ["2", "2"]
    classified = pb.PredictResponse(
        version="3", prediction_ids=["c"], labels=["1"], class_labels=["0", "1"],
        probabilities=[0.2, 0.8],
    )  # fmt: skip
    [p] = predictions_from_response(classified)
    assert (p.label, p.version, p.probabilities) == ("1", "3", {"0": 0.2, "1": 0.8})
