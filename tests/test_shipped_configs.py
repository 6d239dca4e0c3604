"""The shipped configs (autosam2/configs/, package data): found by name or by path from any directory and
from an installed wheel; every default that names one resolves; a name that is none is one line."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autosam2.config import DEEPSPEED_CONFIGS, RUN_CONFIGS, SHIPPED, ConfigError, load_config
from autosam2.engine.engines import read_deepspeed_config
from autosam2.train import build_parser
from tests.helpers import train_overrides

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_NAMES = [
    "cpu_demo",
    "cpu_demo_video",
    "cpu_memory",
    "gpu_hiera_bplus_1024_deepspeed",
    "gpu_hiera_bplus_1024_full",
    "gpu_hiera_t_1024",
]


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory outside the checkout."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_the_shipped_configs_are_the_package_folder_and_nothing_else():
    assert RUN_CONFIGS.names() == RUN_NAMES
    assert DEEPSPEED_CONFIGS.names() == ["zero1", "zero2", "zero3"]
    assert SHIPPED == REPO / "autosam2" / "configs"
    assert not (REPO / "configs").exists()  # one home: no second copy at the repository root


@pytest.mark.parametrize("spelling", ["cpu_demo", "cpu_demo.yaml", "configs/cpu_demo.yaml"])
def test_a_shipped_run_config_is_found_by_name_from_any_directory(elsewhere, spelling):
    assert RUN_CONFIGS.resolve(spelling) == SHIPPED / "cpu_demo.yaml"
    cfg = load_config(spelling)
    assert cfg.model.image_size == 256 and cfg.tracking.experiment == "autosam2-demo"


@pytest.mark.parametrize("spelling", ["zero3", "zero3.json", "configs/deepspeed/zero3.json"])
def test_a_shipped_deepspeed_config_is_found_by_name_from_any_directory(elsewhere, spelling):
    assert read_deepspeed_config(spelling)["zero_optimization"]["stage"] == 3


def test_the_deepspeed_default_and_the_deepspeed_run_config_resolve_from_any_directory(elsewhere):
    assert read_deepspeed_config(load_config(None).train.deepspeed_config)["zero_optimization"]["stage"] == 2
    cfg = load_config("gpu_hiera_bplus_1024_deepspeed")
    assert DEEPSPEED_CONFIGS.resolve(cfg.train.deepspeed_config) == SHIPPED / "deepspeed" / "zero2.json"


def test_a_file_at_the_path_given_wins_over_a_shipped_name(elsewhere):
    (elsewhere / "configs").mkdir()
    for name in ("cpu_demo.yaml", "configs/cpu_demo.yaml"):
        (elsewhere / name).write_text("model:\n  image_size: 512\n")
        assert load_config(name).model.image_size == 512
    assert load_config("cpu_demo").model.image_size == 256  # no file named cpu_demo here: the shipped one
    (elsewhere / "zero2.json").write_text('{"zero_optimization": {"stage": 1}}')
    assert read_deepspeed_config("zero2.json")["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize(
    "ref",
    ["cpu_demoo", "/nowhere/cpu_demo.yaml", "cpu_demo.json", "other/cpu_demo.yaml", "deepspeed/zero2.json"],
)
def test_a_config_that_is_neither_a_file_nor_a_shipped_name_is_one_line_listing_the_names(elsewhere, ref):
    with pytest.raises(ConfigError) as caught:
        load_config(ref)
    assert (
        str(caught.value)
        == f"{ref}: no such file, nor a shipped run config (shipped: {', '.join(RUN_NAMES)})"
    )


def test_a_config_that_is_a_folder_is_said_to_be_one(elsewhere):
    (elsewhere / "mine").mkdir()
    (elsewhere / "zero2").mkdir()  # a folder of a shipped name: the shipped config, as with no folder
    with pytest.raises(ConfigError) as caught:
        load_config("mine")
    assert (
        str(caught.value)
        == f"mine: a folder, not a file, nor a shipped run config (shipped: {', '.join(RUN_NAMES)})"
    )
    assert read_deepspeed_config("zero2")["zero_optimization"]["stage"] == 2


def test_a_deepspeed_config_that_is_neither_is_one_line_listing_the_names(elsewhere):
    with pytest.raises(
        ConfigError, match=r"^zero4: no such file, nor a shipped DeepSpeed config \(shipped: "
    ):
        read_deepspeed_config("zero4")
    with pytest.raises(ConfigError, match="nor a shipped DeepSpeed config"):
        read_deepspeed_config("cpu_demo")  # a run config's name is not a DeepSpeed config's


def test_every_default_that_names_a_config_resolves_from_any_directory(elsewhere):
    from autosam2 import demo
    from launch import gpu_parts

    demo._check(_parser_of(demo.main).parse_args([]))  # both stages' default configs, loaded and checked
    for name in gpu_parts.TRAIN_CONFIGS.values():
        assert RUN_CONFIGS.resolve(name).parent == SHIPPED
    for name in RUN_CONFIGS.names():  # each shipped run config loads, and names a DeepSpeed config that does
        DEEPSPEED_CONFIGS.resolve(load_config(name).train.deepspeed_config)


def _parser_of(main) -> argparse.ArgumentParser:
    """The parser `main` builds, caught at its parse (nothing runs)."""
    from tests.test_docs import parser_of

    return parser_of(lambda: main(["--help"]))


def test_train_help_lists_the_shipped_names():
    text = " ".join(build_parser().format_help().split())
    assert f"({', '.join(RUN_NAMES)})" in text


def test_every_config_the_pages_name_resolves(elsewhere):
    """`--config X` and `train.deepspeed_config=X` in the README and docs/ name a shipped config or a
    placeholder (an upper-case word, a $VARIABLE)."""
    refs = {
        (kind, page.name, ref)
        for page in PAGES
        for kind, pattern in (
            (RUN_CONFIGS, r"--config[ =]+([^\s`|]+)"),
            (DEEPSPEED_CONFIGS, r"deepspeed_config=([^\s`|]+)"),
        )
        for ref in re.findall(pattern, page.read_text())
    }
    assert any(kind is RUN_CONFIGS for kind, _, _ in refs)
    problems = []
    for kind, page, ref in sorted(refs, key=lambda r: r[1:]):
        if re.match(r"^(\$|[A-Z][A-Z0-9_]*\b)", ref):
            continue
        try:
            kind.resolve(ref)
        except ConfigError as err:
            problems.append(f"{page}: {err}")
    assert not problems, "\n".join(problems)


# from another directory, as processes --------------------------------------------------------------------


@pytest.mark.slow
def test_train_with_a_shipped_config_by_name_runs_from_another_directory(train_data, elsewhere):
    out = elsewhere / "run"
    settings = {"model.clip_mode": "frame", "train.max_steps": 2, "train.checkpoint_every": 2}
    settings |= {"train.validate_every": 2, "tracking.enabled": "false"}
    cmd = [sys.executable, "-m", "autosam2.cli", "train", "--config", "cpu_demo"]
    done = subprocess.run(
        [*cmd, *train_overrides(train_data, out, **settings)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = yaml.safe_load((out / "config.yaml").read_text())
    # cpu_demo's own values, where the overrides left them
    assert (
        written["data"]["feature_cache"] == "memory" and written["tracking"]["experiment"] == "autosam2-demo"
    )
    assert (out / "final.pt").is_file()


CHECK_INSTALLED = """
import json, autosam2
from autosam2.config import DEEPSPEED_CONFIGS, RUN_CONFIGS, load_config
print(json.dumps({
    "package": autosam2.__file__,
    "names": RUN_CONFIGS.names(),
    "run": [str(RUN_CONFIGS.resolve(n)) for n in ("cpu_demo", "cpu_demo_video.yaml", "configs/gpu_hiera_t_1024.yaml")],
    "image_size": load_config("gpu_hiera_t_1024").model.image_size,
    "deepspeed": str(DEEPSPEED_CONFIGS.resolve(load_config(None).train.deepspeed_config)),
}))
"""


@pytest.mark.slow
def test_an_installed_wheel_finds_its_shipped_configs_from_any_directory(tmp_path):
    from launch import wheelhouse

    wheels, target, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    wheelhouse.project_wheel(wheels)
    wheelhouse.install(wheels, target)
    env = {**os.environ, "PYTHONPATH": str(target)}  # the wheel's files only, not the checkout

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )

    found = run("-c", CHECK_INSTALLED)
    assert found.returncode == 0, found.stderr[-3000:]
    seen = json.loads(found.stdout)
    shipped = target / "autosam2" / "configs"
    assert seen["package"] == str(target / "autosam2" / "__init__.py")
    assert seen["names"] == RUN_NAMES
    assert seen["run"] == [
        str(shipped / f"{n}.yaml") for n in ("cpu_demo", "cpu_demo_video", "gpu_hiera_t_1024")
    ]
    assert seen["image_size"] == 1024 and seen["deepspeed"] == str(shipped / "deepspeed" / "zero2.json")
    helped = run("-m", "autosam2.cli", "train", "--help")
    assert helped.returncode == 0 and f"({', '.join(RUN_NAMES)})" in " ".join(helped.stdout.split())
    refused = run("-m", "autosam2.cli", "train", "--config", "nope")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert f"nope: no such file, nor a shipped run config (shipped: {', '.join(RUN_NAMES)})" in lines[0]
