"""The MLflow UI as users see it: two training runs compared in headless Chromium, our metric names on the page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from playwright.sync_api import sync_playwright

from tests.helpers import kill_group, start_mlflow_server, train_overrides

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.slow
def test_run_comparison_renders_our_metrics(train_data, tmp_path):
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (.ci/run installs it)"
    out = tmp_path / "runs"
    for name, lr in (("lr-high", "0.001"), ("lr-low", "0.0001")):
        overrides = train_overrides(
            train_data,
            out / name,
            **{
                "train.max_steps": 2,
                "optim.lr": lr,
                "tracking.uri": f"sqlite:///{out}/mlflow.db",
                "tracking.run_name": name,
                "tracking.experiment": "compare",
            },
        )
        subprocess.run(
            [sys.executable, "-m", "autosam2.cli", "train", *overrides],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("compare").experiment_id
    runs = client.search_runs([experiment])
    assert sorted(r.info.run_name for r in runs) == ["lr-high", "lr-low"]

    uri, server = start_mlflow_server(tmp_path / "server", backend_uri=f"sqlite:///{out}/mlflow.db")
    shot = tmp_path / "compare.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            ids = ",".join(f'"{r.info.run_id}"' for r in runs)
            page.goto(f'{uri}/#/compare-runs?runs=[{ids}]&experiments=["{experiment}"]', wait_until="load")
            page.get_by_text("train/loss_total").first.wait_for(timeout=60_000)
            text = page.inner_text("body")
            page.screenshot(path=str(shot), full_page=True)
            page.goto(f"{uri}/#/experiments/{experiment}/runs?compareRunsMode=CHART", wait_until="load")
            # charts are grouped by prefix and drawn when in view: search brings ours up
            page.get_by_placeholder("Search metric charts").fill("valid/dice")
            page.locator('h4[title="valid/dice"]').first.wait_for(timeout=60_000)
            browser.close()
    finally:
        kill_group(server)
    for name in (
        "train/loss_total",
        "train/loss_dice",
        "train/lr",
        "valid/dice",
        "optim.lr",
        "lr-high",
        "lr-low",
    ):
        assert name in text, name
    assert shot.stat().st_size > 20_000
