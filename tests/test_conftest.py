"""The suite's own rules (tests/conftest.py) as the tests' processes see them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _said(code: str) -> str:
    """What a process a test starts prints for `code`."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_process_a_test_starts_writes_its_temp_files_in_the_sessions_own_folder():
    said = _said("import tempfile; print(tempfile.gettempdir())")
    own = Path(os.environ["TMPDIR"])
    assert Path(said) == own and own.is_dir()
    assert own.name.startswith("autosam2-tests-")


def test_a_process_a_test_starts_lets_its_waiting_openmp_threads_sleep():
    assert _said("import os; print(os.environ.get('OMP_WAIT_POLICY'))") == "PASSIVE"
