"""The device check's wheelhouse: every package the project needs that the device image lacks, torch
excepted, as wheels for the device's Python, in `.gpu-check/wheels-cpXY/` (sam2 without its CUDA extension
and DeepSpeed without ops, built from source; the MLflow client and its SQLite store, not the server);
installing it; and a stand-in for the device image for the dry run.

Versions are those installed here, which must be the pins of `constraints.txt`. Only the standard
library is imported at module level (`packaging` inside the functions that need it).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".gpu-check"
PINS = REPO / "constraints.txt"
DEVICE_PYTHON = "3.12"
WHEELHOUSE_LIMIT_MIB = 40


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _image_packages() -> frozenset[str]:
    text = (Path(__file__).with_name("device_image_packages.txt")).read_text()
    return frozenset(_canonical(line) for line in text.splitlines() if line and not line.startswith("#"))


# the device image's Python packages: used as they are there, never carried
IMAGE_PACKAGES = _image_packages()
# what the GPU check's parts need there: the base install's packages that they import, DeepSpeed, and
# MLflow as its client and SQLite store (the `server` extra, most of `mlflow`'s size, runs where users
# look at runs, not on the device)
ROOTS = (
    "sam2",
    "deepspeed",
    "webdataset",
    "submitit",
    "omegaconf",
    "hydra-core",
    "iopath",
    "scipy",
    "pillow",
    "tqdm",
    "nvidia-ml-py",
    "numpy",
    "mlflow-skinny",
    "mlflow-tracing",
    "sqlalchemy",
    "alembic",
)
# published as source only, or built with flags: made into wheels here from the pinned source
BUILT_HERE = {
    "sam2": {"SAM2_BUILD_CUDA": "0"},
    "deepspeed": {"DS_BUILD_OPS": "0"},
    "iopath": {},
    "antlr4-python3-runtime": {},
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def pins() -> dict[str, str]:
    """{name: version} of the exact pins (`==`) in constraints.txt."""
    from packaging.requirements import Requirement

    found = {}
    for line in PINS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            exact = [s.version for s in req.specifier if s.operator == "=="]
            if exact:
                found[_canonical(req.name)] = exact[0]
    return found


def needed_distributions() -> dict[str, str]:
    """{name: version installed here} of what ROOTS pull in (markers evaluated here), less the image's;
    refused where an installed version is not constraints.txt's pin."""

    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    stack = list(ROOTS)
    while stack:
        name = _canonical(stack.pop())
        if name in found or name in IMAGE_PACKAGES:
            continue
        dist = md.distribution(name)
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    pinned = pins()
    wrong = [f"{n} {v} (pinned {pinned[n]})" for n, v in found.items() if pinned.get(n, v) != v]
    if wrong:
        raise SystemExit(
            f"gpu-check: installed here, not as {PINS.name} pins: {', '.join(wrong)}; run make venv"
        )
    return dict(sorted(found.items()))


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"gpu-check: {' '.join(cmd)} failed:\n{done.stderr.strip()[-3000:]}")


def _tag(python_version: str) -> str:
    return "cp" + python_version.replace(".", "")


def _fetch(name: str, version: str, out: Path, python_version: str) -> None:
    """One wheel into `out`: built here (BUILT_HERE), or downloaded for the device's Python."""
    if name in BUILT_HERE:
        flags = ["--no-deps", "--no-build-isolation", "-w", str(out), f"{name}=={version}"]
        _pip("wheel", *flags, env=BUILT_HERE[name])
        return
    platform = [flag for p in PLATFORMS for flag in ("--platform", p)]
    _pip(
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *platform,
        "-d",
        str(out),
        f"{name}=={version}",
    )


def project_wheel(out: Path) -> Path:
    """The project's wheel, built from the working tree as it is, in place of any earlier one; its path."""
    for stale in out.glob("autosam2-*.whl"):
        stale.unlink()
    with tempfile.TemporaryDirectory(prefix="autosam2-wheel-") as build:
        shutil.copytree(
            REPO,
            build,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(
                ".venv", ".git", ".gpu-check", "demo", "output", "results", "*.egg-info", "build"
            ),
        )
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), build)
    (wheel,) = out.glob("autosam2-*.whl")
    return wheel


def _listing(out: Path, needed: dict[str, str], python_version: str) -> dict:
    """One version of each wheel (an older one is removed), listed in `wheels.json`."""
    for wheel in out.glob("*.whl"):
        if _canonical(wheel.name.split("-")[0]) not in needed and not wheel.name.startswith("autosam2-"):
            wheel.unlink()
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    listing = {
        "python": python_version,
        "bytes": size,
        "MiB": round(size / 2**20, 1),
        "wheels": [w.name for w in wheels],
    }
    (out / "wheels.json").write_text(json.dumps(listing, indent=1))
    return listing


def build_wheels(python_version: str = DEVICE_PYTHON) -> Path:
    """The wheelhouse for `python_version` (kept between runs: a wheel already there is not fetched
    again), its listing in `wheels.json`; refused over the size that can travel."""
    out = WHEELS / f"wheels-{_tag(python_version)}"
    out.mkdir(parents=True, exist_ok=True)
    needed = needed_distributions()
    have = {_canonical(p.name.split("-")[0]): p for p in out.glob("*.whl")}
    for name, version in needed.items():
        if not (name in have and f"-{version}-" in have[name].name):
            _fetch(name, version, out, python_version)
    project_wheel(out)
    listing = _listing(out, needed, python_version)
    if listing["bytes"] > WHEELHOUSE_LIMIT_MIB * 2**20:
        raise SystemExit(f"gpu-check: {out} is {listing['MiB']} MiB, over {WHEELHOUSE_LIMIT_MIB} MiB")
    return out


def install(
    wheels: Path, target: Path, python: str = sys.executable, files: list[Path] | None = None
) -> None:
    """The wheelhouse (or those of its `files`) into `target` against `python`'s own torch: no index, no
    dependency resolution."""
    cmd = [
        python,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(target),
        *map(str, wheels.glob("*.whl") if files is None else files),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gpu-check: installing {wheels} failed:\n{done.stderr.strip()[-3000:]}")


def image_stand_in(base: Path, site: Path) -> Path:
    """A venv whose Python sees only the standard library, the image's packages (linked from this
    venv, where installed here) and `site`: the device image, as far as imports can tell."""
    import sysconfig

    image = base / "image"
    image.mkdir(parents=True, exist_ok=True)
    for dist in md.distributions():
        if _canonical(dist.metadata["Name"]) not in IMAGE_PACKAGES:
            continue
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if top not in ("bin", "__pycache__") and source.exists() and not (image / top).exists():
                (image / top).symlink_to(source)
    venv = base / "venv"
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
        check=True,
    )
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "autosam2_device_image.pth").write_text(f"{site}\n{image}\n")
    return venv / "bin" / "python"


def _stand_in_key(carried: list[Path]) -> str:
    """What a stand-in holds: this Python, the image's packages linked from here, the `carried` wheels."""
    image = sorted(
        f"{dist.metadata['Name']}=={dist.version}@{dist.locate_file('')}"
        for dist in md.distributions()
        if _canonical(dist.metadata["Name"]) in IMAGE_PACKAGES
    )
    wheels = [f"{w.name}:{hashlib.sha256(w.read_bytes()).hexdigest()}" for w in sorted(carried)]
    text = json.dumps([sys.version, sys.executable, image, wheels])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_stand_in(wheels: Path) -> Path:
    """`image_stand_in` with the wheelhouse's wheels but the project's installed in its `site`, made once
    for what it holds in `.gpu-check/device-cpXY-KEY/` and reused after: its paths stay put, and with them
    DeepSpeed's JIT-built CPU ops, which are rebuilt wherever their source or include paths change (their
    build directory: its `torch-extensions`). Its root; its python is `venv/bin/python` there."""
    carried = [w for w in wheels.glob("*.whl") if not w.name.startswith("autosam2-")]
    tag = _tag(f"{sys.version_info.major}.{sys.version_info.minor}")
    root = WHEELS / f"device-{tag}-{_stand_in_key(carried)}"
    with open(WHEELS / f"device-{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one dry run makes it while another waits
        if not (root / "made").exists():
            for stale in WHEELS.glob(f"device-{tag}-*"):
                shutil.rmtree(stale)
            image_stand_in(root, root / "site")
            install(wheels, root / "site", files=carried)
            (root / "made").touch()
    return root
