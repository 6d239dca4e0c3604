"""Scores per kind of frame of a synthetic set: Dice and presence where the polyp is hidden, covered,
out of view or clear, from the labels `autosam2 synth` writes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from autosam2.data.synthetic import BLIND, HIDING, SynthSpec, frame_kind, write_dataset
from autosam2.errors import DatasetError
from autosam2.eval.episodes import episode_scores, read_events, sequence_episode_scores


@pytest.fixture(scope="module")
def hard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard") / "pg"
    write_dataset(root, SynthSpec(train_sequences=1, valid_sequences=2, frames=24, size=64, hard=True))
    return root


def predictions(root, folder, hide_hidden: bool):
    """The ground truth as predictions (PNG, 0/255), emptied on the hidden frames if asked."""
    events = read_events(root)
    for seq in ("seq2", "seq3"):
        (folder / seq).mkdir(parents=True)
        for i, event in enumerate(events[seq]):
            gt = (
                np.asarray(Image.open(root / "valid" / "masks" / seq / f"frame{i + 1}.jpg").convert("L"))
                > 128
            )
            if hide_hidden and frame_kind(event) in (*HIDING, *BLIND):
                gt[:] = False
            Image.fromarray(gt.astype(np.uint8) * 255).save(folder / seq / f"frame{i + 1}.png")


def test_a_perfect_prediction_scores_one_on_every_kind(hard_root, tmp_path):
    predictions(hard_root, tmp_path / "perfect", hide_hidden=False)
    scores = episode_scores(
        read_events(hard_root), hard_root / "valid" / "masks", tmp_path / "perfect", ["seq2", "seq3"]
    )
    assert scores["all"]["frames"] == 48
    assert scores["hidden"]["frames"] == sum(scores[k]["frames"] for k in (*HIDING, *BLIND))
    assert scores["blind"]["frames"] == sum(scores[k]["frames"] for k in BLIND) > 0
    assert scores["hidden"]["frames"] > scores["blind"]["frames"]
    for group, score in scores.items():
        if score["frames"]:
            assert score["dice"] == 1.0 and score["presence_accuracy"] == 1.0, group
        else:
            assert score["dice"] is None and score["presence_accuracy"] is None, group


def test_missing_the_hidden_polyp_shows_on_the_hidden_frames_only(hard_root, tmp_path):
    predictions(hard_root, tmp_path / "blind", hide_hidden=True)
    scores = episode_scores(
        read_events(hard_root), hard_root / "valid" / "masks", tmp_path / "blind", ["seq2", "seq3"]
    )
    assert scores["hidden"]["dice"] == 0.0 and scores["hidden"]["presence_accuracy"] == 0.0
    assert scores["blind"]["dice"] == 0.0 and scores["blind"]["presence_accuracy"] == 0.0
    assert scores["clear"]["dice"] == 1.0 and scores["absent"]["presence_accuracy"] == 1.0
    hidden, total = scores["hidden"]["frames"], scores["all"]["frames"]
    assert scores["all"]["presence_accuracy"] == pytest.approx(1 - hidden / total)


def test_a_set_without_labels_or_a_missing_mask_is_one_error_naming_it(hard_root, tmp_path):
    with pytest.raises(DatasetError, match=r"synth\.json: no per-frame events"):
        read_events(tmp_path)
    predictions(hard_root, tmp_path / "p", hide_hidden=False)
    shutil.rmtree(tmp_path / "p" / "seq3")
    with pytest.raises(DatasetError, match=r"seq3/frame1\.png: cannot read the mask"):
        episode_scores(
            read_events(hard_root), hard_root / "valid" / "masks", tmp_path / "p", ["seq2", "seq3"]
        )
    with pytest.raises(DatasetError, match="seq9: no events"):
        episode_scores(read_events(hard_root), hard_root / "valid" / "masks", tmp_path / "p", ["seq9"])


def test_per_sequence_scores_pool_by_frames_to_the_scores_of_all_frames(hard_root, tmp_path):
    predictions(hard_root, tmp_path / "blind", hide_hidden=True)
    args = (read_events(hard_root), hard_root / "valid" / "masks", tmp_path / "blind", ["seq2", "seq3"])
    pooled, apart = episode_scores(*args), sequence_episode_scores(*args)
    assert set(apart) == {"seq2", "seq3"}
    for group, score in pooled.items():
        frames = [apart[seq][group]["frames"] for seq in apart]
        assert sum(frames) == score["frames"], group
        for figure in ("dice", "presence_accuracy"):
            if not score["frames"]:
                assert score[figure] is None and all(apart[s][group][figure] is None for s in apart)
                continue
            weighted = sum((apart[s][group][figure] or 0.0) * apart[s][group]["frames"] for s in apart)
            assert weighted / score["frames"] == pytest.approx(score[figure]), (group, figure)
    assert apart["seq2"]["all"]["frames"] == apart["seq3"]["all"]["frames"] == 24
