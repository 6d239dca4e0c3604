"""The config tree: defaults, YAML, overrides, one clear error; choices as Enums that read as strings."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from autosam2.config import (
    ConfigError,
    EngineKind,
    ModelConfig,
    Variant,
    load_config,
    section_from_dict,
    to_dict,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[1]


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  image_size: 512\n  freeze:\n    mask_decoder: false\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["optim.lr=0.02"])
    assert cfg.model.image_size == 512 and cfg.model.freeze.mask_decoder is False and cfg.optim.lr == 0.02
    assert load_config(REPO / "autosam2" / "configs" / "cpu_demo.yaml").model.image_size == 256


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], "optim.lrr: Key 'lrr' not in 'OptimConfig'"),
        (["optim.lr=fast"], "optim.lr: Value 'fast'"),
        (["model.image_size=250"], "model.image_size must be a multiple of 32"),
        (["train.engine=horovod"], "train.engine must be ddp or deepspeed, got 'horovod'"),
        (
            ["model.variant=hiera_xl"],
            "model.variant must be one of ['hiera_t', 'hiera_s', 'hiera_b+', 'hiera_l']",
        ),
        (["data.on_error=ignore"], "data.on_error must be raise or skip"),
        (["train.device=gpu"], "train.device must be auto, cpu, cuda or cuda:N"),
        (["nonsense"], "expected key=value"),
        (
            ["data.feature_cache=memory", "model.freeze.image_encoder=false"],
            "data.feature_cache=memory keeps the frozen image encoder's output: it needs "
            "model.freeze.image_encoder=true",
        ),
        (
            ["data.feature_cache=memory", "data.augment.degrees=0", "data.augment.translate=0"],
            "set data.augment.brightness=0 (got 0.2), data.augment.contrast=0 (got 0.2), "
            "data.augment.saturation=0 (got 0.2), data.augment.scale_min=1 (got 0.85), "
            "data.augment.scale_max=1 (got 1.15) or data.augment.enabled=false",
        ),
        (["data.feature_cache=disk"], "data.feature_cache must be none or memory, got 'disk'"),
        (["data.feature_cache_dtype=fp16"], "data.feature_cache_dtype must be fp32 or bf16, got 'fp16'"),
        (["data.feature_cache_dir=/tmp/x"], "data.feature_cache_dir holds the feature cache's disk tier"),
        (
            ["data.feature_cache=memory", "data.augment.enabled=false", "data.feature_cache_disk_gb=-1"],
            "data.feature_cache_gb and data.feature_cache_disk_gb must be >= 0",
        ),
        (["train.peer_timeout_s=0"], "dist_timeout_s, peer_timeout_s, threads and max_steps"),
        (["train.grad_compression=fp8"], "train.grad_compression must be none or bf16, got 'fp8'"),
        (
            ["train.bucket_mb=0"],
            "train.bucket_mb must be in (0, 1048576] (null: the engine's own), got 0.0",
        ),
        (
            ["train.bucket_mb=inf"],
            "train.bucket_mb must be in (0, 1048576] (null: the engine's own), got inf",
        ),
        (
            ["train.bucket_mb=1e30"],
            "train.bucket_mb must be in (0, 1048576] (null: the engine's own), got 1e+30",
        ),
        (
            ["data.feature_cache=memory", "data.augment.enabled=false", "data.feature_cache_gb=nan"],
            "data.feature_cache_gb and data.feature_cache_disk_gb must be >= 0 and finite, got nan and 64.0",
        ),
        (
            ["data.feature_cache=memory", "data.augment.enabled=false", "data.feature_cache_disk_gb=inf"],
            "data.feature_cache_gb and data.feature_cache_disk_gb must be >= 0 and finite, got 8.0 and inf",
        ),
        (["train.overlap_comm=false"], "train.overlap_comm=false needs train.engine=deepspeed"),
        (["train.cond_mask_prob=1.5"], "train.cond_mask_prob must be in [0, 1], got 1.5"),
        (["train.cond_mask_prob=nan"], "train.cond_mask_prob must be in [0, 1], got nan"),
        (["train.cond_mask_prob=-0.1"], "train.cond_mask_prob must be in [0, 1], got -0.1"),
        (
            ["train.cond_mask_prob=0.5", "model.clip_mode=frame"],
            "train.cond_mask_prob=0.5 needs model.clip_mode=video and data.clip_len >= 2",
        ),
        (
            ["train.cond_mask_prob=0.5", "data.clip_len=1"],
            "needs model.clip_mode=video and data.clip_len >= 2",
        ),
        (
            ["data.train=[a, b]", "data.train_weights=[1]"],
            "data.train_weights must hold one weight >= 0 for each of the 2",
        ),
        (["data.train=[a, b]", "data.train_weights=[1, -1]"], "data.train_weights must hold one weight >= 0"),
        (["data.train=[a, b]", "data.train_weights=[0, 0]"], "not all 0, got [0.0, 0.0]"),
        (["data.train_weights=[1, 2]"], "for each of the 1 source(s) of data.train"),
        (["data.train_weights=[x]"], "data.train_weights[0]: Value 'x'"),
        (["data.train=[]"], "data.train must be a path or a list of paths, got []"),
        (["data.train=[a, b, a]"], "data.train names a more than once; give one source a larger"),
        (["data.train=12"], "data.train must be a path or a list of paths, got 12"),
        (
            ["data.train=[a, b]", "data.order=resample"],
            "a mix of data.train sources is drawn in data.order=global",
        ),
    ],
)
def test_bad_config_is_refused_with_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.epoch"):
        load_config(path)


def test_choices_are_enums_that_compare_and_print_as_their_value(tmp_path):
    cfg = load_config(None, ["model.variant=hiera_b+", "train.engine=deepspeed", "data.on_error=skip"])
    assert cfg.model.variant is Variant["hiera_b+"] and cfg.train.engine is EngineKind.deepspeed
    assert cfg.train.engine == "deepspeed" and f"{cfg.model.variant}" == "hiera_b+"
    assert str(cfg.data.on_error) == "skip"
    plain = to_dict(cfg)
    assert plain["model"]["variant"] == "hiera_b+" and type(plain["train"]["engine"]) is str
    assert "variant: hiera_b+" in to_yaml(cfg) and "engine: deepspeed" in to_yaml(cfg)
    written = tmp_path / "config.yaml"
    written.write_text(to_yaml(cfg))
    assert load_config(written) == cfg  # the merged config a run writes reads back as itself
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # launchers hand configs to other processes


def test_a_section_from_plain_values_is_checked_like_a_file():
    model = section_from_dict(ModelConfig, {"variant": "hiera_s", "image_size": 512}, "w.pt")
    assert model == ModelConfig(variant=Variant["hiera_s"], image_size=512)
    with pytest.raises(ConfigError, match=r"w\.pt: variant must be one of"):
        section_from_dict(ModelConfig, {"variant": "nope"}, "w.pt")
    with pytest.raises(ConfigError, match=r"w\.pt: tokens: Key 'tokens' not in 'ModelConfig'"):
        section_from_dict(ModelConfig, {"tokens": 8}, "w.pt")


def test_the_feature_cache_takes_flip_only_or_unaugmented_training():
    flips = [f"data.augment.{k}=0" for k in ("degrees", "translate", "brightness", "contrast", "saturation")]
    flips += ["data.augment.scale_min=1", "data.augment.scale_max=1", "data.feature_cache=memory"]
    assert load_config(None, flips).data.augment.hflip == 0.5
    plain = load_config(None, ["data.feature_cache=memory", "data.augment.enabled=false"])
    assert plain.data.feature_cache == "memory"


def test_data_train_is_a_path_or_a_list_of_sources_weighted_equally_by_default(tmp_path):
    one = load_config(None, ["data.train=/data/a"])
    assert one.data.train == "/data/a" and one.data.train_sources() == ["/data/a"]
    mix = load_config(None, ["data.train=[/data/a, /data/b]", "data.train_weights=[3, 0]"])
    assert mix.data.train_sources() == ["/data/a", "/data/b"] and mix.data.train_weights == [3.0, 0.0]
    written = tmp_path / "config.yaml"
    written.write_text(to_yaml(mix))
    assert load_config(written) == mix
    assert load_config(None, ["data.train=[/data/a, /data/b]"]).data.train_weights is None
