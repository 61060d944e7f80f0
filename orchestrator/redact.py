"""Keeping credentials out of what is logged, shipped or rendered.

A tracking URI may carry credentials (``http://user:pass@host``); MLflow takes them from
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``) instead,
so the URI itself is stripped of its userinfo wherever it is logged (MLflow params, config
artifacts), shipped (a Ray job's runtime_env) or rendered (Kubernetes manifests), and the
credentials travel, where they must, as those variables.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

# Key names (config fields, query parameters, environment variables) whose values are secrets,
# by word: any word of SECRET_WORDS (`db_password`, `AWS_SECRET_ACCESS_KEY`), or a last word of
# SECRET_LAST (`hf_token`, `private_key`, `pg_pass`, `sig`). Words, not substrings: `max_tokens`,
# `num_passes` or `author` are model kwargs and config fields, not secrets.
SECRET_WORDS = {"password", "passwd", "passphrase", "secret", "credential", "credentials", "private", "apikey"}
SECRET_LAST = {"token", "pass", "pwd", "key", "auth", "authorization", "sig", "signature"}
# Names ending in these two words hold no secret: the identity keys this program writes as tags
# and params (`orchestrator.run_key`, `plan.cluster_key`) and ordinary data keys.
PLAIN_KEYS = {"run_key", "cluster_key", "floor_key", "sort_key", "metric_key", "cache_key", "partition_key"}
REDACTED = "***"


def is_secret_name(name: str) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()  # apiKey -> api_key
    parts = [w for w in re.split(r"[^a-z0-9]+", words) if w]
    if not parts or "_".join(parts[-2:]) in PLAIN_KEYS:
        return False
    return bool(SECRET_WORDS.intersection(parts)) or parts[-1] in SECRET_LAST


# Every URI in a text starts at a scheme; its authority runs to the first '/', '?', '#', quote or
# space. Userinfo is what the authority holds before its last '@' (RFC 3986); a password holding an
# unescaped '/', '?', '#' or quote cuts the authority short at `user:pass`, so an authority of that
# shape (a ':' not followed by a port number: `_port_ends`) with an '@' close after it is userinfo too.
# A password starting with digits (`bob:2024/Qz@host`) reads as a port, and RFC 3986 takes it for one
# (host bob, path /Qz@host): which it is cannot be told, so up to the '@' is masked, not dropped
# (`http://***@host`), a path holding '@' after a port (`http://h:5000/e/1@x`) shown masked too. Paths
# holding '@' without a port (`file:///data/run@2`, `s3://bucket/v1@2024`, `docker://img@sha256:...`) are kept.
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,30}://", re.I)
_AUTHORITY = re.compile(r"[^/?#'\"\s]*")
_WORD_END = re.compile(r"\s")
USERINFO_REACH = 1024  # how far past a cut-short `user:pass` its '@' is looked for
# A password holding '@' and then '/', '?' or '#' (`user:p@ss/w0rd@host:5000`): urllib takes `ss` for the
# host, and the rest of the password for the path. In a URI with userinfo, the last '@' later in the word
# that a host follows (`host:port`, a dotted name, `[ipv6]`) ends the userinfo; masked, as a path holding
# '@' before a host cannot be told from it (`s3://k:s@bucket/v1@2024` is kept: `2024` reads as no host).
_HOST = r"(?:\[[\w:.%]+\]|[\w-]+(?:\.[\w-]+)+)(?::\d+)?|[\w.-]+:\d+"
_HOST_AT = re.compile(rf"@(?=(?:{_HOST})(?:[/?#]|$))")  # searched up to the word's end, which `$` then is
_WORD = re.compile(r"[^\s'\"]*")
MASK = f"{REDACTED}@"
# Why a value that only a mask can show is refused where it would be worked with (manifests, a shipped job)
AMBIGUOUS_AT = ("an '@' after a '/', '?' or '#' reads as a path's and as a password's end alike; percent-encode "
                "the '@' of a path (%40), and give credentials elsewhere than in the URI")
# a value runs to '&', '#' or a space, and does not end in the punctuation or quote around it
_SECRET_QUERY = re.compile(r"([?&;#])([^=&\s'\"#]+)=((?:[^&\s#]*[^&\s#:,.;)'\"])?)")  # '#': a fragment's too


def _without_userinfo(text: str) -> str:
    kept, at, word = [], 0, (-1, -1)
    for scheme in _SCHEME.finditer(text):
        start = scheme.end()
        if start < at:
            continue  # inside userinfo already cut
        end = _AUTHORITY.match(text, start).end()
        authority, cut, mask = text[start:end], -1, ""
        if "@" in authority:
            cut = start + authority.rindex("@") + 1
            if end >= word[0]:  # a word searched once, however many URIs it holds (else quadratic)
                word = _last_host_at(text, end)
            if word[1] > end:
                cut, mask = word[1] + 1, MASK
        elif ":" in authority and not authority.startswith("["):
            port = _port_ends(text, scheme.start(), end)
            if not port or text[end:end + 1] in ("/", "?", "#"):  # a port the URI's text goes on after
                space = _WORD_END.search(text, end, end + USERINFO_REACH)
                found = text.rfind("@", end, space.start() if space else end + USERINFO_REACH)  # a password may hold "@"
                cut, mask = (found + 1 if found >= 0 else -1), MASK if port else ""
        if cut > 0:
            kept.append(text[at:start] + mask)
            at = cut
    return "".join(kept) + text[at:]


def _last_host_at(text: str, end: int) -> tuple[int, int]:
    """The end of the word that goes on at `end`, and where its last '@' that a host follows is (-1: none)."""
    word_end, last = _WORD.match(text, end).end(), -1
    for found in _HOST_AT.finditer(text, end, word_end):
        last = found.start()
    return word_end, last


def _port_ends(text: str, uri_start: int, end: int) -> bool:
    """Whether the authority of the URI at `uri_start`, cut at `end`, ends in `:PORT`: digits after
    its ':', not cut by a quote that closes none opened just before the URI (a quote inside a
    password, `user:12"ab@host`, leaves digits that are no port)."""
    digits = text[uri_start:end].rpartition("://")[2].partition(":")[2].isdigit()
    quote = text[end:end + 1]
    return digits and not (quote in ("'", '"') and text[uri_start - 1:uri_start] != quote)


def url_error(uri: str, exc: ValueError) -> str:
    """urllib's reason a URI does not split, as " (reason)"; none where it quotes a part of a URI
    with userinfo ("Port could not be cast to integer value as 's3cr3t'": a password's start)."""
    return "" if "@" in uri and "'" in str(exc) else f" ({exc})"


def scrub(text: str) -> str:
    """`text` (a message, an error, a description) with every URI's userinfo removed and the values
    of secret-named query parameters masked: the last guard before anything is printed or logged."""
    return _mask_secret_values(_without_userinfo(text))


def userinfo(uri: str) -> tuple[str, str | None] | None:
    """(user, password) from ``scheme://user:pass@host/...``, or None when the URI has none."""
    parts = urlsplit(uri)
    if "://" not in uri or parts.username is None:
        return None
    password = unquote(parts.password) if parts.password is not None else None
    return unquote(parts.username), password


def redact_uri(uri: str) -> str:
    """`uri` as shown: without its userinfo and secret-named query parameters, and with what only
    might be a password masked (`bob:2024/Qz@host`, which urllib reads as a port and path)."""
    stripped, masked = without_credentials(uri), _without_userinfo(uri)
    shown = masked if stripped == uri or MASK in masked else stripped
    return _mask_secret_values(shown)  # a fragment's too (`#access_token=...`), which urllib's query leaves


def _mask_secret_values(text: str) -> str:
    return _SECRET_QUERY.sub(lambda m: f"{m[1]}{m[2]}={REDACTED}" if is_secret_name(m[2]) else m[0], text)


def without_credentials(uri: str) -> str:
    """`uri` as a client connects to it: without the userinfo and secret-named query parameters
    urllib finds (the credentials travel as MLflow's variables), the host and path as urllib reads them."""
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


def secret_fields(value: Any) -> list[str]:
    """The dotted paths of secret-named keys holding a value, in a config mapping (lists walked,
    as `redact` walks them: `kwargs.mirrors[0].hf_token`)."""
    return _fields(value, "", lambda key, v: is_secret_name(key) and v not in (None, ""))


def masked_fields(value: Any) -> list[str]:
    """The dotted paths of the values in a config mapping that `redact` can only mask (`***@host`:
    an '@' after a '/', '?' or '#' that ends a password or sits in a path, which cannot be told apart).
    Such a value is shown, never worked with: stripped of the mask, it names the host after the '@'."""
    return _fields(value, "", lambda _key, v: isinstance(v, str) and MASK in scrub(v) and MASK not in v)


def _fields(value: Any, path: str, found: Callable[[str, Any], bool]) -> list[str]:
    if isinstance(value, list):
        items = [(f"{path}[{i}]", "", v) for i, v in enumerate(value)]
    elif isinstance(value, Mapping):
        items = [(f"{path}.{k}" if path else str(k), str(k), v) for k, v in value.items()]
    else:
        return []
    return [f for where, key, v in items for f in ([where] if found(key, v) else _fields(v, where, found))]


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
        try:
            value = redact_uri(value)
        except ValueError:  # not a URI urllib can split ("http://[::1"): scrub finds what it can
            pass
        return scrub(value)  # and URIs inside a longer text ("mirror of s3://key:secret@bucket")
    return value
