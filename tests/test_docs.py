"""The README and docs/ stay true: every command line names a real command, subcommand and flag of its
parser, every file named under an output directory is in the tree a tiny real run writes, every dotted
config key is in the config tree, every repository path and link resolves, and the README stays short."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 220

# the output folders the pages name files under, and what writes each in `run_trees`
OUTPUT_FOLDERS = ("OUTPUT_DIR", "EVAL_DIR", "PRED_DIR", "SCORE_DIR", "SHARDS_DIR")
# files the pages name that a finished tiny run does not hold, and when they exist
ONLY_SOMETIMES = {
    "OUTPUT_DIR/run.lock": "while a run holds the output directory",
    "OUTPUT_DIR/run.reserved": "while a training job the launcher submitted is pending or running",
    "OUTPUT_DIR/jobs/*": "when the launcher submitted the run",
    "OUTPUT_DIR/checkpoints/step_*.damaged-*": "when a resume set a damaged checkpoint aside",
}
SECTIONS = ("data", "model", "optim", "loss", "train", "tracking")
CONFIG_KEY = re.compile(rf"^(?:{'|'.join(SECTIONS)})\.[a-z_][a-z0-9_.+]*")
REPO_PATH = re.compile(r"(?<![\w./$-])(?:autosam2|launch|shards|configs|tests|docs)/[\w./<>*-]*")
FILE = re.compile(r"\.(py|md|yaml|json|sbatch|sh|pt)$")  # `train.py`: a file, not a config key
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # COMMAND, KIND, ROOT: any value


# the pages -------------------------------------------------------------------------------------------------


def code_of(page: Path, shell_only: bool = False) -> tuple[list[str], list[str]]:
    """(lines of the page's fenced code blocks, backslash continuations joined; its inline code spans).
    `shell_only`: only the blocks fenced as bash (the others are diagrams, layouts, log lines)."""
    text = page.read_text()
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    lines = [
        line
        for kind, block in blocks
        if kind == "bash" or not shell_only
        for line in block.replace("\\\n", " ").splitlines()
    ]
    prose = re.sub(r"^```\w*\n.*?^```", "", text, flags=re.S | re.M)
    return lines, re.findall(r"`([^`\n]+)`", prose)


def commands_in(line: str) -> Iterator[list[str]]:
    """The simple commands of a shell line: split at ; && || | ( ) < >, comments and env assignments gone."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError:  # an unclosed quote in prose: not a command line
        return
    words: list[str] = []
    for token in [*tokens, ";"]:
        if token and set(token) <= set(";&|()<>"):
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words.pop(0)
            if words:
                yield words
            words = []
        elif token != "$":
            words.append(token)


def page_commands() -> Iterator[tuple[str, list[str]]]:
    for page in PAGES:
        lines, spans = code_of(page, shell_only=True)
        for line in lines + spans:
            for words in commands_in(line):
                yield f"{page.name}: {line.strip()}", words


# the parsers -------------------------------------------------------------------------------------------------


class _Parsed(BaseException):  # not an Exception: passes every command's error path untouched
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def parser_of(call: Callable[[], object], skip_prog: str | None = None) -> argparse.ArgumentParser:
    """The parser `call` builds, caught at its first parse (skipping the parser named `skip_prog`, the
    dispatcher's own): nothing of the command runs."""
    originals = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")}

    def catcher(name: str):
        def parse(self, args=None, namespace=None):
            if self.prog == skip_prog or not self._actions:  # the dispatcher, or its stub of a command
                return originals[name](self, args, namespace)
            raise _Parsed(self)

        return parse

    with mock.patch.multiple(argparse.ArgumentParser, **{name: catcher(name) for name in originals}):
        try:
            call()
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{call} parsed no arguments")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(
        (a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
        {},
    )


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's own parser: `autosam2 NAME` for each command the dispatcher lists, `autosam2` (its
    global flags), `python -m shards`, `python -m launch`."""
    from autosam2 import cli

    top = cli.build_parser()
    found = {"autosam2": top, "shards": parser_of(lambda: _main("shards.__main__")([]))}
    found["launch"] = parser_of(lambda: _main("launch.__main__")([]))
    for name in subcommands(top) or cli.COMMANDS:
        found[f"autosam2 {name}"] = parser_of(lambda name=name: cli.main([name]), skip_prog=top.prog)
    return found


def _main(module: str) -> Callable:
    import importlib

    return importlib.import_module(module).main


def problems_of(parser: argparse.ArgumentParser, args: list[str], where: str) -> list[str]:
    """What in `args` this parser does not know: a flag (exactly, no abbreviation), a subcommand, or a
    config key of a key=value override. Stops at `--`."""
    found = []
    subs = subcommands(parser)
    expect_sub = bool(subs)
    skip_value = False
    for i, word in enumerate(args):
        if word == "--":
            break
        if word.startswith("-") and len(word) > 1 and not re.match(r"^-\d", word):
            flag = word.split("=", 1)[0]
            action = parser._option_string_actions.get(flag)
            if action is None:
                found.append(f"{where}: {parser.prog} has no {flag}")
            skip_value = action is not None and action.nargs != 0 and "=" not in word
            continue
        if skip_value:
            skip_value = False
            continue
        if expect_sub:
            if PLACEHOLDER.match(word) or word in ("...", "…"):
                return found
            if word not in subs:
                return [*found, f"{where}: {parser.prog} has no subcommand {word}"]
            return found + problems_of(subs[word], args[i + 1 :], where)
        found += config_key_problems(word, where)
    return found


def config_key_problems(word: str, where: str) -> list[str]:
    from omegaconf import OmegaConf

    from autosam2.config import Config

    match = CONFIG_KEY.match(word)
    if not match or FILE.search(word) or ("=" not in word and word != match.group(0)):
        return []
    key = match.group(0).rstrip(".")
    missing = object()
    if OmegaConf.select(OmegaConf.structured(Config), key, default=missing) is missing:
        return [f"{where}: the config has no {key}"]
    return []


def command_problems(parsers: dict, words: list[str], where: str) -> list[str]:
    """Route one simple command to the parser that reads it; commands of other programs are not ours."""
    program, args = words[0], words[1:]
    if f"autosam2 {program}" in parsers and args[:1] and args[0].startswith("--"):  # `evaluate --compile`
        program, args = "autosam2", words
    if program == "autosam2":
        return autosam2_problems(parsers, args, where)
    if program in ("python", "python3", "torchrun") and "-m" in args:
        module, rest = args[args.index("-m") + 1], args[args.index("-m") + 2 :]
        if module == "autosam2.cli":
            return autosam2_problems(parsers, rest, where)
        if module == "shards":
            return problems_of(parsers["shards"], rest, where)
        if module == "launch":
            return launch_problems(parsers, rest, where)
        return []
    if program == "make":
        return make_problems(args, where)
    if program == "sbatch":
        return sbatch_problems(parsers, args, where)
    return []


def autosam2_problems(parsers: dict, args: list[str], where: str) -> list[str]:
    top = parsers["autosam2"]
    for i, word in enumerate(args):
        if word.startswith("-"):
            if word not in top._option_string_actions:
                return [f"{where}: autosam2 has no {word}"]
            continue
        if PLACEHOLDER.match(word) or word in ("...", "…"):
            return []
        if f"autosam2 {word}" not in parsers:
            return [f"{where}: autosam2 has no command {word}"]
        return problems_of(parsers[f"autosam2 {word}"], args[i + 1 :], where)
    return []


def launch_problems(parsers: dict, args: list[str], where: str) -> list[str]:
    found = problems_of(parsers["launch"], args, where)
    if "--" not in args or not args:
        return found
    rest = args[args.index("--") + 1 :]
    target = f"autosam2 {args[0]}"
    if target in parsers:
        return found + problems_of(parsers[target], rest, where)
    return found + problems_of(subcommands(parsers["shards"])["build"], rest, where)


def sbatch_problems(parsers: dict, args: list[str], where: str) -> list[str]:
    templates = {
        "launch/train.sbatch": parsers["autosam2 train"],
        "launch/evaluate.sbatch": parsers["autosam2 evaluate"],
        "launch/shard_array.sbatch": subcommands(parsers["shards"])["build"],
    }
    for i, word in enumerate(args):
        if word in templates:
            return problems_of(templates[word], args[i + 1 :], where)
        if word == "--wrap" and i + 1 < len(args):
            return [p for words in commands_in(args[i + 1]) for p in command_problems(parsers, words, where)]
    return []


def make_problems(args: list[str], where: str) -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+):", makefile, re.M))
    found = []
    for word in args:
        name = word.split("=", 1)[0]
        if "=" in word and not re.search(rf"^{re.escape(name)}\s*[?:]?=", makefile, re.M):
            found.append(f"{where}: the Makefile has no variable {name}")
        elif "=" not in word and not word.startswith("-") and word not in targets:
            found.append(f"{where}: the Makefile has no target {word}")
    return found


# the tests ---------------------------------------------------------------------------------------------------


def test_the_readme_is_a_short_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"
    first_section = "\n".join(lines).split("\n## ", 1)[0]
    assert "make demo" in first_section and "make test" in first_section


def test_every_command_line_names_real_commands_and_flags(parsers):
    checked, problems = 0, []
    for where, words in page_commands():
        found = command_problems(parsers, words, where)
        checked += words[0] in ("autosam2", "make", "sbatch", "torchrun") or "-m" in words
        problems += found
    assert checked > 50  # the pages' commands were found at all
    assert not problems, "\n".join(sorted(set(problems)))


def test_every_config_key_the_pages_name_exists():
    problems = []
    for page in PAGES:
        lines, spans = code_of(page)
        words = spans + [w for line in lines for w in line.split()]
        problems += [p for w in words for p in config_key_problems(w.strip("`,;"), str(page.name))]
    assert not problems, "\n".join(sorted(set(problems)))


def test_every_repository_path_and_link_resolves():
    problems = []
    for page in PAGES:
        lines, spans = code_of(page)
        for path in {m for text in [*lines, *spans] for m in REPO_PATH.findall(text)}:
            pattern = re.sub(r"<[^>]*>", "*", path.rstrip("./"))
            if not list(REPO.glob(pattern)):
                problems.append(f"{page.name}: {path} is not in the repository")
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists():
                problems.append(f"{page.name}: the link {target} leads nowhere")
            elif anchor and anchor not in anchors(linked):
                problems.append(f"{page.name}: {linked.name} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but - and _ gone, spaces as -."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def named_outputs() -> dict[str, set[str]]:
    """Every `FOLDER/relative/path` the pages name under an output folder, as a glob, with its pages."""
    named: dict[str, set[str]] = {}
    folders = "|".join(OUTPUT_FOLDERS)
    for page in PAGES:
        for path in re.findall(rf"\b((?:{folders})/[^\s`'\"),;]+)", page.read_text()):
            parts = path.rstrip("/.").split("/")
            if len(parts) == 1:  # the folder itself (`OUTPUT_DIR/...`)
                continue
            glob = "/".join(
                "*" if PLACEHOLDER.match(part) and i else re.sub(r"<[^>]*>|X{4,}|…", "*", part)
                for i, part in enumerate(parts)
            )
            named.setdefault(glob, set()).add(page.name)
    return named


@pytest.fixture(scope="module")
def run_trees(tmp_path_factory, tiny_root_pristine, tiny_shards_pristine, weights) -> dict[str, Path]:
    """The folders tiny real runs write, side by side: `autosam2 train` (2 steps at 64 px, a checkpoint
    each, one validation), and `evaluate`, `predict` and `score` of the tiny set with the weights fixture."""
    base = tmp_path_factory.mktemp("docs_run")
    trees = {name: base / name.lower() for name in OUTPUT_FOLDERS}
    trees["SHARDS_DIR"] = tiny_shards_pristine["valid"]
    shards, valid = tiny_shards_pristine, tiny_root_pristine / "valid"
    overrides = {
        "data.train": shards["train"],
        "data.valid": shards["valid"],
        "data.clip_len": 2,
        "data.num_workers": 0,
        "model.image_size": 64,
        "train.max_steps": 2,
        "train.checkpoint_every": 1,
        "train.validate_every": 2,
        "tracking.system_metrics": "false",
    }
    model, masks = ["--cpu", "--weights", str(weights)], str(valid / "masks")
    out = {name: ["--output-dir", str(trees[name])] for name in OUTPUT_FOLDERS}
    commands = [
        ["train", "--cpu", *out["OUTPUT_DIR"], *(f"{k}={v}" for k, v in overrides.items())],
        ["evaluate", *model, "--data", str(shards["valid"]), *out["EVAL_DIR"]],
        ["predict", str(valid / "images"), *model, *out["PRED_DIR"]],
        ["score", "--pred", masks, "--gt", masks, "--workers", "1", *out["SCORE_DIR"]],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "autosam2.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # four processes share the cores
        )
        for args in commands
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{proc.args[3]}: exit {proc.returncode}\n{out.decode()[-3000:]}"
    return trees


def test_every_output_path_the_pages_name_is_where_a_run_writes_it(run_trees):
    named = named_outputs()
    assert {g.split("/")[0] for g in named} == set(OUTPUT_FOLDERS)
    missing = [
        f"{glob} (named in {', '.join(sorted(pages))})"
        for glob, pages in sorted(named.items())
        if glob not in ONLY_SOMETIMES and not list(run_trees[glob.split("/")[0]].glob(glob.split("/", 1)[1]))
    ]
    assert not missing, "not in a real run's tree:\n" + "\n".join(missing)
    assert set(ONLY_SOMETIMES) <= set(named)  # the exceptions stay named, or go from this list
