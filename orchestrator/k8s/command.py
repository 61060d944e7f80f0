"""`orchestrator k8s render`: the manifests of one job as a multi-document YAML stream."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import JobConfig, check_tracking_uri, load_config
from orchestrator.errors import UserError, given
from orchestrator.files import distinct_outputs, read_json, write_text
from orchestrator.k8s.names import CONFIG_DIR, CONFIG_FILE, MLFLOW_SECRET, SPILL_DIR, default_image, resource_name
from orchestrator.k8s.render import (
    render_cluster_network_policy,
    render_job_configmap,
    render_job_network_policy,
    render_raycluster,
    render_rayjob,
)
from orchestrator.k8s.sizing import WorkerGroup, plan_placement, predicted_seconds, worker_group
from orchestrator.redact import AMBIGUOUS_AT, REDACTED, redact_uri, userinfo

# The user names the admission policy accepts as a RayJob's owner (a path component on the
# shared volume): deploy/k8s/base/admission/rayjobs.yaml checks the same pattern.
OWNER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]*")
WHOAMI = "kubectl auth whoami -o jsonpath='{.status.userInfo.username}'"
OWNER_MAX = 253  # the owner is one directory name on the shared volume (filesystems allow 255 bytes)
# A container image reference: [registry[:port]/]path[:tag][@sha256:digest] (the distribution
# project's reference grammar, lower-case path components).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"  # a host name's part: no '-' at its ends
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_TAG_AND_DIGEST = r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
IMAGE_PATTERN = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*{_TAG_AND_DIGEST}")
_TAG_OR_DIGEST = re.compile(rf"{_TAG_AND_DIGEST}$")
MAX_IMAGE_NAME = 255
# `kubectl apply` keeps each object whole in its last-applied-configuration annotation, and the API
# server holds an object's annotations to 256 KiB (kubectl's own annotation is counted with the rest).
MAX_APPLIED_BYTES = 256 * 1024 - 4096


@dataclass(frozen=True, slots=True)
class Rendered:
    """What the command prints: `text` on stdout, each of `notes` on stderr."""

    text: str
    notes: list[str] = field(default_factory=list)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML, the job config) as readable `|` blocks, and no
    anchors: each object reads (and kubectl applies it) on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_manifests(objs: list[dict[str, Any]], notes: list[str] | None = None) -> str:
    """Objects as one multi-document YAML stream for `kubectl apply -f`, the notes on top as comments.
    Each line of a note is commented: a note echoes config values (resources.cluster, spill_dir),
    and a line break in one would start YAML of the config's choosing, an object kubectl applies."""
    header = "".join(f"# {line}\n" for note in notes or [] for line in note.splitlines() or [""])
    return header + "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=4096) for o in objs)


def load_plan(path: str | Path) -> dict[str, Any]:
    raw = read_json(path, "plan")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        if "version" in raw:  # a hand-written plan may leave it out; another version reads otherwise
            from orchestrator.planner import PLAN_VERSION
            from orchestrator.planner.types import check_version

            check_version(raw["version"], "plan", "plan", PLAN_VERSION)
        plan_placement(raw)
        predicted_seconds(raw)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return raw


def default_owner(notes: list[str]) -> str:
    """Without --owner, this machine's login name, said in a note: the cluster admits the RayJob only
    when it is the Kubernetes user who creates it, so a wrong guess is refused there, not run."""
    import getpass

    try:
        login = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name known (a container's bare uid)
        login = ""
    if not (OWNER_PATTERN.fullmatch(login) and ".." not in login and len(login) <= OWNER_MAX):
        raise UserError(f"--owner: required for a RayJob: your Kubernetes user name, e.g. --owner \"$({WHOAMI})\" "
                        f"(the cluster admits RayJobs annotated with the user who creates them)")
    notes.append(f"no --owner: rendered for {login!r}, this machine's login name; the cluster admits the RayJob only "
                 f"if that is your Kubernetes user name (--owner \"$({WHOAMI})\")")
    return login


def check_owner(owner: str) -> str:
    if not OWNER_PATTERN.fullmatch(owner) or ".." in owner:
        raise UserError(f"--owner: {owner!r} is not a user name the cluster accepts "
                        f"(letters, digits and . _ @ : - only, starting with a letter or digit)")
    if len(owner) > OWNER_MAX:
        raise UserError(f"--owner: {len(owner)} characters is too long (at most {OWNER_MAX}: it names the job's "
                        "folder on the shared volume)")
    return owner


def check_image(image: str) -> str:
    if not IMAGE_PATTERN.fullmatch(image):
        raise UserError(f"--image: {image!r} is not a container image reference (like registry.example.com/team/name:tag or name@sha256:digest)")
    name = _TAG_OR_DIGEST.sub("", image)
    if len(name) > MAX_IMAGE_NAME:  # the reference grammar's NameTotalLengthMax: registries refuse longer
        raise UserError(f"--image: the name {name[:40]}... is {len(name):,} characters; at most {MAX_IMAGE_NAME}")
    tag = image[len(name):].partition("@")[0].removeprefix(":")
    if "@" not in image and tag in ("", "latest"):
        # Pods pull IfNotPresent: a moving tag runs whatever each node pulled first, mixed in one job.
        raise UserError(f"--image: {image!r} is not pinned; give a version tag (name:1.2) or a digest "
                        "(name@sha256:...), not :latest or no tag")
    return image


def render_notes(config: JobConfig, group: WorkerGroup, *, plan_path: str | None, image: str | None,
                 mlflow_uri: str | None, cluster: bool = False) -> list[str]:
    """What the manifests assume without being told, and what was left out of them. A RayCluster
    (`cluster`) holds no job config: nothing of its spill_dir or storage URIs is changed there."""
    notes = []
    if plan_path is None:
        notes.append(f"no --plan: {group}, from resources.workers ({config.resources.workers}); "
                     f"`orchestrator plan` sizes the job from its profile")
    if image is None:
        notes.append(f"no --image: {default_image(gpu=group.gpu)} must be built from deploy/docker/Dockerfile "
                     f"and pushed where the cluster pulls from (docs/kubernetes.md, step 2)")
    for where, uri in (("--mlflow-uri", mlflow_uri), ("tracking.tracking_uri", config.tracking.tracking_uri)):
        if uri and userinfo(uri):
            notes.append(f"{where}: credentials removed; jobs sign in to MLflow with Secret {MLFLOW_SECRET}")
    if cluster:
        return notes
    storage = [("data.path", p) for p in config.data.paths]
    storage.append(("checkpoint.storage_path", config.checkpoint.storage_path))
    if config.resources.cluster is not None:
        notes.append(f"resources.cluster: {config.resources.cluster} is a file of this machine, not of the pods; the "
                     "job's re-planning uses the cluster it runs on, its network probed there")
    if config.tracking.spill_dir is not None:
        notes.append(f"tracking.spill_dir: the job spills to {SPILL_DIR} on its storage, not "
                     f"{config.tracking.spill_dir} (the pods' own disk is read-only or gone with them)")
    for where in dict.fromkeys(where for where, uri in storage if "://" in uri and userinfo(uri)):
        notes.append(f"{where}: credentials removed (a ConfigMap is readable by the namespace); the pods reach "
                     "that storage with their own, e.g. a service account or the image's environment")
    return notes


def check_applicable(config_map: dict[str, Any], config_path: str) -> None:
    """Past MAX_APPLIED_BYTES `kubectl apply -f` refuses the ConfigMap but creates the RayJob beside
    it, which then runs without its config: a one-line error here instead."""
    size = len(json.dumps(config_map, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_APPLIED_BYTES:
        raise UserError(f"{config_path}: the job's config is {size:,} bytes in its ConfigMap; `kubectl apply` "
                        f"takes at most {MAX_APPLIED_BYTES:,} (list folders in data.path rather than their files)")


def check_renderable(mlflow_uri: str | None) -> None:
    """The manifests take `redact_uri(mlflow_uri)` as the job's MLflow: one it can only mask (`:2024/`
    read as a port and path, or as the start of a password, up to an '@'; `user:p@ss/w0rd@host`)
    would send the job to the host after the '@'. A one-line UserError, the URI not shown (it may
    hold a password)."""
    if mlflow_uri and any(c.isspace() for c in mlflow_uri):  # the admission policy admits no spaced runtimeEnvYAML
        raise UserError("--mlflow-uri: holds a space; percent-encode it (%20), as the cluster admits the job's "
                        "MLFLOW_TRACKING_URI as one word only (deploy/k8s/base/admission/rayjobs.yaml)")
    if mlflow_uri and REDACTED in redact_uri(mlflow_uri) and REDACTED not in mlflow_uri:
        raise UserError(f"--mlflow-uri: {AMBIGUOUS_AT} (through Secret {MLFLOW_SECRET})")


def k8s_render_command(config_path: str, *, plan_path: str | None, image: str | None, output: str | None,
                       cluster: bool, overrides: list[str], owner: str | None = None,
                       mlflow_uri: str | None = None) -> Rendered:
    """Without `cluster`: the job's ConfigMap, NetworkPolicy and RayJob, owned by `owner`; with it,
    a RayCluster and its NetworkPolicy. `image` None picks the -cuda or -cpu tag of IMAGE by
    whether the workers get GPUs. With `output`, the YAML goes there and the text says so."""
    if image is not None:
        check_image(image)
    given(mlflow_uri, "--mlflow-uri", "leave it out for the in-cluster MLflow or give http://HOST:PORT")
    distinct_outputs({"-o": output}, {"the config": config_path, "--plan": plan_path})  # -o CONFIG replaced the config
    check_tracking_uri(mlflow_uri, "--mlflow-uri")
    check_renderable(mlflow_uri)
    config = load_config(config_path, overrides)
    plan = load_plan(plan_path) if plan_path else None
    group = worker_group(config, plan)
    notes = render_notes(config, group, plan_path=plan_path, image=image, mlflow_uri=mlflow_uri, cluster=cluster)
    chosen = image or default_image(gpu=group.gpu)
    name = resource_name(config.name)
    if cluster:
        objs = [render_raycluster(config, plan=plan, image=chosen, mlflow_uri=mlflow_uri),
                render_cluster_network_policy(name)]
    else:
        owner = check_owner(owner) if owner is not None else default_owner(notes)
        config_map = render_job_configmap(config, owner=owner, mlflow_uri=mlflow_uri)
        check_applicable(config_map, config_path)
        digest = hashlib.sha256(config_map["data"][CONFIG_FILE].encode()).hexdigest()
        objs = [config_map, render_job_network_policy(name, owner=owner),
                render_rayjob(config, owner=owner, config_path=f"{CONFIG_DIR}/{CONFIG_FILE}", plan=plan,
                              image=chosen, mlflow_uri=mlflow_uri, config_sha256=digest)]
    text = dump_manifests(objs, notes)
    if output is None:
        return Rendered(text, notes)
    write_text(output, text)
    names = ", ".join(f"{o['kind']} {o['metadata']['name']}" for o in objs)
    return Rendered(f"wrote {names} ({group}) to {output}", notes)
