"""Every parser of every registered command speaks one vocabulary: the new spellings first, each older
spelling an alias of the same argument, and the flags of one name keep one meaning."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import torch

from autosam2.commands import AUTOSAM2, REGISTRY, commands_of

# older spelling -> the spelling that replaces it (the same argument: one destination)
ALIASES = {
    "--out": "--output-dir",
    "--folder": "--output-dir",
    "--device": "--gpu",
    "--no-video": "--no-overlay-video",
}
OLD = set(ALIASES) | {"--batch-size"}  # --batch-size: an alias only where it means frames per encoder call


class _Parsed(BaseException):
    """Raised by a parser asked to parse: carries it out of the command that built it."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def parser_of(target: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser that `target` (``module:function``) builds: the function is called and stopped at its
    first parse."""
    module, function = target.split(":")

    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
        with pytest.raises(_Parsed) as parsed:
            getattr(importlib.import_module(module), function)([])
    return parsed.value.parser


def every_parser(parser: argparse.ArgumentParser, name: str):
    """(name, parser) of `parser` and of each subcommand under it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from every_parser(child, f"{name} {sub}")


def programs() -> list[tuple[str, str]]:
    """(name, target) of every parser to walk: each program's, and each `autosam2` command's own (the
    dispatcher's subparsers are placeholders)."""
    found = [(c.program, c.target) for c in REGISTRY if not c.name]
    return found + [(f"{AUTOSAM2} {n}", c.target) for n, c in commands_of(AUTOSAM2).items()]


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        walked = {}
        for name, target in programs():
            for sub, parser in every_parser(parser_of(target, monkeypatch), name):
                walked[sub] = parser
    return walked


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_registered_program_and_command_has_a_parser(parsers):
    expected = {
        f"{c.program} {c.name}".strip() for c in REGISTRY if c.program != "python -m launch" or not c.name
    }
    assert expected <= set(parsers)


def test_no_older_spelling_is_a_primary_one(parsers):
    """An older spelling is never the first of its argument's spellings; `--device` takes a device
    string, so it is an argument of its own beside `--gpu`, setting the same destination."""
    offenders = []
    for name, parser in parsers.items():
        gpu = {a.dest for a in options(parser) if "--gpu" in a.option_strings}
        for action in options(parser):
            first = action.option_strings[0]
            if first == "--device" and action.dest in gpu:
                continue
            if first in OLD and not (first == "--batch-size" and "clips" in (action.help or "")):
                offenders.append(f"{name}: {first}")
    assert offenders == []


def test_every_older_spelling_is_an_alias_of_the_new_one(parsers):
    for name, parser in parsers.items():
        by_flag = {flag: action for action in options(parser) for flag in action.option_strings}
        for old, new in ALIASES.items():
            if old in by_flag:
                assert new in by_flag, f"{name}: {old} without {new}"
                assert by_flag[old].dest == by_flag[new].dest, f"{name}: {old} and {new} set different things"
        batch = by_flag.get("--batch-size")
        if batch is not None and "clips" not in (batch.help or ""):  # frames per encoder call
            assert by_flag.get("--encode-batch") is batch, f"{name}: --batch-size of frames is --encode-batch"


@pytest.mark.parametrize(
    ("flag", "dest", "meaning"),
    [
        ("--output-dir", "output_dir", ""),
        ("--gpu", "device", "GPU N"),
        ("--cpu", "device", "CPU"),
        ("--workers", "workers", "worker processes"),
        ("--encode-batch", "encode_batch", "frames per image-encoder call"),
        ("--batch-size", None, "clips"),
        ("--no-overlays", "no_overlays", "no overlays"),
    ],
)
def test_a_flag_keeps_one_destination_and_meaning(parsers, flag, dest, meaning):
    seen = []
    for name, parser in parsers.items():
        for action in options(parser):
            if action.option_strings[0] == flag:
                seen.append(name)
                assert dest is None or action.dest == dest, name
                assert meaning in (action.help or ""), f"{name} {flag}: {action.help}"
    assert seen, f"{flag} is in no parser"


def test_workers_and_encode_batch_have_one_default(parsers):
    from autosam2.arguments import ENCODE_BATCH, default_workers

    defaults = {"--workers": default_workers(), "--encode-batch": ENCODE_BATCH}
    for name, parser in parsers.items():
        for action in options(parser):
            if action.option_strings[0] in defaults:
                assert action.default == defaults[action.option_strings[0]], name


def test_gpu_and_cpu_are_one_choice(parsers):
    """Wherever a device is chosen: `--gpu N` and `--cpu` (and `--device`) set one device request, and
    only one of them may be given."""
    for name, parser in parsers.items():
        by_flag = {f: a for a in options(parser) for f in a.option_strings}
        if not {"--gpu", "--cpu", "--device"} & set(by_flag):
            continue
        gpu, cpu = by_flag.get("--gpu"), by_flag.get("--cpu")
        assert gpu is not None and cpu is not None, name
        assert gpu.dest == cpu.dest == "device" and gpu.type("1") == "cuda:1" and cpu.const == "cpu", name
        group = next(g for g in parser._mutually_exclusive_groups if gpu in g._group_actions)
        assert cpu in group._group_actions and by_flag.get("--device", cpu) in group._group_actions, name


# the older spellings, parsed by the commands' own parsers
def _parse(target: str, argv: list[str]) -> argparse.Namespace:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)().parse_args(argv)


@pytest.mark.parametrize(
    ("target", "old", "new", "dest"),
    [
        (
            "shards.__main__:build_parser",
            ["build", "r", "--split", "train", "--out", "o"],
            ["build", "r", "--split", "train", "--output-dir", "o"],
            "output_dir",
        ),
        (
            "launch.__main__:build_parser",
            ["train", "--folder", "j"],
            ["train", "--output-dir", "j"],
            "output_dir",
        ),
        (
            "autosam2.evaluate:build_parser",
            ["--weights", "w", "--batch-size", "3"],
            ["--weights", "w", "--encode-batch", "3"],
            "encode_batch",
        ),
        (
            "autosam2.predict:build_parser",
            ["v", "--weights", "w", "--batch-size", "3"],
            ["v", "--weights", "w", "--encode-batch", "3"],
            "encode_batch",
        ),
        (
            "autosam2.predict:build_parser",
            ["v", "--weights", "w", "--no-video"],
            ["v", "--weights", "w", "--no-overlay-video"],
            "no_overlay_video",
        ),
    ],
)
def test_an_older_spelling_parses_as_the_new_one(target, old, new, dest):
    old_args, new_args = _parse(target, old), _parse(target, new)
    assert vars(old_args) == vars(new_args) and getattr(new_args, dest) not in (None, False)


@pytest.mark.parametrize("build", ["shards.__main__:build_parser", "autosam2.sync:build_parser"])
def test_a_folder_given_as_positional_or_option_is_taken_once(build, capsys):
    from autosam2.arguments import given_folder

    module, name = build.split(":")
    parser = getattr(importlib.import_module(module), name)()
    first = ["merge"] if module.startswith("shards") else []
    assert given_folder(parser, parser.parse_args([*first, "s"])) == Path("s")
    assert given_folder(parser, parser.parse_args([*first, "--output-dir", "s"])) == Path("s")
    for twice_or_never in ([], ["s", "--output-dir", "t"]):
        with pytest.raises(SystemExit) as refused:
            given_folder(parser, parser.parse_args([*first, *twice_or_never]))
        assert refused.value.code == 2 and "give the folder once" in capsys.readouterr().err


def test_autosam2_version_is_the_installed_packages(capsys):
    from importlib.metadata import version

    from autosam2.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"autosam2 {version('autosam2')}"


@pytest.mark.parametrize("device", ["bogus", "cuda:abc", "gpu"])
def test_a_device_that_is_not_one_is_a_usage_error(device, capsys):
    from autosam2.bench import main

    with pytest.raises(SystemExit) as refused:
        main(["decode", "--device", device])
    assert refused.value.code == 2 and "is not cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU where there is none")
@pytest.mark.parametrize("argv", [["bench", "decode", "--gpu", "0"], ["bench", "infer", "--device", "cuda"]])
def test_a_gpu_asked_for_where_there_is_none_is_one_line(argv, capsys):
    from autosam2.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("asked for, but no CUDA device is visible; use --cpu") and "\n" not in err


def test_sync_refuses_a_timeout_that_is_not_a_finite_positive_number(tmp_path, capsys):
    from autosam2.sync import main

    for timeout in ("nan", "inf", "-5"):
        with pytest.raises(SystemExit) as refused:
            main([str(tmp_path), "--timeout", timeout])
        assert refused.value.code == 2 and "--timeout" in capsys.readouterr().err


def test_sync_to_a_tracking_uri_mlflow_refuses_is_one_line(tmp_path, capsys):
    from autosam2.cli import main

    (tmp_path / "run" / "tracking").mkdir(parents=True)
    (tmp_path / "run" / "tracking" / "outbox.jsonl").write_text("")
    uri = str(tmp_path / "mlruns")  # a file store, which MLflow no longer takes
    assert main(["sync", str(tmp_path / "run"), "--tracking-uri", uri, "--timeout", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"autosam2 sync: --tracking-uri {uri}: ") and "\n" not in err


def test_no_parser_takes_an_abbreviated_flag(parsers):
    # `train --data ROOT` must not be read as `--dataset ROOT` (the layout), nor any prefix as a flag
    assert [name for name, parser in parsers.items() if parser.allow_abbrev] == []


def test_a_prefix_of_a_flag_is_refused_as_unknown(capsys):
    from autosam2.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "/data/SUN-SEG"])
    assert exit_.value.code == 2 and "unrecognized arguments: --data" in capsys.readouterr().err
