"""The rollout strategies' names: one list, derived from the trainer API's `RolloutStrategy` enum.

A strategy's name is its enum value without the prefix, lower-cased (`ROLLOUT_STRATEGY_RED_BLACK`
is `red_black`), so the plan's `strategy:`, the CLI's `--strategy`, the store's check and the
trainer's protobuf mapping all follow the proto and nothing else. What a strategy does lives in
`services/trainer/rollout/strategies/<name>.py` (a test checks there is one module per name).
"""

from __future__ import annotations

from typing import TypeAlias, cast

from cyclone.trainer.v1 import trainer_service_pb2 as _pb

# One of STRATEGIES (a plain str: the list is the proto's, not a hand-written Literal).
StrategyName: TypeAlias = str

PREFIX = "ROLLOUT_STRATEGY_"
_UNSPECIFIED = _pb.ROLLOUT_STRATEGY_UNSPECIFIED

STRATEGIES: tuple[StrategyName, ...] = tuple(
    name.removeprefix(PREFIX).lower()
    for name, number in _pb.RolloutStrategy.items()
    if number != _UNSPECIFIED
)


def strategy_to_pb(strategy: StrategyName | None) -> _pb.RolloutStrategy.ValueType:
    """The enum number of `strategy` (None or empty: UNSPECIFIED, the plan decides)."""
    if not strategy:
        return _UNSPECIFIED
    if strategy not in STRATEGIES:
        raise ValueError(f"expected one of {list(STRATEGIES)}, got {strategy!r}")
    return _pb.RolloutStrategy.Value(PREFIX + strategy.upper())


def strategy_from_pb(number: int) -> StrategyName | None:
    """The name of enum number `number`; None for UNSPECIFIED; ValueError for a number this
    build does not know."""
    if number == _UNSPECIFIED:
        return None
    try:
        name = _pb.RolloutStrategy.Name(cast(_pb.RolloutStrategy.ValueType, number))
    except ValueError:
        raise ValueError(f"unknown rollout strategy {number}") from None
    return name.removeprefix(PREFIX).lower()
