"""The import graph keeps its shape: the config is the ground floor, the library never imports the
`shards/` tool nor a command, and `autosam2 --help` loads neither torch nor SAM2."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autosam2.commands import REGISTRY, commands_of

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "autosam2"
# the command modules, as the registry names them; a registered package holds commands' helpers too
COMMANDS = {command.module for command in REGISTRY}
PACKAGES = {m for m in COMMANDS if (REPO / m.replace(".", "/") / "__init__.py").exists()}
HEAVY = ("torch", "torchvision", "sam2", "hydra", "deepspeed", "mlflow", "webdataset")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (`from a import b` names a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


LIBRARY = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def is_command(module: str) -> bool:
    return module in COMMANDS or any(module.startswith(package + ".") for package in PACKAGES)


def within(name: str, top: str) -> bool:
    return name == top or name.startswith(top + ".")


def test_the_config_imports_none_of_ours_and_nothing_heavy():
    imported = LIBRARY["autosam2.config"]
    assert not {m for m in imported if within(m, "autosam2")}
    assert not {m for m in imported for heavy in HEAVY if within(m, heavy)}
    # and at run time, with everything the imports pull in
    code = "import sys, json; from autosam2.config import load_config; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert [m for m in loaded if within(m, "autosam2")] == ["autosam2", "autosam2.config"]
    assert not [m for m in loaded for heavy in HEAVY if within(m, heavy)]


def test_the_library_never_imports_the_shards_tool():
    offenders = {mod: sorted(m for m in imported if within(m, "shards")) for mod, imported in LIBRARY.items()}
    assert {mod: found for mod, found in offenders.items() if found} == {}


def test_no_library_module_imports_a_command():
    offenders = {
        mod: sorted(m for m in imported if is_command(m))
        for mod, imported in LIBRARY.items()
        if not is_command(mod)
    }
    assert {mod: found for mod, found in offenders.items() if found} == {}


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["evaluate", "--help"], ["predict", "--help"]]
)
def test_help_loads_neither_torch_nor_sam2(argv):
    code = (
        "import sys, json\nfrom autosam2.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if within(m, "torch") or within(m, "sam2")]


def test_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "autosam2.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    listed = {line.split()[0] for line in done.stdout.splitlines() if re.match(r"    \S", line)}
    assert listed == set(commands_of("autosam2"))


@pytest.mark.parametrize("command", REGISTRY, ids=lambda c: f"{c.program} {c.name}".strip())
def test_every_registered_command_names_what_exists(command):
    module, function = command.target.split(":")
    assert callable(getattr(__import__(module, fromlist=[function]), function))


def test_a_registered_package_holds_commands_and_the_registry_is_library():
    assert is_command("autosam2.bench.common")
    assert not is_command("autosam2.commands") and not is_command("autosam2.config")


@pytest.mark.parametrize("argv", [["port", "123"], ["max-requeues"]])
def test_the_job_scripts_questions_before_srun_load_no_torch(argv):
    """launch/train.sbatch and evaluate.sbatch ask these before srun starts the ranks: in the job's
    start-up time, so they stay light (a torch import costs seconds)."""
    code = (
        "import sys, json, runpy\n"
        f"sys.argv = ['dist', *{argv!r}]\n"
        "try:\n    runpy.run_module('autosam2.engine.dist', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    answer, loaded = done.stdout.strip().splitlines()[-2], json.loads(done.stdout.strip().splitlines()[-1])
    assert answer.isdigit() and not [m for m in loaded if within(m, "torch")]
