"""The Ray Jobs API of one cluster: list, follow and stop jobs; every cluster error is one line.

The address is the head's dashboard (``http://HEAD:8265``). The token Ray's own clients would use
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) goes with every request as a
bearer token, so it is never sent in the clear to another machine: plain ``http://`` is accepted
for a loopback host (a head on this machine, an SSH tunnel, ``kubectl port-forward``) and refused
for any other host unless ``--insecure`` says so. An address without a scheme means ``http://``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from orchestrator import constants
from orchestrator.errors import BAD_HOST_NAME, UserError
from orchestrator.redact import scrub, url_error

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# `submit --follow` and `jobs logs --follow` exit with the job's outcome (2 stays "bad input").
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
TOKEN_HINT = ("set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it; "
              "without either, ~/.ray/auth_token is read: `ray start` writes it there on the head's machine)")
JOB_KEY = "orchestrator.job"
# Ray's JobSubmissionClient replaces the address it is given with either of these: the transport
# check and the probe would judge one host while the token went to another.
ADDRESS_OVERRIDES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
NO_PROXY = ("no_proxy", "NO_PROXY")
QUIET_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging")

# Ray's message for a failed entrypoint: this first line, then the job's last log lines.
LOGS_FOLLOW = re.compile(r",? last available logs \(truncated to [\d,]+ chars\):$")

Write = Callable[[str], Any]


def resolve_address(address: str | None) -> str:
    """`--address`, else RAY_ADDRESS, as the dashboard URL the Jobs API lives at."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address: no Ray cluster given; pass --address http://HEAD:8265 or set RAY_ADDRESS")
    url = address if "://" in address else f"http://{address}"
    if bad := next((c for c in url if not c.isprintable() or c.isspace()), None):
        raise UserError(f"--address: holds the character {bad!r}; give the Ray dashboard's http://HOST:PORT")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port out of range or no number
    except ValueError as exc:
        raise UserError(f"--address {shown(address)}: not a valid URL{url_error(address, exc)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--address {shown(address)}: expected the Ray dashboard's http://HOST:PORT "
                        "(usually port 8265)")
    return url.rstrip("/")


def shown(address: str) -> str:
    """An address as messages print it: without a user:password it may carry."""
    # a regex, not urllib: the address may be malformed (a password holding '/' splits no URL)
    return scrub(address) if "://" in address else scrub(f"http://{address}").removeprefix("http://")


def check_job_id(job_id: str) -> str:
    """A job id goes into the Jobs API's URL path: one that would change the path (a '/', '?', '#',
    '%', '..') or holds spaces or control characters is refused, so no id can name another job."""
    bad = next((c for c in job_id if c in "/\\?#%" or not c.isprintable() or c.isspace()), None)
    if not job_id or job_id in (".", "..") or bad is not None or len(job_id) > 256:
        why = ("is empty" if not job_id else f"holds {bad!r}" if bad is not None
               else f"is {len(job_id)} characters (at most 256)" if len(job_id) > 256 else f"cannot be {job_id!r}")
        raise UserError(f"job id {job_id[:64]!r}: {why}; see `orchestrator jobs list` for the ids")
    return job_id


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_transport(address: str, *, token_source: str | None, insecure: bool) -> None:
    """Refuse to send a token over plain http to another machine unless `insecure`; warn when it goes."""
    url = urlsplit(address)
    if url.scheme == "https" or token_source is None or is_loopback(url.hostname):
        return
    if not insecure:
        raise UserError(f"--address {shown(address)}: the Ray token (from {token_source}) would cross the network "
                        "unencrypted; use https://, or a tunnel to 127.0.0.1 (ssh -L, kubectl port-forward), "
                        "or pass --insecure")
    print(f"warning: sending the Ray token from {token_source} unencrypted to {url.hostname} (--insecure)",
          file=sys.stderr)


def auth_token() -> tuple[str | None, str]:
    """The token Ray's own clients would use, and where it came from (for error messages)."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = _read_token(Path(path).expanduser(), "RAY_AUTH_TOKEN_PATH: ")
        return token or None, f"RAY_AUTH_TOKEN_PATH ({path}{'' if token else ', an empty file'})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        token = _read_token(default, "")
        return token or None, f"{default}{'' if token else ' (an empty file)'}"
    return None, "no token"


def _read_token(path: Path, flag: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise UserError(f"{flag}cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError:  # a key or certificate file given by mistake: a token is text
        raise UserError(f"{flag}{path} is not a text file; it should hold the cluster's token") from None


@contextmanager
def _address_as_given(address: str) -> Iterator[None]:
    """Requests go to the checked address and nowhere else: hide the variables by which Ray would
    override it (RAY_ADDRESS is already `resolve_address`'s default), and keep a loopback address
    off any proxy of the environment (HTTP_PROXY carried the token in plain http to the proxy's
    host, which cannot reach this machine's loopback anyway). The environment is restored after."""
    saved = {name: os.environ.get(name) for name in (*ADDRESS_OVERRIDES, *NO_PROXY)}
    for name in ADDRESS_OVERRIDES:
        os.environ.pop(name, None)
    if is_loopback(host := urlsplit(address).hostname):
        for name in NO_PROXY:  # requests reads no_proxy, then NO_PROXY
            os.environ[name] = ",".join(filter(None, (saved[name], host)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class JobsClient:
    """The Ray Jobs API at one address; every cluster error becomes a one-line UserError."""

    def __init__(self, address: str | None, *, insecure: bool = False) -> None:
        self.address = resolve_address(address)
        token, self._token_source = auth_token()
        check_transport(self.address, token_source=self._token_source if token else None, insecure=insecure)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._probe(headers)
        from ray.job_submission import JobSubmissionClient

        for name in QUIET_LOGGERS:  # Ray sets them to INFO: a line per upload and per log stream
            logging.getLogger(name).setLevel(logging.WARNING)
        self._answered = False
        with self._errors():
            self._client = JobSubmissionClient(self.address, headers=headers)
        self._answered = True

    def _probe(self, headers: dict[str, str] | None) -> None:
        # requests waits minutes on an address that drops packets; a TCP connect says it in seconds.
        url = urlsplit(self.address)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=constants.RAY_CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise UserError(f"--address {shown(self.address)}: cannot reach the Ray dashboard "
                            f"({exc.strerror or type(exc).__name__})") from None
        except UnicodeError:  # `a..b`, a part past 63 characters: the name is refused before any lookup
            raise UserError(f"--address {shown(self.address)}: {url.hostname!r} is not a host name "
                            f"({BAD_HOST_NAME})") from None
        self._answers(headers)

    def _answers(self, headers: dict[str, str] | None) -> None:
        # Ray's client sends its version check with no timeout: a port that takes the connection and
        # never answers (a hung dashboard, another service) held the command forever.
        import requests

        try:
            with _address_as_given(self.address):
                requests.get(f"{self.address}/api/version", headers=headers,
                             timeout=constants.RAY_CONNECT_TIMEOUT_S).close()
        except requests.exceptions.Timeout:
            raise UserError(f"--address {shown(self.address)}: no Ray dashboard answered within "
                            f"{constants.RAY_CONNECT_TIMEOUT_S:g} s; give the dashboard's http://HOST:PORT "
                            "(usually 8265)") from None
        except requests.exceptions.RequestException:
            pass  # Ray's own version check, next, says what is wrong

    @contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        import requests
        from ray.exceptions import AuthenticationError

        try:
            with _address_as_given(self.address):
                yield
        except AuthenticationError as exc:
            if "Authentication failed" in exc.message:  # 403: a token was sent and refused
                raise UserError(f"{shown(self.address)}: the Ray cluster rejected the token from "
                                f"{self._token_source}; {TOKEN_HINT}") from None
            empty = f" ({self._token_source})" if "empty file" in self._token_source else ""
            raise UserError(f"{shown(self.address)}: the Ray cluster requires a token{empty}; {TOKEN_HINT}") from None
        except (ConnectionError, requests.exceptions.RequestException) as exc:
            if not self._answered:  # a port that takes connections but is no dashboard: often the GCS's 6379
                raise UserError(f"--address {shown(self.address)}: no Ray dashboard answers there "
                                f"({type(exc).__name__}); give the dashboard's http://HOST:PORT (usually 8265), "
                                "not the cluster's Ray address (port 6379)") from None
            raise UserError(f"--address {shown(self.address)}: the Ray dashboard stopped answering "
                            f"({type(exc).__name__})") from None
        except RuntimeError as exc:  # the Jobs API answered with an error status
            if job_id is not None and "status code 404" in str(exc):
                raise UserError(f"job {job_id}: no such job at {shown(self.address)} "
                                "(see `orchestrator jobs list`)") from None
            raise UserError(f"{shown(self.address)}: the Ray Jobs API refused: {first_line(str(exc))}") from None

    def submit(self, **job: Any) -> str:
        """`JobSubmissionClient.submit_job(**job)`, retried while a just-started head has no job agent."""
        deadline = time.monotonic() + constants.JOB_SUBMIT_RETRY_S
        while True:
            try:
                with self._errors():
                    return self._client.submit_job(**job)
            except UserError as exc:
                if "try again later" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(constants.JOB_POLL_S)

    def list(self) -> list[Any]:
        with self._errors():
            jobs = [j for j in self._client.list_jobs() if j.submission_id]
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def info(self, job_id: str) -> Any:
        with self._errors(job_id):
            return self._client.get_job_info(job_id)

    def status(self, job_id: str) -> str:
        return str(self.info(job_id).status)

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self._client.get_job_logs(job_id)

    def stop(self, job_id: str) -> str:
        """Ask the job to stop (SIGTERM; Ray kills it JOB_STOP_GRACE_S later), then wait for a final status."""
        with self._errors(job_id):
            stopping = self._client.stop_job(job_id)
        if stopping:  # it writes a final checkpoint first: seconds to a minute without a word otherwise
            print(f"{job_id}: asked to stop; waiting up to {constants.JOB_STOP_WAIT_S:g} s while it writes a "
                  "final checkpoint", file=sys.stderr)
        return self.wait(job_id, timeout_s=constants.JOB_STOP_WAIT_S)

    def wait(self, job_id: str, *, timeout_s: float | None = None) -> str:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (status := self.status(job_id)) not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(constants.JOB_POLL_S)
        return status

    def follow(self, job_id: str, write: Write) -> int:
        """Stream the job's logs until it ends, then say on stderr how it ended; returns the exit code."""
        self.info(job_id)  # an unknown id is a one-line error, not a websocket failure
        try:
            asyncio.run(self._tail(job_id, write))
        except (UserError, BrokenPipeError):  # the reader of our output went away (`| head`)
            raise
        except KeyboardInterrupt:
            print(f"stopped following; the job goes on: orchestrator jobs logs {job_id} --follow", file=sys.stderr)
            raise
        except Exception as exc:  # noqa: BLE001 - the stream broke; the job's status still tells the end
            print(f"log stream lost ({type(exc).__name__}); waiting for the job to end", file=sys.stderr)
        status = self.wait(job_id)
        code = exit_code(status)
        why = "" if code == 0 else reason(self.info(job_id).message)
        print(f"job {job_id}: {status}" + (f" ({why})" if why else "") + f"; exit code {code}", file=sys.stderr)
        return code

    async def _tail(self, job_id: str, write: Write) -> None:
        chunks = self._client.tail_job_logs(job_id)
        while True:
            with self._errors(job_id):  # not around `write`: a closed stdout is no dashboard failing
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
            write(chunk)


def exit_code(status: str) -> int:
    """0 SUCCEEDED, 1 FAILED, 3 STOPPED; 1 for anything else (a job that never reached an end)."""
    return EXIT_CODES.get(status, 1)


def format_jobs(jobs: list[Any]) -> list[str]:
    rows = [("ID", "STATUS", "STARTED", "MESSAGE")]
    rows += [(j.submission_id, str(j.status), _when(j.start_time), reason(j.message)[:60]) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]


def format_info(info: Any) -> list[str]:
    lines = [f"{info.submission_id}: {info.status}"]
    if info.message:
        lines.append(f"  {reason(info.message)}")
    if name := (info.metadata or {}).get(JOB_KEY):
        lines.append(f"  job name: {name} (MLflow run name; --resume {name} continues it)")
    lines.append(f"  started {_when(info.start_time)}" + (f", ended {_when(info.end_time)}" if info.end_time else ""))
    return lines


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def reason(message: str | None) -> str:
    """A job's message in one line; for a failed entrypoint, Ray's "last available logs (...):" gives
    way to the job's own last line, which says why (`error: data.path: ... not found`)."""
    head = first_line(message)
    if not LOGS_FOLLOW.search(head):
        return head
    logs = [line.strip() for line in (message or "").strip().splitlines()[1:] if line.strip()]
    return LOGS_FOLLOW.sub("", head) + (f": {logs[-1]}" if logs else "")


def first_line(text: str | None) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""
