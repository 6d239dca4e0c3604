"""A real `mlflow server` on loopback, for the tracking benchmark and the tests: started, health-checked,
stopped with everything it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from autosam2.tracking.credentials import CREDENTIAL_ENV


def free_port() -> int:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(proc) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_mlflow_server(
    store: Path,
    backend_uri: str | None = None,
    timeout_s: float = 60,
    admin_password: str | None = None,
    port: int | None = None,
):
    """A real `mlflow server` on 127.0.0.1 in its own process group; returns (uri, process). Its log goes
    to ``store/server.log`` (appended to, across restarts). With
    `admin_password`: MLflow's basic-auth app, user ``admin``, and no access for anyone else (its user
    store, auth config and Flask secret in `store`)."""

    from autosam2.extras import require

    require("server", "an MLflow server")
    port = port or free_port()  # a given port: the same server started again after an outage
    store.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    for name in CREDENTIAL_ENV:  # the server runs without the client's credentials
        env.pop(name, None)
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        backend_uri or f"sqlite:///{store}/mlflow.db",
    ]
    if admin_password is not None:
        cmd += _basic_auth(store, admin_password, env)
    cmd += [
        "--artifacts-destination",
        str(store / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(store / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_until_healthy(proc, port, store, timeout_s)
    return f"http://127.0.0.1:{port}", proc


def _basic_auth(store: Path, admin_password: str, env: dict[str, str]) -> list[str]:
    """MLflow's basic-auth app for a server of `store`: its config file and variables (set in `env`);
    returns the server's arguments that turn it on."""
    ini = store / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{store}/basic_auth.db\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    ini.chmod(0o600)
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex(),
    )
    return ["--app-name", "basic-auth"]


def _wait_until_healthy(proc: subprocess.Popen, port: int, store: Path, timeout_s: float) -> None:
    """Poll the server's health endpoint; a server that exits or stays unhealthy for `timeout_s` is
    stopped, and RuntimeError carries the end of its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            raise RuntimeError(
                f"mlflow server did not become healthy: {(store / 'server.log').read_text()[-2000:]}"
            )
        time.sleep(0.2)
