"""What a resumed run changes: the settings its checkpoint was trained under against this run's.

A checkpoint keeps the config it was trained under (`LoopState.config`) and its learning-rate schedule
(`LRSchedule`, in the scheduler's state). Restoring the optimizer, the scheduler and the data position
would silently override some settings; each of those is either applied from the resumed step, said in
one line, or refused with one ConfigError naming the key, both values and the way out:

- `optim.lr`: applied; the schedule goes on from its position at the new peak.
- the schedule's length (`train.max_steps`, or the epochs' batches: `train.epochs`,
  `data.batches_per_epoch`, the batch size, the data): applied; the cosine goes on from where it stands
  and ends at the new last step, without a jump. A length that ends before the checkpoint is refused.
- `optim.weight_decay`, `optim.betas`: applied to the restored optimizer.
- `data.batch_size`: applied; the epoch goes on at the same global sample (the loop says so, as for
  another world size).
- `optim.warmup_steps`, `optim.min_lr_ratio` (no change without a jump), `optim.grad_accum` (the
  accumulation count is restored), `optim.layer_decay` (the restored groups carry its lr scales),
  `data.clip_len`, `data.order`, `data.shuffle_shards`, `train.seed` (the epoch's order and the data
  position depend on them), `train.init_from` (a resumed run's weights are its checkpoint's): refused.

Any other difference is honoured as given and named in one line. Every change is kept in
`LoopState.changes`, carried by later checkpoints, so config.yaml and MLflow list them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from autosam2.config import Config, ConfigError, to_dict
from autosam2.data.batches import TrainingBatches
from autosam2.engine.checkpoint import LoopState
from autosam2.engine.dist import DistInfo
from autosam2.engine.engines import Engine, LRSchedule
from autosam2.tracking import flatten_config

# why a resumed run cannot take another value of these
REFUSED = {
    "optim.warmup_steps": "its warm-up cannot change without a jump in the learning rate",
    "optim.min_lr_ratio": "the end of its cosine cannot change without a jump in the learning rate",
    "optim.grad_accum": "the optimizer's accumulation count comes from the checkpoint",
    "optim.layer_decay": "the optimizer's parameter groups and their lr scales come from the checkpoint",
    "data.clip_len": "which samples hold a clip, hence the epoch's order and the data position, depend on it",
    "data.order": "the data position is counted in that order",
    "data.shuffle_shards": "the epoch's order depends on it",
    "train.seed": "the epoch's order depends on it, and the random state comes from the checkpoint",
    "train.init_from": "a resumed run's weights come from its checkpoint",
}
# how to resume, not what runs
NOT_COMPARED = {"train.resume", "train.output_dir"}
# what sets the schedule's length without train.max_steps, besides the world size
LENGTH_KEYS = ("train.max_steps", "train.epochs", "data.batches_per_epoch", "data.batch_size", "data.train")
WAY_OUT = "or start a new run: --resume none, or another train.output_dir"


@dataclass
class Change:
    """A setting a resumed run changed: from `step` on it is `new` (it was `old`)."""

    step: int
    key: str
    old: str
    new: str
    note: str = ""

    def __str__(self) -> str:
        return f"from step {self.step}: {self.key} {self.old} -> {self.new}" + (
            f" ({self.note})" if self.note else ""
        )


def planned_steps(cfg: Config, data: TrainingBatches, world_size: int, state: LoopState | None = None) -> int:
    """The optimizer step the run ends at: `train.max_steps`, else the epochs' batches. A run resumed at
    another step size (ranks x clips) counts what is left of the data at its own size."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    accum = cfg.optim.grad_accum
    fresh = max(1, cfg.train.epochs * data.per_epoch // accum)
    per_step = world_size * cfg.data.batch_size
    if state is None or not state.step or not state.world_size:
        return fresh
    if state.world_size * state.batch_size == per_step:
        return fresh
    resumed = data.resume(state, world_size, cfg.data.batch_size)
    return state.step + data.batches_left(state.epoch, resumed.sample, cfg.train.epochs, per_step) // accum


def reconcile(
    cfg: Config, state: LoopState, engine: Engine, data: TrainingBatches, info: DistInfo, total_steps: int
) -> int:
    """Compare a resumed run's config with its checkpoint's; apply or refuse each difference (see the
    module's docstring), record the changes in `state` and return the step the run now ends at. Every
    rank calls it (each restores its own optimizer); rank 0 says what changed."""
    in_effect, saved, state.config = to_dict(cfg), state.config, to_dict(cfg)
    if not state.step:
        return total_steps
    if saved is None:
        if info.is_main:
            print(
                f"warning: the checkpoint of step {state.step} does not record the config it was trained "
                "under, so this run's settings could not be compared with it: its optimizer and "
                "learning-rate schedule go on as they were saved",
                flush=True,
            )
        return total_steps
    old, new = flatten_config(saved), flatten_config(in_effect)
    differ = {k for k in old.keys() & new.keys() if old[k] != new[k]} - NOT_COMPARED
    refused = [
        f"{k} {old[k]} -> {new[k]}: a resumed run cannot change it ({REFUSED[k]}); keep {k}={old[k]}"
        for k in sorted(differ & REFUSED.keys())
    ]
    if refused:
        raise ConfigError(f"the checkpoint of step {state.step}: " + "; ".join(refused) + f", {WAY_OUT}")
    total_steps = planned_steps(cfg, data, info.world_size, state)
    diff = _Diff(old, new, differ)
    if "None" in (old.get("train.max_steps"), new.get("train.max_steps")):  # a length from the data too
        diff.length_keys = LENGTH_KEYS
        if state.world_size and state.world_size != info.world_size:
            diff.length_causes.append(f"world size {state.world_size} -> {info.world_size}")
    changes, lines = _optimizer_changes(cfg, engine, state.step, total_steps, diff)
    others = sorted(differ - {c.key for c in changes} - REFUSED.keys())
    changes += [Change(state.step + 1, k, old[k], new[k]) for k in others]
    shown = [k for k in others if k != "data.batch_size"]  # the loop says what a batch size change does
    if shown:
        lines.append(
            f"resumed with other settings, in effect from step {state.step + 1}: "
            + ", ".join(f"{k} {old[k]} -> {new[k]}" for k in shown)
        )
    if info.is_main:
        for line in lines:
            print(line, flush=True)
    state.changes = [*state.changes, *(asdict(c) for c in changes)]
    return total_steps


@dataclass
class _Diff:
    """The checkpoint's settings and this run's (flattened), the keys whose values differ, the keys
    that set the schedule's length, and what else changed it."""

    old: dict[str, str]
    new: dict[str, str]
    keys: set[str]
    length_keys: tuple[str, ...] = ("train.max_steps",)
    length_causes: list[str] = field(default_factory=list)


def _optimizer_changes(
    cfg: Config, engine: Engine, at: int, total_steps: int, diff: _Diff
) -> tuple[list[Change], list[str]]:
    """The changes the restored optimizer and scheduler would override, made in `engine` from step
    `at` + 1 on, and a line for each."""
    old, new, differ = diff.old, diff.new, diff.keys
    peak, schedule = engine.scheduler.base_lrs[0], engine.scheduler.lr_lambdas[0]
    step = at + 1
    changes, lines = [], []
    if total_steps != schedule.total:
        causes = [k for k in diff.length_keys if k in differ]
        said = [f"{k} {old[k]} -> {new[k]}" for k in causes] + diff.length_causes
        why = ", ".join(said) or "the data's batches per epoch"
        if total_steps < at:
            raise ConfigError(
                f"the schedule would end at step {total_steps} ({why}), before step {at} where the "
                f"checkpoint stands; ask for at least {at} steps, {WAY_OUT}"
            )
        stretched = schedule.stretched(total_steps, at)
        lines.append(_length_line(schedule, stretched, peak, at, why))
        note = f"the schedule's length {schedule.total} -> {total_steps} steps, without a jump"
        changes += [Change(step, k, old[k], new[k], note) for k in causes]
        if not causes:
            changes.append(Change(step, "schedule length", str(schedule.total), str(total_steps), why))
        schedule = stretched
    if "optim.lr" in differ:
        note = (
            f"the schedule goes on from its position at the new peak: lr at step {step}: "
            f"{cfg.optim.lr * schedule(step):.2e} instead of {peak * schedule(step):.2e}"
        )
        changes.append(Change(step, "optim.lr", old["optim.lr"], new["optim.lr"], note))
        lines.append(f"optim.lr {old['optim.lr']} -> {new['optim.lr']} from step {step}: {note}")
    for key in sorted(differ & {"optim.weight_decay", "optim.betas"}):
        changes.append(Change(step, key, old[key], new[key], "set in the restored optimizer"))
        lines.append(f"{key} {old[key]} -> {new[key]} from step {step}: set in the restored optimizer")
    if changes:
        engine.retune(cfg.optim, schedule)
    return changes, lines


def _length_line(before: LRSchedule, after: LRSchedule, peak: float, at: int, why: str) -> str:
    head = f"schedule length {before.total} -> {after.total} steps ({why}) from step {at + 1}: "
    if before.progress(at) >= 1.0:
        return head + (
            f"the cosine had ended at step {before.total}, so the lr stays at its end value "
            f"{peak * before(at):.2e}; for a new schedule start a new run with train.init_from=<final.pt>"
        )
    if at < before.warmup:
        return head + f"the cosine after the warm-up now ends at step {after.total}"
    return head + (
        f"the cosine goes on from where it stands (lr {peak * before(at):.2e} at step {at}) and now ends "
        f"at step {after.total}"
    )


def describe(changes: list[dict[str, Any]]) -> list[str]:
    """The changes a run made as it resumed, one line each (config.yaml, the MLflow tag)."""
    return [str(Change(**c)) for c in changes]
