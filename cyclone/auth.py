"""Who may call what: bearer tokens with scopes, checked by the shared server bootstrap.

Every RPC needs one scope:

- ``predict``: the inference APIs (Cyclone's and the Open Inference Protocol);
- ``label``: label ingestion (``AddLabels``, ``AddLabelsStream``);
- ``internal``: service-to-service calls nobody else should make (logging predictions, claiming
  and completing alerts, recording evaluations, ...);
- ``admin``: everything else (registry, plans, alerts, training data, trainer, monitor).

Health and reflection are always open. With no tokens configured nothing is checked (one user
on one machine). With tokens, admin and internal RPCs always need a token that has the scope;
predict and label stay open unless ``require_data_token`` is set -- but a token that is sent
must be valid. A missing or unknown token is UNAUTHENTICATED, a token without the scope
PERMISSION_DENIED. Tokens are compared as SHA-256 digests in constant time and never logged,
traced or echoed in an error.

The tokens file (YAML, mode 0600) lists tokens by name::

    tokens:
      - name: admin
        token: "c2VjcmV0..."          # or  sha256: "<hex digest of the token>"
        scopes: [admin, predict, label]
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc import aio

AUTHORIZATION = "authorization"
TOKEN_ENV = "CYCLONE_TOKEN"
TOKEN_FILE_NAME = "token"  # in the data dir: the local user's token, written by `cyclone up`
TOKENS_FILE_NAME = "tokens.yaml"


class Scope(StrEnum):
    PREDICT = "predict"
    LABEL = "label"
    ADMIN = "admin"
    INTERNAL = "internal"


ALL_SCOPES = frozenset(Scope)

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_DATA_PLANE_PREFIXES: tuple[tuple[str, Scope], ...] = (
    ("/cyclone.inference.v1.InferenceService/", Scope.PREDICT),
    ("/inference.GRPCInferenceService/", Scope.PREDICT),
)
_METHOD_SCOPES: Mapping[str, Scope] = {
    "/cyclone.store.v1.StoreService/AddLabels": Scope.LABEL,
    "/cyclone.store.v1.StoreService/AddLabelsStream": Scope.LABEL,
    # Internal: the mesh's own plumbing.
    "/cyclone.store.v1.StoreService/LogPredictions": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/ClaimAlerts": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/CompleteAlert": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/RecordEvaluation": Scope.INTERNAL,
    # Monitors sharing the models (docs/scaling-out.md).
    "/cyclone.store.v1.StoreService/LeaseModels": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/ReleaseModelLeases": Scope.INTERNAL,
    # Trainers electing the traffic plane's leader.
    "/cyclone.store.v1.StoreService/AcquireRoleLease": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/ReleaseRoleLease": Scope.INTERNAL,
    # The trainer's bookkeeping: jobs, lineage and rollouts are written by the trainer only
    # (people start and stop them through the trainer's own admin RPCs).
    "/cyclone.store.v1.StoreService/CreateTrainingJob": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/UpdateTrainingJob": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/FailOrphanedTrainingJobs": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/HeartbeatTrainingJobs": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/ClaimTrainingJobs": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/RegisterTrainedVersion": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/CreateRollout": Scope.INTERNAL,
    "/cyclone.store.v1.StoreService/UpdateRollout": Scope.INTERNAL,
}
# Internal RPCs have no REST mapping (protos/cyclone/store/v1/store_service.proto), so the
# transcoder cannot publish them; tests/integration/test_auth.py checks the two agree.


def scope_for(full_method: str) -> Scope | None:
    """The scope `full_method` (``/package.Service/Method``) needs; None when it is open."""
    if full_method.startswith(_OPEN_PREFIXES):
        return None
    scope = _METHOD_SCOPES.get(full_method)
    if scope is not None:
        return scope
    for prefix, prefix_scope in _DATA_PLANE_PREFIXES:
        if full_method.startswith(prefix):
            return prefix_scope
    return Scope.ADMIN


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message names the entry and field."""


@dataclasses.dataclass(frozen=True)
class _Token:
    name: str
    digest: bytes
    scopes: frozenset[Scope]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclasses.dataclass(frozen=True)
class TokenSet:
    """The tokens a server accepts."""

    tokens: tuple[_Token, ...]
    require_data_token: bool = False

    @classmethod
    def from_file(cls, path: Path, *, require_data_token: bool = False) -> TokenSet:
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise TokenFileError(f"tokens file {path}: {exc}") from None
        entries = raw.get("tokens") if isinstance(raw, dict) else None
        if not isinstance(entries, list) or not entries:
            raise TokenFileError(f"tokens file {path}: tokens: must be a non-empty list")
        tokens = []
        for i, entry in enumerate(entries):
            where = f"tokens file {path}: tokens[{i}]"
            if not isinstance(entry, dict):
                raise TokenFileError(f"{where}: must be a mapping")
            name = str(entry.get("name") or f"token-{i}")
            if "sha256" in entry:
                try:
                    digest = bytes.fromhex(str(entry["sha256"]))
                except ValueError:
                    raise TokenFileError(f"{where}.sha256: not a hex digest") from None
                if len(digest) != 32:
                    raise TokenFileError(f"{where}.sha256: must be 64 hex characters")
            elif isinstance(entry.get("token"), str) and len(entry["token"]) >= 16:
                digest = _digest(entry["token"])
            else:
                raise TokenFileError(f"{where}.token: must be a string of 16 or more characters")
            scopes = entry.get("scopes")
            if not isinstance(scopes, list) or not scopes:
                raise TokenFileError(f"{where}.scopes: must be a non-empty list")
            unknown = [s for s in scopes if s not in ALL_SCOPES]
            if unknown:
                raise TokenFileError(
                    f"{where}.scopes: unknown {unknown}; known: {sorted(ALL_SCOPES)}"
                )
            tokens.append(_Token(name, digest, frozenset(Scope(s) for s in scopes)))
        return cls(tuple(tokens), require_data_token)

    def scopes_of(self, token: str) -> frozenset[Scope] | None:
        """The scopes of `token`, None when it is not one of ours. Constant time per entry."""
        presented = _digest(token)
        found: frozenset[Scope] | None = None
        for entry in self.tokens:  # no early exit: timing does not tell which entry matched
            if hmac.compare_digest(presented, entry.digest):
                found = entry.scopes
        return found

    def check(
        self, scope: Scope, metadata: Iterable[tuple[str, Any]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and a message without the token."""
        header = next((str(v) for k, v in metadata or () if k == AUTHORIZATION), None)
        data_plane = scope in (Scope.PREDICT, Scope.LABEL)
        if header is None:
            if data_plane and not self.require_data_token:
                return None
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                f"authorization: a bearer token with scope {scope.value!r} is required",
            )
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization: expected 'Bearer <token>'",
            )
        scopes = self.scopes_of(token.strip())
        if scopes is None:
            return grpc.StatusCode.UNAUTHENTICATED, "authorization: unknown token"
        if scope not in scopes:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"authorization: the token lacks scope {scope.value!r}",
            )
        return None


# Given a call's metadata: None when it may proceed, else the status and message to refuse with.
Admission = Callable[[Iterable[tuple[str, Any]] | None], tuple[grpc.StatusCode, str] | None]


def admission(full_method: str, tokens: TokenSet | None) -> Admission | None:
    """The check a call of `full_method` must pass; None when nothing is checked (no tokens
    configured, or a method open to all such as health)."""
    scope = scope_for(full_method) if tokens is not None else None
    if tokens is None or scope is None:
        return None

    def admit(metadata: Iterable[tuple[str, Any]] | None) -> tuple[grpc.StatusCode, str] | None:
        return tokens.check(scope, metadata)

    return admit


def guard(
    full_method: str, handler: grpc.RpcMethodHandler, tokens: TokenSet
) -> grpc.RpcMethodHandler:
    """`handler` refusing calls without the token its method's scope needs.

    (The server's registration checks unary calls itself, in the one coroutine it wraps
    around them; see `cyclone.instrumentation.instrument`.)"""
    admit = admission(full_method, tokens)
    if admit is None:
        return handler

    async def refuse(context: aio.ServicerContext[Any, Any]) -> None:
        verdict = admit(context.invocation_metadata())
        if verdict is not None:
            await context.abort(*verdict)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await refuse(context)
            return await inner(request, context)

        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return make(unary, **kwargs)

    inner_stream = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await refuse(context)
        async for item in inner_stream(request, context):
            yield item

    make_stream = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return make_stream(streaming, **kwargs)


# ---- the client side -----------------------------------------------------------------------


def client_token(data_dir: Path | None = None) -> str | None:
    """The token a Cyclone client sends: ``$CYCLONE_TOKEN``, else ``<data_dir>/token`` (the
    data dir defaults to ``$CYCLONE_DATA_DIR``, else ~/.cyclone, as `cyclone up`'s does)."""
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env.strip()
    base = data_dir or Path(os.environ.get("CYCLONE_DATA_DIR") or Path.home() / ".cyclone")
    path = base / TOKEN_FILE_NAME
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


def write_local_tokens(data_dir: Path) -> str:
    """Create (once) the local user's all-scopes token and the tokens file; both mode 0600.

    Returns the token. Used by `cyclone up`, so a local user's CLI notices nothing.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    token_path, tokens_path = data_dir / TOKEN_FILE_NAME, data_dir / TOKENS_FILE_NAME
    if token_path.exists() and tokens_path.exists():
        return token_path.read_text().strip()
    token = secrets.token_urlsafe(32)
    for path, text in (
        (token_path, token + "\n"),
        (
            tokens_path,
            yaml.safe_dump(
                {
                    "tokens": [
                        {
                            "name": "local",
                            "token": token,
                            "scopes": sorted(s.value for s in ALL_SCOPES),
                        }
                    ]
                }
            ),
        ),
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    return token
