"""One list of rollout strategies (the trainer proto's enum), one module per strategy, and the
phases a persisted rollout records."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cyclone import rollout_strategies
from cyclone.errors import InvalidArgument
from cyclone.rollout_plan import check_rollout
from cyclone.rollout_strategies import STRATEGIES, strategy_from_pb, strategy_to_pb
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone_app.cli import app
from services.trainer import convert
from services.trainer.rollout import Phase, Progress
from services.trainer.rollout.strategies import BY_NAME, Strategy, canary, load


def test_the_strategy_names_are_the_proto_enum_values_lower_cased() -> None:
    from_proto = {
        value.name.removeprefix("ROLLOUT_STRATEGY_").lower()
        for value in pb.RolloutStrategy.DESCRIPTOR.values
        if value.number != pb.ROLLOUT_STRATEGY_UNSPECIFIED
    }
    assert set(STRATEGIES) == from_proto == {"canary", "blue_green", "red_black", "shadow"}


def test_every_strategy_name_has_its_module_and_nothing_else_does() -> None:
    assert list(BY_NAME) == list(STRATEGIES)
    assert all(BY_NAME[name].name == name for name in STRATEGIES)


def test_a_name_without_a_module_fails_naming_the_file_to_write() -> None:
    with pytest.raises(
        ImportError, match=r"no module services/trainer/rollout/strategies/ramp\.py"
    ):
        load("ramp")


def test_a_strategy_cannot_tick_a_phase_it_does_not_list() -> None:
    with pytest.raises(ValueError, match="does not list"):
        Strategy("odd", (Phase.START,), canary.begin, {Phase.STEPS: canary.analyse_step})


@pytest.mark.parametrize("name", STRATEGIES)
def test_protobuf_numbers_map_by_name_both_ways(name: str) -> None:
    number = strategy_to_pb(name)
    assert pb.RolloutStrategy.Name(number) == "ROLLOUT_STRATEGY_" + name.upper()
    assert strategy_from_pb(number) == name
    assert convert.strategy_from_pb(number) == name


def test_unspecified_and_unknown_strategies() -> None:
    assert strategy_to_pb("") == strategy_to_pb(None) == pb.ROLLOUT_STRATEGY_UNSPECIFIED
    assert strategy_from_pb(pb.ROLLOUT_STRATEGY_UNSPECIFIED) is None
    with pytest.raises(ValueError, match="unknown rollout strategy 99"):
        strategy_from_pb(99)
    with pytest.raises(InvalidArgument, match="strategy: unknown rollout strategy 99"):
        convert.strategy_from_pb(99)
    with pytest.raises(ValueError, match="expected one of"):
        strategy_to_pb("ramp")


def test_the_plan_and_the_store_check_against_the_same_list() -> None:
    from services.store.domain import rollouts as store_rollouts

    assert store_rollouts.STRATEGIES is rollout_strategies.STRATEGIES
    for name in STRATEGIES:
        spec, problems = check_rollout({"strategy": name})
        assert spec.strategy == name and problems == []
    _, problems = check_rollout({"strategy": "ramp"})
    assert problems == [
        "rollout.strategy: expected one of ['canary', 'blue_green', 'red_black', 'shadow'],"
        " got 'ramp'"
    ]


def test_the_cli_refuses_an_unknown_strategy_listing_the_known_ones() -> None:
    result = CliRunner().invoke(app, ["rollout", "credit", "2", "--strategy", "ramp"])
    assert result.exit_code != 0
    assert "--strategy: expected one of canary, blue_green, red_black, shadow" in result.output


@pytest.mark.parametrize("phase", [p for p in Phase if p is not Phase.UNKNOWN])
def test_a_recorded_phase_stringloads_as_its_phase(phase: Phase) -> None:
    old_record = {"phase": phase.value, "step_index": 1, "failed_checks": 1}  # as stored JSON
    progress = Progress.from_dict(json.loads(json.dumps(old_record)))
    assert progress.phase is phase and progress.step_index == 1
    assert json.loads(json.dumps(progress.to_dict()))["phase"] == phase.value


def test_a_phase_this_build_does_not_knowloads_as_unknown() -> None:
    assert Progress.from_dict({"phase": "cutover"}).phase is Phase.UNKNOWN
    assert Progress.from_dict({}).phase is Phase.START
