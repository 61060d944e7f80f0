"""Module-scoped fixtures of the Kubernetes tests: import them into a test module to use them."""

from __future__ import annotations

from pathlib import Path

import k8s_util
import pytest

Obj = k8s_util.Obj


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
