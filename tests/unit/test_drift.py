from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

import plugins.drift
from cyclone.plugin_api import (
    CurrentColumn,
    DriftTestSpec,
    NumericProfile,
    ReferenceProfile,
    build_profile,
)
from cyclone.plugins import Plugins, build_plugin_manager

NUMERIC_TESTS = ("ks", "wasserstein", "psi", "js")


@pytest.fixture(scope="module")
def tests_() -> dict[str, DriftTestSpec]:
    return Plugins(
        build_plugin_manager(load_entrypoints=False, extra_plugins=[plugins.drift])
    ).drift_tests


@pytest.fixture(scope="module")
def reference() -> ReferenceProfile:
    rng = np.random.default_rng(0)
    features = {f"f{i}": rng.normal(5.0, 2.0, 100_000) for i in range(3)}
    features["cat"] = rng.choice(["a", "b", "c"], 100_000, p=[0.5, 0.3, 0.2]).astype(object)
    features["flag"] = (rng.uniform(size=100_000) < 0.1).astype(np.int64)
    features["visits"] = rng.poisson(2.0, 100_000).astype(np.float64)
    features["ratio"] = rng.choice([0.1, 0.2, 0.7], 100_000, p=[0.2, 0.5, 0.3])
    return build_profile(features, predictions=rng.normal(size=100_000), task="regression")


def run(spec: DriftTestSpec, reference: ReferenceProfile, name: str, values: np.ndarray) -> bool:
    result = spec.fn(CurrentColumn(name, values, reference.features[name]), spec.default_threshold)
    assert result.status == "ok"
    return result.drifted


def test_cyclone_register_drift_tests_hook() -> None:
    pm = build_plugin_manager(load_entrypoints=False, extra_plugins=[plugins.drift])
    got: list[DriftTestSpec] = []
    pm.hook.cyclone_register_drift_tests(register=got.append)
    assert {s.name for s in got} == {*NUMERIC_TESTS, "chi_square"}


@pytest.mark.slow
def test_no_false_flags_on_unshifted_million_rows(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(1)
    for name in ("f0", "f1", "f2"):
        current = rng.normal(5.0, 2.0, 1_000_000)
        for test in NUMERIC_TESTS:
            assert not run(tests_[test], reference, name, current), (test, name)


def test_catches_small_shift_at_100k(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(2)
    current = rng.normal(5.0 + 0.2 * 2.0, 2.0, 100_000)
    for test in NUMERIC_TESTS:
        assert run(tests_[test], reference, "f0", current), test
    unshifted = rng.normal(5.0, 2.0, 100_000)
    assert not any(run(tests_[t], reference, "f0", unshifted) for t in NUMERIC_TESTS)


def test_small_windows_are_not_flagged_on_noise(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(3)
    flags = [
        run(tests_[t], reference, "f0", rng.normal(5.0, 2.0, 300))
        for _ in range(20)
        for t in NUMERIC_TESTS
    ]
    assert sum(flags) <= 1


def test_ks_statistic_close_to_scipy(
    reference: ReferenceProfile, tests_: dict[str, DriftTestSpec]
) -> None:
    rng = np.random.default_rng(4)
    raw_ref = rng.normal(5.0, 2.0, 100_000)
    profile = build_profile({"f0": raw_ref})
    current = rng.normal(5.3, 2.2, 50_000)
    ours = tests_["ks"].fn(CurrentColumn("f0", current, profile.features["f0"]), 0.05)
    floor = stats.ks_2samp(raw_ref, current).statistic
    assert ours.statistic == pytest.approx(floor, abs=0.01)
    w = tests_["wasserstein"].fn(CurrentColumn("f0", current, profile.features["f0"]), 0.1)
    exact = stats.wasserstein_distance(raw_ref, current)
    assert w.statistic == pytest.approx(exact, rel=0.05)


def test_out_of_range_and_missing_current_values(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    current = np.full(1000, 1e6)
    current[:10] = np.nan
    assert run(tests_["wasserstein"], reference, "f0", current)
    assert run(tests_["psi"], reference, "f0", current)


def test_chi_square_categorical(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(5)
    same = rng.choice(["a", "b", "c"], 200_000, p=[0.5, 0.3, 0.2]).astype(object)
    moved = rng.choice(["a", "b", "c"], 50_000, p=[0.4, 0.35, 0.25]).astype(object)
    unseen = rng.choice(["a", "b", "z"], 50_000, p=[0.5, 0.3, 0.2]).astype(object)
    spec = tests_["chi_square"]
    assert not run(spec, reference, "cat", same)
    assert run(spec, reference, "cat", moved)
    assert run(spec, reference, "cat", unseen)


def test_empty_current_column_is_not_enough_data(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    col = CurrentColumn("f0", np.array([np.nan]), reference.features["f0"])
    result = tests_["ks"].fn(col, 0.05)
    assert result.status == "not_enough_data" and not result.drifted


def test_profile_round_trip(reference: ReferenceProfile, tmp_path: pytest.TempPathFactory) -> None:
    data = reference.to_dict()
    json.dumps(data)  # JSON-serialisable, e.g. for JSONB
    again = ReferenceProfile.from_dict(json.loads(json.dumps(data)))
    assert again == reference
    path = tmp_path / "reference.json"  # type: ignore[operator]
    reference.save(path)
    assert ReferenceProfile.load(path) == reference


def test_profile_contents() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=10_000)
    x[:100] = np.nan
    profile = build_profile({"x": x, "k": np.array(["a", "b"] * 5000, dtype=object)})
    num = profile.features["x"]
    assert num.kind == "numeric"
    assert num.missing_rate == pytest.approx(0.01)
    assert num.count == 9900 and sum(num.counts) == 9900
    assert num.mean == pytest.approx(np.nanmean(x)) and num.min == np.nanmin(x)
    assert len(num.edges) == 101
    cat = profile.features["k"]
    assert cat.kind == "categorical" and cat.frequencies == {"a": 5000, "b": 5000}


# -- discrete numeric columns (0/1 flags, small counts) -------------------------------------


def _flag(rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
    return (rng.uniform(size=n) < rate).astype(np.int64)


def test_discrete_columns_keep_exact_value_frequencies(reference: ReferenceProfile) -> None:
    flag = reference.features["flag"]
    assert isinstance(flag, NumericProfile) and flag.discrete
    assert flag.values == (0.0, 1.0)
    assert sum(flag.value_counts) == flag.count == 100_000
    assert flag.value_counts[1] / flag.count == pytest.approx(0.1, abs=0.005)
    # The quantile edges collapsed: one bin holds everything, which is why values are kept.
    assert flag.edges == (0.0, 1.0) and flag.counts == (100_000,)
    visits = reference.features["visits"]
    assert isinstance(visits, NumericProfile) and visits.discrete and len(visits.values) < 20
    assert not reference.features["f0"].discrete  # type: ignore[union-attr]


def test_short_or_continuous_samples_are_not_discrete() -> None:
    rng = np.random.default_rng(11)
    profile = build_profile(
        {"short": rng.normal(size=15), "wide": rng.integers(0, 1000, 10_000), "flag": [0, 1] * 5}
    )
    assert not profile.features["short"].discrete  # type: ignore[union-attr]
    assert not profile.features["wide"].discrete  # type: ignore[union-attr]
    assert profile.features["flag"].discrete  # type: ignore[union-attr]


def test_flag_rate_change_caught_at_100k(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(12)
    moved = _flag(rng, 0.2, 100_000)
    for test in NUMERIC_TESTS:
        assert run(tests_[test], reference, "flag", moved), test
    same = _flag(rng, 0.1, 100_000)
    assert not any(run(tests_[t], reference, "flag", same) for t in NUMERIC_TESTS)


def test_count_shift_caught_at_100k(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(13)
    moved = rng.poisson(2.4, 100_000).astype(np.float64)  # a 0.28-sigma mean shift
    for test in NUMERIC_TESTS:
        assert run(tests_[test], reference, "visits", moved), test


def test_unseen_value_in_discrete_column_is_drift(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(14)
    current = _flag(rng, 0.1, 50_000)
    current[:5_000] = 2  # a value the reference never had, on 10 % of the rows
    for test in NUMERIC_TESTS:
        assert run(tests_[test], reference, "flag", current), test


def test_float32_current_values_match_float64_reference_values(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(15)
    current = rng.choice([0.1, 0.2, 0.7], 100_000, p=[0.2, 0.5, 0.3]).astype(np.float32)
    col = CurrentColumn("ratio", current, reference.features["ratio"])
    assert not np.any(col.value_cells % 2 == 0), "a float32 value fell between the values"
    assert not any(run(tests_[t], reference, "ratio", current) for t in NUMERIC_TESTS)


def test_no_false_flags_on_unshifted_discrete_million_rows(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(16)
    columns = {
        "flag": _flag(rng, 0.1, 1_000_000),
        "visits": rng.poisson(2.0, 1_000_000).astype(np.float64),
        "ratio": rng.choice([0.1, 0.2, 0.7], 1_000_000, p=[0.2, 0.5, 0.3]),
    }
    for name, current in columns.items():
        for test in NUMERIC_TESTS:
            assert not run(tests_[test], reference, name, current), (test, name)


def test_small_discrete_windows_are_not_flagged_on_noise(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(17)
    flags = [
        run(tests_[t], reference, name, values)
        for _ in range(20)
        for name, values in (
            ("flag", _flag(rng, 0.1, 300)),
            ("visits", rng.poisson(2.0, 300).astype(np.float64)),
        )
        for t in NUMERIC_TESTS
    ]
    assert sum(flags) <= 2


def test_discrete_wasserstein_is_exact(
    tests_: dict[str, DriftTestSpec], reference: ReferenceProfile
) -> None:
    rng = np.random.default_rng(18)
    raw_ref = rng.poisson(2.0, 100_000).astype(np.float64)
    profile = build_profile({"visits": raw_ref})
    current = np.concatenate((rng.poisson(2.5, 40_000), rng.uniform(0, 3, 1_000)))
    col = CurrentColumn("visits", current, profile.features["visits"])
    w = tests_["wasserstein"].fn(col, 0.1)
    assert w.statistic == pytest.approx(stats.wasserstein_distance(raw_ref, current), rel=1e-9)
    ks_ = tests_["ks"].fn(CurrentColumn("visits", current, profile.features["visits"]), 0.05)
    assert ks_.statistic == pytest.approx(stats.ks_2samp(raw_ref, current).statistic, abs=1e-9)


def test_profiles_without_value_frequencies_still_load(reference: ReferenceProfile) -> None:
    """A profile saved before discrete columns existed: no values/value_counts keys."""
    data = json.loads(reference.to_json())
    assert "values" in data["features"]["flag"] and "values" not in data["features"]["f0"]
    for column in data["features"].values():
        column.pop("values", None)
        column.pop("value_counts", None)
    old = ReferenceProfile.from_dict(data)
    flag = old.features["flag"]
    assert isinstance(flag, NumericProfile) and not flag.discrete
    assert flag.edges == reference.features["flag"].edges  # type: ignore[union-attr]
    # Still usable: tested on its quantile bins as before.
    col = CurrentColumn("flag", _flag(np.random.default_rng(19), 0.1, 1000), flag)
    assert plugins.drift.ks(col, 0.05).status == "ok"


def test_mismatched_value_frequencies_refused(reference: ReferenceProfile) -> None:
    data = reference.to_dict()
    data["features"]["flag"]["value_counts"] = [1]
    with pytest.raises(ValueError, match="values and value_counts differ in length"):
        ReferenceProfile.from_dict(data)
