"""Every command of every program of the project, in one table: the dispatchers, their --help, the
import-layer test and the vocabulary test read it. Imports nothing, so `autosam2 --help` stays light."""

from __future__ import annotations

from dataclasses import dataclass

AUTOSAM2 = "autosam2"
BENCH = "autosam2 bench"
SHARDS = "python -m shards"
LAUNCH = "python -m launch"
GPU_CHECK = "python -m launch.gpu_check"
HOSTS_BENCH = "python launch/hosts_bench.py"
DIST = "python -m autosam2.engine.dist"


@dataclass(frozen=True)
class Command:
    """`program name ARGS` runs `target` (``module:function``); `name` is empty for the program itself.
    A program's own entry names its `main(argv)`; its commands name what its dispatcher calls: a
    `main(argv)` (autosam2), a `run(args)` beside `add_arguments(parser)` (bench), a function of the
    parsed arguments (shards), the job a launcher submits (launch)."""

    program: str
    name: str
    target: str
    help: str

    @property
    def module(self) -> str:
        return self.target.split(":")[0]


REGISTRY: tuple[Command, ...] = (
    Command(
        AUTOSAM2,
        "",
        "autosam2.cli:main",
        "SAM2 with a learned prompt encoder for colon-polyp video segmentation",
    ),
    Command(
        AUTOSAM2, "train", "autosam2.train:main", "train AutoSAM2 (alone, under torchrun, or under srun)"
    ),
    Command(
        AUTOSAM2,
        "evaluate",
        "autosam2.evaluate:main",
        "streaming inference + metrics, masks and overlays of a split",
    ),
    Command(
        AUTOSAM2,
        "predict",
        "autosam2.predict:main",
        "masks and overlay videos for unlabeled video files or frame folders",
    ),
    Command(
        AUTOSAM2,
        "score",
        "autosam2.score:main",
        "score saved masks of any method (the SUN-SEG toolbox's figures)",
    ),
    Command(
        AUTOSAM2,
        "benchmark",
        "autosam2.benchmark:main",
        "every SUN-SEG test split by the toolbox's protocol, beside the published methods",
    ),
    Command(
        AUTOSAM2,
        "sync",
        "autosam2.sync:main",
        "send what a run's tracking outbox still holds (its MLflow server was down) to its run",
    ),
    Command(AUTOSAM2, "demo", "autosam2.demo:main", "the whole mission on the embedded defaults, on the CPU"),
    Command(
        AUTOSAM2,
        "synth",
        "autosam2.data_commands:synth",
        "write a synthetic polyp_gen dataset (train, valid and test)",
    ),
    Command(
        AUTOSAM2,
        "validate",
        "autosam2.data_commands:validate",
        "check a dataset folder in any layout; list every problem, one per line",
    ),
    Command(
        AUTOSAM2,
        "inspect",
        "autosam2.data_commands:inspect",
        "name a dataset folder's layout and splits, summarise its sequences or a shard set's",
    ),
    Command(AUTOSAM2, "bench", "autosam2.bench:main", "benchmarks, one JSON object of figures each"),
    Command(
        BENCH,
        "data",
        "autosam2.bench.data:run",
        "shard stream vs folder reader vs bare JPEG decoding, frames/s",
    ),
    Command(
        BENCH,
        "train",
        "autosam2.bench.train:run",
        "full trainer step time vs the bare train step of the same model and clip",
    ),
    Command(
        BENCH,
        "infer",
        "autosam2.bench.infer:run",
        "streaming inference FPS vs bare image-encoder FPS, and the evaluate pipeline vs streaming",
    ),
    Command(
        BENCH,
        "features",
        "autosam2.bench.features:run",
        "feature cache bytes per frame and hit rates: fp32 / bf16 storage, memory alone / with the disk tier",
    ),
    Command(
        BENCH,
        "memory",
        "autosam2.bench.memory:run",
        "tensor memory of a run config's training step, by kind, and a per-GPU estimate",
    ),
    Command(
        BENCH,
        "comm",
        "autosam2.bench.comm:run",
        "gradient bytes per step and the weights reached, fp32 vs bf16 gradient communication",
    ),
    Command(
        BENCH,
        "longvideo",
        "autosam2.bench.longvideo:run",
        "peak host RSS of evaluate and predict over sequences of 100 / 1,000 / 5,000 frames",
    ),
    Command(
        BENCH,
        "checkpoint",
        "autosam2.bench.checkpoint:run",
        "loop stall per checkpoint, synchronous vs asynchronous, at two trainable-set sizes",
    ),
    Command(
        BENCH,
        "tracking",
        "autosam2.bench.tracking:run",
        "longest logging stall while the MLflow server is up, hung and dead; flush time after",
    ),
    Command(
        BENCH,
        "decode",
        "autosam2.bench.decode:run",
        "JPEG decoding frames/s: PIL, the project's decoder on the CPU and on the device",
    ),
    Command(
        BENCH,
        "layouts",
        "autosam2.bench.layouts:run",
        "validate / inspect time and peak memory over each layout, shard build frames/s vs polyp_gen",
    ),
    Command(
        BENCH,
        "memory-learning",
        "autosam2.bench.memory_learning:run",
        "video (memory) vs per-frame mode of the same weights per kind of frame, with bootstrap intervals",
    ),
    Command(SHARDS, "", "shards.__main__:main", "offline sharding of dataset folders"),
    Command(
        SHARDS,
        "build",
        "shards.__main__:build",
        "pack one split of a dataset folder (any layout) into tar shards + manifest.json",
    ),
    Command(
        SHARDS, "merge", "shards.__main__:merge", "join the parts written by a job array into manifest.json"
    ),
    Command(
        SHARDS,
        "verify",
        "shards.__main__:verify",
        "check a shard set against its manifest; list every problem",
    ),
    Command(
        LAUNCH, "", "launch.__main__:main", "submit a command to SLURM (or run it here) through submitit"
    ),
    Command(
        LAUNCH,
        "train",
        "launch.__main__:TrainJob",
        "`autosam2 train` on every task, requeued on time limit or preemption",
    ),
    Command(
        LAUNCH,
        "evaluate",
        "launch.__main__:EvaluateJob",
        "`autosam2 evaluate`, the ranks splitting the sequences",
    ),
    Command(
        LAUNCH,
        "predict",
        "launch.__main__:PredictJob",
        "`autosam2 predict` on every task, as under srun",
    ),
    Command(
        LAUNCH,
        "benchmark",
        "launch.__main__:BenchmarkJob",
        "`autosam2 benchmark`, the ranks splitting each split's cases",
    ),
    Command(
        LAUNCH,
        "shard",
        "launch.__main__:shard_part",
        "`python -m shards build` as a job array, then its merge",
    ),
    Command(
        GPU_CHECK, "", "launch.gpu_check:main", "the GPU check: wheelhouse, the check on a GPU, decode speed"
    ),
    Command(HOSTS_BENCH, "", "launch.hosts_bench:main", "one host vs two hosts on the local SLURM cluster"),
    Command(
        DIST,
        "",
        "autosam2.engine.dist.__main__:main",
        "a SLURM job's rendezvous port and the requeue cap, for train.sbatch",
    ),
)


def program(name: str) -> Command:
    """The entry of program `name` itself."""
    return next(c for c in REGISTRY if c.program == name and not c.name)


def commands_of(name: str) -> dict[str, Command]:
    """The commands of program `name`, by name, in the order they are listed."""
    return {c.name: c for c in REGISTRY if c.program == name and c.name}
