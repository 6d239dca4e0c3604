"""Checkpoints that survive preemption: atomic step folders, exact resume, stop-on-signal, weights files.

A checkpoint is ``OUT/checkpoints/step_XXXXXXXX/`` holding the engine's state (model, optimizer,
scheduler), ``state.json`` (step, epoch, position in the data stream, counters) and one RNG file per
rank. It is written under a ``.tmp`` name and renamed by rank 0 once every rank is done; ``latest``
names the newest complete one. SIGUSR2 / SIGTERM only set a flag: the loop checkpoints at the next step
boundary and exits cleanly.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosam2.atomic import atomic_write_json, atomic_write_text
from autosam2.engine.dist import DistInfo, all_reduce, barrier, broadcast_object

WEIGHTS_FORMAT = "autosam2-weights"


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, output_dir: str | Path, info: DistInfo, keep: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.info = info
        self.keep = keep

    def save(self, engine, state: dict[str, Any]) -> Path:
        """Every rank calls this; returns the final folder."""
        final = self.root / f"step_{state['step']:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        # python's pickle of numpy/random state is not weights_only-loadable: keep it out of torch.load
        torch.save(
            {k: v for k, v in rng_state().items() if k in ("torch", "cuda")},
            tmp / f"rng_rank{self.info.rank}.pt",
        )
        (tmp / f"rng_rank{self.info.rank}.json").write_text(json.dumps(_py_rng()))
        if self.info.is_main:
            atomic_write_json(tmp / "state.json", state)
        barrier()
        if self.info.is_main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_text(self.root / "latest", final.name + "\n")
            for old in sorted(
                p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
            )[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        return folder if (folder / "state.json").is_file() else None

    def resolve(self, resume: str) -> Path | None:
        """The folder to resume from: `auto` (latest here, if any), `none`, or a path."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        folder = Path(resume)
        if not (folder / "state.json").is_file():
            raise FileNotFoundError(f"{folder}: not a checkpoint folder (no state.json)")
        return folder

    def load(self, engine, folder: Path) -> dict[str, Any]:
        engine.load(folder)
        state = json.loads((folder / "state.json").read_text())
        rng_file = folder / f"rng_rank{self.info.rank}.pt"
        if rng_file.is_file():
            tensors = torch.load(rng_file, map_location="cpu", weights_only=True)
            set_rng_state(
                {
                    **tensors,
                    **_py_rng_restore(json.loads((folder / f"rng_rank{self.info.rank}.json").read_text())),
                }
            )
        return state


def _py_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def _py_rng_restore(data: dict[str, Any]) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = data["numpy"]
    version, internal, gauss = data["python"]
    return {
        "numpy": (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached),
        "python": (version, tuple(internal), gauss),
    }


class StopSignal:
    """SIGUSR2 / SIGTERM (SLURM's time-limit and preemption signals) set a flag; ranks agree on it."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank as soon as one rank got a signal (a collective: call it on all ranks)."""
        return all_reduce(1.0 if self.received is not None else 0.0, op="max") > 0


def save_weights(
    path: str | Path,
    model: torch.nn.Module,
    model_config: dict[str, Any],
    full: bool,
    extra: dict[str, Any] | None = None,
) -> None:
    """Weights for `evaluate`: trainable parameters (all parameters when SAM2 was randomly initialised,
    since no checkpoint can rebuild those), the model config, and metadata; weights_only-loadable."""
    path = Path(path)
    named = model.state_dict() if full else {n: p for n, p in model.named_parameters() if p.requires_grad}
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": 1,
        "full": full,
        "model_config": model_config,
        "model": {
            k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in named.items()
        },
        "extra": extra or {},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, tmp)
    tmp.replace(path)


def read_weights(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: weights file not found") from err
    except Exception as err:  # a damaged or foreign file: torch.load raises many types
        raise ValueError(f"{path}: not a loadable weights file ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not an AutoSAM2 weights file (written by `autosam2 train`)")
    return payload


def agree_on_resume(folder: Path | None) -> Path | None:
    """Rank 0's choice of checkpoint, for every rank (they may see the file system at slightly different times)."""
    chosen = broadcast_object(str(folder) if folder else None)
    return Path(chosen) if chosen else None
