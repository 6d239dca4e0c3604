"""Validation during training: when it runs, over which sequences, what is logged, and the best weights.

Every rank evaluates its share of `data.valid` (split by rank, as evaluation reads it), writes a GIF per
sequence, and rank 0 merges the ranks' metrics into one summary, logs it with the per-sequence CSV and
the GIFs, and keeps ``best.pt`` when the valid Dice improves. The metrics are those of `autosam2 evaluate`
in its default mode, by the one accumulator (``VALIDATION_MODE``): ``valid/dice`` of some weights is the
``eval/dice`` of ``evaluate --metric-mode ours`` on the same sequences (every frame; an empty prediction
on a polyp-free frame scores 1, see `autosam2.metrics`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from autosam2.config import Config
from autosam2.data.sources import read_sequences
from autosam2.engine.dist import DistInfo, gather_objects
from autosam2.eval.inference import evaluate_sequences
from autosam2.eval.report import PredictionWriter, write_metrics
from autosam2.metrics import REPORTED, MetricAccumulator, Mode
from autosam2.model.autosam2 import AutoSAM2
from autosam2.model.weights import RunWeights
from autosam2.progress import Progress
from autosam2.tracking import MetricLogger

VALIDATION_MODE: Mode = "ours"  # every frame counts: a checkpoint is chosen on polyp-free frames too


class Validator:
    def __init__(
        self,
        cfg: Config,
        model: AutoSAM2,
        info: DistInfo,
        logger: MetricLogger,
        out: Path,
        weights: RunWeights,
    ):
        self.cfg, self.model, self.info, self.logger = cfg, model, info, logger
        self.out, self.weights = Path(out), weights

    def should_validate(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.train.validate_every == 0 or step == total_steps

    def validate(self, step: int) -> dict[str, float] | None:
        """Every rank calls this; the summary (``valid/dice``, ...) comes back on rank 0 only, and None
        when no sequence could be read."""
        folder = self.out / "valid" / f"step_{step:08d}"
        pictures = folder / "overlays"
        pictures.mkdir(parents=True, exist_ok=True)
        data = self.cfg.data
        sequences = read_sequences(
            data.valid,
            data.valid_split,
            self.info.rank,
            self.info.world_size,
            self.cfg.train.valid_sequences,
            data.on_error,
            layout=data.layout,
        )
        with Progress(len(sequences), f"valid step {step}", "sequence", enabled=self.info.is_main) as bar:
            mine = evaluate_sequences(
                self.model,
                sequences,
                self.info.device,
                metric_mode=VALIDATION_MODE,
                sink=PredictionWriter(folder, masks=False, overlay_dir=pictures, sheets=False),
                on_sequence=lambda video: bar.update(note=video.video_id),
            )
        metrics = MetricAccumulator(VALIDATION_MODE)
        for part in gather_objects(mine):  # also the point where every rank's GIFs are on disk
            metrics.merge(part)
        per_sequence = metrics.per_sequence()
        if self.info.is_main and not per_sequence:
            print(
                f"warning: step {step}: no validation sequence could be read; nothing validated",
                file=sys.stderr,
            )
        if not self.info.is_main or not per_sequence:
            return None
        means = metrics.summary()
        summary = {f"valid/{k}": v for k, v in means.items()}
        self.logger.log_metrics(summary, step)
        write_metrics(folder, per_sequence, means, {"step": step}, REPORTED[VALIDATION_MODE])
        self.logger.log_artifact(folder / "metrics.csv", f"valid/step_{step:08d}")
        self.logger.log_artifact(pictures, f"valid/step_{step:08d}")  # a folder lands as .../overlays
        print(
            f"step {step} valid dice {means['dice']:.4f} iou {means['iou']:.4f} over {len(per_sequence)} sequences",
            flush=True,
        )
        return summary

    def save_best(self, step: int, summary: dict[str, float]) -> None:
        self.weights.save("best.pt", step, summary)
