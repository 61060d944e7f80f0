"""Evaluate ValidatingAdmissionPolicies on admission requests, offline, with cel-python.

Run by tests/k8s_admission.py with the interpreter of the venv that holds cel-python (it is not a
project dependency): JSON on stdin {"policies": [...], "requests": [...]}, JSON on stdout, one
{"policy": {"denied": [messages]}} per request, for the policies that match it. It follows the
API server's steps: matchConstraints, then matchConditions, then variables (in order, each seeing
the ones before), then validations; an expression that fails to evaluate denies (failurePolicy
Fail). `authorizer` is a stand-in whose checks answer the request's "privileged" flag.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from typing import Any

import celpy
from celpy import celtypes

ENV = celpy.Environment()


def _chain(target: Any, *_: Any) -> Any:
    return target


def _allowed(target: Any) -> celtypes.BoolType:
    return celtypes.BoolType(bool(target[celtypes.StringType("privileged")]))


FUNCTIONS = {"group": _chain, "resource": _chain, "namespace": _chain, "check": _chain, "allowed": _allowed}


@lru_cache(maxsize=None)
def program(expression: str) -> Any:
    return ENV.program(ENV.compile(expression), functions=FUNCTIONS)


def evaluate(expression: str, activation: dict[str, Any]) -> Any:
    """The expression's value, or an Exception instance when it does not evaluate."""
    try:
        result = program(expression).evaluate(activation)
    except Exception as exc:  # a compile or evaluation error: the API server denies
        return exc
    return result


def matches(policy: dict[str, Any], request: dict[str, Any]) -> bool:
    for rule in policy["spec"]["matchConstraints"]["resourceRules"]:
        if (request["group"] in rule["apiGroups"] and request["resource"] in rule["resources"]
                and request["operation"] in rule["operations"]):
            return True
    return False


def admit(policy: dict[str, Any], request: dict[str, Any]) -> list[str] | None:
    """None when the policy does not apply, else the messages of the failed validations."""
    if not matches(policy, request):
        return None
    spec = policy["spec"]
    activation: dict[str, Any] = {
        "object": celpy.json_to_cel(request.get("object")),
        "oldObject": celpy.json_to_cel(request.get("oldObject")),
        "request": celpy.json_to_cel({"operation": request["operation"], "namespace": request["namespace"],
                                      "userInfo": {"username": request["username"]}}),
        "authorizer": celpy.json_to_cel({"privileged": request.get("privileged", False)}),
    }
    for condition in spec.get("matchConditions", []):
        value = evaluate(condition["expression"], activation)
        if isinstance(value, Exception):
            return [f"matchCondition {condition['name']}: {value}"]
        if not value:
            return None
    variables = celtypes.MapType({})
    activation["variables"] = variables
    for variable in spec.get("variables", []):
        value = evaluate(variable["expression"], activation)
        if not isinstance(value, Exception):
            variables[celtypes.StringType(variable["name"])] = value
    denied = []
    for validation in spec["validations"]:
        value = evaluate(validation["expression"], activation)
        if not (isinstance(value, celtypes.BoolType) and bool(value)):
            detail = "" if isinstance(value, celtypes.BoolType) else f" (evaluation error: {value!r})"
            denied.append(validation["message"] + detail)
    return denied


def main() -> None:
    data = json.load(sys.stdin)
    results = []
    for request in data["requests"]:
        outcome = {}
        for policy in data["policies"]:
            messages = admit(policy, request)
            if messages is not None:
                outcome[policy["metadata"]["name"]] = messages
        results.append(outcome)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
