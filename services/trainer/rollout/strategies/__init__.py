"""The rollout strategies, one module each, found by name.

`cyclone.rollout_strategies.STRATEGIES` (the trainer proto's `RolloutStrategy` enum) lists the
names; `<name>.py` here says what that strategy does as its `STRATEGY`. A name without a module
fails the trainer's import, naming the file to write.
"""

from __future__ import annotations

import importlib

from cyclone.rollout_strategies import STRATEGIES

from .base import Engine, Handler, Strategy


def load(name: str) -> Strategy:
    """The `STRATEGY` of module `<name>.py` here (ImportError naming the file when missing)."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise ImportError(
            f"rollout strategy {name!r} is in the trainer proto's RolloutStrategy enum but has"
            f" no module services/trainer/rollout/strategies/{name}.py"
        ) from exc
    strategy = getattr(module, "STRATEGY", None)
    if not isinstance(strategy, Strategy) or strategy.name != name:
        raise ImportError(f"{module.__name__}: expected STRATEGY = Strategy(name={name!r}, ...)")
    return strategy


BY_NAME: dict[str, Strategy] = {name: load(name) for name in STRATEGIES}

__all__ = ["BY_NAME", "Engine", "Handler", "Strategy", "load"]
