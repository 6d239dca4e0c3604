import torch

from autosam2.data.clips import FolderClips
from autosam2.data.polyp_gen import PolypGenDataset


def test_folder_clips_are_resized_windows_with_seeded_augmentation(tiny_root_pristine):
    clips = FolderClips(tiny_root_pristine, "train", clip_len=4, image_size=32, seed=1, stride=4)
    assert len(clips) == 6
    video = clips[4]
    assert video.video_id == "seq2" and [f.frame_index for f in video.frames] == [4, 5, 6, 7]
    assert video.size == (32, 32) and video.frames[0].image_CHW.shape == (3, 32, 32)
    raw = PolypGenDataset(tiny_root_pristine, "train").load_frame("seq2", 4)
    assert raw.object_mask().any() == video.frames[0].object_mask().any()
    assert clips[4].metadata["augment"] == video.metadata["augment"]
    clips.set_epoch(1)
    assert clips[4].metadata["augment"] != video.metadata["augment"]
    assert torch.equal(clips[4].frames[0].image_CHW, video.frames[0].image_CHW)
