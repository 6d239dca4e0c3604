"""Synthetic polyp videos in the polyp_gen layout, so everything runs and is tested without real data.

Each sequence is a camera moving over a colon-like canvas (textured pink mucosa, folds, vessels, a dark
lumen) that carries one polyp (a shaded, irregular dome with a specular highlight). The camera pans,
zooms and rolls, so the polyp moves and scales; it leaves the view for a stretch of every sequence
(polyp-free frames), a tissue fold sometimes slides over part of it (partial occlusion: the mask keeps
only the visible part), and short episodes of motion blur or fluid haze hide it without changing its
mask (where video memory should help). The hard split hides it harder (HIDING), or takes it out of the
frame altogether while it is there (BLIND: an instrument over it, a dropped frame, a flash), where only
memory can tell where it is. Masks are written as JPEG, as polyp_gen roots hold them.

Everything is drawn from ``numpy.random.default_rng((seed, split, index))``: the same seed gives
byte-identical files, and each split has a stream of its own, so a test split (or none) leaves the train
and valid files as they are.
"""

from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from itertools import chain, zip_longest
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from autosam2.data.layouts.polyp_gen import list_file
from autosam2.outputs import SYNTH_DATASET, output_directory

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}  # the split's part of every sequence's seed
# the hard split's episodes: the polyp is there (its mask unchanged) but all but invisible in the frame
HIDING = ("haze", "blur", "specular", "low_contrast")
# the hard split's episodes in which the frame holds no trace of the present polyp (its mask unchanged):
# an opaque instrument over it and a margin around it, a dropped (near-black) frame, a saturated flash
BLIND = ("covered", "dropped", "flash")
# the label of every frame, for scores per kind: one of HIDING or BLIND, or occluded (a fold covers part
# of the polyp; the mask keeps the visible part), absent (no polyp in view), clear (everything else)
FRAME_KINDS = (*HIDING, *BLIND, "occluded", "absent", "clear")
DECOY_GLARE = 0.12  # hard split: share of the other frames with a glare where no polyp is
DECOY_INSTRUMENT = 0.15  # hard split: share of the frames outside episodes with an instrument away from it
INSTRUMENT_COLOUR = (150.0, 158.0, 170.0)  # steel grey, before its shading
BLANK_LEVEL = {"dropped": 0.0, "flash": 253.0}  # a dropped or flash frame: this level plus sensor noise
# hard split: share of the frames with the polyp far out of view that are dropped or flash frames too, so
# a blank frame says as little about whether the polyp is there as about where
DECOY_BLANK = 0.35
CANVAS_SCALE = 4.5  # canvas side / frame side: room for the camera to pan the polyp out of view
ABSENT_FRACTION = (0.15, 0.3)  # share of each sequence with the polyp fully out of view
# `synth --hard --episode-windows N`: the split of N-frame windows cut from the train split, each from two
# frames with the polyp in view into one of its hidden episodes (stage 2's curriculum, docs/performance.md)
WINDOWS_SPLIT = "train_episodes"
WINDOW_LEAD = 2  # frames in view before each window's episode: every hard episode comes after two


@dataclass(frozen=True)
class SynthSpec:
    """What `autosam2 synth` makes: sequence counts per split (no test split unless asked), frames per
    sequence, frame side, seed."""

    train_sequences: int = 8
    valid_sequences: int = 4
    test_sequences: int = 0
    frames: int = 24
    size: int = 256
    seed: int = 0
    hard: bool = False  # the hard split: episodes that hide a present polyp almost entirely
    episode_windows: int = 0  # frames per window of WINDOWS_SPLIT (hard split only); 0: no such split

    def __post_init__(self) -> None:
        small = self.size < 32 or self.frames < 2 or self.test_sequences < 0
        if small or self.train_sequences < 1 or self.valid_sequences < 1:
            raise ValueError(
                "synthetic dataset needs size >= 32, frames >= 2, >= 1 train and valid sequence and "
                f">= 0 test sequences: {self}"
            )
        problem = episode_windows_problem(self.episode_windows, self.hard, self.frames)
        if problem:
            raise ValueError(f"episode windows {self.episode_windows}: {problem}: {self}")


def episode_windows_problem(windows: int, hard: bool, frames: int) -> str | None:
    """Why `windows` frames a window of WINDOWS_SPLIT cannot be cut (0: none asked), or None."""
    if windows and not (hard and WINDOW_LEAD < windows <= frames):
        return (
            f"needs --hard and {WINDOW_LEAD + 1} to --frames ({frames}) frames a window ({WINDOW_LEAD} "
            "frames before each episode, then the episode)"
        )
    return None


@dataclass
class SynthSequence:
    name: str
    frames: list[np.ndarray]  # uint8 [H,W,3]
    masks: list[np.ndarray]  # bool [H,W]
    events: list[dict]  # per frame: episode kind ('': none), blur sigma, haze, occluded share, visible


def _noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, ...]) -> np.ndarray:
    """Smooth value noise in about [-1, 1]: random grids of a few cells, upsampled bicubically, summed."""
    h, w = shape
    out = np.zeros(shape, np.float32)
    total = 0.0
    for i, c in enumerate(cells):
        weight = 0.6**i
        grid = rng.standard_normal((c, c)).astype(np.float32)
        out += weight * np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC))
        total += weight
    return out / total


def _smoothstep(x: np.ndarray | float) -> np.ndarray | float:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _canvas(rng: np.random.Generator, side: int, size: int) -> np.ndarray:
    """Colon-like background, float32 [side,side,3] in 0..255."""
    base = np.array([198.0, 104.0, 92.0]) + rng.normal(0, 10, 3)
    mucosa = _noise(rng, (side, side), (max(3, side // size * 3), side // size * 8, side // 6))
    fine = _noise(rng, (side, side), (side // 4, side // 2))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    # haustral folds: bright ridges with dark troughs around an off-centre point
    fx, fy = rng.uniform(0.2, 0.8, 2) * side
    period = rng.uniform(0.35, 0.6) * size
    radius = np.hypot(xx - fx, yy - fy) + 25 * mucosa
    folds = np.sin(2 * np.pi * radius / period)
    shade = 1.0 + 0.12 * mucosa + 0.04 * fine + 0.13 * folds
    # dark lumen
    lx, ly = rng.uniform(0.1, 0.9, 2) * side
    lumen = np.exp(-(((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * (0.18 * size) ** 2)))
    shade *= 1.0 - 0.75 * lumen
    img = base[None, None, :] * shade[..., None]
    # vessels: thin dark random walks
    vessels = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(vessels)
    for _ in range(int(12 * (side / size) ** 2 / 4) + 6):
        x, y = rng.uniform(0, side, 2)
        angle = rng.uniform(0, 2 * np.pi)
        points = [(x, y)]
        for _ in range(int(rng.integers(8, 25))):
            angle += rng.normal(0, 0.5)
            step = rng.uniform(0.02, 0.05) * size
            x, y = x + step * math.cos(angle), y + step * math.sin(angle)
            points.append((x, y))
        draw.line(points, fill=int(rng.integers(90, 200)), width=int(rng.integers(1, 3)))
    vessel = np.asarray(vessels.filter(ImageFilter.GaussianBlur(0.8)), np.float32)[..., None] / 255.0
    img = img * (1 - 0.35 * vessel) + np.array([120.0, 30.0, 45.0]) * 0.35 * vessel
    return img.astype(np.float32)


def _add_polyp(rng: np.random.Generator, canvas: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Composite one polyp at the canvas centre; return its hard mask (uint8 0/255) and max radius."""
    side = canvas.shape[0]
    c = side / 2.0
    r0 = rng.uniform(0.08, 0.15) * size
    harmonics = [(rng.uniform(0, 0.14 / k), rng.uniform(0, 2 * np.pi), k) for k in range(2, 6)]
    r_max = r0 * (1 + sum(a for a, _, _ in harmonics))
    lo, hi = int(c - 2 * r_max), int(c + 2 * r_max) + 1
    yy, xx = np.mgrid[lo:hi, lo:hi].astype(np.float32)
    dx, dy = xx - c, yy - c
    d = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    r = r0 * (1 + sum(a * np.cos(k * theta + p) for a, p, k in harmonics))
    inside = d < r
    z = np.sqrt(np.clip(1 - (d / r) ** 2, 0, 1))
    light = rng.uniform(0, 2 * np.pi)
    lx, ly = math.cos(light), math.sin(light)
    texture = _noise(rng, d.shape, (max(3, int(r0 / 4)), max(4, int(r0 / 2))))
    colour = np.array([214.0, 128.0, 104.0]) + rng.normal(0, 10, 3)
    shade = 0.78 + 0.3 * z - 0.18 * (dx * lx + dy * ly) / r * z + 0.08 * texture
    polyp = colour[None, None, :] * shade[..., None]
    highlight = np.exp(-((dx + 0.4 * r0 * lx) ** 2 + (dy + 0.4 * r0 * ly) ** 2) / (2 * (0.12 * r0) ** 2))
    polyp = polyp * (1 - 0.8 * highlight[..., None]) + 250.0 * 0.8 * highlight[..., None]
    alpha = np.clip(r - d + 0.5, 0, 1)[..., None]
    rim = 1 - 0.3 * np.exp(-(((d - r) / (0.15 * r0)) ** 2)) * (d > r)
    region = canvas[lo:hi, lo:hi]
    region[:] = (region * rim[..., None]) * (1 - alpha) + polyp * alpha
    mask = np.zeros((side, side), np.uint8)
    mask[lo:hi, lo:hi] = inside * 255
    return mask, r_max


def _camera(
    rng: np.random.Generator, n: int, size: int, r_max: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: polyp offset from the view centre in frame pixels [n,2], zoom [n], roll [n]."""
    t = np.arange(n, dtype=np.float64)
    zoom = rng.uniform(0.95, 1.15) * np.exp(
        rng.uniform(0.1, 0.25) * np.sin(2 * np.pi * t / n * rng.uniform(0.5, 1.5) + rng.uniform(0, 6.3))
    )
    roll = rng.uniform(-0.4, 0.4) * np.sin(2 * np.pi * t / n * rng.uniform(0.3, 1.0) + rng.uniform(0, 6.3))
    wander = np.stack(
        [
            0.22
            * size
            * np.sin(2 * np.pi * t / n * rng.uniform(0.4, 1.2) + rng.uniform(0, 6.3))
            * rng.uniform(0.3, 1),
            0.22
            * size
            * np.sin(2 * np.pi * t / n * rng.uniform(0.4, 1.2) + rng.uniform(0, 6.3))
            * rng.uniform(0.3, 1),
        ],
        axis=1,
    )
    # one stretch with the polyp fully out of view, sliding out and back in over `ramp` frames
    absent = max(1, math.ceil(rng.uniform(*ABSENT_FRACTION) * n))
    ramp = min(3, max(1, (n - absent) // 4))
    where = rng.choice(["start", "middle", "end"])
    start = {
        "start": 0,
        "end": n - absent,
        "middle": int(rng.integers(ramp, max(ramp + 1, n - absent - ramp + 1))),
    }[where]
    start = min(start, n - absent)
    exit_level = np.zeros(n)
    for i in range(n):
        if start <= i < start + absent:
            exit_level[i] = 1.0
        else:
            gap = start - i if i < start else i - (start + absent - 1)
            exit_level[i] = _smoothstep(1 - gap / (ramp + 1))
    # leave through one side: far enough on that axis that the whole polyp is outside the frame
    axis, sign = int(rng.integers(0, 2)), float(rng.choice([-1.0, 1.0]))
    away = np.array(wander)
    away[:, axis] = sign * (size / 2 + 1.2 * r_max * zoom.max() + 2)
    offset = wander * (1 - exit_level[:, None]) + away * exit_level[:, None]
    return offset, zoom, roll


def _fold_alpha(
    xx: np.ndarray, yy: np.ndarray, centre: np.ndarray, direction: float, half_thick: float, half_long: float
) -> np.ndarray:
    """Alpha (0..1, soft edge) of a tissue fold: an ellipse whose short axis points along `direction`."""
    cos, sin = math.cos(direction), math.sin(direction)
    u = (xx - centre[0]) * cos + (yy - centre[1]) * sin
    v = -(xx - centre[0]) * sin + (yy - centre[1]) * cos
    radius = np.sqrt((u / half_thick) ** 2 + (v / half_long) ** 2)
    return np.clip((1 - radius) * half_thick / 1.5, 0, 1).astype(np.float32)


@dataclass(frozen=True)
class _Fold:
    """A tissue fold that slides over part of the polyp: per frame it covers, its shift from the polyp
    centre and its direction; its half thickness and half length; its colour."""

    at: dict[int, tuple[np.ndarray, float]]
    half_thick: float
    half_long: float
    colour: np.ndarray


@dataclass(frozen=True)
class _Instrument:
    """An opaque instrument: a round-ended shaft `half_width` wide either side of its axis, which runs
    `length` from the tip along `direction` (radians: the way back to where it enters, outside the frame)."""

    tip: np.ndarray
    direction: float
    half_width: float
    length: float


@dataclass(frozen=True)
class _Scene:
    """One sequence, drawn before any frame: the canvas (the polyp's mask on a canvas of its own, and in
    the hard split the same tissue without the polyp), the camera path, the per-frame episodes (blur
    sigma, haze, kind, strength of a glare or fading), the fold, the instruments (hard split: over the
    polyp on covered frames, decoys elsewhere), and the frame's pixel grid and vignette."""

    size: int
    side: int
    hard: bool
    canvas: Image.Image
    plain: Image.Image | None
    mask: Image.Image
    r_max: float
    offset: np.ndarray
    zoom: np.ndarray
    roll: np.ndarray
    blur: np.ndarray
    haze: np.ndarray
    episode: list[str]
    hiding: dict[int, float]
    fold: _Fold
    instruments: dict[int, _Instrument]
    blanks: dict[int, str]  # hard split: decoy dropped or flash frames where no polyp is (frame -> kind)
    xx: np.ndarray
    yy: np.ndarray
    vignette: np.ndarray


def generate_sequence(name: str, split: str, index: int, spec: SynthSpec) -> SynthSequence:
    """Render one sequence; deterministic in (spec.seed, split, index)."""
    # the hard split draws from streams of its own (a fourth seed part), apart from the default set's
    rng = np.random.default_rng((spec.seed, SPLIT_CODES[split], index, *((1,) if spec.hard else ())))
    scene = _scene(rng, spec, index)
    frames, masks, events = [], [], []
    for i in range(spec.frames):
        frame, mask, event = _render_frame(rng, scene, i)
        frames.append(frame)
        masks.append(mask)
        events.append(event)
    return SynthSequence(name, frames, masks, events)


def _scene(rng: np.random.Generator, spec: SynthSpec, index: int) -> _Scene:
    """Sequence `index`'s canvas with its polyp and reflections, the camera path, the episodes, the fold
    and (hard split) the instruments, drawn in that order."""
    size = spec.size
    side = int(CANVAS_SCALE * size)
    canvas = _canvas(rng, side, size)
    plain = canvas.copy() if spec.hard else None  # the same tissue without the polyp, to fade it into
    mask_canvas, r_max = _add_polyp(rng, canvas, size)
    _add_reflections(rng, canvas, plain, size)
    offset, zoom, roll = _camera(rng, spec.frames, size, r_max)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    vignette = 1.0 - 0.45 * (np.hypot(xx - size / 2, yy - size / 2) / (size / math.sqrt(2))) ** 2
    blur, haze, episode, hiding, visible = _episodes(rng, spec, offset, index)
    fold = _fold(rng, spec.frames, size, visible, r_max, zoom)
    instruments = _instruments(rng, size, episode, offset, zoom, r_max) if spec.hard else {}
    scene = _Scene(
        size=size,
        side=side,
        hard=spec.hard,
        canvas=Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)),
        plain=None if plain is None else Image.fromarray(np.clip(plain, 0, 255).astype(np.uint8)),
        mask=Image.fromarray(mask_canvas),
        r_max=r_max,
        offset=offset,
        zoom=zoom,
        roll=roll,
        blur=blur,
        haze=haze,
        episode=episode,
        hiding=hiding,
        fold=fold,
        instruments=instruments,
        blanks={},
        xx=xx,
        yy=yy,
        vignette=vignette,
    )
    if spec.hard:
        scene = replace(scene, blanks=_decoy_blanks(rng, scene))
    return scene


def _add_reflections(
    rng: np.random.Generator, canvas: np.ndarray, plain: np.ndarray | None, size: int
) -> None:
    """A few specular reflections that move with the tissue, on the canvas (and the polyp-free one)."""
    side = canvas.shape[0]
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.uniform(0, side, 2)
        s = rng.uniform(0.004, 0.012) * size
        lo_y, hi_y, lo_x, hi_x = (
            int(max(0, y - 4 * s)),
            int(min(side, y + 4 * s)),
            int(max(0, x - 4 * s)),
            int(min(side, x + 4 * s)),
        )
        yy, xx = np.mgrid[lo_y:hi_y, lo_x:hi_x]
        spot = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s**2))[..., None]
        for layer in (canvas,) if plain is None else (canvas, plain):
            layer[lo_y:hi_y, lo_x:hi_x] = layer[lo_y:hi_y, lo_x:hi_x] * (1 - spot) + 255 * spot


def _episodes(
    rng: np.random.Generator, spec: SynthSpec, offset: np.ndarray, index: int
) -> tuple[np.ndarray, np.ndarray, list[str], dict[int, float], list[int]]:
    """Per frame: blur sigma, haze, episode kind and (hard split) the strength of its glare or fading;
    and the frames with the polyp in view. The default split has one hard-to-see stretch (blur or haze,
    mask unchanged); the hard split its HIDING and BLIND episodes."""
    size, n = spec.size, spec.frames
    blur = rng.uniform(0.0, 0.8, n)
    haze = np.zeros(n)
    episode = [""] * n
    visible = [i for i in range(n) if np.hypot(*offset[i]) < size / 2]
    hiding: dict[int, float] = {}  # frame -> strength of its specular glare or fading (0..1)
    if spec.hard:
        for i, (kind, strength) in _hiding_episodes(rng, n, visible, index).items():
            episode[i] = kind
            if kind == "blur":
                blur[i] = (6.0 + 4.0 * strength) * size / 256
            elif kind == "haze":
                haze[i] = 0.86 + 0.08 * strength
            elif kind in HIDING:
                hiding[i] = 0.9 + 0.07 * strength
    elif visible:
        hard_start = int(rng.choice(visible))
        hard_len = int(rng.integers(2, 4))
        kind = rng.choice(["blur", "haze"])
        for i in range(hard_start, min(n, hard_start + hard_len)):
            episode[i] = str(kind)
            if kind == "blur":
                blur[i] = rng.uniform(2.5, 4.5) * size / 256
            else:
                haze[i] = rng.uniform(0.55, 0.75)
    return blur, haze, episode, hiding, visible


def _fold(
    rng: np.random.Generator, n: int, size: int, visible: list[int], r_max: float, zoom: np.ndarray
) -> _Fold:
    """A fold that (in most sequences) slides in from one side, covers part of the polyp (its near edge
    stops inside it) and slides away."""
    at: dict[int, tuple[np.ndarray, float]] = {}
    half_thick, half_long = rng.uniform(0.12, 0.2) * size, rng.uniform(0.35, 0.5) * size
    if visible and rng.random() < 0.6:
        first = int(rng.choice(visible))
        direction = float(rng.uniform(0, 2 * np.pi))
        toward = np.array([math.cos(direction), math.sin(direction)])
        length = int(rng.integers(3, 6))
        target = rng.uniform(-0.3, 0.4)  # near edge at this many radii from the polyp centre
        for k, i in enumerate(range(first, min(n, first + length))):
            reach = math.sin(math.pi * (k + 0.5) / length)
            edge = r_max * zoom[i] * (1.1 - reach * (1.1 - target))
            at[i] = (toward * (edge + half_thick), direction)
    colour = np.array([176.0, 86.0, 80.0]) + rng.normal(0, 8, 3)
    return _Fold(at, half_thick, half_long, colour)


def _render_frame(rng: np.random.Generator, scene: _Scene, i: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Frame `i`: the camera's view, the fold over it (not over a blind frame's polyp: its mask stays
    whole), an instrument, vignette, haze, glare, sensor noise and blur, or a dropped or flash frame's
    level and noise alone; with its mask and its `events` record."""
    frame, mask = _view(scene, i)
    occluded = 0.0
    blank = scene.episode[i] if scene.episode[i] in BLANK_LEVEL else scene.blanks.get(i)
    if blank:
        frame = np.full((scene.size, scene.size, 3), BLANK_LEVEL[blank])
        frame = np.clip(frame + rng.normal(0, 2.0, frame.shape), 0, 255).astype(np.uint8)
        return frame, mask, _event(scene, i, occluded, mask)
    if scene.episode[i] not in BLIND:
        frame, mask, occluded = _fold_over(rng, scene, i, frame, mask)
    if i in scene.instruments:
        frame = _instrument_over(scene, scene.instruments[i], frame)
    frame = frame * scene.vignette[..., None]
    if scene.haze[i] > 0:
        frame = frame * (1 - scene.haze[i]) + np.array([205.0, 170.0, 150.0]) * scene.haze[i]
    frame = _glare(rng, scene, i, frame, mask)
    frame = frame + rng.normal(0, 2.0, frame.shape)
    img = Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8))
    if scene.blur[i] > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(scene.blur[i])))
    return np.asarray(img), mask, _event(scene, i, occluded, mask)


def _event(scene: _Scene, i: int, occluded: float, mask: np.ndarray) -> dict:
    """Frame `i`'s record in synth.json's `events`."""
    return {
        "episode": scene.episode[i],
        "blur_sigma": round(float(scene.blur[i]), 2),
        "haze": round(float(scene.haze[i]), 2),
        "occluded": round(occluded, 3),
        "visible": bool(mask.any()),
    }


def _view(scene: _Scene, i: int) -> tuple[np.ndarray, np.ndarray]:
    """The camera's view of the canvas and of the mask at frame `i` (a low_contrast frame fades the
    polyp into the tissue beneath it)."""
    size = scene.size
    # frame pixel p maps to canvas point c + R(p - centre - offset)/zoom
    cos, sin = math.cos(scene.roll[i]) / scene.zoom[i], math.sin(scene.roll[i]) / scene.zoom[i]
    cx = cy = scene.side / 2.0
    ox, oy = size / 2 + scene.offset[i, 0], size / 2 + scene.offset[i, 1]
    affine = (cos, -sin, cx - cos * ox + sin * oy, sin, cos, cy - sin * ox - cos * oy)

    def seen(image: Image.Image) -> Image.Image:
        return image.transform((size, size), Image.AFFINE, affine, resample=Image.BILINEAR)

    frame = np.asarray(seen(scene.canvas), np.float32)
    mask = np.asarray(seen(scene.mask)) >= 128
    if scene.episode[i] == "low_contrast":
        under = np.asarray(seen(scene.plain), np.float32)
        frame = frame * (1 - scene.hiding[i]) + under * scene.hiding[i]
    return frame, mask


def _fold_over(
    rng: np.random.Generator, scene: _Scene, i: int, frame: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """The fold over frame `i`, where it covers one: the frame, the mask of the polyp's visible part,
    and the share of the polyp it covers."""
    fold = scene.fold
    if i not in fold.at:
        return frame, mask, 0.0
    shift, direction = fold.at[i]
    size = scene.size
    alpha = _fold_alpha(
        scene.xx, scene.yy, size / 2 + scene.offset[i] + shift, direction, fold.half_thick, fold.half_long
    )
    texture = 1 + 0.1 * _noise(rng, (size, size), (6, 16))
    frame = frame * (1 - alpha[..., None]) + (fold.colour * texture[..., None]) * alpha[..., None]
    covered = mask & (alpha >= 0.5)
    occluded = float(covered.sum() / max(1, mask.sum()))
    return frame, mask & (alpha < 0.5), occluded


def _decoy_blanks(rng: np.random.Generator, scene: _Scene) -> dict[int, str]:
    """Hard split: about DECOY_BLANK of the frames outside episodes whose view holds no part of the
    polyp are dropped or flash frames."""
    n = len(scene.episode)
    draws, kinds = rng.random(n), rng.choice(list(BLANK_LEVEL), n)
    return {
        i: str(kinds[i])
        for i in range(n)
        if not scene.episode[i] and draws[i] < DECOY_BLANK and not _view(scene, i)[1].any()
    }


def _instruments(
    rng: np.random.Generator,
    size: int,
    episode: list[str],
    offset: np.ndarray,
    zoom: np.ndarray,
    r_max: float,
) -> dict[int, _Instrument]:
    """Hard split, per frame: on a covered frame an instrument whose shaft covers the polyp, its shaded
    rim and a margin (the polyp anywhere across the shaft near its tip, one placement per episode, moving
    with the polyp); on about DECOY_INSTRUMENT of the frames outside episodes one drawn the same way
    around a spot away from any polyp in view, so an instrument gives nothing away."""
    instruments: dict[int, _Instrument] = {}
    placement: tuple[float, ...] = ()
    for i, kind in enumerate(episode):
        reach = 1.5 * r_max * zoom[i] + 4  # the polyp, its rim and room for resampling and blur
        polyp = size / 2 + offset[i]
        if kind == "covered":
            if not placement or episode[i - 1] != "covered":
                placement = _placement(rng)
            instruments[i] = _instrument_around(polyp, reach, size, placement)
        elif not kind and rng.random() < DECOY_INSTRUMENT:
            for _ in range(10):  # a few draws to find room beside a polyp in view
                decoy = _instrument_around(rng.uniform(0.15, 0.85, 2) * size, reach, size, _placement(rng))
                if _shaft(decoy, polyp[0], polyp[1])[0] > decoy.half_width + reach:
                    instruments[i] = decoy
                    break
    return instruments


def _placement(rng: np.random.Generator) -> tuple[float, ...]:
    """An instrument's draw: its direction, its width in reaches, where the spot lies across the shaft
    (-1..1 of the room there) and along it from the tip (in half widths)."""
    return (
        float(rng.uniform(0, 2 * np.pi)),
        float(rng.uniform(1.15, 1.6)),
        float(rng.uniform(-1, 1)),
        float(rng.uniform(0, 1.5)),
    )


def _instrument_around(
    spot: np.ndarray, reach: float, size: int, placement: tuple[float, ...]
) -> _Instrument:
    """An instrument that covers every point within `reach` of `spot`: the spot lies over the shaft's
    axis (not beyond its tip) and at most half_width - reach from it."""
    direction, widen, across, along = placement
    half = widen * reach
    toward = np.array([math.cos(direction), math.sin(direction)])
    normal = np.array([-toward[1], toward[0]])
    tip = spot - toward * along * half + normal * across * (half - reach)
    return _Instrument(tip, direction, half, 3.0 * size)


def _shaft(instrument: _Instrument, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of points (x, y) from the instrument's axis (from its tip along `direction`), and their
    signed offset across the axis."""
    tx, ty = math.cos(instrument.direction), math.sin(instrument.direction)
    px, py = x - instrument.tip[0], y - instrument.tip[1]
    along = np.clip(px * tx + py * ty, 0, instrument.length)
    return np.hypot(px - along * tx, py - along * ty), py * tx - px * ty


def _instrument_over(scene: _Scene, instrument: _Instrument, frame: np.ndarray) -> np.ndarray:
    """The frame with the instrument over it: opaque (a one-pixel soft edge), shaded as a steel
    cylinder with a specular streak along it."""
    distance, across = _shaft(instrument, scene.xx, scene.yy)
    alpha = np.clip(instrument.half_width - distance + 0.5, 0, 1)[..., None]
    v = np.clip(across / instrument.half_width, -1, 1)
    shade = 0.55 + 0.35 * np.sqrt(1 - v**2) + 0.45 * np.exp(-(((v - 0.35) / 0.12) ** 2))
    steel = np.array(INSTRUMENT_COLOUR) * shade[..., None]
    return frame * (1 - alpha) + steel * alpha


def _glare(
    rng: np.random.Generator, scene: _Scene, i: int, frame: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """A specular frame's glare, light off a wet fold that washes out the polyp and the tissue around
    it; in the hard split, as often a decoy glare away from any polyp, so a glare gives nothing away."""
    size, offset, r_max, zoom = scene.size, scene.offset, scene.r_max, scene.zoom
    glare_at = None
    if scene.episode[i] == "specular":
        glare_at = size / 2 + offset[i] + rng.uniform(-0.6, 0.6, 2) * r_max * zoom[i]
    elif scene.hard and rng.random() < DECOY_GLARE:
        glare_at = rng.uniform(0.1, 0.9, 2) * size
        near = np.hypot(*(glare_at - size / 2 - offset[i])) < 3 * r_max * zoom[i]
        if near and mask.any() and scene.episode[i] not in BLIND:  # nothing of a blind frame's to wash out
            glare_at = None
    if glare_at is None:
        return frame
    reach = 2.2 * r_max * zoom[i]
    strength = scene.hiding.get(i, 0.93)
    glare = strength * np.exp(-((np.hypot(scene.xx - glare_at[0], scene.yy - glare_at[1]) / reach) ** 4))
    return frame * (1 - glare[..., None]) + 250.0 * glare[..., None]


# the order the hard split's sequences take the episode kinds in, a HIDING and a BLIND one in turn
EPISODE_TURNS = tuple(k for k in chain(*zip_longest(HIDING, BLIND)) if k)


def _hiding_episodes(
    rng: np.random.Generator, n: int, visible: list[int], index: int
) -> dict[int, tuple[str, float]]:
    """The hard split's episodes: about one per 10 frames, each 3 to 5 frames of one kind of
    EPISODE_TURNS (sequence `index` goes on from where sequence index - 1 stops, so a few sequences hold
    every kind), each after at least two clear frames with the polyp in view, so the last sight of it is
    close; per frame its kind and a strength in 0..1."""
    seen = set(visible)
    episodes: dict[int, tuple[str, float]] = {}
    count, wanted = 0, max(1, n // 10)
    for _ in range(40 * wanted):  # a few tries per episode; a short or mostly hidden video gets fewer
        if count == wanted:
            break
        length = int(rng.integers(3, 6))
        start = int(rng.integers(2, max(3, n - length + 1)))
        lead_in = range(start - 2, start + length)  # two frames in view before, the episode itself
        apart = start + length not in episodes  # never straight into another episode either
        if start + length <= n and apart and all(i in seen and i not in episodes for i in lead_in):
            kind = EPISODE_TURNS[(index * wanted + count) % len(EPISODE_TURNS)]
            for i in range(start, start + length):
                episodes[i] = (kind, float(rng.random()))
            count += 1
    return episodes


def frame_kind(event: dict) -> str:
    """The label of a frame (one of FRAME_KINDS) from its `events` record in synth.json."""
    if not event["visible"]:
        return "absent"
    if event["episode"] in HIDING or event["episode"] in BLIND:
        return event["episode"]
    return "occluded" if event["occluded"] > 0.05 else "clear"


def sequence_names(spec: SynthSpec) -> dict[str, list[str]]:
    """Names per split written (test only when it has sequences); unique across splits (seq1..seqN
    train, then valid, then test)."""
    counts = {"train": spec.train_sequences, "valid": spec.valid_sequences, "test": spec.test_sequences}
    names: dict[str, list[str]] = {}
    first = 1
    for split, count in counts.items():
        if count:
            names[split] = [f"seq{first + i}" for i in range(count)]
        first += count
    return names


def write_sequence(split_dir: Path, seq: SynthSequence) -> None:
    image_dir = split_dir / "images" / seq.name
    mask_dir = split_dir / "masks" / seq.name
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for i, (frame, mask) in enumerate(zip(seq.frames, seq.masks, strict=True)):
        # frame1..frameN, unpadded as polyp_gen names them, so natural order matters
        Image.fromarray(frame).save(image_dir / f"frame{i + 1}.jpg", quality=90)
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            mask_dir / f"frame{i + 1}.jpg", quality=100, subsampling=0
        )


def _make_sequence(folder: Path, split: str, index: int, name: str, spec: SynthSpec) -> tuple[int, int, list]:
    """Generate and write one sequence: (frames, polyp-free frames, events)."""
    seq = generate_sequence(name, split, index, spec)
    write_sequence(folder / split, seq)
    return len(seq.frames), sum(not m.any() for m in seq.masks), seq.events


def episode_window_starts(events: list[dict], frames: int) -> list[int]:
    """Where a sequence's `frames`-frame windows of WINDOWS_SPLIT start: WINDOW_LEAD frames before the
    first frame of each hidden episode, where the window fits in the sequence."""
    starts = []
    for i, event in enumerate(events):
        begins = event["episode"] and (i == 0 or events[i - 1]["episode"] != event["episode"])
        if begins and 0 <= i - WINDOW_LEAD <= len(events) - frames:
            starts.append(i - WINDOW_LEAD)
    return starts


def _write_windows(root: Path, events: dict[str, list[dict]], train: list[str], frames: int) -> list[str]:
    """Copy the train sequences' episode windows into ROOT/WINDOWS_SPLIT (``<sequence>w<first frame>``,
    frames numbered from 1 again), each labelled in `events` by its frames' records; their names."""
    from autosam2.config import ConfigError

    names = []
    for seq in train:
        for start in episode_window_starts(events[seq], frames):
            name = f"{seq}w{start + 1}"
            for part in ("images", "masks"):
                folder = root / WINDOWS_SPLIT / part / name
                folder.mkdir(parents=True)
                for j in range(frames):
                    source = root / "train" / part / seq / f"frame{start + j + 1}.jpg"
                    shutil.copyfile(source, folder / f"frame{j + 1}.jpg")
            events[name] = events[seq][start : start + frames]
            names.append(name)
    if not names:
        raise ConfigError(
            f"--episode-windows {frames}: no window of {frames} frames fits around an episode of the "
            "train sequences (more --sequences or --frames, or fewer frames a window)"
        )
    return names


def write_dataset(
    out: str | Path, spec: SynthSpec, overwrite: bool = False, progress: bool = False, workers: int = 1
) -> dict:
    """Write a synthetic polyp_gen root at `out` atomically (temp folder, then rename); return a summary.
    ``workers`` processes generate sequences side by side; each sequence depends on the spec alone, so
    the dataset is the same for any number."""
    with output_directory(out, SYNTH_DATASET, overwrite) as tmp:
        names = sequence_names(spec)
        jobs = [(split, i, name) for split in names for i, name in enumerate(names[split])]
        summary = {"spec": asdict(spec), "splits": names, "frames": 0, "empty_frames": 0, "events": {}}
        with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
            run = pool.map if pool is not None else map
            results = run(
                _make_sequence, *zip(*[(tmp, split, i, name, spec) for split, i, name in jobs], strict=True)
            )
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(jobs), desc="synth", unit="seq")
            for (_, _, name), (frames, empty, events) in zip(jobs, results, strict=True):
                summary["frames"] += frames
                summary["empty_frames"] += empty
                summary["events"][name] = events
        if spec.episode_windows:
            names[WINDOWS_SPLIT] = _write_windows(
                tmp, summary["events"], names["train"], spec.episode_windows
            )
        for split in names:
            list_file(tmp, split).write_text("".join(f"{n}\n" for n in names[split]))
        (tmp / "synth.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary
