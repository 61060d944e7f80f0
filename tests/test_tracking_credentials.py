"""MLflow's credentials (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD) go to the tracking
server only. A run's artifact location is the experiment's, which anyone allowed to create experiments
sets: an http(s) URL or an `mlflow-artifacts://host:port/...` URI naming another host was sent the
artifact uploads and listings with the credentials attached. A stub tracking server and a stub other
host, both on 127.0.0.1, record the Authorization header each request carried."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from mlflow.exceptions import MlflowException

from orchestrator.tracking.ops import ResolvedRun
from orchestrator.tracking.store import Store, is_refusal

ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
Seen = list[tuple[str, str, str | None]]  # method, path, Authorization


@contextmanager
def _stub(answer: Callable[[str], dict], status: int = 200) -> Iterator[tuple[str, Seen]]:
    """An HTTP server on 127.0.0.1 answering every request with `status` and `answer(path)` as JSON."""
    seen: Seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            body = json.dumps(answer(self.path)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = _reply  # noqa: N815 - http.server's names

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _artifact_host(path: str) -> dict:
    return {"files": [{"path": "notes/a.txt", "is_dir": False}]} if path.startswith(f"{ARTIFACTS}?") else {}


@pytest.fixture(params=["token", "basic"])
def credentials(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The MLflow credentials set, as the Authorization header they make."""
    if request.param == "token":
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cret-token")
        return "Bearer s3cret-token"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    return "Basic " + base64.b64encode(b"ann:s3cret-pw").decode()


@contextmanager
def _tracking(artifact_uri: str) -> Iterator[tuple[Store, ResolvedRun, Seen]]:
    """A stub tracking server whose run r1 has `artifact_uri`, a Store on it, and the run."""
    run = {"info": {"run_id": "r1", "experiment_id": "1", "artifact_uri": artifact_uri}, "data": {}}
    with _stub(lambda path: {"run": run} if "/mlflow/runs/get" in path else _artifact_host(path)) as (uri, seen):
        yield Store(f"http://{uri}", timeout_s=5), ResolvedRun(
            run_id="r1", experiment_id="1", artifact_uri=artifact_uri, resumed=False, floor=None), seen


@pytest.mark.parametrize("location", [
    "mlflow-artifacts:/1/r1/artifacts",  # the tracking server's own proxy
    "http://{other}" + ARTIFACTS + "/1/r1/artifacts",
    "mlflow-artifacts://{other}/1/r1/artifacts",  # MLflow resolves it to http://{other}/...
])
def test_credentials_go_to_the_tracking_server_only(location: str, credentials: str) -> None:
    with _stub(_artifact_host) as (other, other_seen):
        with _tracking(location.format(other=other)) as (store, resolved, tracking_seen):
            store.log_text(resolved, "hello", "notes/a.txt")
            assert store.has_artifact(resolved, "notes/a.txt")
    own = location.startswith("mlflow-artifacts:/1")
    artifact_requests = (tracking_seen if own else other_seen)[-2:]
    assert [(method, path.split("?")[0]) for method, path, _ in artifact_requests] == [
        ("PUT", f"{ARTIFACTS}/1/r1/artifacts/notes/a.txt"), ("GET", ARTIFACTS)]
    assert [auth for _, _, auth in tracking_seen] == [credentials] * len(tracking_seen)
    assert [auth for _, _, auth in other_seen] == [None] * len(other_seen)
    assert len(other_seen) == (0 if own else 2)


def test_another_host_that_wants_credentials_says_so_and_the_upload_waits(credentials: str) -> None:
    with _stub(lambda path: {}, status=401) as (other, other_seen):
        with _tracking(f"http://{other}{ARTIFACTS}/1/r1/artifacts") as (store, resolved, _), \
                pytest.raises(MlflowException) as refused:
            store.log_text(resolved, "hello", "notes/a.txt")
    assert str(refused.value) == (f"http://{other}, the run's artifact location, answered HTTP 401: "
                                  "MLflow's credentials go to the tracking server only")
    assert not is_refusal(refused.value)  # kept, for a replay once the location is fixed
    assert [auth for _, _, auth in other_seen] == [None]
