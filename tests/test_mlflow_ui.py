"""The MLflow UI as users see it: two training runs compared in headless Chromium, our metric names on the page."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from playwright.sync_api import sync_playwright

from tests.helpers import kill_group, start_mlflow_server, train_overrides

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# the runs table's button that unfolds a run's child runs (MLflow 3.17's run name cell)
EXPAND_CHILD_RUNS = 'button[data-component-id$="runnamecellrenderer.tsx_46"]'
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
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")  # the default: one store beside both runs
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
            page.get_by_text("train/loss_dice").first.wait_for(timeout=60_000)
            text = page.inner_text("body")
            page.screenshot(path=str(shot), full_page=True)
            page.goto(f"{uri}/#/experiments/{experiment}/runs?compareRunsMode=CHART", wait_until="load")
            # charts are grouped by prefix and drawn when in view: search brings each of ours up
            for metric in ("train/loss_total", "train/lr", "valid/dice", "startup/total_s"):
                page.get_by_placeholder("Search metric charts").fill(metric)
                page.locator(f'h4[title="{metric}"]').first.wait_for(timeout=60_000)
                text += f"\n{metric}"
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


@pytest.mark.slow
def test_two_trainings_and_their_evaluations_sit_in_one_experiment_nested(
    train_data, tmp_path, mlflow_server
):
    """The tracking server given once, by MLflow's variable, and no tracking flag: two trainings and an
    evaluation of each one's weights are four runs of one experiment on that server, each evaluation
    tagged with its training run and nested under it in the UI."""
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (.ci/run installs it)"
    uri = mlflow_server[0]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    runs_dir = tmp_path / "runs"
    for name, lr in (("lr-high", "0.001"), ("lr-low", "0.0001")):
        overrides = train_overrides(train_data, runs_dir / name, **{"train.max_steps": 2, "optim.lr": lr})
        evaluate = ["--weights", str(runs_dir / name / "final.pt"), "--data", str(train_data["valid"])]
        evaluate += ["--output-dir", str(tmp_path / "results" / name), "--cpu", "--no-overlays"]
        for argv in (["train", *overrides], ["evaluate", *evaluate]):
            done = subprocess.run(
                [sys.executable, "-m", "autosam2.cli", *argv],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stderr[-3000:]
    assert not [
        *runs_dir.parent.glob("mlflow.db*"),
        *(tmp_path / "results").glob("mlflow.db*"),
    ]  # all on the server

    client = mlflow.MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    assert [e.name for e in experiments] == ["autosam2"]
    runs = client.search_runs([experiments[0].experiment_id])
    assert len(runs) == 4
    trainings = {r.info.run_id: r for r in runs if "trained_by" not in r.data.tags}
    assert sorted(r.info.run_name for r in trainings.values()) == [
        "hiera_t-video-lr-high",
        "hiera_t-video-lr-low",
    ]
    evaluations = [r for r in runs if "trained_by" in r.data.tags]
    assert {r.data.tags["mlflow.parentRunId"] for r in evaluations} == set(trainings)
    for found in evaluations:
        trained = trainings[found.data.tags["trained_by"]]
        assert found.data.tags["mlflow.parentRunId"] == trained.info.run_id
        assert found.data.tags["trained_by_dir"] == trained.data.tags["output_dir"]
        assert found.info.run_name == "eval-valid-step2"
        assert Path(found.data.tags["output_dir"]).name == Path(trained.data.tags["output_dir"]).name

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{uri}/#/experiments/{experiments[0].experiment_id}/runs", wait_until="load")
        page.get_by_text("hiera_t-video-lr-high").first.wait_for(timeout=60_000)
        evaluation = page.get_by_text("eval-valid-step2")
        assert evaluation.count() == 0  # folded under the training runs
        expanders = page.locator(EXPAND_CHILD_RUNS)
        assert expanders.count() == 2  # one per training run, none for the evaluations
        for shown in (1, 2):
            expanders.nth(shown - 1).click()
            evaluation.nth(shown - 1).wait_for(timeout=30_000)
            assert evaluation.count() == shown  # each training run unfolds its own evaluation
        page.screenshot(path=str(tmp_path / "nested.png"), full_page=True)
        browser.close()
