"""What every StoreService servicer module shares: the context type and the `Store` it calls."""

from __future__ import annotations

from typing import Any, TypeAlias

from grpc import aio

from services.store.domain import Store

Context: TypeAlias = aio.ServicerContext[Any, Any]


class RpcArea:
    """An area's RPCs, mixed into `StoreServicer`, which sets `self.store`; each method only
    translates protobuf around one `Store` call."""

    store: Store
