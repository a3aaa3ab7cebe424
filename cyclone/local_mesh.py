"""Where a `cyclone up` mesh on this machine listens: the file it writes, the defaults it uses.

`cyclone up` writes `<data_dir>/mesh.json` once every component is up and removes it when it
stops; CLI commands read it so that, with a mesh running, no address flag is needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

MESH_FILE = "mesh.json"
DATA_DIR_ENV = "CYCLONE_DATA_DIR"

# Default ports of `cyclone up` (and of `cyclone serve <component>`).
DEFAULT_PORTS: dict[str, int] = {
    "public": 8080,  # Envoy: predictions and labels, gRPC and REST
    "control": 8081,  # Envoy, loopback: every service's control plane
    "envoy_admin": 9901,
    "store": 8002,
    "monitor": 8003,
    "trainer": 8004,
    "dashboard": 8090,
}


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cyclone")


@dataclasses.dataclass(frozen=True)
class ComponentInfo:
    address: str
    pid: int
    log: str = ""


@dataclasses.dataclass(frozen=True)
class MeshInfo:
    """What a running `cyclone up` tells clients."""

    pid: int
    data_dir: str
    public: str  # Envoy's public listener, HOST:PORT
    control: str
    dashboard: str  # URL
    components: dict[str, ComponentInfo]
    repository: str = ""  # the model repository the mesh serves from

    def address(self, component: str) -> str | None:
        info = self.components.get(component)
        return info.address if info else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MeshInfo:
        return cls(
            pid=int(raw["pid"]),
            data_dir=str(raw["data_dir"]),
            public=str(raw["public"]),
            control=str(raw["control"]),
            dashboard=str(raw["dashboard"]),
            components={k: ComponentInfo(**v) for k, v in dict(raw["components"]).items()},
            repository=str(raw.get("repository", "")),
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_mesh(data_dir: Path | None = None) -> MeshInfo | None:
    """The running mesh of `data_dir` (default `$CYCLONE_DATA_DIR` or ~/.cyclone), if any."""
    path = (data_dir or default_data_dir()) / MESH_FILE
    try:
        info = MeshInfo.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if _alive(info.pid) else None


# Where each component's address comes from, in order: its flag, its environment variable,
# the running mesh of the data dir, the default port.
ADDRESS_FLAG: dict[str, str] = {
    "public": "--address",
    "store": "--store",
    "monitor": "--monitor",
    "trainer": "--trainer",
}
ADDRESS_ENV: dict[str, str] = {
    "public": "CYCLONE_ADDRESS",
    "store": "CYCLONE_STORE",
    "monitor": "CYCLONE_MONITOR",
    "trainer": "CYCLONE_TRAINER",
}
_NAMES = {"public": "the public listener (Envoy)"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A component's address and where it came from (said in errors when nothing answers)."""

    component: str
    address: str
    source: str  # "--monitor", "$CYCLONE_MONITOR", "mesh", "default"
    data_dir: Path | None = None

    def describe(self) -> str:
        name = _NAMES.get(self.component, f"the {self.component}")
        if self.source == "mesh":
            origin = f"the `cyclone up` running in {self.data_dir}"
        elif self.source == "default":
            origin = f"default port; no `cyclone up` is running in {self.data_dir}"
        else:
            origin = f"from {self.source}"
        return f"{name} at {self.address} ({origin})"


def resolve(component: str, flag: str | None = None, data_dir: Path | None = None) -> Target:
    """Where `component` (public, store, monitor, trainer) listens: the flag, else its
    `CYCLONE_*` variable, else the running mesh of the data dir, else the default port.

    "public" is Envoy's public listener with a mesh running, else a lone inference server on
    8001.
    """
    if flag:
        return Target(component, flag, ADDRESS_FLAG[component])
    env = os.environ.get(ADDRESS_ENV[component], "").strip()
    if env:
        return Target(component, env, "$" + ADDRESS_ENV[component])
    directory = data_dir or default_data_dir()
    mesh = read_mesh(directory)
    if mesh is not None:
        found = mesh.public if component == "public" else mesh.address(component)
        if found:
            return Target(component, found, "mesh", directory)
    port = 8001 if component == "public" else DEFAULT_PORTS[component]
    return Target(component, f"127.0.0.1:{port}", "default", directory)


def default_address(component: str, data_dir: Path | None = None) -> str:
    """Where `component` listens when no flag names it (see `resolve`)."""
    return resolve(component, None, data_dir).address
