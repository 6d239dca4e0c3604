"""`autosam2 benchmark sunseg`: a trained model over every SUN-SEG test split by the toolbox's protocol,
its figures set beside the published methods'.

Each split is evaluated as `autosam2 evaluate --layout sunseg --metric-mode sunseg --split S` does (the
same function, in this process: the model is loaded once and the ranks of torchrun / srun share every
split's cases), into ``OUT/<split with / as _>/`` (masks, soft maps, overlays, metrics.json,
metrics.csv); ``OUT/benchmark.json`` / ``benchmark.csv`` and the printed table hold every split beside the
published figures (`autosam2.eval.benchmark`). The output folder appears only when every split is done.
Rank 0 logs one MLflow run per split, tagged with the split and linked to the run that trained the
weights.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

from autosam2.arguments import add_no_overlays, add_tracking
from autosam2.eval.benchmark import BENCHMARKS, add_splits
from autosam2.evaluate import add_model_arguments

EPILOG = """\
Writes OUTPUT_DIR/<split>/ for each split (TestEasyDataset_Seen, ...: what `autosam2 evaluate` writes,
the toolbox's 17 figures in metrics.json and metrics.csv), and OUTPUT_DIR/benchmark.json, benchmark.csv
and a table: a row per split and method, this model's and the published methods' figures (read from the
toolbox's own result files, with their repository, commit and path in benchmark.json). Published
figures on a split of another release (the whole TestEasyDataset of March 2022) keep their own rows.

MLflow: one run per split, benchmark-<split>-step<N>, in the store and experiment of the run that trained
the weights (read from the weights file's run folder; --tracking-uri, --experiment and MLflow's variables
override), tagged split and trained_by (that run's id) and nested under it in the MLflow UI.

`autosam2 score --layout sunseg --pred Pred/<method> --gt ROOT` gives the same rows for any method's
saved predictions in the toolbox's layout.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosam2 benchmark",
        description="a trained model over a benchmark's test splits, beside the published methods",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("benchmark", choices=list(BENCHMARKS), help="the benchmark (its protocol and splits)")
    add_model_arguments(parser, "benchmark")
    parser.add_argument("--data", required=True, help="the dataset root (SUN-SEG: holds TestEasyDataset/...)")
    add_splits(parser)
    parser.add_argument(
        "--method", default=None, help="this model's name in the table (default: <run folder>/<weights stem>)"
    )
    add_no_overlays(parser)
    add_tracking(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from autosam2.evaluate import on_ranks

    return on_ranks(build_parser().parse_args(argv), _benchmark)


def _benchmark(args: argparse.Namespace, info) -> int:
    """Every rank evaluates its share of each split's cases into the one output folder; rank 0 gathers
    each split's figures, writes the table, renames the folder into place and logs the runs."""
    from autosam2.engine.dist import announce_ranks, broadcast_object
    from autosam2.eval.benchmark import SplitResult, split_folder, write_benchmark
    from autosam2.evaluate import evaluate_into, set_up
    from autosam2.outputs import BENCHMARK, claim, output_directory

    splits = _splits(args)
    inputs = [args.data, args.weights, args.checkpoint]
    out = claim(args.output_dir, BENCHMARK, args.overwrite, inputs)  # every rank says it, not rank 0 alone
    announce_ranks(info)
    first = _split_args(args, splits[0])
    decode, _, model = set_up(first, info.device)
    args.step = first.step  # the weights' training step, in the runs' names
    results, rows = [], []
    with output_directory(out, BENCHMARK, args.overwrite, inputs) if info.is_main else nullcontext() as tmp:
        tmp = Path(broadcast_object(str(tmp) if info.is_main else None))
        for split in splits:
            folder = tmp / split_folder(split)
            folder.mkdir(exist_ok=True)  # every rank: another may be writing its masks there already
            found = evaluate_into(_split_args(args, split), info, model, decode, None, folder)
            results.append(SplitResult(split, *found))
        if info.is_main:
            rows = write_benchmark(
                tmp, args.benchmark, _method(args), results, _described(args, info.world_size)
            )
    if info.is_main:
        _report(args, out, rows, results, info.world_size)
    return 0


def _splits(args: argparse.Namespace) -> list[str]:
    """The splits to run (--splits, default every test split), each present in --data and its files in
    place (a broken last split is found before the first is run); else one DatasetError naming the root
    and every split it lacks, or the first problem."""
    from autosam2.data.folder import FolderDataset
    from autosam2.data.layouts import sunseg
    from autosam2.errors import DatasetError

    root = Path(args.data)
    if not root.is_dir():
        raise DatasetError(
            f"{root}: {'is a file' if root.exists() else 'does not exist'}, not a SUN-SEG root"
        )
    wanted = args.splits or list(sunseg.TESTS)
    present = sunseg.splits(root)
    missing = [s for s in wanted if s not in present]
    if missing:
        raise DatasetError(
            f"{root}: no {', '.join(missing)} (a SUN-SEG root holds <split>/Frame/<case>/ and "
            f"<split>/GT/<case>/; found: {', '.join(present) or 'none'})"
        )
    for split in wanted:
        FolderDataset(root, split, layout="sunseg")  # reads file names only; raises on the first problem
    return wanted


def _split_args(args: argparse.Namespace, split: str) -> argparse.Namespace:
    """What `autosam2 evaluate` would be given for one split: the toolbox's figures on a SUN-SEG split."""
    return argparse.Namespace(
        **vars(args), split=split, layout="sunseg", metric_mode="sunseg", decode_device="auto", episodes=None
    )


def _method(args: argparse.Namespace) -> str:
    weights = Path(args.weights).resolve()
    return args.method or f"{weights.parent.name}/{weights.stem}"


def _described(args: argparse.Namespace, ranks: int) -> dict[str, str | int]:
    """What was benchmarked, as benchmark.json and the MLflow runs record it."""
    return {
        "weights": str(args.weights),
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "mode": args.mode,
        "metric_mode": "sunseg",
        "ranks": ranks,
    }


def _report(args: argparse.Namespace, out: Path, rows, results, ranks: int) -> None:
    """Rank 0's account: the table, a run per split, and the lines naming what was written."""
    from autosam2.eval.benchmark import log_splits, print_benchmark, split_folder
    from autosam2.eval.report import say_left_out, scored_line
    from autosam2.tracking import scoring_run_name, scoring_store

    for result in results:
        say_left_out({f"{result.split}/{n}": why for n, why in result.extra["left_out"].items()})
    print_benchmark(rows, args.benchmark)
    params = {**_described(args, ranks), "method": _method(args)}
    store, link = scoring_store(args.tracking_uri, args.experiment, out, args.weights)
    name = lambda split: scoring_run_name("benchmark", split, args.step, args.weights)  # noqa: E731
    log_splits(out, store, name, results, params, link)
    for result in results:
        line = scored_line(result.extra["frames"], result.extra["left_out"], f"over {ranks} rank(s)")
        print(f"wrote {out / split_folder(result.split)}: masks/, soft/, metrics.json, metrics.csv ({line})")
    print(f"wrote {out}: benchmark.json, benchmark.csv ({len(rows)} rows)")
