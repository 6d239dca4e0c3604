"""The suite's own rules (tests/conftest.py) as the tests' processes see them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_process_a_test_starts_writes_its_temp_files_in_the_sessions_own_folder():
    said = subprocess.run(
        [sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    own = Path(os.environ["TMPDIR"])
    assert Path(said) == own and own.is_dir()
    assert own.name.startswith("autosam2-tests-")


def test_a_process_a_test_starts_lets_its_waiting_openmp_threads_sleep():
    said = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert said == "PASSIVE"
