"""The Nomad job files: rendered ones and the committed example parse, hold the blocks Cyclone
relies on and agree with each other; the validator catches what it claims to."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cyclone.nomad import render as nomad
from cyclone.nomad.validate import JobFileError, check_cluster, check_directory, parse
from cyclone_app.cli import app

ROOT = Path(__file__).resolve().parents[2]
IMAGE = nomad.ClusterSettings().image


def test_committed_example_is_current_and_valid() -> None:
    expected = nomad.render(nomad.example_revisions())
    on_disk = {
        str(p.relative_to(ROOT / "deploy/nomad")): p.read_text()
        for p in (ROOT / "deploy/nomad").rglob("*.nomad.hcl")
    }
    assert on_disk == expected, "deploy/nomad is stale: re-render it (see deploy/nomad/README.md)"
    assert len(check_directory(ROOT / "deploy/nomad", IMAGE)) == 7


@pytest.mark.parametrize("discovery", ["nomad", "consul"])
def test_rendered_cluster_is_consistent(discovery: str) -> None:
    revisions = [
        nomad.RevisionSpec("credit", "1", "serving"),
        nomad.RevisionSpec("credit", "2", "canary"),
        nomad.RevisionSpec("credit", "0", "retired"),
        nomad.RevisionSpec("fraud", "1.5", "serving"),
    ]
    files = nomad.render(revisions, nomad.ClusterSettings(discovery=discovery))
    check_cluster(files, IMAGE)
    assert sorted(f for f in files if f.startswith("revisions/")) == [
        "revisions/credit--1.nomad.hcl",
        "revisions/credit--2.nomad.hcl",
        "revisions/fraud--1.5.nomad.hcl",
    ]
    job = parse(files["revisions/fraud--1.5.nomad.hcl"])
    assert job["name"] == "cyclone-inference-fraud--1.5"
    [(_, group)] = job["body"]["group"][0].items()
    update = group["update"][0]
    assert (update["canary"], update["auto_revert"], update["health_check"]) == (1, True, "checks")
    assert group["scaling"][0]["min"] == 0
    [service] = group["service"]
    assert service["name"] == "cyclone-fraud-v1-5"
    assert service["provider"] == discovery
    assert service["check"][0]["type"] == ("grpc" if discovery == "consul" else "tcp")
    envoy = files["envoy.nomad.hcl"]
    lookup = "nomadService" if discovery == "nomad" else "service"
    for name in ("cyclone-credit-v1", "cyclone-credit-v2", "cyclone-fraud-v1-5", "cyclone-store"):
        assert f'{lookup} \\"{name}\\"' in envoy or f'{lookup} "{name}"' in envoy
    assert "cyclone-credit-v0" not in envoy


def _revision_text() -> str:
    return nomad.render(nomad.example_revisions())["revisions/credit--1.nomad.hcl"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("    update {", "    xupdate {"), "update block missing"),
        (lambda t: t.replace("min     = 0", "min     = 1"), "scaling.min must be 0"),
        (lambda t: t.replace('type     = "tcp"', 'type     = "grpc"'), "grpc checks need"),
        (lambda t: t.replace('ports = ["grpc", "metrics"]', 'ports = ["grpc", "http"]'), "'http'"),
        (lambda t: t.rstrip()[:-1], "not valid HCL"),
    ],
)
def test_validator_rejects_broken_revision_jobs(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    files = nomad.render(nomad.example_revisions())
    files["revisions/credit--1.nomad.hcl"] = edit(_revision_text())
    with pytest.raises(JobFileError, match=message):
        check_cluster(files)


def test_validator_rejects_a_lookup_nobody_registers_and_a_foreign_image() -> None:
    files = nomad.render(nomad.example_revisions())
    files.pop("store.nomad.hcl")
    with pytest.raises(JobFileError, match="cyclone-store"):
        check_cluster(files)
    files = nomad.render(nomad.example_revisions())
    with pytest.raises(JobFileError, match="differs from the cluster"):
        check_cluster(files, "other:1")


def test_service_names_are_dns_safe() -> None:
    assert nomad.service_name("Credit_Risk", "1.2") == "cyclone-credit-risk-v1-2"
    assert len(nomad.service_name("m" * 100, "1")) <= 63


def _repository(root: Path) -> Path:
    for model, version in [("credit", "1"), ("credit", "2"), ("fraud", "7")]:
        directory = root / model / version
        directory.mkdir(parents=True)
        (directory / "model.yaml").write_text("name: x\n")
    return root


def test_cli_renders_from_a_model_repository(tmp_path: Path) -> None:
    repo = _repository(tmp_path / "models")
    out = tmp_path / "jobs"
    (out / "revisions").mkdir(parents=True)
    (out / "revisions" / "gone--1.nomad.hcl").write_text("stale")
    result = CliRunner().invoke(
        app, ["deploy", "nomad", "render", "--out", str(out), "--model-repository", str(repo)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "revisions").iterdir()) == [
        "credit--2.nomad.hcl",
        "fraud--7.nomad.hcl",
    ]
    check_directory(out, IMAGE)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --store or --model-repository"),
        (["--model-repository", "/nonexistent"], "--model-repository"),
        (["--model-repository", ".", "--discovery", "zookeeper"], "discovery"),
        (["--model-repository", ".", "--replicas", "-1"], "--replicas"),
        (["--model-repository", ".", "--stores", "0"], "--stores"),
        (["--model-repository", ".", "--monitors", "0"], "--monitors"),
        (["--model-repository", ".", "--trainers", "0"], "--trainers"),
    ],
)
def test_cli_bad_input_names_the_option(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["deploy", "nomad", "render", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output


def _group(text: str) -> dict:  # type: ignore[type-arg]
    [(_, group)] = parse(text)["body"]["group"][0].items()
    return dict(group)


def _env(text: str) -> str:
    [template] = _group(text)["task"][0].popitem()[1]["template"]
    return str(template["data"])


def test_stores_monitors_and_trainers_run_several_instances() -> None:
    files = nomad.render(nomad.example_revisions())
    assert _group(files["store.nomad.hcl"])["count"] == 2
    assert _group(files["monitor.nomad.hcl"])["count"] == 2
    assert _group(files["trainer.nomad.hcl"])["count"] == 2
    # Each monitor and trainer is its own lease holder: the allocation tells them apart.
    for job in ("monitor.nomad.hcl", "trainer.nomad.hcl"):
        assert 'CYCLONE_INSTANCE_ID={{ env "NOMAD_ALLOC_ID" }}' in _env(files[job]), job
    # No trainer drives Envoy on Nomad (routes rendered, rollouts are deployments): none
    # leads a traffic plane, so any of them serves any call.
    assert "--envoy" not in files["trainer.nomad.hcl"]
    # Callers list every store in one gRPC target and fail over between them.
    for job in ("monitor.nomad.hcl", "trainer.nomad.hcl", "revisions/credit--1.nomad.hcl"):
        assert "CYCLONE_STORE=ipv4:{{ range $i, $s := nomadService" in _env(files[job]), job
    # Envoy health-checks the store cluster and retries idempotent calls on a sibling.
    envoy = files["envoy.nomad.hcl"]
    assert "/cyclone.store.v1.StoreService/LogPredictions" in envoy
    assert "unavailable,reset" in envoy


def test_one_store_keeps_the_plain_address() -> None:
    files = nomad.render(nomad.example_revisions(), nomad.ClusterSettings(stores=1, monitors=1))
    assert _group(files["store.nomad.hcl"])["count"] == 1
    env = _env(files["monitor.nomad.hcl"])
    assert 'CYCLONE_STORE={{ range nomadService "cyclone-store" }}' in env
    assert "/cyclone.store.v1.StoreService/LogPredictions" not in files["envoy.nomad.hcl"]
