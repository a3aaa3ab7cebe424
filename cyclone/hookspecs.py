"""Hook specifications: the plugin author's reference.

A plugin is a module (or object) with functions decorated by :data:`hookimpl` and named after the
hooks below. It is found through the ``cyclone`` entry-point group::

    [project.entry-points.cyclone]
    my_plugin = "my_package.my_module"

Registry hooks receive a ``register`` callback instead of returning values, so one
implementation can register any number of items. Each registered name must be unique across all
plugins; a duplicate is reported as a plugin problem and the first registration wins.
Hooks are called once, lazily, the first time Cyclone needs the registry.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from cyclone.plugin_api import (
    AlertSinkSpec,
    DriftTestSpec,
    MetricSpec,
    ModelFamilySpec,
    OrchestratorSpec,
)

PROJECT_NAME = "cyclone"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def cyclone_register_metrics(register: Callable[[MetricSpec], None]) -> None:
    """Register metrics computed over a monitoring window.

    Called once per process, when the metric registry is first needed (plan validation or the
    first evaluation).

    :param register: call ``register(MetricSpec(...))`` for each metric. The spec's ``fn`` takes
        ``(window, ctx)`` and returns a :class:`~cyclone.plugin_api.MetricResult`; it must be
        vectorised (no per-row Python loops) and return ``MetricResult.not_enough_data(...)``
        rather than NaN when the window cannot support the metric.
    """


@hookspec
def cyclone_register_drift_tests(register: Callable[[DriftTestSpec], None]) -> None:
    """Register drift tests comparing a current column with its reference profile.

    Called once per process, when the drift registry is first needed.

    :param register: call ``register(DriftTestSpec(...))`` for each test. The spec's ``fn`` takes
        ``(column, threshold)``: a :class:`~cyclone.plugin_api.CurrentColumn` (binned once
        against the reference quantile sketch) and the effect-size threshold; it returns a
        :class:`~cyclone.plugin_api.DriftResult` whose ``drifted`` flag comes from the effect
        size, not from a p-value (p-values flag everything at a million rows).
    """


@hookspec
def cyclone_register_alert_sinks(register: Callable[[AlertSinkSpec], None]) -> None:
    """Register alert sinks (webhook, Slack, ...) that deliver level changes.

    Called once per process, when the monitor first needs to deliver an alert or validate a plan.

    :param register: call ``register(AlertSinkSpec(...))`` for each sink. ``deliver(alert,
        config)`` must raise on failure; the monitor keeps the alert in its outbox and retries
        with backoff, so delivery may happen more than once.
    """


@hookspec
def cyclone_register_model_families(register: Callable[[ModelFamilySpec], None]) -> None:
    """Register model families the trainer can fit.

    Called once per process, when the trainer first needs the family registry.

    :param register: call ``register(ModelFamilySpec(...))`` for each family. ``build(params)``
        returns an unfitted scikit-learn compatible estimator that skl2onnx can convert.
    """


@hookspec
def cyclone_register_orchestrators(register: Callable[[OrchestratorSpec], None]) -> None:
    """Register orchestrators that start and stop inference revisions during a rollout.

    Called once per process, when the trainer's rollout controller first needs one.

    :param register: call ``register(OrchestratorSpec(...))`` for each orchestrator.
        ``create(config)`` returns the object the rollout controller drives.
    """
