"""`make gpu-check DRY_RUN=1`: the device check, wheelhouse included, run on the CPU in a stand-in for the
device image, so it cannot rot between the loans of a GPU machine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launch import gpu_check

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
    # the GPU tests ran (on the CPU), none skipped: the stand-in image had everything they import
    tests = report["parts"]["tests"]
    assert tests["passed"] == len(tests["tests"]) >= 5 and tests["failed"] == tests["skipped"] == 0
    summary = report["summary"]
    for name in gpu_check.TRAIN_CONFIGS:
        assert summary[name]["frames_per_s"] > 0 and summary[name]["estimate_GiB"] > 0
        assert 0 <= summary[name]["data_wait_share"] <= 1
    for variant in ("hiera_t", "hiera_bplus"):
        assert summary[f"infer_{variant}_compiled"]["compiled_ran"] is True
        assert summary[f"infer_{variant}_eager"]["streaming_fps"] > 0
    assert min(summary["decode"][k] for k in ("pil_fps", "cpu_fps", "device_fps")) > 0
    assert {"synth", "shards"} <= set(report["parts"])  # one data set made for the training and data parts
    listing = json.loads(next((REPO / ".gpu-check").glob("wheels-cp3*/wheels.json")).read_text())
    assert listing["MiB"] <= gpu_check.WHEELHOUSE_LIMIT_MIB
    assert not any(w.startswith(("torch-", "torchvision-")) for w in listing["wheels"])
    assert (out / "gpu_check.log").stat().st_size > 0


def test_the_wheel_list_leaves_out_what_the_image_has_and_keeps_what_it_lacks():
    needed = gpu_check.needed_distributions()
    assert {"sam2", "deepspeed", "webdataset", "submitit", "omegaconf", "hydra-core", "iopath"} <= set(needed)
    assert {"mlflow-skinny", "sqlalchemy", "pydantic", "pydantic-core"} <= set(needed)
    assert not set(needed) & gpu_check.IMAGE_PACKAGES
    assert "mlflow" not in needed  # the server and UI stay behind


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
