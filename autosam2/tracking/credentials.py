"""Credentials in a tracking URI: moved out of it into MLflow's variables, and redacted wherever a URI is shown."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

# MLflow's client reads a tracking server's basic-auth credentials from these (or ~/.mlflow/credentials)
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


def redact_uri(text: str | None) -> str | None:
    """`text` (a URI, or a message that holds some) with every ``user:password@`` of a URI replaced by
    ``***@``, for whatever is printed or logged."""
    return _USERINFO.sub(r"\1***@", text) if text else text


def take_uri_credentials(uri: str | None, env: dict[str, str] | None = None) -> str | None:
    """`uri` without its ``user:password@``, which move to MLflow's own variables in `env` (default this
    process's environment, which jobs and ranks inherit): so credentials never sit in a param, a config
    file, a log line or a job's pickled arguments. A URI without them is returned as it is."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    env = os.environ if env is None else env
    env[CREDENTIAL_ENV[0]] = unquote(parts.username or "")
    if parts.password is not None:
        env[CREDENTIAL_ENV[1]] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
