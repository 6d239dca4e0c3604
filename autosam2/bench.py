"""`autosam2 bench ...`: throughput figures printed as one JSON object, ratios measured in the same run."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from autosam2.data.clips import FolderClips
from autosam2.data.polyp_gen import decode_image
from autosam2.data.stream import ClipStream, StreamConfig, make_loader
from autosam2.data.synthetic import SynthSpec, write_dataset
from autosam2.data.transforms import prepare_batch
from autosam2.data.video import collate_clips


class _FrameFiles(torch.utils.data.Dataset):
    """Bare decoding: read and decode one frame file, nothing else."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_image(self.paths[index].read_bytes(), self.paths[index])


def _stack_frames(frames: list[torch.Tensor]) -> torch.Tensor:
    """One tensor per batch, stacked as decoded (channel-last), so c ships frames the way a and b do."""
    return torch.stack([f.permute(1, 2, 0) for f in frames])


def _frames_per_second(batches: Iterable, frames_in: callable, limit: int, consume=None) -> float:
    """Frames/s after the first batch (worker start-up and first prefetch are left out, alike for all)."""
    iterator = iter(batches)
    first = next(iterator)
    if consume:
        consume(first)
    frames, start = 0, time.perf_counter()
    for i, batch in enumerate(iterator, start=1):
        if consume:
            consume(batch)
        frames += frames_in(batch)
        if i >= limit:
            break
    return frames / (time.perf_counter() - start)


def bench_data(args: argparse.Namespace) -> dict[str, Any]:
    from shards.writer import build

    with tempfile.TemporaryDirectory(prefix="autosam2-bench-") as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "polyp_gen"
        if not args.root:
            spec = SynthSpec(
                train_sequences=args.sequences, valid_sequences=1, frames=args.frames, size=args.size, seed=0
            )
            write_dataset(root, spec)
        shard_dir = Path(tmp) / "shards"
        build(root, "train", shard_dir, frames_per_sample=args.frames_per_sample, workers=args.workers)
        t, b, w = args.clip_len, args.batch_size, args.workers
        per_batch = t * b

        def shard_stream(seed: int) -> ClipStream:
            cfg = StreamConfig(
                clip_len=t,
                batch_size=b,
                image_size=args.image_size,
                batches_per_epoch=args.batches + 1,
                seed=seed,
            )
            return ClipStream(shard_dir, "train", cfg)

        clips = FolderClips(
            root, "train", clip_len=t, image_size=args.image_size, stride=args.frames_per_sample
        )
        frame_paths = [f.image for s in clips.dataset.sequences.values() for f in s.frames]
        loader = dict(num_workers=w, drop_last=True, shuffle=True, prefetch_factor=4 if w else None)
        readers = {
            "a": lambda r: _frames_per_second(
                make_loader(shard_stream(r), w), lambda _: per_batch, args.batches
            ),
            "b": lambda r: _frames_per_second(
                _cycle(torch.utils.data.DataLoader(clips, batch_size=b, collate_fn=collate_clips, **loader)),
                lambda _: per_batch,
                args.batches,
            ),
            "c": lambda r: _frames_per_second(
                _cycle(
                    torch.utils.data.DataLoader(
                        _FrameFiles(frame_paths), batch_size=per_batch, collate_fn=_stack_frames, **loader
                    )
                ),
                len,
                args.batches,
            ),
            "a_aug": lambda r: _frames_per_second(
                make_loader(shard_stream(r), w), lambda _: per_batch, args.batches, consume=prepare_batch
            ),
        }
        # rounds interleave the readers, and medians damp the noise of a shared 2-core machine
        runs: dict[str, list[float]] = {k: [] for k in readers}
        for r in range(args.rounds):
            for name, run in readers.items():
                runs[name].append(run(r))
        shards, folder, decode, shards_aug = (statistics.median(runs[k]) for k in ("a", "b", "c", "a_aug"))

    return {
        "bench": "data",
        "runs_frames_per_s": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
        "frames_per_s": {
            "a_shard_stream": round(shards, 1),
            "b_folder_reader": round(folder, 1),
            "c_jpeg_decode": round(decode, 1),
            "a_shard_stream_with_cpu_augment": round(shards_aug, 1),
        },
        "ratios": {
            "a_over_c": round(shards / decode, 3),
            "a_over_b": round(shards / folder, 3),
            "a_with_cpu_augment_over_c": round(shards_aug / decode, 3),
        },
        "target": {"a_over_c": 0.9, "met": shards / decode >= 0.9},
        "config": {
            "frame_size": args.size if not args.root else "from --root",
            "image_size": args.image_size,
            "clip_len": t,
            "batch_size": b,
            "workers": w,
            "batches_timed": args.batches,
            "rounds": args.rounds,
            "frames_per_sample": args.frames_per_sample,
            "cpu_count": os.cpu_count(),
            "torch_threads_main": torch.get_num_threads(),
        },
        "notes": "a, b: loader workers decode the clip window, resize to image_size and draw the augmentation; "
        "the augmentation itself runs batched on the training device (prepare_batch), shown on the CPU in "
        "a_shard_stream_with_cpu_augment. c: read + decode of the same frame files only.",
    }


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    """The full trainer's step time against a bare forward + backward + optimizer step of the same clip."""
    from autosam2.config import load_config
    from autosam2.data.transforms import prepare_batch
    from autosam2.engine.checkpoint import Checkpointer, StopSignal
    from autosam2.engine.dist import DistInfo
    from autosam2.engine.engines import build_engine
    from autosam2.engine.trainer import LoopState, Trainer
    from autosam2.losses import clip_losses
    from autosam2.model.sam2_builder import build_model
    from autosam2.tracking import default_tracking_uri, make_logger
    from shards.writer import build

    info = DistInfo(0, 1, 0, torch.device(args.device))
    with tempfile.TemporaryDirectory(prefix="autosam2-bench-") as tmp:
        root, out = Path(tmp) / "polyp_gen", Path(tmp) / "run"
        write_dataset(
            root,
            SynthSpec(
                train_sequences=2,
                valid_sequences=1,
                frames=max(8, args.clip_len * 2),
                size=args.image_size,
                seed=0,
            ),
        )
        build(root, "train", Path(tmp) / "shards", frames_per_sample=args.clip_len * 2)
        overrides = [
            f"data.train={Path(tmp) / 'shards'}",
            f"data.clip_len={args.clip_len}",
            f"data.batch_size={args.batch_size}",
            "data.num_workers=1",
            f"model.variant={args.variant}",
            f"model.image_size={args.image_size}",
            f"model.clip_mode={args.clip_mode}",
            "model.freeze.mask_decoder=false",
            f"train.device={args.device}",
            f"train.max_steps={args.steps}",
            "train.epochs=1000",
            "train.log_every=1",
            f"train.checkpoint_every={args.steps + 1}",
            f"train.validate_every={args.steps + 1}",
            f"train.output_dir={out}",
            "tracking.system_metrics=false",
        ]
        cfg = load_config(None, overrides)

        def fresh_model():
            torch.manual_seed(0)
            model = build_model(cfg.model.variant, cfg.model.image_size)
            model.attach_prompt_encoder(cfg.model.prompt)
            model.freeze(cfg.model.freeze)
            return model.to(info.device).train()

        # bare: one prepared clip, forward + loss + backward + AdamW step, nothing else
        stream = ClipStream(
            cfg.data.train,
            "train",
            StreamConfig(clip_len=args.clip_len, batch_size=args.batch_size, image_size=args.image_size),
        )
        clip = prepare_batch(next(iter(stream)), info.device)
        per_frame = cfg.model.clip_mode == "frame"

        def bare_steps() -> list[float]:
            model = fresh_model()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                out_ = model.forward_clip(clip.images_TBCHW, per_frame)
                loss = clip_losses(
                    out_.mask_logits_TBHW,
                    out_.iou_TB,
                    out_.object_logits_TB,
                    clip.masks_TBHW,
                    clip.present_TB,
                )["total"]
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.1)
                optimizer.step()
                _sync(info.device)
                times.append(time.perf_counter() - start)
            return times[1:]  # the first step warms caches

        bare = bare_steps()

        # the full trainer: stream + workers, augmentation, engine, MLflow logging every step
        model = fresh_model()
        engine = build_engine(model, cfg, args.steps, info)
        stamps: list[float] = []
        original = engine.step

        def timed_step():
            norm = original()
            if norm is not None:
                _sync(info.device)
                stamps.append(time.perf_counter())
            return norm

        engine.step = timed_step
        trainer_stream = ClipStream(
            cfg.data.train,
            "train",
            StreamConfig(
                clip_len=args.clip_len,
                batch_size=args.batch_size,
                image_size=args.image_size,
                batches_per_epoch=args.steps + 2,
            ),
        )

        def batches(epoch: int):
            trainer_stream.set_epoch(epoch)
            return make_loader(trainer_stream, 1)

        logger = make_logger(0, True, default_tracking_uri(out), "bench", system_metrics=False)
        try:
            Trainer(
                cfg, engine, batches, args.steps, Checkpointer(out, info), logger, info, stop=StopSignal(())
            ).fit(LoopState())
        finally:
            logger.close()
        bare += bare_steps()  # before and after the trainer, so drift on a shared machine hits both
    bare_step = statistics.median(bare)
    trainer_step = statistics.median(
        b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)
    )  # after the first step
    return {
        "bench": "train",
        "step_s": {"bare_forward_backward": round(bare_step, 4), "full_trainer": round(trainer_step, 4)},
        "ratio_trainer_over_bare": round(trainer_step / bare_step, 3),
        "target": {"ratio_trainer_over_bare": 1.10, "met": trainer_step / bare_step <= 1.10},
        "config": {
            "variant": args.variant,
            "image_size": args.image_size,
            "clip_len": args.clip_len,
            "batch_size": args.batch_size,
            "clip_mode": args.clip_mode,
            "device": args.device,
            "steps": args.steps,
            "torch_threads": torch.get_num_threads(),
        },
        "notes": "medians over steps after the first (bare: run before and after the trainer); the trainer includes data loading (1 worker), device-side augmentation, "
        "the engine (DDP code path, world size 1), loss logging to MLflow (SQLite) every step",
    }


def bench_infer(args: argparse.Namespace) -> dict[str, Any]:
    """Streaming inference FPS (encoder + prompt + memory, one frame at a time) against the bare image encoder."""
    from autosam2.model.prompt_encoder import PromptEncoderConfig
    from autosam2.model.sam2_builder import build_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.variant, args.image_size)
    model.attach_prompt_encoder(PromptEncoderConfig())
    model = model.to(device).eval()
    if args.compile:
        model.image_encoder.forward = torch.compile(model.image_encoder.forward, dynamic=False)
    frames = [torch.randn(1, 3, args.image_size, args.image_size, device=device) for _ in range(args.frames)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def encoder_pass() -> float:
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            for frame in frames:
                model.image_encoder(frame)
        _sync(device)
        return time.perf_counter() - start

    def stream_pass() -> float:
        start = time.perf_counter()
        with autocast:
            for _ in model.stream(iter(frames), num_frames=len(frames)):
                pass
        _sync(device)
        return time.perf_counter() - start

    encoder_pass(), stream_pass()  # warm-up (and compilation)
    encoder = statistics.median(encoder_pass() for _ in range(args.rounds))
    streaming = statistics.median(stream_pass() for _ in range(args.rounds))
    return {
        "bench": "infer",
        "fps": {
            "streaming_inference": round(args.frames / streaming, 2),
            "bare_image_encoder": round(args.frames / encoder, 2),
        },
        "ratio_streaming_over_encoder": round(encoder / streaming, 3),
        "config": {
            "variant": args.variant,
            "image_size": args.image_size,
            "frames": args.frames,
            "rounds": args.rounds,
            "device": str(device),
            "bf16": args.bf16,
            "compile": args.compile,
            "torch_threads": torch.get_num_threads(),
        },
    }


class _TensorBytes(TorchDispatchMode):
    """Bytes of the live tensor storages that ops inside it create on ``device``, and their peak.

    torch's own ``MemTracker`` would also sort them by kind, but it hooks every parameter for gradients
    and fails on frozen ones, which our configs have; this counts storages only.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # in-place ops and views hand back an input's storage: only new storages are counted, so
        # tensors made before (the weights) never are; lift_fresh brings in a new torch.tensor(...)
        inputs = {
            id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        if func is torch.ops.aten.lift_fresh.default:
            inputs = set()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device == self.device:
                storage = t.untyped_storage()
                if id(storage) not in inputs and storage not in self._seen:
                    self._seen[storage] = nbytes = storage.nbytes()
                    weakref.finalize(storage, self._free, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak tensor memory of training steps of a run config, and a per-GPU estimate.

    The config's model, image size, clip and precision run for real (random weights, a synthetic clip;
    fp32 weights under bf16 autocast, as both engines train); every tensor the steps create is counted
    while it lives. DDP adds its gradient buckets; DeepSpeed's ZeRO partitions (Adam states, reduced
    gradients, the reduce bucket) are added by formula, divided over ``--ranks`` as its stage says.
    """
    from autosam2.config import load_config
    from autosam2.engine.engines import read_deepspeed_config
    from autosam2.losses import clip_losses
    from autosam2.model.sam2_builder import build_model

    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    t_len, batch, size = cfg.data.clip_len, cfg.data.batch_size, cfg.model.image_size
    deepspeed = cfg.train.engine == "deepspeed"
    zero = (
        read_deepspeed_config(Path(cfg.train.deepspeed_config)).get("zero_optimization", {})
        if deepspeed
        else {}
    )

    torch.manual_seed(0)
    model = build_model(cfg.model.variant, size, None, cfg.model.multimask_output)
    model.attach_prompt_encoder(cfg.model.prompt)
    model.freeze(cfg.model.freeze)
    model = model.to(device).train()
    # CUDA's fused attention kernels keep attention dropout at O(tokens) memory; CPU attention with
    # dropout falls back to materialising the attention matrix, so off the GPU it is set to 0 here
    no_dropout = [m for m in model.modules() if hasattr(m, "dropout_p")] if device.type != "cuda" else []
    for module in no_dropout:
        module.dropout_p = 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if deepspeed else torch.optim.AdamW(trainable, lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    per_frame = cfg.model.clip_mode == "frame"

    counter = _TensorBytes(device)
    start = time.perf_counter()
    with counter:
        for _ in range(args.steps):  # from the second step on, the optimizer states are held too
            images = torch.randn(t_len, batch, 3, size, size, device=device)
            masks = torch.zeros(t_len, batch, size, size, device=device)
            masks[..., size // 4 : size // 2, size // 4 : size // 2] = 1.0
            present = torch.ones(t_len, batch, dtype=torch.bool, device=device)
            with autocast:
                out = model.forward_clip(images, per_frame)
            loss = clip_losses(
                out.mask_logits_TBHW.float(),
                out.iou_TB.float(),
                out.object_logits_TB.float(),
                masks,
                present,
                cfg.loss,
            )["total"]
            loss.backward()
            if optimizer is not None:
                optimizer.step()
            for p in trainable:
                p.grad = None
            del images, masks, out, loss
    seconds = time.perf_counter() - start

    def nbytes(tensors: Iterable[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    weights = nbytes(model.parameters()) + nbytes(model.buffers())
    gradients = nbytes(trainable)
    states = [v for s in (optimizer.state.values() if optimizer else []) for v in s.values()]
    optimizer_states = nbytes(v for v in states if isinstance(v, torch.Tensor) and v.device == device)
    n_trainable = sum(p.numel() for p in trainable)
    ranks = max(1, args.ranks)
    extra: dict[str, float] = {}
    engine = "ddp"
    if deepspeed:
        stage = int(zero.get("stage", 0))
        engine = f"deepspeed ZeRO-{stage}"
        extra["zero_adam_states"] = 8 * n_trainable / (ranks if stage >= 1 else 1)
        extra["zero_reduced_gradients"] = 4 * n_trainable / (ranks if stage >= 2 else 1)
        extra["zero_reduce_bucket"] = 4 * min(n_trainable, int(zero.get("reduce_bucket_size", 5e8)))
    elif ranks > 1:
        extra["ddp_gradient_buckets"] = 4 * n_trainable  # DDP's flat copy of the gradients
    peak = weights + counter.peak
    mib = 2**20
    return {
        "bench": "memory",
        "peak_MiB": {
            "weights": round(weights / mib, 1),
            "optimizer_states": round(optimizer_states / mib, 1),
            "gradients": round(gradients / mib, 1),
            "activations_and_temporaries": round((peak - weights - optimizer_states - gradients) / mib, 1),
            "total": round(peak / mib, 1),
        },
        "engine_extra_MiB": {k: round(v / mib, 1) for k, v in extra.items()},
        "estimate_per_gpu_GiB": round((peak + sum(extra.values())) / 2**30, 2),
        "parameters": {
            "trainable": n_trainable,
            "frozen": sum(p.numel() for p in model.parameters()) - n_trainable,
        },
        "config": {
            "config": str(args.config) if args.config else None,
            "variant": cfg.model.variant,
            "image_size": size,
            "clip_len": t_len,
            "batch_size": batch,
            "clip_mode": cfg.model.clip_mode,
            "precision": cfg.train.precision,
            "engine": engine,
            "ranks": ranks,
            "device": str(device),
            "steps": args.steps,
            "seconds": round(seconds, 1),
            "attention_dropout_zeroed": len(no_dropout),
        },
        "notes": "tensor bytes only, counted on the device given (autocast's op list on CPU differs slightly "
        "from CUDA's); on a GPU add the CUDA context and the caching allocator's slack. "
        "activations_and_temporaries is the rest of the peak, so it includes gradients not yet reduced",
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(loader: torch.utils.data.DataLoader) -> Iterable:
    while True:
        yield from loader


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks; each prints one JSON object")
    kinds = p.add_subparsers(dest="kind", required=True)
    d = kinds.add_parser("data", help="shard stream vs folder reader vs bare JPEG decoding, frames/s")
    d.add_argument(
        "--root", type=Path, default=None, help="a polyp_gen root to read (default: a synthetic one)"
    )
    d.add_argument("--size", type=int, default=512, help="synthetic frame side (default 512)")
    d.add_argument("--image-size", type=int, default=512, help="model image size (default 512)")
    d.add_argument("--sequences", type=int, default=6)
    d.add_argument("--frames", type=int, default=32)
    d.add_argument("--frames-per-sample", type=int, default=16)
    d.add_argument("--clip-len", type=int, default=8)
    d.add_argument("--batch-size", type=int, default=2)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--batches", type=int, default=25, help="batches timed per reader and round")
    d.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    d.set_defaults(func=lambda args: print(json.dumps(bench_data(args), indent=1)) or 0)
    t = kinds.add_parser(
        "train", help="full trainer step time vs a bare forward + backward of the same model and clip"
    )
    t.add_argument("--variant", default="hiera_t")
    t.add_argument("--image-size", type=int, default=256)
    t.add_argument("--clip-len", type=int, default=4)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--clip-mode", default="video", choices=["video", "frame"])
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.set_defaults(func=lambda args: print(json.dumps(bench_train(args), indent=1)) or 0)
    i = kinds.add_parser("infer", help="streaming inference FPS vs bare image-encoder FPS at the same size")
    i.add_argument("--variant", default="hiera_t")
    i.add_argument("--image-size", type=int, default=256)
    i.add_argument("--frames", type=int, default=16)
    i.add_argument("--rounds", type=int, default=3)
    i.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    i.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    i.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    i.set_defaults(func=lambda args: print(json.dumps(bench_infer(args), indent=1)) or 0)
    m = kinds.add_parser(
        "memory", help="tensor memory of a run config's training step, by kind, and a per-GPU estimate"
    )
    m.add_argument("--config", type=Path, default=None, help="run config (default: the embedded defaults)")
    m.add_argument("overrides", nargs="*", help="key=value config overrides")
    m.add_argument("--ranks", type=int, default=8, help="data-parallel ranks for ZeRO sharding (default 8)")
    m.add_argument("--steps", type=int, default=2, help="training steps tracked (default 2)")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.set_defaults(func=lambda args: print(json.dumps(bench_memory(args), indent=1)) or 0)
