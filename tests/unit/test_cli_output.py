"""Tables printed to a pipe or a file keep their full width (rich cuts at 80 columns)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cyclone_app.cli import app

runner = CliRunner()


def test_tables_are_not_cut_when_output_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    result = runner.invoke(app, ["plugins", "list"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    # Every hook of the classification plugin is on its row, however long the row is.
    [row] = [line for line in result.output.splitlines() if "plugins.classification" in line]
    assert len(row) > 80 and "cyclone_register_metrics" in row
