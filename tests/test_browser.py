"""Headless Chromium opens an infer run's page (as `make demo` prints it) on the local server and
sees its artifacts: the run's Artifacts tab lists them, the summary renders its table and plot.
Screenshots are kept in ``out/browser/`` (or ``$SBIPIPE_TEST_OUTPUT``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .browser import Browser, chromium
from .service_helpers import REPO, service, wait_for  # noqa: F401  (service: session fixture)

pytestmark = pytest.mark.skipif(chromium() is None,
                                reason="needs headless Chromium (Debian package `chromium`; .ci/run installs it)")

OUTPUT = Path(os.environ.get("SBIPIPE_TEST_OUTPUT", REPO / "out")) / "browser"


def test_run_page_shows_the_artifacts(service):
    from flows.infer import infer

    with service.settings():
        state = infer(service.model, str(service.observation), n_samples=2000, return_state=True)
    assert state.is_completed()
    url = f"{service.ui}/runs/flow-run/{state.state_details.flow_run_id}"
    with Browser() as browser:
        browser.open(url)
        browser.wait_text("Artifacts")
        assert browser.click_text("Artifacts")
        text = browser.wait_text("per-parameter posterior summary")
        for key in ("infer-tm", "posterior-tm", "corner-tm", "posterior summary", "corner plot"):
            assert key in text, key
        browser.screenshot(OUTPUT / "run-artifacts.png")

        assert browser.click_text("infer-tm")  # the markdown summary: model, observation, table, verdict, plot
        text = browser.wait_text("Posterior summary")
        for fragment in ("tm:1", "two_moons v1", "good.npy", "validation verdict", "passed", "theta1", "theta2"):
            assert fragment in text, fragment
        wait_for(lambda: browser.loaded_data_images() >= 1, timeout=30, what="the corner plot to render")
        shot = browser.screenshot(OUTPUT / "summary-artifact.png")
    assert shot.stat().st_size > 10_000
