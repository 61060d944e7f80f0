"""Admission requests against the ValidatingAdmissionPolicies of deploy/k8s, evaluated offline.

The CEL rules run in cel-python (tests/cel_eval.py), installed once into its own venv under
.cache, like checkov: it is a test tool, not a dependency of the product.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import k8s_util

CEL_VERSION = "0.5.0"
EVALUATOR = Path(__file__).with_name("cel_eval.py")
RESOURCES = {"RayJob": ("ray.io", "rayjobs"), "ConfigMap": ("", "configmaps"),
             "NetworkPolicy": ("networking.k8s.io", "networkpolicies")}


@dataclass(frozen=True)
class Request:
    """One admission request: CREATE (object), UPDATE (object, old) or DELETE (old)."""

    operation: str
    object: dict[str, Any] | None = None
    old: dict[str, Any] | None = None
    username: str = "alice"
    privileged: bool = False  # whether the requester may read Secrets in the namespace
    namespace: str = "ray-training"

    def as_json(self) -> dict[str, Any]:
        kind = (self.object or self.old or {})["kind"]
        group, resource = RESOURCES[kind]
        return {"operation": self.operation, "object": self.object, "oldObject": self.old,
                "username": self.username, "privileged": self.privileged, "namespace": self.namespace,
                "group": group, "resource": resource}


def admit(policies: list[dict[str, Any]], requests: list[Request]) -> list[dict[str, list[str]]]:
    """For each request, {policy name: messages of the failed validations} of the policies that apply."""
    payload = json.dumps({"policies": policies, "requests": [r.as_json() for r in requests]})
    out = subprocess.run([str(k8s_util.tool_venv("cel-python", CEL_VERSION) / "python"), str(EVALUATOR)], input=payload, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def denials(outcome: dict[str, list[str]]) -> list[str]:
    return [message for messages in outcome.values() for message in messages]
