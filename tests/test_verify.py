"""`python -m shards verify`: every problem of a shard set listed, naming the shard and sample; exit 1."""

import io
import json

import numpy as np
from PIL import Image

from shards.__main__ import main
from tests.helpers import rewrite_tar, truncate

SHARD = "train-000-00000.tar"


def run_verify(path, capsys) -> tuple[int, list[str]]:
    code = main(["verify", str(path)])
    return code, capsys.readouterr().out.strip().splitlines()


def test_a_sound_set_passes(tiny_shards, capsys):
    assert run_verify(tiny_shards["train"], capsys) == (0, [f"{tiny_shards['train']}: ok"])


def test_truncated_tar(tiny_shards, capsys):
    truncate(tiny_shards["train"] / SHARD, 0.6)
    code, lines = run_verify(tiny_shards["train"], capsys)
    assert code == 1
    assert any(
        f"{SHARD}: tar is truncated or corrupt" in line and "after sample seq" in line for line in lines
    ), lines
    assert any(f"{SHARD}: sha256 differs" in line for line in lines)


def test_corrupted_member(tiny_shards, capsys):
    rewrite_tar(
        tiny_shards["train"] / SHARD,
        lambda name, data: data[:40] + b"\x00" * 200 if name == "seq1__00001.f0002.jpg" else data,
    )
    code, lines = run_verify(tiny_shards["train"], capsys)
    assert code == 1
    assert any(f"{SHARD}: sample seq1__00001: f0002.jpg: cannot decode image" in line for line in lines), (
        lines
    )


def test_missing_mask_member(tiny_shards, capsys):
    rewrite_tar(
        tiny_shards["train"] / SHARD, lambda name, data: None if name == "seq2__00000.m0003.png" else data
    )
    code, lines = run_verify(tiny_shards["train"], capsys)
    assert code == 1
    assert f"{tiny_shards['train'] / SHARD}: sample seq2__00000: member m0003.png is missing" in lines, lines


def test_non_binary_mask(tiny_shards, capsys):
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 77, np.uint8)).save(buf, format="PNG")
    rewrite_tar(
        tiny_shards["train"] / SHARD,
        lambda name, data: buf.getvalue() if name == "seq1__00000.m0001.png" else data,
    )
    code, lines = run_verify(tiny_shards["train"], capsys)
    assert code == 1
    assert any("sample seq1__00000: m0001.png is not binary" in line for line in lines), lines


def test_missing_and_stray_shards_and_counts(tiny_shards, capsys):
    train = tiny_shards["train"]
    (train / SHARD).rename(train / "extra.tar")
    code, lines = run_verify(train, capsys)
    assert code == 1
    assert f"{train / SHARD}: shard is missing" in lines
    assert f"{train / 'extra.tar'}: shard is not in the manifest" in lines


def test_sample_missing_from_a_shard(tiny_shards, capsys):
    rewrite_tar(
        tiny_shards["valid"] / "valid-000-00000.tar",
        lambda name, data: None if name.startswith("seq3__00001.") else data,
    )
    code, lines = run_verify(tiny_shards["valid"], capsys)
    assert code == 1
    assert any("holds 2 samples, the manifest lists 3 (missing ['seq3__00001']" in line for line in lines), (
        lines
    )


def test_missing_or_foreign_manifest(tiny_shards, capsys):
    manifest = tiny_shards["train"] / "manifest.json"
    manifest.write_text(json.dumps({"format": "something-else", "format_version": 9}))
    code, lines = run_verify(tiny_shards["train"], capsys)
    assert code == 1 and "format 'something-else' version 9" in lines[0]
    manifest.unlink()
    code, lines = run_verify(tiny_shards["train"], capsys)
    assert code == 1 and lines == [
        f"{manifest}: manifest is missing (is {tiny_shards['train']} a shard set built by `python -m shards build`?)"
    ]


def test_every_problem_is_listed(tiny_shards, capsys):
    rewrite_tar(
        tiny_shards["train"] / SHARD,
        lambda name, data: (
            None
            if name == "seq2__00001.m0000.png"
            else (b"junk" if name == "seq1__00002.f0001.jpg" else data)
        ),
    )
    code, lines = run_verify(tiny_shards["train"], capsys)
    assert code == 1
    assert any("seq2__00001: member m0000.png is missing" in line for line in lines)
    assert any("seq1__00002: f0001.jpg: cannot decode image" in line for line in lines)
    assert any("sha256 differs" in line for line in lines)
