"""Offline checks of Nomad job files: each parses as HCL (python-hcl2, the `dev` extra), has the
blocks Cyclone relies on, and the files agree with each other (service names the templates look
up exist, ports used by services and tasks are declared, one image for Cyclone's own tasks)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_LOOKUP = re.compile(r'(?:nomadService|service) "([^"]+)"')


class JobFileError(ValueError):
    """A job file that would not run as Cyclone expects; the message names file and block."""


def _clean(value: Any) -> Any:
    """python-hcl2 keeps quotes on strings and marks blocks; give plain Python values."""
    if isinstance(value, dict):
        return {_clean_key(k): _clean(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"')
    return value


def _clean_key(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


def parse(text: str, name: str = "<job>") -> dict[str, Any]:
    """The job as {"name": ..., "body": {...}} with plain values."""
    try:
        import hcl2
    except ImportError as exc:  # pragma: no cover - dev extra missing
        raise JobFileError("validation needs python-hcl2 (pip install -e '.[dev]')") from exc
    try:
        document = _clean(hcl2.loads(text))
    except Exception as exc:
        raise JobFileError(f"{name}: not valid HCL: {exc}") from None
    jobs = document.get("job") or []
    if len(jobs) != 1 or len(jobs[0]) != 1:
        raise JobFileError(f"{name}: must hold exactly one job block")
    [(job_name, body)] = jobs[0].items()
    return {"name": job_name, "body": body}


def _blocks(body: Mapping[str, Any], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """Labelled blocks (`group "x" {}`) as (label, body) pairs."""
    found = []
    for entry in body.get(kind) or []:
        found += list(entry.items())
    return found


def _one(body: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    entries = body.get(kind) or []
    return dict(entries[0]) if entries else None


def check_job(text: str, name: str) -> dict[str, Any]:
    """Check one file; returns what `check_cluster` compares across files."""
    job = parse(text, name)
    body = job["body"]
    summary: dict[str, Any] = {
        "job": job["name"],
        "type": body.get("type", "service"),
        "services": set(),
        "lookups": set(),
        "images": set(),
    }
    if not body.get("datacenters"):
        raise JobFileError(f"{name}: job {job['name']!r}: datacenters missing")
    groups = _blocks(body, "group")
    if not groups:
        raise JobFileError(f"{name}: job {job['name']!r}: no group")
    for group_name, group in groups:
        where = f"{name}: group {group_name!r}"
        network = _one(group, "network") or {}
        ports = {label for label, _ in _blocks(network, "port")}
        volumes = {label for label, _ in _blocks(group, "volume")}
        for service in group.get("service") or []:
            for field in ("name", "port", "provider"):
                if not service.get(field):
                    raise JobFileError(f"{where}: service: {field} missing")
            if service["port"] not in ports:
                raise JobFileError(f"{where}: service port {service['port']!r} not in network")
            checks = service.get("check") or []
            if not checks:
                raise JobFileError(f"{where}: service {service['name']!r}: no check")
            for check in checks:
                if check.get("type") == "grpc" and service["provider"] != "consul":
                    raise JobFileError(f'{where}: grpc checks need provider = "consul"')
            summary["services"].add(service["name"])
        tasks = _blocks(group, "task")
        if not tasks:
            raise JobFileError(f"{where}: no task")
        for task_name, task in tasks:
            config = _one(task, "config") or {}
            if not config.get("image"):
                raise JobFileError(f"{where}: task {task_name!r}: config.image missing")
            summary["images"].add(config["image"])
            for port in config.get("ports") or []:
                if port not in ports:
                    raise JobFileError(f"{where}: task {task_name!r}: port {port!r} undeclared")
            for mount in task.get("volume_mount") or []:
                if mount.get("volume") not in volumes:
                    raise JobFileError(
                        f"{where}: task {task_name!r}: volume {mount.get('volume')!r} undeclared"
                    )
            for template in task.get("template") or []:
                summary["lookups"] |= set(_LOOKUP.findall(str(template.get("data", ""))))
        if summary["type"] == "service" and group_name == "inference":
            _check_revision_group(group, where)
    if summary["type"] == "batch" and body.get("parameterized"):
        for _task_name, task in tasks:
            if not task.get("dispatch_payload"):
                raise JobFileError(f"{name}: parameterized job without dispatch_payload")
    return summary


def _check_revision_group(group: Mapping[str, Any], where: str) -> None:
    update = _one(group, "update")
    if update is None:
        raise JobFileError(f"{where}: update block missing")
    for field in ("canary", "auto_promote", "auto_revert", "health_check"):
        if field not in update:
            raise JobFileError(f"{where}: update.{field} missing")
    if update["health_check"] != "checks":
        raise JobFileError(f'{where}: update.health_check must be "checks"')
    scaling = _one(group, "scaling")
    if scaling is None:
        raise JobFileError(f"{where}: scaling block missing")
    if scaling.get("min") != 0:
        raise JobFileError(f"{where}: scaling.min must be 0 (scale to zero)")
    policy = _one(scaling, "policy")
    if policy is None or not _blocks(policy, "check"):
        raise JobFileError(f"{where}: scaling.policy with a check missing (Nomad Autoscaler)")


def check_cluster(files: Mapping[str, str], cyclone_image: str | None = None) -> None:
    """Check every file and their consistency; raises `JobFileError` on the first problem."""
    summaries = {name: check_job(text, name) for name, text in files.items()}
    services: set[str] = set()
    jobs: set[str] = set()
    for name, summary in summaries.items():
        if summary["job"] in jobs:
            raise JobFileError(f"{name}: job {summary['job']!r} defined twice")
        jobs.add(summary["job"])
        clash = services & summary["services"]
        if clash:
            raise JobFileError(f"{name}: service {sorted(clash)} registered by another job too")
        services |= summary["services"]
    for name, summary in summaries.items():
        missing = summary["lookups"] - services
        if missing:
            raise JobFileError(f"{name}: templates look up {sorted(missing)}: no job registers it")
    if cyclone_image is not None:
        for name, summary in summaries.items():
            foreign = {i for i in summary["images"] if not i.startswith("timescale/")}
            if foreign - {cyclone_image}:
                raise JobFileError(
                    f"{name}: image {sorted(foreign)} differs from the cluster's {cyclone_image!r}"
                )


def check_directory(directory: Path, cyclone_image: str | None = None) -> list[str]:
    files = {
        str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*.nomad.hcl"))
    }
    if not files:
        raise JobFileError(f"{directory}: no *.nomad.hcl files")
    check_cluster(files, cyclone_image)
    return sorted(files)
