"""2 processes under torchrun (gloo) x 2 loader workers each, on 5 single-sequence shards."""

import json
import subprocess
from pathlib import Path

from autosam2.data.synthetic import SynthSpec, write_dataset
from shards.writer import build
from tests.helpers import TORCHRUN_2

REPO = Path(__file__).resolve().parents[1]


def test_two_ranks_split_evaluation_and_match_training_batches(tmp_path):
    write_dataset(tmp_path / "pg", SynthSpec(train_sequences=5, valid_sequences=1, frames=7, size=32, seed=2))
    manifest = build(tmp_path / "pg", "train", tmp_path / "shards", frames_per_sample=4, max_shard_mb=0.0001)
    assert manifest["totals"]["shards"] == 5
    out = tmp_path / "ranks.json"
    result = subprocess.run(
        [
            *TORCHRUN_2,
            str(REPO / "tests" / "dist_stream_job.py"),
            str(tmp_path / "shards"),
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    # evaluation: disjoint shards, every sequence exactly once, whole
    seqs = [name for r in ranks for name, _ in r["sequences"]]
    assert sorted(seqs) == sorted(manifest["sequences"]) and len(seqs) == len(set(seqs))
    assert all(n == 7 for r in ranks for _, n in r["sequences"])
    assert not set(ranks[0]["shards"]) & set(ranks[1]["shards"])
    assert ranks[0]["shards"] and ranks[1]["shards"]
    # training: the same number of batches on both ranks, every epoch: 10 samples / (2 per batch x 2 ranks)
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"] == [2, 2]
