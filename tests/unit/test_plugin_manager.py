from __future__ import annotations

from collections.abc import Callable

import pytest

import plugins.classification
import plugins.drift
import plugins.regression
from cyclone import plugins as cyclone_plugins
from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import MetricContext, MetricResult, MetricSpec, Window
from cyclone.plugins import DEFAULT_PLUGINS, PluginError, Plugins, build_plugin_manager


def names(pm_plugins: Plugins) -> set[str]:
    return {name for name, _ in pm_plugins.pm.list_name_plugin()}


def test_entrypoints_and_defaults_load_all_builtins() -> None:
    facade = Plugins(build_plugin_manager(env={}))
    assert {n for n, _ in DEFAULT_PLUGINS} <= names(facade)
    assert {"accuracy", "mae", "prediction_p95", "feature_missing_rate"} <= set(facade.metrics)
    assert {"ks", "psi", "wasserstein", "js", "chi_square"} <= set(facade.drift_tests)
    assert {"webhook", "slack", "record"} <= set(facade.alert_sinks)


def test_defaults_used_when_entry_points_are_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cyclone.plugins.metadata.entry_points", lambda group: [])
    facade = Plugins(build_plugin_manager(env={}))
    assert {n for n, _ in DEFAULT_PLUGINS} == names(facade)
    assert "roc_auc" in facade.metrics


def test_allow_list() -> None:
    facade = Plugins(build_plugin_manager(env={"CYCLONE_PLUGINS": "regression, drift"}))
    assert names(facade) == {"regression", "drift"}
    assert "mae" in facade.metrics and "accuracy" not in facade.metrics


def test_block_list_wins_over_allow_list() -> None:
    env = {"CYCLONE_PLUGINS": "regression,drift", "CYCLONE_DISABLE_PLUGINS": "drift"}
    facade = Plugins(build_plugin_manager(env=env))
    assert names(facade) == {"regression"}
    assert facade.drift_tests == {}


def test_isolated_manager_loads_nothing_implicitly() -> None:
    facade = Plugins(build_plugin_manager(load_entrypoints=False, extra_plugins=[plugins.drift]))
    assert names(facade) == {"plugins.drift"}
    assert facade.metrics == {}


class Typo:
    @hookimpl
    def cyclone_register_metric(self, register: Callable[[MetricSpec], None]) -> None:
        pass


def test_unknown_hook_is_rejected_with_plugin_and_hook_names() -> None:
    with pytest.raises(PluginError, match=r"'typo'.*'cyclone_register_metric'"):
        build_plugin_manager(load_entrypoints=False, extra_plugins=[("typo", Typo())])


class BadSignature:
    @hookimpl
    def cyclone_register_metrics(self, regster: Callable[[MetricSpec], None]) -> None:
        pass


def test_bad_hook_signature_is_rejected() -> None:
    with pytest.raises(PluginError, match="'bad'"):
        build_plugin_manager(load_entrypoints=False, extra_plugins=[("bad", BadSignature())])


class Exploding:
    @hookimpl
    def cyclone_register_metrics(self, register: Callable[[MetricSpec], None]) -> None:
        raise RuntimeError("boom")


def _mean_of(window: Window, ctx: MetricContext) -> MetricResult:
    return MetricResult.ok(float(window.predictions.mean()))


class Duplicate:
    @hookimpl
    def cyclone_register_metrics(self, register: Callable[[MetricSpec], None]) -> None:
        register(MetricSpec("mae", _mean_of, False))
        register(MetricSpec("mean_of", _mean_of, False))


def test_raising_hook_is_reported_and_others_still_register(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pm = build_plugin_manager(
        load_entrypoints=False,
        extra_plugins=[plugins.regression, ("exploding", Exploding())],
    )
    facade = Plugins(pm)
    assert "mae" in facade.metrics
    [problem] = facade.problems
    assert problem.plugin == "exploding"
    assert problem.hook == "cyclone_register_metrics"
    assert "boom" in problem.error
    assert "exploding" in caplog.text
    info = {i.name: i for i in facade.plugin_infos()}
    assert info["exploding"].error is not None and "boom" in info["exploding"].error
    assert info["plugins.regression"].error is None


def test_duplicate_metric_name_keeps_first_and_reports() -> None:
    facade = Plugins(
        build_plugin_manager(
            load_entrypoints=False, extra_plugins=[plugins.regression, ("dup", Duplicate())]
        )
    )
    assert facade.metrics["mae"].plugin == "plugins.regression"
    assert facade.metrics["mean_of"].plugin == "dup"
    assert [p.plugin for p in facade.problems] == ["dup"]


def test_plugin_infos_name_module_distribution_and_hooks() -> None:
    infos = {i.name: i for i in cyclone_plugins.plugin_infos(Plugins(build_plugin_manager(env={})))}
    cls = infos["classification"]
    assert cls.module == "plugins.classification"
    assert cls.hooks == ("cyclone_register_metrics",)
    assert cls.distribution == "cyclone" and cls.version


def test_broken_import_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cyclone_plugins, "DEFAULT_PLUGINS", (("ghost", "plugins.does_not_exist"),))
    monkeypatch.setattr("cyclone.plugins.metadata.entry_points", lambda group: [])
    facade = Plugins(build_plugin_manager(env={}, extra_plugins=[plugins.classification]))
    infos = {i.name: i for i in facade.plugin_infos()}
    assert infos["ghost"].error and "does_not_exist" in infos["ghost"].error
    assert "accuracy" in facade.metrics


def test_global_manager_is_built_once() -> None:
    assert cyclone_plugins.get_plugin_manager() is cyclone_plugins.get_plugin_manager()
    assert cyclone_plugins.metrics() is cyclone_plugins.metrics()
