"""`make gpu-check DRY_RUN=1`: the device check, wheelhouse included, run on the CPU in a stand-in for the
device image, so it cannot rot between the loans of a GPU machine."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from launch import gpu_check, gpu_parts, wheelhouse

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_dry_run_runs_every_part_in_a_stand_in_for_the_device_image(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["make", "--no-print-directory", "gpu-check", "DRY_RUN=1", f"OUT={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert (out / "gpu_check.json").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    failed = {name: part.get("error") for name, part in report["parts"].items() if not part.get("ok")}
    assert done.returncode == 0 and not failed, failed
    assert report["dry_run"] is True
    # every part of the table that the dry run holds ran, and no other
    assert set(report["parts"]) == {part.name for part in gpu_parts.PARTS if part.in_dry_run}
    # the GPU tests ran (on the CPU), none skipped: the stand-in image had everything they import
    tests = report["parts"]["tests"]
    assert tests["passed"] == len(tests["tests"]) >= 5 and tests["failed"] == tests["skipped"] == 0
    summary = report["summary"]
    for name in gpu_parts.TRAIN_CONFIGS:
        assert summary[name]["frames_per_s"] > 0 and summary[name]["estimate_GiB"] > 0
        assert 0 <= summary[name]["data_wait_share"] <= 1
    for part in gpu_parts.PARTS:
        if part.name.startswith("infer_"):
            assert summary[part.name]["streaming_fps"] > 0
            assert summary[part.name]["compiled_ran"] is part.name.endswith("_compiled")
    assert min(summary["decode"][k] for k in ("pil_fps", "cpu_fps", "device_fps")) > 0
    assert 0 < summary["checkpointing"]["activation_ratio"] and summary["checkpointing"]["peak_GiB_with"] > 0
    assert 0.49 <= summary["comm"]["bytes_ratio"] <= 0.51 and summary["comm"]["step_time_ratio"] > 0
    features = summary["features"]
    assert features["fp32"]["bytes_per_frame"] == 2 * features["bf16"]["bytes_per_frame"] > 0
    assert set(summary["goals"]) == {goal.figure for goal in gpu_parts.GOALS}
    assert summary["goals_met"] == "not judged: a dry run"
    listing = json.loads(next((REPO / ".gpu-check").glob("wheels-cp3*/wheels.json")).read_text())
    assert listing["MiB"] <= wheelhouse.WHEELHOUSE_LIMIT_MIB
    assert not any(w.startswith(("torch-", "torchvision-")) for w in listing["wheels"])
    assert (out / "gpu_check.log").stat().st_size > 0


def test_the_wheel_list_leaves_out_what_the_image_has_and_keeps_what_it_lacks():
    needed = wheelhouse.needed_distributions()
    assert {"sam2", "deepspeed", "webdataset", "submitit", "omegaconf", "hydra-core", "iopath"} <= set(needed)
    assert {"mlflow-skinny", "sqlalchemy", "pydantic", "pydantic-core"} <= set(needed)
    assert not set(needed) & wheelhouse.IMAGE_PACKAGES
    assert "mlflow" not in needed  # the server and UI stay behind
    pins = wheelhouse.pins()  # constraints.txt's, and what the wheelhouse carries of them
    assert {"torch", "torchvision", "sam2", "deepspeed"} <= set(pins)
    assert all(needed[name] == version for name, version in pins.items() if name in needed)


def test_the_stand_in_is_reused_while_its_wheels_stay_the_same(tmp_path):
    wheels = [tmp_path / "a-1-py3-none-any.whl", tmp_path / "b-1-py3-none-any.whl"]
    for wheel in wheels:
        wheel.write_bytes(b"x")
    key = wheelhouse._stand_in_key(wheels)
    assert wheelhouse._stand_in_key(list(reversed(wheels))) == key
    wheels[1].write_bytes(b"y")
    assert wheelhouse._stand_in_key(wheels) != key
    assert wheelhouse._stand_in_key(wheels[:1]) not in (key, wheelhouse._stand_in_key(wheels))


def test_the_summary_judges_each_goal_at_its_threshold():
    def parts(fps: float, peak: float, estimate: float, wait: float, ratio: float, full: float) -> dict:
        train = {"memory": {"max_allocated_GiB": peak}, "data_wait_share": wait}
        found = {f"train_{name}": {"ok": True, "result": train} for name in gpu_parts.TRAIN_CONFIGS}
        found["estimate_zero2_hiera_bplus"] = {"ok": True, "result": {"estimate_per_gpu_GiB": estimate}}
        found["infer_hiera_t_eager"] = {"ok": True, "result": {"fps": {"streaming_inference": fps}}}
        compared = {"activation_ratio": ratio, "with": {"estimate_per_gpu_GiB": full}}
        found["checkpointing"] = {"ok": True, "result": {"checkpointing": compared}}
        return found

    at = parts(
        gpu_parts.STREAMING_FPS_GOAL,
        gpu_parts.ZERO2_PEAK_GOAL_GIB,
        gpu_parts.ZERO2_PEAK_GOAL_GIB / (1 + gpu_parts.ESTIMATE_TOLERANCE / 2),
        gpu_parts.DATA_WAIT_GOAL,
        gpu_parts.ACTIVATION_RATIO_GOAL,
        gpu_parts.FULL_MODEL_PEAK_GOAL_GIB - 0.01,
    )
    assert gpu_parts.summarize(at)["goals_met"] == {goal.name: True for goal in gpu_parts.GOALS}
    past = parts(100.0, 25.0, 10.0, 0.05, 0.6, gpu_parts.FULL_MODEL_PEAK_GOAL_GIB)
    assert gpu_parts.summarize(past)["goals_met"] == {goal.name: False for goal in gpu_parts.GOALS}
    assert gpu_parts.summarize({})["goals_met"] == {goal.name: None for goal in gpu_parts.GOALS}


def test_the_docs_table_names_every_part_its_limit_and_its_goals():
    table = gpu_parts.parts_markdown().splitlines()
    assert len(table) == 2 + len(gpu_parts.PARTS)
    for part, row in zip(gpu_parts.PARTS, table[2:], strict=True):
        assert row.startswith(f"| `{part.name}` |")
        assert part.limit_s is None or f"| {part.limit_s:g} s |" in row
        assert all(goal.text in row for goal in gpu_parts.GOALS if goal.name in part.goals)


def test_a_part_that_fails_or_overruns_is_recorded_and_the_rest_still_run(tmp_path):
    check = gpu_check.Check(tmp_path, budget_s=60, dry=True)
    py = "import sys, time, json"
    assert check.part("good", ["python3", "-c", f"{py}; print('x'); print(json.dumps({{'a': 1}}))"], 30) == {
        "a": 1
    }
    assert (
        check.part("bad", ["python3", "-c", f"{py}; print('boom', file=sys.stderr); sys.exit(3)"], 30) is None
    )
    assert check.part("slow", ["python3", "-c", f"{py}; time.sleep(30)"], 1) is None
    check.close()
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["good"] == {"ok": True, "seconds": parts["good"]["seconds"], "result": {"a": 1}}
    assert not parts["bad"]["ok"] and "boom" in parts["bad"]["error"]
    assert not parts["slow"]["ok"] and "timed out after 1 s" in parts["slow"]["error"]
    check = gpu_check.Check(tmp_path / "late", budget_s=5, dry=True)
    assert check.part("late", ["python3", "-c", "print(1)"], 30) is None  # under 10 s left: not started
    assert (
        "budget" in json.loads((tmp_path / "late" / "gpu_check.json").read_text())["parts"]["late"]["error"]
    )


def test_the_gpu_page_holds_the_table_the_parts_render():
    page = (Path(__file__).resolve().parents[1] / "docs" / "gpu.md").read_text()
    between = re.search(r"<!-- gpu-check-parts -->\n(.*?)<!-- /gpu-check-parts -->", page, re.S)
    assert between, "docs/gpu.md lost its gpu-check-parts markers"
    assert between.group(1).strip() == gpu_parts.parts_markdown().strip(), (
        "docs/gpu.md is behind launch/gpu_parts.py: paste `python -m launch.gpu_check parts` between its markers"
    )
