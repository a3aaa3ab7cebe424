"""Meta-tests: every hook is documented and exercised by some test (as in datasette)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest

from cyclone import hookspecs
from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import ModelFamilySpec, OrchestratorSpec
from cyclone.plugins import Plugins, build_plugin_manager

HOOKS = sorted(
    name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "cyclone_spec")
)
TESTS_DIR = Path(__file__).parents[1]


def test_hooks_found() -> None:
    assert "cyclone_register_metrics" in HOOKS
    assert all(name.startswith("cyclone_") for name in HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    assert "Called" in doc, f"{hook}: say when it is called"
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{hook}: document parameter {param!r}"
    hints = inspect.get_annotations(fn)
    assert "return" in hints and set(inspect.signature(fn).parameters) <= set(hints)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    own = Path(__file__).resolve()
    sources = [
        p.read_text(encoding="utf-8") for p in TESTS_DIR.rglob("test_*.py") if p.resolve() != own
    ]
    # This file's own tests below count too, but not the HOOKS listing above.
    sources.append(own.read_text(encoding="utf-8").split("# --- hook tests ---", 1)[1])
    assert any(hook in src for src in sources), f"no test exercises {hook}"


# --- hook tests ---


class FamilyAndOrchestrator:
    @hookimpl
    def cyclone_register_model_families(self, register: Callable[[ModelFamilySpec], None]) -> None:
        register(ModelFamilySpec("tiny", lambda params: ("estimator", dict(params)), "regression"))

    @hookimpl
    def cyclone_register_orchestrators(self, register: Callable[[OrchestratorSpec], None]) -> None:
        register(OrchestratorSpec("inline", lambda config: ("orchestrator", dict(config))))


def test_model_families_and_orchestrators_registry() -> None:
    plugins = Plugins(
        build_plugin_manager(load_entrypoints=False, extra_plugins=[("t", FamilyAndOrchestrator())])
    )
    family = plugins.model_families["tiny"]
    assert family.plugin == "t"
    assert family.build({"alpha": 1}) == ("estimator", {"alpha": 1})
    assert plugins.orchestrators["inline"].create({"x": 2}) == ("orchestrator", {"x": 2})
    assert plugins.problems == []
