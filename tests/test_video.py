import pytest
import torch

from autosam2.data.video import POLYP_ID, ClipBatch, Frame, Object, VideoDatapoint, collate_clips


def _video(name: str, n: int, h: int = 8, w: int = 6, present: tuple[int, ...] = ()) -> VideoDatapoint:
    frames = []
    for i in range(n):
        mask = torch.zeros(h, w, dtype=torch.bool)
        if i in present:
            mask[1:3, 2:4] = True
        image = torch.full((3, h, w), i, dtype=torch.uint8)
        frames.append(Frame(i + 10, image, [Object(POLYP_ID, i + 10, mask)], name=f"frame{i}"))
    return VideoDatapoint(name, frames, (h, w))


def test_object_requires_bool_hw_mask():
    with pytest.raises(ValueError, match="bool"):
        Object(POLYP_ID, 0, torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bool"):
        Object(POLYP_ID, 0, torch.zeros(1, 4, 4, dtype=torch.bool))
    assert Object(POLYP_ID, 0, torch.zeros(4, 4, dtype=torch.bool)).mask_HW.shape == (4, 4)


def test_frame_without_the_object_gives_an_empty_mask():
    frame = Frame(0, torch.zeros(3, 5, 7, dtype=torch.uint8))
    mask = frame.object_mask()
    assert mask.shape == (5, 7) and mask.dtype == torch.bool and not mask.any()


def test_video_rejects_a_frame_of_another_size():
    frame = Frame(0, torch.zeros(3, 5, 7, dtype=torch.uint8), name="frame0")
    with pytest.raises(ValueError, match="frame0"):
        VideoDatapoint("v", [frame], (5, 8))


def test_collate_is_time_major_with_presence_and_indices():
    a = _video("a", 3, present=(0, 2))
    b = _video("b", 3, present=(1,))
    batch = collate_clips([a, b])
    assert isinstance(batch, ClipBatch)
    assert batch.images_TBCHW.shape == (3, 2, 3, 8, 6)
    assert batch.masks_TBHW.shape == (3, 2, 8, 6) and batch.masks_TBHW.dtype == torch.bool
    assert batch.present_TB.tolist() == [[True, False], [False, True], [True, False]]
    assert batch.frame_indices_TB.tolist() == [[10, 10], [11, 11], [12, 12]]
    assert batch.video_ids == ["a", "b"]
    # frame t of clip b sits at [t, 1]
    assert int(batch.images_TBCHW[2, 1, 0, 0, 0]) == 2
    assert (batch.num_frames, batch.batch_size) == (3, 2)


def test_collate_refuses_clips_of_different_length_or_size():
    with pytest.raises(ValueError, match="a: 3 frames"):
        collate_clips([_video("a", 3), _video("b", 2)])
    with pytest.raises(ValueError, match="share length and size"):
        collate_clips([_video("a", 3), _video("b", 3, h=9)])
    with pytest.raises(ValueError):
        collate_clips([])


def test_batch_moves_to_a_device():
    batch = collate_clips([_video("a", 2)]).to("cpu")
    assert batch.images_TBCHW.device.type == "cpu" and batch.video_ids == ["a"]
