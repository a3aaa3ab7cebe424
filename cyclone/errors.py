"""Domain errors shared by every service, mapped to gRPC status codes in one place."""

from __future__ import annotations

import grpc


class CycloneError(Exception):
    """An error a caller can act on; `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CycloneError):
    """The request is malformed; the message names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CycloneError):
    """A named model, version or record does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(CycloneError):
    """The system is not in a state where the request can run."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(CycloneError):
    """A dependency is down; the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class NotLeader(Unavailable):
    """This instance does not lead the role the request needs (a standby trainer, or one whose
    lease ended): another instance does, or will within the lease time; retry."""


class ModelLoadError(CycloneError):
    """A model in the repository cannot be loaded (corrupt, missing or inconsistent files)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
