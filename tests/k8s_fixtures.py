"""Module-scoped fixtures of the Kubernetes tests: import them into a test module to use them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import k8s_util
import pytest
import yaml

Obj = k8s_util.Obj
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "k8s-schemas"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


@pytest.fixture(scope="module")
def deploy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return k8s_util.deploy_copy(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def overlays(deploy_dir: Path) -> dict[str, list[Obj]]:
    return {name: k8s_util.build(deploy_dir / "overlays" / name) for name in k8s_util.OVERLAYS}


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    return k8s_util.render_variants(tmp_path_factory.mktemp("plans"))


@pytest.fixture(scope="module")
def manifests(overlays: dict[str, list[Obj]], variants: dict[str, list[Obj]]) -> dict[str, list[Obj]]:
    return {**{f"overlay-{k}": v for k, v in overlays.items()}, **variants}


def closed_schema(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever it declares properties."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: closed_schema(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        closed["additionalProperties"] = False
    return closed


def fits_in(bits: int) -> Callable[[Any], bool]:
    return lambda value: not isinstance(value, int) or -2**(bits - 1) <= value < 2**(bits - 1)


# The integer formats the CRDs declare (KubeRay's Go types), which the API server checks and
# jsonschema by itself does not: an activeDeadlineSeconds past int32 passed unseen.
INTEGER_FORMATS = jsonschema.FormatChecker(formats=())
INTEGER_FORMATS.checks("int32")(fits_in(32))
INTEGER_FORMATS.checks("int64")(fits_in(64))


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"{CRD_DIR} is absent (a clone without ../shared): KubeRay CRDs not checked")
    validators = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.safe_load((CRD_DIR / filename).read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = closed_schema(v1["schema"]["openAPIV3Schema"])
        validators[kind] = jsonschema.Draft202012Validator(schema, format_checker=INTEGER_FORMATS)
    return validators
