"""`orchestrator.ray_jobs.JobsClient` against stand-in dashboards on the loopback: the token goes
only to the address that was checked. No Ray is started."""

from __future__ import annotations

import contextlib
import errno
import http.server
import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator import constants
from orchestrator.errors import UserError
from orchestrator.ray_jobs import ADDRESS_OVERRIDES, JobsClient, auth_token, format_info, reason


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with 500 (no dashboard), keeping the path and the token it got."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.seen.append((self.path, self.headers.get("Authorization")))  # type: ignore[attr-defined]
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dashboards() -> Iterator[list[http.server.HTTPServer]]:
    servers = [http.server.HTTPServer(("127.0.0.1", 0), _Recorder) for _ in range(2)]
    for server in servers:
        server.seen = []  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("variable", ADDRESS_OVERRIDES)
def test_the_token_goes_only_to_the_checked_address(dashboards: list[http.server.HTTPServer], variable: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's client replaced the address it was given with RAY_ADDRESS / RAY_API_SERVER_ADDRESS:
    # `--address http://127.0.0.1:...` passed the plain-http check, and the token went to the other host.
    given, other = (f"http://127.0.0.1:{server.server_port}" for server in dashboards)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-token")
    monkeypatch.setenv(variable, other)
    with pytest.raises(UserError, match=rf"--address {given}: "):
        JobsClient(given)
    assert set(dashboards[0].seen) == {("/api/version", "Bearer the-token")}  # type: ignore[attr-defined]
    assert dashboards[1].seen == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_a_loopback_dashboard_is_reached_directly_not_through_a_proxy(
        dashboards: list[http.server.HTTPServer], variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # With HTTP_PROXY set (and no NO_PROXY), requests for http://127.0.0.1:8265 went to the proxy,
    # the token with them in plain http, to a host that cannot reach this machine's loopback.
    given, proxy = (f"http://127.0.0.1:{server.server_port}" for server in dashboards)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-token")
    monkeypatch.setenv(variable, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match=rf"--address {given}: "):
        JobsClient(given)
    assert dashboards[1].seen == []  # type: ignore[attr-defined]
    assert set(dashboards[0].seen) == {("/api/version", "Bearer the-token")}  # type: ignore[attr-defined]
    assert "no_proxy" not in os.environ and "NO_PROXY" not in os.environ  # restored


def test_a_port_that_is_no_dashboard_names_the_dashboard_port() -> None:
    # The GCS (port 6379) takes the connection and answers HTTP with nothing a client can read:
    # it was "the Ray dashboard stopped answering", of a dashboard that never answered.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def close_each() -> None:
            with contextlib.suppress(OSError):
                while True:
                    listener.accept()[0].close()

        threading.Thread(target=close_each, daemon=True).start()
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(UserError, match=rf"^--address {address}: no Ray dashboard answers there .*usually 8265"):
            JobsClient(address)


def test_a_port_that_never_answers_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # A port that takes the connection and never answers (a hung dashboard, another service): Ray's
    # version check has no timeout, and `jobs list` waited forever. The stand-in lets go after 60 s,
    # so without the probe's timeout this fails (Ray's client then sees the connection close).
    monkeypatch.setattr(constants, "RAY_CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        held: list[socket.socket] = []
        threading.Thread(target=lambda: [held.append(listener.accept()[0]) for _ in range(4)], daemon=True).start()
        let_go = threading.Timer(60, lambda: [c.close() for c in held])
        let_go.daemon = True
        let_go.start()
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(UserError, match=rf"^--address {address}: no Ray dashboard answered within 0.5 s"):
            JobsClient(address)
        let_go.cancel()
        for c in held:
            c.close()


@pytest.mark.parametrize("host", ["a..b", "x" * 64], ids=["empty part", "part past 63"])
def test_a_host_name_that_cannot_be_looked_up_is_one_line(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # socket refuses such a name with a UnicodeError (IDNA), not an OSError: it was a traceback
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    with pytest.raises(UserError, match=rf"^--address http://{host}:8265: '{host}' is not a host name \(a part "):
        JobsClient(f"http://{host}:8265")


class _FinishedJob:
    """The part of JobSubmissionClient that `follow` reads, for a job whose log is one line."""

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        return SimpleNamespace(status="SUCCEEDED", message="")

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        yield "line\n"


def test_a_closed_output_is_not_blamed_on_the_dashboard() -> None:
    # `jobs logs ID --follow | head -1` said "the Ray dashboard stopped answering (BrokenPipeError)",
    # exit 2; it now ends as typer ends any command whose stdout is closed (quiet, exit 1).
    client = object.__new__(JobsClient)
    client.address, client._token_source, client._answered = "http://127.0.0.1:8265", "no token", True
    client._client = _FinishedJob()

    def closed(text: str) -> None:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        client.follow("job-1", closed)


@pytest.mark.parametrize("where", ["RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"])
def test_a_token_file_that_is_not_text_is_one_line(where: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A key or certificate given by mistake was a UnicodeDecodeError traceback, exit 1.
    path = tmp_path / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_bytes(b"\x30\x82\x01\xff binary")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    if where == "RAY_AUTH_TOKEN_PATH":
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    else:
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    with pytest.raises(UserError, match=rf"{path} is not a text file; it should hold the cluster's token"):
        auth_token()


def test_an_empty_token_file_is_no_token_and_named_as_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("  \n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token() == (None, f"{tmp_path}/.ray/auth_token (an empty file)")


def test_a_failed_entrypoint_says_why_in_one_line() -> None:
    # Ray's message promises logs after a colon; its first line alone was the whole `jobs status`.
    message = ("Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
               "Running entrypoint for job j-1: exec sh orchestrator-entry.sh run digits.yaml\n"
               "error: data.path: data/digits not found\n\n")
    info = SimpleNamespace(submission_id="j-1", status="FAILED", message=message, metadata={}, start_time=None,
                           end_time=None)
    expected = "Job entrypoint command failed with exit code 2: error: data.path: data/digits not found"
    assert format_info(info)[1] == f"  {expected}"
    assert reason(message.splitlines()[0]) == "Job entrypoint command failed with exit code 2"
    assert reason("Job was intentionally stopped.\nmore") == "Job was intentionally stopped."


class _StoppedJob:
    def __init__(self, running: bool) -> None:
        self.running = running

    def stop_job(self, job_id: str) -> bool:
        return self.running

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        return SimpleNamespace(status="STOPPED", message="")


@pytest.mark.parametrize("running", [True, False])
def test_stopping_a_running_job_says_it_waits_for_the_final_checkpoint(running: bool,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # `jobs stop ID` was silent for the 17 s the job took to checkpoint and end.
    client = object.__new__(JobsClient)
    client.address, client._token_source, client._answered = "http://127.0.0.1:8265", "no token", True
    client._client = _StoppedJob(running)
    assert client.stop("job-1") == "STOPPED"
    said = capsys.readouterr().err
    from orchestrator import constants

    waits = f"job-1: asked to stop; waiting up to {constants.JOB_STOP_WAIT_S:g} s while it writes a final checkpoint\n"
    assert said == (waits if running else "")
