"""Unlabeled input for `autosam2 predict`: video files and folders of frames, read lazily as `LazyVideo`s.

A video file (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ...) is decoded frame by frame through PyAV (FFmpeg);
its frames are named by index (``00000`` ...). A folder of frames (``.jpg``/``.png``) is one sequence, its
frames in the natural order of their names; a folder of such folders and video files is one sequence
each, named by the folder or the file's stem.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from autosam2.data.codec import decode_image, image_size
from autosam2.data.layouts.files import image_files, natural_key
from autosam2.data.video import Frame, LazyVideo
from autosam2.errors import DatasetError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".ts")


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


def video_file(path: str | Path) -> LazyVideo:
    """A video file as one sequence; one DatasetError naming it when FFmpeg cannot read it."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DatasetError(f"{path}: holds no video stream")
            stream = container.streams.video[0]
            size = (stream.codec_context.height, stream.codec_context.width)
            # 0: the container does not say (Matroska, say): its packets are counted, nothing decoded
            count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            fps = float(stream.average_rate) if stream.average_rate else None
    except av.FFmpegError as err:
        raise DatasetError(f"{path}: cannot read video ({err})") from err
    if not size[0] or not size[1]:
        raise DatasetError(f"{path}: the video stream has no frame size")

    def read() -> Iterator[Frame]:
        index = 0
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                    yield Frame(index, image, [], name=f"{index:05d}")
                    index += 1
        except av.FFmpegError as err:
            raise DatasetError(f"{path}: cannot decode frame {index} ({err})") from err

    return LazyVideo(path.stem, size, count or None, read, {"fps": fps, "source": str(path)})


def frame_folder(folder: str | Path, name: str | None = None) -> LazyVideo:
    """A folder of frames as one sequence, in the natural order of their names."""
    folder = Path(folder)
    files = sorted(image_files(folder).items(), key=lambda item: natural_key(item[0]))
    if not files:
        raise DatasetError(f"{folder}: holds no frames (.jpg, .jpeg, .png)")
    return frame_files(name or folder.name, files, folder)


def frame_files(name: str, files: list[tuple[str, Path]], source: Path) -> LazyVideo:
    """Frame files (stem, path) as one sequence, in the order given."""
    size = image_size(files[0][1])

    def read() -> Iterator[Frame]:
        for index, (stem, path) in enumerate(files):
            image = decode_image(path.read_bytes(), path)
            if tuple(image.shape[-2:]) != size:
                raise DatasetError(
                    f"{path}: frame is {image.shape[2]}x{image.shape[1]}, the sequence started at "
                    f"{size[1]}x{size[0]} ({files[0][1].name}) (WxH)"
                )
            yield Frame(index, image, [], name=stem)

    return LazyVideo(name, size, len(files), read, {"source": str(source)})


def read_inputs(path: str | Path) -> list[LazyVideo]:
    """The sequences of a video file, a folder of frames, or a folder of those (and of video files)."""
    path = Path(path)
    if path.is_file():
        if not is_video_file(path):
            raise DatasetError(
                f"{path}: not a video file ({', '.join(VIDEO_SUFFIXES)}) nor a folder of frames"
            )
        return [video_file(path)]
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or folder")
    if image_files(path):
        return [frame_folder(path)]
    entries = sorted(path.iterdir(), key=lambda p: natural_key(p.name))
    videos: dict[str, tuple[Path, LazyVideo]] = {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if is_video_file(entry):
            video = video_file(entry)
        elif entry.is_dir() and image_files(entry):
            video = frame_folder(entry)
        else:
            continue
        if video.video_id in videos:
            raise DatasetError(
                f"{entry}: same sequence name {video.video_id!r} as {videos[video.video_id][0]}; rename one"
            )
        videos[video.video_id] = (entry, video)
    if not videos:
        raise DatasetError(
            f"{path}: holds no frames, no video files ({', '.join(VIDEO_SUFFIXES)}) and no folders of frames"
        )
    return [video for _, video in videos.values()]
