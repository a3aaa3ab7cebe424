"""The dashboard of a `cyclone up` serving two models, in headless Chromium, while a third model
is imported into the running mesh: every card stays GREEN, no alert appears, the new model's
card arrives by server push, and its charts' time axes fit their data.

Needs Debian's `chromium` (see tests/integration/test_dashboard_browser.py: skipped without it on
a developer machine, a failure under CI=true).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import Mesh, wait_for
from tests.integration.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, require_browser

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]


def _probes_answered(mesh: Mesh, models: set[str]) -> bool:
    """The monitor's probes got an answer from every model (uptime 1.0), each GREEN."""
    status = json.loads(mesh.cli("status", "--json"))
    found = status["models"]
    return all(
        m in found
        and found[m].get("metrics", {}).get("uptime") == 1.0
        and found[m].get("level") == "GREEN"
        for m in models
    )


async def _levels(page: Any) -> dict[str, str]:
    cards = await page.locator("section[data-model]").all()
    return {
        str(await c.get_attribute("data-model")): (await c.locator(".level").inner_text()).strip()
        for c in cards
    }


async def test_two_models_and_an_import_leave_every_card_green_and_no_alert(
    tmp_path: Path,
) -> None:
    require_browser()
    from playwright.async_api import async_playwright

    mesh = Mesh(tmp_path / "data")
    mesh.start()
    console_errors: list[str] = []
    seen: list[dict[str, str]] = []
    try:
        mesh.import_credit(tmp_path, name="credit", seed=0)
        mesh.import_credit(tmp_path, name="loans", seed=1)
        wait_for(lambda: _probes_answered(mesh, {"credit", "loans"}), 120, mesh.log_tail)
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 1400})
                page.on(
                    "console",
                    lambda m: console_errors.append(m.text) if m.type == "error" else None,
                )
                page.on("pageerror", lambda e: console_errors.append(str(e)))
                await page.goto(f"http://127.0.0.1:{mesh.ports['dashboard']}/")
                await page.locator('section[data-model="loans"]').wait_for(timeout=15_000)
                seen.append(await _levels(page))

                # A third model into the running mesh: its card comes by push, probes answer.
                mesh.import_credit(tmp_path, name="cards", seed=2)
                await page.locator('section[data-model="cards"]').wait_for(timeout=30_000)
                deadline = time.monotonic() + 120
                while not _probes_answered(mesh, {"credit", "loans", "cards"}):
                    seen.append(await _levels(page))
                    assert time.monotonic() < deadline, seen[-1]
                    await page.wait_for_timeout(1000)
                seen.append(await _levels(page))
                alerts = (await page.locator("#alerts tbody").inner_text()).strip()
                await page.screenshot(path=str(tmp_path / "dashboard-three-models.png"))
            finally:
                await browser.close()
    finally:
        assert mesh.stop() == 0, mesh.log_tail()
    assert console_errors == []
    # Every card the page showed, at every look, was GREEN (or not yet evaluated).
    bad = [levels for levels in seen if any(v in ("AMBER", "RED") for v in levels.values())]
    assert bad == [], bad
    assert set(seen[-1]) == {"credit", "loans", "cards"}
    assert alerts == "None."
