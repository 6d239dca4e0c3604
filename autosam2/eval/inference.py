"""Streaming inference over whole sequences (folder, shards or a video file) and their per-frame metrics.

Used by the trainer's periodic validation, `autosam2 evaluate` and `autosam2 predict`. Sequences are read
lazily (`LazyVideo`), a frame at a time, and each output is scored and handed to the sink (masks, soft
maps, overlays) as it comes, so host memory does not grow with a sequence's length. On an accelerator a
reader thread decodes and prepares at most ``READ_AHEAD`` frames ahead of the model and a writer thread
scores and writes at most ``WRITE_BEHIND`` behind, overlapping both with inference; on the CPU both run
inline (see `overlaps`). Metrics are computed at each sequence's
own resolution: predictions are resized back before scoring, and gathered in one `MetricAccumulator`,
whose summary is the only one the project computes.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from autosam2.data.transforms import model_input
from autosam2.data.video import Frame, LazyVideo
from autosam2.errors import SequenceSkipped
from autosam2.metrics import MetricAccumulator, Mode
from autosam2.model.autosam2 import AutoSAM2

READ_AHEAD = 8  # frames decoded and prepared ahead of the model (at least one encoder batch)
WRITE_BEHIND = 8  # outputs waiting to be scored and written

T = TypeVar("T")


class SequenceSink(Protocol):
    """Receives each sequence's predictions frame by frame, on the writer thread, in frame order."""

    def begin(self, video: LazyVideo) -> None: ...

    def frame(self, video: LazyVideo, frame: Frame, prob_HW: np.ndarray, presence: float) -> None: ...

    def end(self, video: LazyVideo) -> None: ...

    def discard(self, video: LazyVideo) -> None:
        """The sequence could not be read to its end (on_error=skip): forget what was written of it."""


def read_ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """`items`, produced by a thread at most `depth` ahead of the consumer; the producer's error is
    raised here, in order; leaving early stops the producer. ``depth=0``: no thread, `items` itself."""
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((end, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, who raises it
            ready.put((end, err))

    thread = threading.Thread(target=produce, name="autosam2-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, err = ready.get()
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it see `stop`
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def overlaps(device: torch.device) -> bool:
    """Whether reading and writing run in threads beside the model: on an accelerator, yes; on the CPU,
    no, since the model's intra-op threads already hold every core and a thread beside them stalls each
    of their parallel regions (measured on 2 cores, hiera-t at 256 px: +30 ms a frame to decode in a
    thread, +5 ms inline)."""
    return device.type != "cpu"


def predict_frames(
    model: AutoSAM2,
    video: LazyVideo,
    device: torch.device,
    mode: str = "video",
    encode_batch: int = 1,
) -> Iterator[tuple[Frame, np.ndarray, float]]:
    """Each frame with its probabilities ``[H,W]`` at the video's own size (zero where judged polyp-free)
    and its presence probability, frame by frame as the model streams. Frames are decoded and prepared
    by a reader thread ahead of the model when it runs on an accelerator, inline on the CPU (`overlaps`)."""
    size = model.image_size
    h, w = video.size
    pending: deque[Frame] = deque()

    def prepared() -> Iterator[tuple[Frame, torch.Tensor]]:
        for frame in video.frames():
            yield frame, model_input(frame.image_CHW, size, device)

    def inputs() -> Iterator[torch.Tensor]:
        for frame, image in read_ahead(prepared(), max(READ_AHEAD, encode_batch) if overlaps(device) else 0):
            pending.append(frame)
            yield image

    for out in model.stream(
        inputs(), num_frames=video.num_frames, per_frame=mode == "frame", encode_batch=encode_batch
    ):
        prob = out.probs_BHW[None].float()
        if (h, w) != (size, size):
            prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
        yield pending.popleft(), prob[0, 0].cpu().numpy(), float(out.presence_B[0])


def infer_sequences(
    model: AutoSAM2,
    sequences: Iterable[LazyVideo],
    device: torch.device,
    mode: str = "video",
    encode_batch: int = 1,
    sink: SequenceSink | None = None,
    accumulator: MetricAccumulator | None = None,
    on_sequence: Callable[[LazyVideo], None] | None = None,
) -> None:
    """Run every sequence through the model; the writer thread scores each frame into `accumulator` (when
    given) and hands it to `sink`. A sequence that raises SequenceSkipped is forgotten by both;
    `on_sequence(video)` is called (on the writer thread) as each one is written to its end."""
    was_training = model.training
    model.eval()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="autosam2-write") as writer:
            submit = writer.submit if overlaps(device) else _now
            behind: deque[Future] = deque()  # in order on the one writer thread, across sequences
            for video in sequences:

                def handle(frame: Frame, prob: np.ndarray, presence: float, video=video) -> None:
                    if accumulator is not None:
                        accumulator.add_frame(video.video_id, prob, frame.object_mask().numpy())
                    if sink is not None:
                        sink.frame(video, frame, prob, presence)

                def done(video=video) -> None:  # the GIF, sheet and video finish while the next one runs
                    if sink is not None:
                        sink.end(video)
                    if on_sequence is not None:
                        on_sequence(video)

                try:
                    if sink is not None:
                        behind.append(submit(sink.begin, video))
                    for frame, prob, presence in predict_frames(model, video, device, mode, encode_batch):
                        behind.append(submit(handle, frame, prob, presence))
                        _wait(behind, WRITE_BEHIND)
                except SequenceSkipped:
                    _wait(behind, 0)
                    if accumulator is not None:
                        accumulator.discard(video.video_id)
                    if sink is not None:
                        sink.discard(video)
                    continue
                behind.append(submit(done))
            _wait(behind, 0)
    finally:
        model.train(was_training)


def _now(fn: Callable[..., T], *args) -> Future:
    """`fn(*args)` run here and now, as a done Future (its error kept for `result`, as a thread's is)."""
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except BaseException as err:  # noqa: BLE001 - raised by `result`, in order, as from the writer thread
        done.set_exception(err)
    return done


def _wait(behind: deque[Future], limit: int) -> None:
    """Wait for the oldest writes until at most `limit` are outstanding (raising a writer's error)."""
    while len(behind) > limit:
        behind.popleft().result()


def evaluate_sequences(
    model: AutoSAM2,
    sequences: Iterable[LazyVideo],
    device: torch.device,
    mode: str = "video",
    metric_mode: Mode = "ours",
    encode_batch: int = 1,
    sink: SequenceSink | None = None,
    on_sequence: Callable[[LazyVideo], None] | None = None,
) -> MetricAccumulator:
    """The metrics of this process's sequences (`infer_sequences` with an accumulator)."""
    accumulator = MetricAccumulator(mode=metric_mode)
    infer_sequences(model, sequences, device, mode, encode_batch, sink, accumulator, on_sequence)
    return accumulator
