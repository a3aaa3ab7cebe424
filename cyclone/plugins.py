"""Plugin manager and the typed facade over its registry hooks.

Built-in plugins (``plugins.*``) are found through the same ``cyclone`` entry-point group as
third-party ones; when the distribution is not installed (a source checkout) the missing
built-ins are imported from :data:`DEFAULT_PLUGINS` instead.

Environment:
    ``CYCLONE_PLUGINS``          comma-separated allow-list of plugin names (entry-point names).
    ``CYCLONE_DISABLE_PLUGINS``  comma-separated block-list; wins over the allow-list.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import metadata
from types import ModuleType
from typing import TypeVar

import pluggy

from cyclone import hookspecs
from cyclone.plugin_api import (
    AlertSinkSpec,
    DriftTestSpec,
    MetricSpec,
    ModelFamilySpec,
    OrchestratorSpec,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cyclone"
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("classification", "plugins.classification"),
    ("regression", "plugins.regression"),
    ("sanity", "plugins.sanity"),
    ("features", "plugins.features"),
    ("drift", "plugins.drift"),
    ("alert_sinks", "plugins.alert_sinks"),
    ("families", "plugins.families"),
    ("orchestrator_local", "plugins.orchestrator_local"),
    ("orchestrator_nomad", "plugins.orchestrator_nomad"),
)


class PluginError(Exception):
    """A plugin cannot be loaded: unknown hook, bad hook signature."""


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that failed while loading or inside a hook; reported, never fatal to others."""

    plugin: str
    hook: str
    error: str


@dataclass(frozen=True)
class PluginInfo:
    """What ``cyclone plugins list`` shows for one plugin."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    hooks: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class _Loaded:
    """Provenance of registered plugins, kept beside the manager for ``plugin_infos``."""

    dists: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    failed: list[PluginInfo] = field(default_factory=list)


def _env_list(env: Mapping[str, str], key: str) -> set[str] | None:
    raw = env.get(key)
    if raw is None or not raw.strip():
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def build_plugin_manager(
    load_entrypoints: bool = True,
    extra_plugins: Iterable[tuple[str, object] | ModuleType] = (),
    env: Mapping[str, str] | None = None,
) -> pluggy.PluginManager:
    """Build a fresh manager; tests pass ``load_entrypoints=False`` to stay isolated.

    :param load_entrypoints: load the ``cyclone`` entry points and the built-in defaults.
    :param extra_plugins: modules or ``(name, object)`` pairs registered in addition.
    :param env: environment for the allow/block lists (defaults to ``os.environ``).
    :raises PluginError: a plugin implements an unknown hook or has a bad signature.
    """
    env = os.environ if env is None else env
    allow = _env_list(env, "CYCLONE_PLUGINS")
    block = _env_list(env, "CYCLONE_DISABLE_PLUGINS") or set()

    def wanted(name: str) -> bool:
        return name not in block and (allow is None or name in allow)

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    loaded = _Loaded()
    pm._cyclone_loaded = loaded  # type: ignore[attr-defined]
    candidates: list[tuple[str, Callable[[], object], str | None, str | None]] = []
    if load_entrypoints:
        seen: set[str] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in seen:
                continue
            seen.add(ep.name)
            dist = ep.dist
            candidates.append(
                (ep.name, ep.load, dist.name if dist else None, dist.version if dist else None)
            )
        for name, module in DEFAULT_PLUGINS:
            if name not in seen:
                candidates.append((name, _importer(module), None, None))
    for extra in extra_plugins:
        name, obj = (extra.__name__, extra) if isinstance(extra, ModuleType) else extra
        candidates.append((name, _constant(obj), None, None))

    for name, load, dist_name, version in candidates:
        if not wanted(name):
            continue
        try:
            plugin = load()
        except Exception as exc:
            # A broken third-party package must not take the whole service down.
            log.error("cannot import cyclone plugin %r: %s", name, exc)
            loaded.failed.append(PluginInfo(name, "?", dist_name, version, (), repr(exc)))
            continue
        _register(pm, plugin, name)
        loaded.dists[name] = (dist_name, version)
    _check_pending(pm)
    return pm


def _importer(module: str) -> Callable[[], object]:
    return lambda: importlib.import_module(module)


def _constant(obj: object) -> Callable[[], object]:
    return lambda: obj


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    if pm.is_registered(plugin) or pm.get_plugin(name) is not None:
        return
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r}: {exc}") from exc


def _check_pending(pm: pluggy.PluginManager) -> None:
    """Reject implementations of hooks that do not exist (typos, newer/older API)."""
    for hook_name, caller in vars(pm.hook).items():
        if not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if not impl.optionalhook:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} implements unknown hook {hook_name!r}"
                )
    pm.check_pending()


S = TypeVar("S", MetricSpec, DriftTestSpec, AlertSinkSpec, ModelFamilySpec, OrchestratorSpec)


class Plugins:
    """Typed facade over one manager: every registry is collected once, with its problems."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._problems: list[PluginProblem] = []

    def _collect(self, hook_name: str, kind: type[S]) -> dict[str, S]:
        caller: pluggy.HookCaller = getattr(self.pm.hook, hook_name)
        found: dict[str, S] = {}
        # Call each implementation on its own so one raising plugin cannot hide the others.
        for impl in caller.get_hookimpls():  # registration order: built-ins win clashes
            plugin_name: str = impl.plugin_name

            def register(spec: S, _plugin: str = plugin_name) -> None:
                if not isinstance(spec, kind):
                    raise TypeError(f"expected {kind.__name__}, got {type(spec).__name__}")
                if spec.name in found:
                    self._problem(
                        _plugin,
                        hook_name,
                        f"{spec.name!r} already registered by {found[spec.name].plugin!r}",
                    )
                    return
                found[spec.name] = replace(spec, plugin=_plugin)

            try:
                impl.function(register=register)
            except Exception as exc:
                self._problem(plugin_name, hook_name, f"{type(exc).__name__}: {exc}")
        return found

    def _problem(self, plugin: str, hook: str, error: str) -> None:
        log.error("cyclone plugin %r failed in %s: %s", plugin, hook, error)
        self._problems.append(PluginProblem(plugin, hook, error))

    @cached_property
    def metrics(self) -> dict[str, MetricSpec]:
        return self._collect("cyclone_register_metrics", MetricSpec)

    @cached_property
    def drift_tests(self) -> dict[str, DriftTestSpec]:
        return self._collect("cyclone_register_drift_tests", DriftTestSpec)

    @cached_property
    def alert_sinks(self) -> dict[str, AlertSinkSpec]:
        return self._collect("cyclone_register_alert_sinks", AlertSinkSpec)

    @cached_property
    def model_families(self) -> dict[str, ModelFamilySpec]:
        return self._collect("cyclone_register_model_families", ModelFamilySpec)

    @cached_property
    def orchestrators(self) -> dict[str, OrchestratorSpec]:
        return self._collect("cyclone_register_orchestrators", OrchestratorSpec)

    @property
    def problems(self) -> list[PluginProblem]:
        """Problems found so far (registries are collected lazily; touch them first)."""
        return list(self._problems)

    def plugin_infos(self) -> list[PluginInfo]:
        loaded: _Loaded = getattr(self.pm, "_cyclone_loaded", _Loaded())
        infos: list[PluginInfo] = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist, version = loaded.dists.get(name, (None, None))
            module = getattr(plugin, "__name__", type(plugin).__module__)
            hooks = tuple(sorted(c.name for c in self.pm.get_hookcallers(plugin) or ()))
            errors = [p.error for p in self._problems if p.plugin == name]
            infos.append(PluginInfo(name, module, dist, version, hooks, "; ".join(errors) or None))
        return sorted([*infos, *loaded.failed], key=lambda i: i.name)


_lock = threading.Lock()
_plugins: Plugins | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, loaded lazily and once."""
    return get_plugins().pm


def get_plugins() -> Plugins:
    """The process-wide facade, loaded lazily and once."""
    global _plugins
    if _plugins is None:
        with _lock:
            if _plugins is None:
                _plugins = Plugins(build_plugin_manager())
    return _plugins


def _facade(plugins: Plugins | None) -> Plugins:
    return plugins if plugins is not None else get_plugins()


def metrics(plugins: Plugins | None = None) -> dict[str, MetricSpec]:
    return _facade(plugins).metrics


def drift_tests(plugins: Plugins | None = None) -> dict[str, DriftTestSpec]:
    return _facade(plugins).drift_tests


def alert_sinks(plugins: Plugins | None = None) -> dict[str, AlertSinkSpec]:
    return _facade(plugins).alert_sinks


def model_families(plugins: Plugins | None = None) -> dict[str, ModelFamilySpec]:
    return _facade(plugins).model_families


def orchestrators(plugins: Plugins | None = None) -> dict[str, OrchestratorSpec]:
    return _facade(plugins).orchestrators


def plugin_infos(plugins: Plugins | None = None) -> list[PluginInfo]:
    facade = _facade(plugins)
    # Collect every registry so hook failures show up in the listing.
    _ = (
        facade.metrics,
        facade.drift_tests,
        facade.alert_sinks,
        facade.model_families,
        facade.orchestrators,
    )
    return facade.plugin_infos()


def plugin_problems(plugins: Plugins | None = None) -> Sequence[PluginProblem]:
    return _facade(plugins).problems
