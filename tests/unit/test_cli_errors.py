"""What the CLI says when a call fails: a server that answered UNAVAILABLE (a standby trainer)
is quoted, not reported as "nothing answered"; a call Envoy could not forward is tried again
while the component fails over, any other error is not."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cyclone.local_mesh import Target
from cyclone_app import cli_errors


class RpcFailure(grpc.RpcError):
    """An RPC error as the sync stubs raise it: a code and details (unit-test stand-in)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


TRAINER = Target("trainer", "127.0.0.1:9", "--trainer", Path("/nowhere"))
STANDBY = (
    "ListRollouts: this trainer is a standby; the traffic plane's leader is 127.0.0.1:46699"
    " (retry: through Envoy's control listener calls reach the leader)"
)


@pytest.mark.parametrize(
    "details",
    [
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: "
        "Failed to connect to remote host: Connection refused",
        "no healthy upstream",
        "upstream connect error or disconnect/reset before headers. reset reason: "
        "connection failure",
        "",
    ],
)
def test_nothing_answering_says_so_with_the_way_out(details: str) -> None:
    said = cli_errors.message(RpcFailure(grpc.StatusCode.UNAVAILABLE, details), TRAINER)
    assert said.startswith("nothing answered at the trainer at 127.0.0.1:9"), said


def test_a_standby_that_answered_is_quoted() -> None:
    said = cli_errors.message(RpcFailure(grpc.StatusCode.UNAVAILABLE, STANDBY), TRAINER)
    assert said == f"UNAVAILABLE: {STANDBY}"


def test_a_call_envoy_could_not_forward_is_tried_again_until_it_answers() -> None:
    failures = [
        RpcFailure(grpc.StatusCode.UNAVAILABLE, "no healthy upstream"),
        RpcFailure(
            grpc.StatusCode.UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: "
            "connection failure, transport failure reason: delayed connect error: 111",
        ),
        RpcFailure(
            grpc.StatusCode.UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: "
            "remote connection failure, transport failure reason: delayed connect error: "
            "Connection refused",
        ),
    ]
    calls = 0

    def call() -> str:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)
        return "answered"

    assert cli_errors.waiting_out_failover(call, wait=10) == "answered"
    assert calls == 4


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.UNAVAILABLE, STANDBY),  # answered: retrying would not change it
        (grpc.StatusCode.NOT_FOUND, "model: 'nope' is not registered"),
        (grpc.StatusCode.UNAVAILABLE, "upstream reset: reset reason: connection termination"),
    ],
)
def test_other_failures_are_not_tried_again(code: grpc.StatusCode, details: str) -> None:
    calls = 0

    def call() -> str:
        nonlocal calls
        calls += 1
        raise RpcFailure(code, details)

    with pytest.raises(RpcFailure):
        cli_errors.waiting_out_failover(call, wait=10)
    assert calls == 1


def test_the_wait_is_bounded() -> None:
    def call() -> str:
        raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "no healthy upstream")

    with pytest.raises(RpcFailure):
        cli_errors.waiting_out_failover(call, wait=0.6)
