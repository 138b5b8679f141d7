"""The dashboard served for real (`python -m dashboard`) and driven in Debian's headless Chromium
through playwright: charts render, the slider moves the heatmap, a live run refreshes in place.

Never downloads a browser: /usr/bin/chromium or a skip (a failure when CI is set)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")
expect, sync_playwright = playwright_api.expect, playwright_api.sync_playwright

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from collector.process import terminate  # noqa: E402
from tests.dashboard.runs import DEAD_INJECT, record_tiny_runs, write_synthetic_run  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 90_000  # an upper bound on 2 busy cores, never an expectation
STEPS = 6
CHART = "[data-testid='stVegaLiteChart'] :is(svg.marks, canvas)"  # vega-embed's drawing
LOSS = f".st-key-chart-loss {CHART}"
HEATMAP = f".st-key-heatmap-step {CHART}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dashboard:
    """`python -m dashboard --store URL` on a free loopback port, until stop()."""

    def __init__(self, url: str, log: Path) -> None:
        self.port = _free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dashboard",
                "--store",
                url,
                "--server.port",
                str(self.port),
                "--server.address",
                "127.0.0.1",
                "--server.headless",
                "true",
                "--browser.gatherUsageStats",
                "false",
            ],
            cwd=ROOT,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )
        self.address = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + WAIT_MS / 1000
        while True:  # Streamlit's own health endpoint
            if self.proc.poll() is not None:
                raise RuntimeError(f"dashboard exited {self.proc.returncode}: {log.read_text()}")
            try:
                with urllib.request.urlopen(self.address + "_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dashboard never became healthy: {log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        terminate(self.proc)


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        msg = f"{CHROMIUM} not installed (scripts/system-deps.sh installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("dash-browser")
    return record_tiny_runs(
        d / "store", {"browser": dict(steps=STEPS, seed=0, injects=[DEAD_INJECT])}
    )


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    artifacts = os.environ.get("STEPWATCH_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


def test_charts_render_and_the_slider_moves_the_heatmap(browser, recorded, tmp_path):
    app = Dashboard(recorded, tmp_path / "dashboard.log")
    page = browser.new_page(viewport={"width": 1400, "height": 1700})
    try:
        page.goto(app.address)
        page.wait_for_selector(LOSS, timeout=WAIT_MS)  # the chart elements themselves
        page.wait_for_selector(HEATMAP, timeout=WAIT_MS)
        heat = page.locator(".st-key-heatmap-step")
        heat.get_by_text(f"Heatmap at step {STEPS - 1}").wait_for(timeout=WAIT_MS)
        assert page.locator(LOSS).bounding_box()["height"] > 100
        assert page.locator(HEATMAP).bounding_box()["height"] > 60
        # the Vega SVG itself says which step it drew (its title is a text mark)
        page.locator(HEATMAP).get_by_text(f"token share at step {STEPS - 1}").wait_for(
            timeout=WAIT_MS
        )
        before = page.locator(HEATMAP).screenshot()
        save_screenshot(page, tmp_path, "dashboard.png")

        thumb = page.get_by_role("slider")
        thumb.focus()
        page.keyboard.press("Home")  # to the first step
        heat.get_by_text("Heatmap at step 0").wait_for(timeout=WAIT_MS)
        page.locator(HEATMAP).get_by_text("token share at step 0").wait_for(timeout=WAIT_MS)
        expect(thumb).to_have_value("0", timeout=WAIT_MS)  # an <input type=range>; the
        # widget re-renders after the heatmap's delta on a busy machine, so wait, never sample
        assert page.locator(HEATMAP).screenshot() != before  # and it looks different
        save_screenshot(page, tmp_path, "dashboard-step0.png")

        page.get_by_role("button", name="Play").click()  # the server's tick plays
        page.get_by_role("button", name="Pause").wait_for(timeout=WAIT_MS)
        last = page.locator(HEATMAP).get_by_text(f"token share at step {STEPS - 1}")
        last.wait_for(timeout=WAIT_MS)
        page.get_by_role("button", name="Play").wait_for(timeout=WAIT_MS)  # stopped at the end
        expect(thumb).to_have_value(str(STEPS - 1), timeout=WAIT_MS)
        # and stays there: the last tick must not be undone by a stale widget value
        page.wait_for_timeout(1500)
        assert thumb.input_value() == str(STEPS - 1)
        last.wait_for(timeout=WAIT_MS)
    finally:
        page.close()
        app.stop()


def test_a_live_run_refreshes_in_place_keeping_the_users_step(browser, tmp_path):
    url = f"parquet:{tmp_path / 'live'}"
    write_synthetic_run(url, "live", 40, finished=False, layers=(1, 2), experts=4)
    app = Dashboard(url, tmp_path / "dashboard.log")
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    try:
        page.goto(app.address)
        page.wait_for_selector(LOSS, timeout=WAIT_MS)
        header = page.locator(".st-key-run-header")
        header.get_by_text("last step 39").wait_for(timeout=WAIT_MS)
        assert "last step received" in header.inner_text()
        page.get_by_role("slider").focus()
        page.keyboard.press("Home")  # the user scrubs back
        page.locator(".st-key-heatmap-step").get_by_text("Heatmap at step 0").wait_for(
            timeout=WAIT_MS
        )
        page.evaluate("window.__stepwatch_marker = 1")  # gone if the page reloads

        write_synthetic_run(url, "live", 60, start=40, finished=False, layers=(1, 2), experts=4)
        header.get_by_text("last step 59").wait_for(timeout=WAIT_MS)  # no reload, no click
        assert page.evaluate("window.__stepwatch_marker") == 1
        slider = page.get_by_role("slider")
        expect(slider).to_have_count(1, timeout=WAIT_MS)  # the 0..39 one is replaced
        expect(slider).to_have_attribute("max", "59", timeout=WAIT_MS)
        assert slider.input_value() == "0"
        page.locator(".st-key-heatmap-step").get_by_text("Heatmap at step 0").wait_for(
            timeout=WAIT_MS
        )
        save_screenshot(page, tmp_path, "dashboard-live.png")
    finally:
        page.close()
        app.stop()
