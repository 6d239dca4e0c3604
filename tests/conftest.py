"""Shared fixtures (tiny synthetic polyp_gen roots made by the project's own generator, shard sets, a
real MLflow server, the real SLURM) and the one place that sorts tests into kinds: unit, integration,
cluster (tests/README.md). What is not a fixture lives in `tests/helpers.py`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from autosam2.data.synthetic import SynthSpec, write_dataset
from tests.helpers import TINY, kill_group, start_mlflow_server

# kinds ---------------------------------------------------------------------------------------------------
# A test is `cluster` when its module is in CLUSTER; else `integration` when it is slow, uses a server
# fixture, or is named in INTEGRATION (its module, or itself); else `unit`. Unit tests start no process:
# the guard below fails one that does, naming this table.
CLUSTER = {"test_hosts.py", "test_slurm.py"}  # the modules that use the test SLURM, and only they
CLUSTER_FIXTURES = {"slurm_cluster", "slurm_hosts"}
INTEGRATION_FIXTURES = {"mlflow_server"}
INTEGRATION = {
    # whole modules: each test runs a command, torchrun, DeepSpeed, a server or a browser
    "test_bench.py",
    "test_failures.py",
    "test_gpu.py",
    "test_install.py",  # a venv with torch from the registry, the project installed into it
    "test_launch.py",
    "test_mlflow_ui.py",
    "test_score.py",
    "test_stop.py",
    "test_stream_distributed.py",
    "test_train.py",
    "test_validator.py",
    # single tests of modules that are otherwise unit (every parametrization of the function)
    "test_benchmark.py::test_a_root_without_a_split_is_one_line_and_nothing_is_written",
    "test_cli.py::test_bad_root_gives_one_clear_error",
    "test_cli.py::test_console_script_runs_the_demo_steps",
    "test_cli.py::test_every_command_reports_bad_input_in_one_line_through_the_one_dispatcher",
    "test_cli.py::test_second_make_run_installs_nothing",
    "test_conftest.py::test_a_process_a_test_starts_writes_its_temp_files_in_the_sessions_own_folder",
    "test_conftest.py::test_a_process_a_test_starts_lets_its_waiting_openmp_threads_sleep",
    "test_dist.py::test_a_rank_that_only_sees_another_go_names_that_ranks_error",
    "test_dist.py::test_slurm_variables_become_torchrun_variables",  # scontrol
    "test_dist.py::test_a_stopped_peer_ends_the_rank_watching_it_within_peer_timeout_s",
    "test_dist.py::test_a_process_ends_cleanly_while_its_watch_talks_to_the_store",
    "test_errors.py::test_debug_shows_the_traceback_of_a_user_error",
    "test_errors.py::test_merge_on_a_full_disk_keeps_the_parts",  # mount
    "test_errors.py::test_readers_work_on_a_read_only_mount",
    "test_errors.py::test_sync_of_a_run_on_a_read_only_disk_is_one_line",
    "test_feature_cache.py::test_a_cache_folder_on_a_read_only_disk_is_one_line",
    "test_gpu_check.py::test_a_part_that_fails_or_overruns_is_recorded_and_the_rest_still_run",
    "test_imports.py::test_help_lists_every_command",
    "test_imports.py::test_help_loads_neither_torch_nor_sam2",
    "test_imports.py::test_the_job_scripts_questions_before_srun_load_no_torch",
    "test_imports.py::test_the_config_imports_none_of_ours_and_nothing_heavy",
    "test_outputs.py::test_an_empty_mount_point_is_filled_in_place",
    "test_predict.py::test_a_folder_of_sequences_and_videos_is_one_sequence_each",
    "test_predict.py::test_a_video_file_gives_the_masks_of_its_frames_folder",
    "test_predict.py::test_bad_input_is_one_line_naming_the_file_and_leaves_no_output",
    "test_run_lock.py::test_a_live_holder_refuses_a_second_run_and_a_dead_one_is_taken_over",
    "test_run_lock.py::test_a_rank_of_an_incarnation_that_lost_the_lock_leaves_in_one_line_writing_nothing",
    "test_run_lock.py::test_a_reservation_refuses_a_second_submission_while_its_job_is_pending",  # squeue
    "test_run_lock.py::test_a_job_that_loses_the_race_exits_in_one_line",
    "test_shards.py::test_module_command_end_to_end",
    "test_shipped_configs.py::test_an_installed_wheel_finds_its_shipped_configs_from_any_directory",  # pip
    "test_shipped_configs.py::test_train_with_a_shipped_config_by_name_runs_from_another_directory",
    "test_tracking.py::test_a_server_down_from_the_start_gets_the_whole_run_once_it_is_up",
    "test_tracking.py::test_scores_a_store_did_not_take_are_kept_for_sync_and_nothing_is_left_when_it_takes_them",
    "test_tracking_choice.py::test_a_resumed_run_keeps_the_store_it_started_in",  # git rev-parse
    "test_tracking_choice.py::test_two_runs_writing_into_one_sqlite_store_at_once_lose_nothing",
    "test_vocabulary.py::test_sync_to_a_tracking_uri_mlflow_refuses_is_one_line",  # MLflow runs uname
}
# Under pytest-xdist (`-n 2`) the cluster tests are one unit of work: one worker runs them in order,
# since they share the one test SLURM (its state folders, the network namespaces and their bridge),
# while the other workers take the rest.
CLUSTER_GROUP = "cluster"
TIMELINE_ENV = "AUTOSAM2_TEST_TIMELINE"


def kind_of(item: pytest.Item) -> str:
    """unit, integration or cluster (the tables above)."""
    module = item.path.name
    if module in CLUSTER:
        return "cluster"
    fixtures = set(getattr(item, "fixturenames", ()))
    if fixtures & CLUSTER_FIXTURES:
        raise pytest.UsageError(f"{item.nodeid} uses the test SLURM: add {module} to CLUSTER in {__file__}")
    if (
        fixtures & INTEGRATION_FIXTURES
        or item.get_closest_marker("slow")
        or module in INTEGRATION
        or f"{module}::{getattr(item, 'originalname', item.name)}" in INTEGRATION
    ):
        return "integration"
    return "unit"


def scope_of(nodeid: str) -> str:
    """The unit of work pytest-xdist hands out: the cluster group, or the test alone."""
    return CLUSTER_GROUP if nodeid.split("::")[0].rsplit("/", 1)[-1] in CLUSTER else nodeid


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # ahead of xdist's own choice
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's load balancing, with the cluster tests as one unit of work (handed out first, being
    the largest)."""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ClusterApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ClusterApart(config, log)


def worker_threads() -> int | None:
    """Under pytest-xdist, each worker's share of the cores for its in-process torch work (commands that
    tests start follow the project's own thread rule); None when not under xdist."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, len(os.sched_getaffinity(0)) // workers) if workers > 1 else None


def _share_threads() -> None:
    threads = worker_threads()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def pytest_configure(config: pytest.Config) -> None:
    _share_threads()  # for the session fixtures too
    if not hasattr(config, "workerinput"):
        _own_tmpdir(config)
        # OpenMP threads that wait for a partner sleep instead of spinning: the session runs more threads
        # than the machine has cores (two workers, the ranks they start), and a spinning thread burns the
        # core its descheduled partner needs (a 2-thread step took 4.6 times the CPU time on a busy machine)
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _own_tmpdir(config: pytest.Config) -> None:
    """The session's processes (xdist's workers and every command a test starts, which inherit them)
    write their temp files under a TMPDIR of the session's own, removed when the session ends: a process
    a test kills (torchrun, multiprocessing, a run's tracking outbox) cannot clean up after itself.
    pytest's own tmp_path folders stay where they are (the controller keeps the system's temp dir)."""
    tempfile.gettempdir()  # fixed for this process before TMPDIR moves
    own = tempfile.mkdtemp(prefix="autosam2-tests-")
    os.chmod(own, 0o1777)  # as /tmp: for a job that runs as another user
    os.environ["TMPDIR"] = own
    config.add_cleanup(lambda: shutil.rmtree(own, ignore_errors=True))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(kind_of(item))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # after the cluster group, the slow tests first: the longest run beside the cluster tests and
        # the short ones fill the end
        items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)


@pytest.fixture(autouse=True)
def _kind_rules(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with its worker's share of torch threads (a test before it may have changed
    them), the default action of the stop signals (a run in this process ignores them once it is over,
    and an ignored signal stays ignored in every process started after: bash cannot even trap it) and
    without MLflow's variables of the shell that ran pytest; a unit test may not start a process."""
    _share_threads()
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(
            f"a unit test started a process ({args!r}): name it in INTEGRATION in tests/conftest.py"
        )

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


# a timeline of the run (tests/timeline.py draws it) ---------------------------------------------------------
_spans: dict[str, dict] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not os.environ.get(TIMELINE_ENV):
        return
    node = getattr(report, "node", None)  # set where xdist's controller receives a worker's report
    worker = node.gateway.id if node is not None else os.environ.get("PYTEST_XDIST_WORKER", "main")
    span = _spans.setdefault(report.nodeid, {"test": report.nodeid, "worker": worker, "start": report.start})
    span["stop"] = report.stop
    span["kind"] = next((k for k in ("cluster", "integration", "unit") if k in report.keywords), "unit")
    span.setdefault("outcome", "passed")
    if report.outcome != "passed":
        span["outcome"] = report.outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get(TIMELINE_ENV)
    if path and not hasattr(session.config, "workerinput"):  # the controller, or a run without workers
        Path(path).write_text(json.dumps(sorted(_spans.values(), key=lambda s: s["start"]), indent=1))


@pytest.fixture(scope="session")
def tiny_root_pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "polyp_gen"
    write_dataset(root, TINY)
    return root


@pytest.fixture
def tiny_root(tiny_root_pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    root = tmp_path / "polyp_gen"
    shutil.copytree(tiny_root_pristine, root)
    return root


@pytest.fixture(scope="session")
def tiny_shards_pristine(
    tiny_root_pristine: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Shards of the tiny dataset: 5 frames per sample, so 12-frame sequences make chunks of 5, 5, 2."""
    from shards.writer import build

    out = tmp_path_factory.mktemp("tiny_shards")
    return {
        split: (build(tiny_root_pristine, split, out / split, frames_per_sample=5), out / split)[1]
        for split in ("train", "valid")
    }


@pytest.fixture
def tiny_shards(tiny_shards_pristine: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of the tiny shard sets that a test may damage."""
    copies = {}
    for split, path in tiny_shards_pristine.items():
        copies[split] = tmp_path / "shards" / split
        shutil.copytree(path, copies[split])
    return copies


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights file of a random-init model at 64 px (holding every weight), for evaluate and predict."""
    import torch

    from autosam2.config import load_config
    from autosam2.model.sam2_builder import build_autosam2
    from autosam2.model.weights import RunWeights

    folder = tmp_path_factory.mktemp("weights")
    cfg = load_config(None, ["model.image_size=64"])
    torch.manual_seed(0)
    RunWeights(folder, build_autosam2(cfg.model, torch.device("cpu")), cfg.model, True).save("w.pt", 0)
    return folder / "w.pt"


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic shards at 256 px for training runs: 4 train + 2 valid sequences of 8 frames, one per shard."""
    from shards.writer import build

    base = tmp_path_factory.mktemp("train_data")
    write_dataset(base / "pg", SynthSpec(train_sequences=4, valid_sequences=2, frames=8, size=256, seed=5))
    for split in ("train", "valid"):
        build(base / "pg", split, base / "shards" / split, frames_per_sample=4, max_shard_mb=0.0001)
    return {"root": base / "pg", "train": base / "shards" / "train", "valid": base / "shards" / "valid"}


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """(uri, process, store folder) of a real mlflow server, stopped at the end of the test."""
    store = tmp_path / "server"
    uri, proc = start_mlflow_server(store)
    try:
        yield uri, proc, store
    finally:
        kill_group(proc)


def _slurm(state: Path, *flags: str):
    """launch/slurm_test_cluster.sh started with `flags` in the state folder `state`, SLURM_CONF pointing
    at it while the caller runs (every SLURM command and submitit read it; the cluster's munge socket is
    in it), stopped and the previous SLURM_CONF back afterwards."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "launch" / "slurm_test_cluster.sh"
    env = {**os.environ, "AUTOSAM2_SLURM_DIR": str(state)}
    started = subprocess.run(
        ["bash", str(script), "start", *flags], capture_output=True, text=True, timeout=600, env=env
    )
    assert started.returncode == 0, started.stdout + started.stderr
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run(
            ["bash", str(script), "stop", *flags], capture_output=True, text=True, timeout=300, env=env
        )
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real single-node SLURM of launch/slurm_test_cluster.sh, up for the session."""
    import os

    yield from _slurm(Path(os.environ.get("AUTOSAM2_SLURM_DIR", "/tmp/autosam2-slurm")))


@pytest.fixture(scope="module")
def slurm_hosts():
    """Three test hosts, node1..node3 (network namespaces on one bridge, 10.231.0.1 to .3), with a
    slurmd each, from launch/slurm_test_cluster.sh --hosts 3; jobs take two, the third stands in for
    a dead one. For the module, then removed."""
    yield from _slurm(Path("/tmp/autosam2-slurm-hosts"), "--hosts", "3")
