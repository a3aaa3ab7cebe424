"""The README's commands, in its order, against `cyclone up` serving two models on other ports
(and a third imported into the running mesh): no address flag anywhere, rollback after a
promotion, and no level but GREEN and no alert while nothing is wrong (the monitor's probes
reach every model through Envoy, a fresh route included)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import yaml
from sklearn.ensemble import RandomForestClassifier
from test_up import ROW, Up, _ports, _rest_predict

from cyclone_app.examples import bike_frame, bike_pipeline, credit_frame, credit_pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

FOREST_ROW = {"age": 41, "income": 52000, "visits": 3}


def _files(root: Path) -> dict[str, Path]:
    frame = credit_frame(400, seed=0)
    joblib.dump(credit_pipeline(frame), root / "credit.joblib")
    frame.to_csv(root / "holdout.csv", index=False)
    newer = credit_frame(400, seed=3)
    joblib.dump(credit_pipeline(newer), root / "credit-2.joblib")
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.uniform(18, 80, 300), rng.uniform(1e4, 1e5, 300), rng.poisson(3, 300)])
    forest = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0)
    joblib.dump(forest.fit(x, (x[:, 2] > 3).astype(int)), root / "forest.joblib")
    bikes = bike_frame(24 * 20, seed=0)
    joblib.dump(bike_pipeline(bikes), root / "bikes.joblib")
    bikes.to_csv(root / "bikes.csv", index=False)
    return {
        "bikes": root / "bikes.joblib",
        "bikes_sample": root / "bikes.csv",
        "credit": root / "credit.joblib",
        "holdout": root / "holdout.csv",
        "credit2": root / "credit-2.joblib",
        "forest": root / "forest.joblib",
    }


def _all_green(up: Up, models: set[str]) -> dict[str, Any]:
    """`cyclone status --json`, asserting every model is GREEN, no alert is open, no problem."""
    status = json.loads(up.cli("status", "--json").stdout)
    assert status["problems"] == [], status["problems"]
    levels = {m: s.get("level") for m, s in status["models"].items()}
    assert set(levels) == models, levels
    wrong = {
        m: (lv, status["models"][m].get("reasons")) for m, lv in levels.items() if lv != "GREEN"
    }
    assert not wrong, wrong  # None: not evaluated yet is fine too
    assert status["alerts"] == [], status["alerts"]
    return status


def _probes_answered(up: Up, models: set[str], timeout: float = 90) -> None:
    """Wait until the monitor's probes got an answer from every model (uptime 1.0), checking
    all the while that nothing turned AMBER or raised an alert."""
    deadline = time.monotonic() + timeout
    while True:
        status = _all_green(up, models)
        uptimes = {m: s.get("metrics", {}).get("uptime") for m, s in status["models"].items()}
        if all(uptimes[m] == 1.0 for m in models):
            return
        assert time.monotonic() < deadline, uptimes
        time.sleep(1)


def test_the_readme_with_two_models_on_other_ports(tmp_path: Path) -> None:
    files = _files(tmp_path)
    data_dir = tmp_path / "data"
    repository = str(data_dir / "models")
    up = Up(data_dir, _ports())
    # README: import, then `cyclone up`.
    up.cli(
        "model", "import", str(files["credit"]), "--name", "credit", "--repository", repository,
        "--sample", str(files["holdout"]), "--label-column", "defaulted",
    )  # fmt: skip
    up.cli(
        "model", "import", str(files["forest"]), "--name", "forest",
        "--feature-names", "age,income,visits", "--repository", repository,
    )  # fmt: skip
    up.start()
    try:
        # Both models answer through Envoy; the monitor's probes reach both (uptime 1.0) and
        # the mesh's own start-up turned nothing AMBER.
        _probes_answered(up, {"credit", "forest"})
        # A third model imported into the running mesh: its route is new when the first probe
        # round comes, and that is not an outage either.
        third = up.cli(
            "model", "import", str(files["bikes"]), "--name", "bikes",
            "--sample", str(files["bikes_sample"]), "--label-column", "rentals",
        )  # fmt: skip
        assert "serving it through" in third.stdout, third.stdout
        _probes_answered(up, {"credit", "forest", "bikes"})
        models = {"credit", "forest", "bikes"}

        row = up.cli("predict", "--model", "credit", "--row", json.dumps(ROW), "--json")
        prediction = json.loads(row.stdout.splitlines()[0])
        assert prediction["version"] == "1"
        forest = up.cli("predict", "--model", "forest", "--row", json.dumps(FOREST_ROW), "--json")
        assert json.loads(forest.stdout)["label"] in ("0", "1")
        assert _rest_predict(up.ports["public"], "credit")["version"] == "1"
        listing = f"http://127.0.0.1:{up.ports['public']}/v1/models"
        with urllib.request.urlopen(listing, timeout=10) as response:
            assert [m["name"] for m in json.loads(response.read())["models"]] == [
                "bikes",
                "credit",
                "forest",
            ]
        labelled = up.cli("label", "--model", "credit", "--id", prediction["prediction_id"],
                          "--value", "1")  # fmt: skip
        assert "stored 1 label(s)" in labelled.stdout

        text = up.cli("status").stdout
        assert all(m in text for m in models) and "…" not in text

        # plan get -> edit -> plan set: a red-black rollout that keeps the old version warm 1 s.
        got = up.cli("plan", "get", "credit").stdout
        assert got.startswith("# revision 0 (generated default)\n")
        plan = yaml.safe_load(got)
        plan["rollout"] = {"strategy": "red_black", "red_black": {"keep_old_for": "1s"},
                           "drain": "1s"}  # fmt: skip
        (tmp_path / "plan.yaml").write_text(got.splitlines()[0] + "\n" + yaml.safe_dump(plan))
        assert (
            "saved as revision 1"
            in up.cli("plan", "set", "credit", str(tmp_path / "plan.yaml")).stdout
        )
        again = up.cli("plan", "get", "credit").stdout
        assert again.startswith("# revision 1\n") and "revision 0" not in again

        assert "#" in up.cli("retrain", "credit", "--no-wait").stdout
        assert "credit" in up.cli("jobs").stdout

        # A second version: imported into the running mesh, rolled out, promoted by hand.
        imported = up.cli(
            "model", "import", str(files["credit2"]), "--name", "credit",
            "--sample", str(files["holdout"]), "--label-column", "defaulted",
        )  # fmt: skip
        assert "cyclone rollout credit 2" in imported.stdout, imported.stdout
        started = up.cli("rollout", "credit", "2").stdout
        rollout_id = started.split()[1]
        assert started.startswith(f"rollout {rollout_id} credit 1 -> 2 (red_black)"), started
        deadline = time.monotonic() + 60
        while True:  # promote needs the new revision started
            promoted = up.cli("promote", rollout_id, check=False)
            if promoted.returncode == 0:
                break
            assert "has not started its new revision yet" in promoted.stderr, promoted.stderr
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert f"promoted rollout {rollout_id}: credit 2 takes all traffic" in promoted.stdout
        assert _rest_predict(up.ports["public"], "credit")["version"] == "2"

        # Rollback after the promotion: a rollout of its own back to version 1.
        back = up.cli("rollback", "credit", "--wait")
        assert "rolling credit back from 2 to 1" in back.stdout, back.stdout
        assert ": promoted at 100%" in back.stdout.strip().splitlines()[-1], back.stdout
        assert _rest_predict(up.ports["public"], "credit")["version"] == "1"
        listed = up.cli("rollouts").stdout.splitlines()
        assert listed[0].split()[2:5] == ["credit", "2", "->"] and " 1 (red_black)" in listed[0]

        assert up.cli("alerts").stdout.strip() == ""
        assert "metrics:" in up.cli("plugins", "list").stdout
        status = _all_green(up, models)
        assert status["models"]["credit"]["serving"] == "1"
    finally:
        stopped = up.cli("down", check=False)
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped"), stopped.stderr
    assert up.process is not None and up.process.wait(30) == 0

    # Nothing running any more: a command names what it tried and how to start it.
    missing = up.cli("alerts", check=False)
    assert missing.returncode == 1
    assert "start it with `cyclone up`" in missing.stderr and "StatusCode" not in missing.stderr
