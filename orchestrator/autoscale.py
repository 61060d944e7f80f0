"""Ask the Ray autoscaler for a job's workers before it starts, and give them back after.

`ray.autoscaler.sdk.request_resources` is a standing, cluster-wide hint: the autoscaler keeps enough
nodes for the requested bundles until the next call replaces the request. The driver asks for one
bundle per planned worker, waits (with a progress line) until that many workers fit or the timeout
passes, and withdraws the request when the job ends, success or not, so the autoscaler can scale
down. On KubeRay this is what makes GPU worker pods appear.

Ray keeps one request per cluster, and since Ray 2.5x Ray Data and Ray Train each go through a
shared `AutoscalingCoordinator` actor that merges its requesters' bundles and re-sends the merged
request every few seconds, replacing any request made beside it. So the request is registered with
that coordinator under the job's own requester id (low priority, so its reservations never starve
Ray Train's), with an expiry that cleans up after a driver that dies; where the coordinator does not
exist (another Ray version) `request_resources` is called directly.

Only a cluster whose autoscaler can add nodes is asked (`resources.autoscale: auto`); an embedded
Ray or a static cluster (no autoscaler, or a read-only one that only mirrors the nodes it has) is
left alone.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import ray

from orchestrator import constants
from orchestrator.cluster import worker_slots

log = logging.getLogger(__name__)

# Keys the v1 autoscaler (monitor.py) uses in the GCS key-value store.
_STATUS_KEY = b"__autoscaling_status"
_REQUEST_KEY = b"autoscaler_resource_request"
# A read-only autoscaler (a cluster started without an autoscaling config) names each node type
# after the node it mirrors; it can add nothing.
_READONLY_TYPE = re.compile(r"^node_[0-9a-f]{56}$")


def autoscaler_present() -> bool:
    """Whether the connected cluster runs an autoscaler that can add nodes."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    try:
        if is_autoscaler_v2(fetch_from_server=True):
            return True  # v2 runs only where KubeRay (or a cluster launcher) manages nodes
    except Exception:  # an older GCS without the key: fall through to v1
        log.debug("autoscaler v2 flag unreadable", exc_info=True)
    # The v1 monitor publishes a status; its autoscaler report (node types) follows once the
    # autoscaler has load metrics, a few seconds after the head starts. No status: no monitor.
    deadline = time.monotonic() + constants.AUTOSCALE_DETECT_S
    while (status := _kv_get(_STATUS_KEY)) is not None:
        report = json.loads(status).get("autoscaler_report")
        if report:
            types = set(report.get("active_nodes") or {}) | set((report.get("node_type_mapping") or {}).values())
            return any(not _READONLY_TYPE.match(t) for t in types)
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return False


def worker_bundles(workers: int, *, use_gpu: bool, cpus_per_worker: float) -> list[dict[str, float]]:
    """One resource bundle per training worker, as Ray Train will ask for them."""
    bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return [dict(bundle) for _ in range(workers)]


def request(requester: str, bundles: list[dict[str, float]], *, ttl_s: float) -> None:
    """Ask for `bundles` on behalf of `requester` (one job) until `release` or `ttl_s` passes."""
    coordinator = _coordinator()
    if coordinator is None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
        return
    from ray.data._internal.cluster_autoscaler.base_autoscaling_coordinator import ResourceRequestPriority

    ray.get(coordinator.request_resources.remote(requester_id=requester, resources=bundles, expire_after_s=ttl_s,
                                                 priority=ResourceRequestPriority.LOW))


def release(requester: str) -> None:
    """Withdraw `requester`'s request; the autoscaler may then scale down what it added for it."""
    coordinator = _coordinator()
    if coordinator is None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
        return
    ray.get(coordinator.cancel_request.remote(requester_id=requester))


def refresh_cluster_view() -> None:
    """Make the coordinator re-read the cluster's nodes now rather than at its next tick (up to 20 s
    away). Ray Train's elastic policy sizes a group on the coordinator's view: after a node is
    lost, a stale view makes it try the old worker count and wait out the worker-group start
    timeout (60 s) before shrinking; before a start, a node that arrived since the last tick is
    not counted. An optimisation: on failure, the coordinator's next tick does it anyway."""
    try:
        coordinator = _coordinator()
        if coordinator is not None:
            ray.get(coordinator.get_reserved_resources.remote("orchestrator-refresh", recompute=True), timeout=30)
    except Exception:  # noqa: BLE001 - see the docstring
        log.warning("could not refresh the autoscaling coordinator's view of the cluster", exc_info=True)


def _coordinator() -> Any:
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return None
    return get_or_create_autoscaling_coordinator()


def pending_request() -> list[dict[str, float]]:
    """The bundles the autoscaler is currently asked to keep, all requesters merged."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray.autoscaler.v2.sdk import get_cluster_status

        demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
        return [dict(b.bundle) for d in demands.cluster_constraint_demand for b in d.bundles_by_count
                for _ in range(b.count)]
    raw = _kv_get(_REQUEST_KEY)
    return json.loads(raw) if raw else []


def slots_available(*, use_gpu: bool, cpus_per_worker: float) -> int:
    return worker_slots(ray.nodes(), use_gpu=use_gpu, cpus_per_worker=cpus_per_worker)


def _kv_get(key: bytes) -> bytes | None:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key)
