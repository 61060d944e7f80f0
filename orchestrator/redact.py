"""Keeping credentials out of what is logged, shipped or rendered.

A tracking URI may carry credentials (``http://user:pass@host``); MLflow takes them from
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``) instead,
so the URI itself is stripped of its userinfo wherever it is logged (MLflow params, config
artifacts), shipped (a Ray job's runtime_env) or rendered (Kubernetes manifests), and the
credentials travel, where they must, as those variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

# Key names (config fields, query parameters, environment variables) whose values are secrets.
SECRET_HINTS = ("password", "passwd", "secret", "token", "access_key", "credential", "api_key", "apikey")
REDACTED = "***"


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(hint in lowered for hint in SECRET_HINTS)


def userinfo(uri: str) -> tuple[str, str | None] | None:
    """(user, password) from ``scheme://user:pass@host/...``, or None when the URI has none."""
    parts = urlsplit(uri)
    if "://" not in uri or parts.username is None:
        return None
    password = unquote(parts.password) if parts.password is not None else None
    return unquote(parts.username), password


def redact_uri(uri: str) -> str:
    """`uri` without its userinfo and without secret-named query parameters."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if not is_secret_name(k)]
    if "@" not in parts.netloc and len(kept) == len(pairs):
        return uri  # nothing to strip (and urlunsplit would rewrite `sqlite:////abs` paths)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept), parts.fragment))


def tracking_credentials(uri: str) -> dict[str, str]:
    """The environment variables MLflow reads for the credentials a tracking URI carries."""
    found = userinfo(uri)
    if found is None:
        return {}
    user, password = found
    return {"MLFLOW_TRACKING_USERNAME": user, **({"MLFLOW_TRACKING_PASSWORD": password} if password else {})}


def redact(value: Any, key: str = "") -> Any:
    """A copy of `value` (mappings and lists walked) with secret-named keys masked and every URI
    stripped of its credentials: safe to log as MLflow params or artifacts."""
    if is_secret_name(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return redact_uri(value)
    return value
