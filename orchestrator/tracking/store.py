"""The only module that talks to MLflow: bounded requests to one tracking store.

For a tracking server (http, https) every request is ONE attempt of at most
``TRACKING_REQUEST_TIMEOUT_S``, artifact uploads through the server's proxy included: MLflow's own
client retries for minutes (7 retries, 120 s each), which is what let an outage stop training. The
caller (the tracker's sender thread, or ``tracking replay``) retries on its own schedule. A local
store (sqlite, a folder) is used as MLflow opens it. Imported only off the caller's thread: MLflow
takes seconds to import.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow.entities import ExperimentTag, Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.proto_json_utils import parse_dict
from mlflow.utils.rest_utils import MlflowHostCreds, http_request, verify_rest_response

from orchestrator.config import sqlite_create_problem, sqlite_path, tracking_uri_problem
from orchestrator.errors import UserError
from orchestrator.redact import tracking_credentials
from orchestrator.tracking.ops import (
    BATCH_LIMIT, HANDLE_TAG, OPENED_TAG, RUN_KEY_TAG, ResolvedRun, floor_and_cut, later_driver,
)

PARAMS_PER_REQUEST = 100  # MLflow's log_batch limit for params and for tags
# HTTP statuses of a request the store understood and refused (a bad value, no such run): sending
# it again cannot succeed. Anything else (no answer, 5xx, 429, auth) may pass later.
REFUSED = (400, 404, 409)
# Statuses a proxy in front of the server answers a request too large for it with (nginx's default
# body limit is 1 MiB): MLflow's client reads them as 500, which would be retried for good and
# stall every later operation behind it. Refusals: sending it again cannot succeed.
TOO_LARGE = {413: "payload too large", 414: "URI too long", 431: "request header fields too large"}


def is_refusal(exc: BaseException) -> bool:
    return isinstance(exc, MlflowException) and exc.get_http_status_code() in REFUSED


def verified(response: Any, endpoint: str) -> Any:
    """`verify_rest_response`, with a too-large answer made the refusal it is (HTTP 400 to `is_refusal`)."""
    if (why := TOO_LARGE.get(response.status_code)) is not None:
        raise MlflowException(f"{endpoint}: HTTP {response.status_code} ({why}) from the server or a proxy before "
                              "it; raise its request size limit", error_code=INVALID_PARAMETER_VALUE)
    return verify_rest_response(response, endpoint)


class BoundedRestStore(RestStore):
    """MLflow's REST store, each request one attempt bounded by `timeout_s`."""

    def __init__(self, tracking_uri: str, timeout_s: float) -> None:
        super().__init__(partial(get_default_host_creds, tracking_uri))
        self.timeout_s = timeout_s

    def _call_endpoint(self, api: Any, json_body: str | None = None, endpoint: str | None = None,
                       retry_timeout_seconds: float | None = None, response_proto: Any = None) -> Any:
        default_endpoint, method = self._METHOD_TO_INFO[api]
        endpoint = endpoint or default_endpoint
        body = json.loads(json_body) if json_body is not None else None
        payload = {"params": body} if method == "GET" else {"json": body}
        response = http_request(self.get_host_creds(), endpoint, method, max_retries=0,
                                timeout=self.timeout_s, **payload)
        response = verified(response, endpoint)
        proto = response_proto or api.Response()
        if response.status_code != 204:
            parse_dict(js_dict=response.json(), message=proto)
        return proto


def _mlflow_store(tracking_uri: str, timeout_s: float) -> Any:
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return BoundedRestStore(tracking_uri, timeout_s)
    # Every store opens here (the tracker, a replay called from Python), not only through the
    # checked flags and config: MLflow would add its tables to any sqlite file (an application's own).
    problem = tracking_uri_problem(tracking_uri)
    if not problem and urlsplit(tracking_uri).scheme.split("+")[0] == "sqlite":  # checked where it opens, not
        problem = sqlite_create_problem(sqlite_path(tracking_uri))  # at validation: a config may name another machine's
    if problem:
        raise UserError(problem)
    from mlflow.tracking._tracking_service.utils import _get_store

    return _get_store(tracking_uri)


class Store:
    """The operations the tracker needs, on one tracking store."""

    def __init__(self, tracking_uri: str, *, timeout_s: float) -> None:
        self.tracking_uri = tracking_uri
        self.timeout_s = timeout_s
        self._mlflow = _mlflow_store(tracking_uri, timeout_s)
        self._repos: dict[str, Any] = {}  # artifact repository by artifact URI
        # Each run's artifact URI as the store answered, by run id. Never as a spill file or its
        # progress record says: those are untrusted, and an artifact URI they named (file:///home/u,
        # http://elsewhere) would have a replay write files anywhere or send credentials elsewhere.
        self._artifact_uris: dict[str, str] = {}

    def open_run(self, *, experiment: str, run_key: str, run_name: str, handle: str, floor_key: str,
                 start_ms: int, may_be_stale: bool = True) -> ResolvedRun:
        """Resume the run tagged with `run_key` (set RUNNING again), or create it. A handle opened
        before the run's latest driver (`later_driver`; a spill file's, not the running driver's:
        `may_be_stale`) leaves the run's status as it is."""
        experiment_id = self._experiment_id(experiment)
        found = self._mlflow.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                         ViewType.ACTIVE_ONLY, max_results=1)
        if not found:
            tags = [RunTag(RUN_KEY_TAG, run_key), RunTag(HANDLE_TAG, handle), RunTag(OPENED_TAG, str(start_ms))]
            run = self._mlflow.create_run(experiment_id, "unknown", start_ms, tags, run_name)
            self._artifact_uris[run.info.run_id] = run.info.artifact_uri
            return _resolved(run, resumed=False, floor_key=floor_key)
        run = found[0]
        run_id = run.info.run_id
        self._artifact_uris[run_id] = run.info.artifact_uri
        if run.data.tags.get(HANDLE_TAG) == handle:  # this handle's create, stored before it timed out
            return _resolved(run, resumed=False, floor_key=floor_key)
        if may_be_stale and later_driver(start_ms, tags=run.data.tags, start_ms=run.info.start_time,
                                         end_ms=run.info.end_time):
            history = [(m.step, m.timestamp) for m in self._mlflow.get_metric_history(run_id, floor_key)]
            floor, cut = floor_and_cut(history, start_ms)
            return replace(_resolved(run, resumed=True, floor_key=floor_key), floor=floor, cut=cut, stale=True)
        self._mlflow.update_run_info(run_id, RunStatus.RUNNING, run.info.end_time, None)
        self._mlflow.set_tag(run_id, RunTag(OPENED_TAG, str(start_ms)))
        return _resolved(run, resumed=True, floor_key=floor_key)

    def run_key(self, run_id: str) -> str | None:
        """The run-key tag of run `run_id`; None when the store has no such run, or it has none."""
        try:
            run = self._mlflow.get_run(run_id)
        except MlflowException as exc:
            if is_refusal(exc):
                return None
            raise
        self._artifact_uris[run_id] = run.info.artifact_uri
        return run.data.tags.get(RUN_KEY_TAG)

    def _experiment_id(self, name: str) -> str:
        existing = self._mlflow.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        try:
            return self._mlflow.create_experiment(
                name, _artifacts_beside_db(self.tracking_uri),
                # Open in the UI's "Model training" view (MLflow 3 defaults new experiments to GenAI).
                [ExperimentTag("mlflow.experimentKind", "custom_model_development")],
            )
        except MlflowException as exc:  # another job created it meanwhile
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            return self._mlflow.get_experiment_by_name(name).experiment_id

    def log_metrics(self, run_id: str, points: list[Any]) -> None:
        """Points as (key, value, timestamp_ms, step)."""
        metrics = [Metric(key, value, stamp, step) for key, value, stamp, step in points]
        for i in range(0, len(metrics), BATCH_LIMIT):
            self._mlflow.log_batch(run_id, metrics[i : i + BATCH_LIMIT], [], [])

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        for chunk in _chunks([Param(k, v) for k, v in params.items()]):
            self._mlflow.log_batch(run_id, [], chunk, [])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for chunk in _chunks([RunTag(k, v) for k, v in tags.items()]):
            self._mlflow.log_batch(run_id, [], [], chunk)

    def set_status(self, run_id: str, status: str, end_ms: int) -> None:
        self._mlflow.update_run_info(run_id, RunStatus.from_string(status), end_ms, None)

    def log_text(self, run: ResolvedRun, text: str, name: str) -> None:
        folder, file_name = posixpath.split(name)
        with tempfile.TemporaryDirectory(prefix="orch-artifact-") as tmp:
            local = Path(tmp) / file_name
            local.write_text(text)
            self.log_artifact(run, local, folder or None)

    def log_artifact(self, run: ResolvedRun, local: Path, artifact_path: str | None) -> None:
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        repo = self._repo(run)
        if isinstance(repo, HttpArtifactRepository):  # the server's artifact proxy: one bounded PUT
            self._put(repo.artifact_uri, local, artifact_path)
        else:  # a folder, or object storage the client writes itself (bounded by its own client)
            repo.log_artifact(str(local), artifact_path)

    def has_artifact(self, run: ResolvedRun, name: str) -> bool:
        """Whether the run has a file at artifact path `name`."""
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        folder, file_name = posixpath.split(name)
        repo = self._repo(run)
        if isinstance(repo, HttpArtifactRepository):  # the server's artifact proxy: one bounded GET
            files = self._list(repo.artifact_uri, folder)
        else:
            files = [(posixpath.basename(f.path), f.is_dir) for f in repo.list_artifacts(folder or None)]
        return (file_name, False) in files

    def _list(self, artifacts_url: str, folder: str) -> list[tuple[str, bool]]:
        endpoint = "/mlflow-artifacts/artifacts"
        url, tail = artifacts_url.split(endpoint, maxsplit=1)
        path = posixpath.join(tail.lstrip("/"), folder) if folder else tail.lstrip("/")
        response = http_request(self._host_creds(url), endpoint, "GET", params={"path": path},
                                max_retries=0, timeout=self.timeout_s)
        return [(posixpath.basename(f["path"]), bool(f["is_dir"]))
                for f in self._artifacts_verified(response, endpoint, url).json().get("files", [])]

    def _host_creds(self, url: str) -> MlflowHostCreds:
        """MLflow's credentials for the tracking server; none for another host. A run's artifact location
        is its experiment's, which anyone allowed to create experiments sets (an http URL, or
        mlflow-artifacts://host:port/...): MLflow's client would hand that host the token or password.
        The upload still goes there, as MLflow would send it."""
        creds = get_default_host_creds(url)
        if not artifacts_elsewhere(url, self.tracking_uri):
            return creds
        return MlflowHostCreds(url, ignore_tls_verification=creds.ignore_tls_verification,
                               server_cert_path=creds.server_cert_path)

    def _artifacts_verified(self, response: Any, endpoint: str, url: str) -> Any:
        """`verified`, saying why another host wants credentials. Not a refusal: the upload waits in the
        queue or spill file, for a replay once the experiment's artifact location is fixed."""
        if response.status_code in (401, 403) and artifacts_elsewhere(url, self.tracking_uri):
            scheme, host, port = _origin(url)
            raise MlflowException(f"{scheme}://{host}:{port}, the run's artifact location, answered HTTP "
                                  f"{response.status_code}: MLflow's credentials go to the tracking server only")
        return verified(response, endpoint)

    def _artifact_uri(self, run_id: str) -> str:
        """The run's artifact URI from the store (asked once per run), not the one a ResolvedRun
        read back from disk carries."""
        if (uri := self._artifact_uris.get(run_id)) is None:
            uri = self._artifact_uris[run_id] = self._mlflow.get_run(run_id).info.artifact_uri
        return uri

    def _repo(self, run: ResolvedRun) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        artifact_uri = self._artifact_uri(run.run_id)
        repo = self._repos.get(artifact_uri)
        if repo is None:
            repo = self._repos[artifact_uri] = get_artifact_repository(artifact_uri, tracking_uri=self.tracking_uri)
        return repo

    def _put(self, artifacts_url: str, local: Path, artifact_path: str | None) -> None:
        from mlflow.utils.mime_type_utils import _guess_mime_type

        endpoint = posixpath.join("/", *[p for p in (artifact_path, local.name) if p])
        with open(local, "rb") as data:
            response = http_request(self._host_creds(artifacts_url), endpoint, "PUT", data=data,
                                    extra_headers={"Content-Type": _guess_mime_type(local.name)},
                                    max_retries=0, timeout=self.timeout_s)
        self._artifacts_verified(response, endpoint, artifacts_url)

    def log_dataset(self, run_id: str, *, name: str, uri: str, rows: int, schema: Mapping[str, str]) -> None:
        """A dataset entry (MLflow's run inputs) for the Parquet data the job reads."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.types import ColSpec, Schema

        spec = Schema([ColSpec(type="string", name=f"{col}: {dtype}") for col, dtype in schema.items()])
        with warnings.catch_warnings():  # a local path matches two equivalent source types
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        entity = MetaDataset(source, name=name, schema=spec)._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", "training"), InputTag("rows", str(rows))]
        self._mlflow.log_inputs(run_id, datasets=[DatasetInput(entity, tags=tags)])


def _chunks(items: list[Any]) -> Iterable[list[Any]]:
    for i in range(0, len(items), PARAMS_PER_REQUEST):
        yield items[i : i + PARAMS_PER_REQUEST]


def credentials_set(tracking_uri: str) -> bool:
    """Whether MLflow's client has credentials to send, which it attaches to every HTTP artifact request
    whatever the host: the URI's userinfo, or what MLflow reads itself (its variables, and a user
    name and password in ~/.mlflow/credentials), an auth plugin or AWS signing included."""
    creds = get_default_host_creds(tracking_uri or "the default tracking URI")  # the host is only a label here
    return bool(tracking_credentials(tracking_uri)) or any(
        (creds.username, creds.password, creds.token, creds.client_cert_path, creds.auth, creds.aws_sigv4))


def artifacts_elsewhere(artifact_uri: str, tracking_uri: str) -> bool:
    """Whether a run's artifact location is reached over HTTP on a host other than the tracking
    server's, where MLflow's own client (`list_artifacts`, `download_artifacts`) would send the
    tracking credentials. `mlflow-artifacts:/...` is the tracking server's proxy and
    `mlflow-artifacts://host:port/...` that host; s3://, file: and the like get none of them."""
    parts = urlsplit(artifact_uri)
    scheme = parts.scheme.lower()
    if scheme == "mlflow-artifacts":
        if not parts.netloc:
            return False
        artifact_uri = f"{urlsplit(tracking_uri).scheme or 'http'}://{parts.netloc}"
    elif scheme not in ("http", "https"):
        return False
    try:
        return _origin(artifact_uri) != _origin(tracking_uri)
    except ValueError:  # no port number: no host to trust
        return True


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port, the port as the scheme implies when absent."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme)


def _resolved(run: Any, *, resumed: bool, floor_key: str) -> ResolvedRun:
    # The run's latest metrics carry the highest step logged for each key.
    last_steps = {m.key: m.step for m in run.data.to_proto().metrics}
    return ResolvedRun(
        run_id=run.info.run_id, experiment_id=run.info.experiment_id, artifact_uri=run.info.artifact_uri,
        resumed=resumed, floor=last_steps.get(floor_key) if resumed else None,
        params=dict(run.data.params), tags=dict(run.data.tags), last_steps=last_steps,
    )


def _artifacts_beside_db(tracking_uri: str) -> str | None:
    """A sqlite store keeps its artifacts in ./mlruns beside the database, wherever it runs from.

    MLflow's own default is ./mlruns of the current directory, which differs between a driver,
    a submitted job and `mlflow ui`; servers (http URIs) choose their own artifact root.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    return (db.parent / "mlruns").resolve().as_uri()
