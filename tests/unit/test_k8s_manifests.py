"""deploy/k8s renders offline and every object is valid, hardened and consistent with itself and with triaged.

Each overlay is rendered by kubectl's kustomize and each object checked against the Kubernetes JSON schemas
(``kubernetes-validate``, strict: unknown fields fail) of the oldest and the newest version we claim; KEDA's
objects against the vendored subset of KEDA's CRD schema. The rest are the promises README "Kubernetes" makes:
non-root pods with read-only root filesystems, probes on /healthz and /readyz, one GPU per worker in the gpu
overlay, DICOM only from the configured CIDRs, and settings and arguments that triaged itself accepts.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from typer.testing import CliRunner

from tests.support import k8s
from tests.support.k8s import OVERLAYS, Obj, containers, find, pod_templates, render_overlay
from triaged.cli.app import app
from triaged.config import Settings, load_settings

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # oldest and newest we claim (README "Kubernetes")
PLACEHOLDER_CIDR = "192.0.2.0/24"  # base's documentation range; the site's list must replace it
DICOM_PORT = 11112
HTTP_PORT = 9110


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return str(request.param), render_overlay(str(request.param))


def _single_node(tmp_path: Path) -> list[Obj]:
    """The cpu overlay plus the single-node component, as a site would combine them."""
    root = k8s.K8S_DIR
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(root / 'overlays' / 'cpu', tmp_path)}]\n"
        f"components: [{os.path.relpath(root / 'components' / 'single-node', tmp_path)}]\n"
    )
    return k8s.render(tmp_path)


def _validate_kubernetes(objects: list[Obj]) -> None:
    for obj in objects:
        if obj["apiVersion"].startswith(k8s.KEDA_GROUP):
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {exc.message}")


def test_every_object_matches_the_kubernetes_schemas(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    kinds = {obj["kind"] for obj in objects}
    assert {"StatefulSet", "Deployment", "Job", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds, name
    assert {"ScaledObject", "TriggerAuthentication", "ConfigMap", "PersistentVolumeClaim", "Namespace"} <= kinds
    _validate_kubernetes(objects)
    assert {obj["metadata"].get("namespace", "triaged") for obj in objects} == {"triaged"}


def test_single_node_component_renders_valid_read_write_once(tmp_path: Path) -> None:
    objects = _single_node(tmp_path)
    _validate_kubernetes(objects)
    assert find(objects, "PersistentVolumeClaim", "triaged-storage")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert find(objects, "StatefulSet", "triaged-receiver")["spec"]["replicas"] == 1
    affinity = find(objects, "Deployment", "triaged-worker")["spec"]["template"]["spec"]["affinity"]
    (term,) = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    receiver = find(objects, "StatefulSet", "triaged-receiver")["spec"]["template"]["metadata"]["labels"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert k8s.selector_matches(term["labelSelector"], receiver)


def test_a_broken_manifest_fails_validation(overlay: tuple[str, list[Obj]]) -> None:
    """The check can fail: a misspelt field and a wrong type are refused (strict schemas)."""
    _, objects = overlay
    worker = find(objects, "Deployment", "triaged-worker")
    worker["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = worker["spec"]["template"]["spec"][
        "containers"
    ][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSIONS[-1], strict=True)
    scaled = find(objects, "ScaledObject", "triaged-worker")
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        _keda_validator().validate(scaled)


def _keda_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(k8s.KEDA_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_keda_scales_the_worker_deployment_on_the_postgresql_queue(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    validator = _keda_validator()
    keda = [obj for obj in objects if obj["apiVersion"].startswith(k8s.KEDA_GROUP)]
    for obj in keda:
        validator.validate(obj)
    scaled = find(objects, "ScaledObject", "triaged-worker")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "triaged-worker")
    find(objects, "Deployment", "triaged-worker")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert "FROM jobs" in trigger["metadata"]["query"]
    assert int(trigger["metadata"]["targetQueryValue"]) >= 1
    assert 0 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    auth = find(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert [ref["parameter"] for ref in auth["spec"]["secretTargetRef"]] == ["connection"]


def test_pods_run_as_non_root_on_read_only_root_filesystems(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    templates = list(pod_templates(objects))
    assert len(templates) == 3
    for workload, template in templates:
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = template["spec"]
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, where
        assert pod_security["runAsUser"] > 0, where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for item in containers(spec):
            security = item["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, (where, item["name"])
            assert security["allowPrivilegeEscalation"] is False, (where, item["name"])
            assert security["capabilities"]["drop"] == ["ALL"], (where, item["name"])
            mounts = {mount["mountPath"]: mount["name"] for mount in item["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], (where, item["name"], "/tmp must be an emptyDir")
            assert "memory" in item["resources"]["limits"], (where, item["name"])


def _http_get(probe: Obj) -> tuple[str, Any]:
    return probe["httpGet"]["path"], probe["httpGet"]["port"]


@pytest.mark.parametrize(
    ("kind", "name", "container_name"),
    [("StatefulSet", "triaged-receiver", "receiver"), ("Deployment", "triaged-worker", "worker")],
)
def test_probes_use_healthz_and_readyz(
    overlay: tuple[str, list[Obj]], kind: str, name: str, container_name: str
) -> None:
    _, objects = overlay
    item = k8s.container(objects, kind, name, container_name)
    ports = {port["name"]: port["containerPort"] for port in item["ports"]}
    assert ports["http"] == HTTP_PORT
    assert _http_get(item["livenessProbe"]) == ("/healthz", "http")
    assert _http_get(item["readinessProbe"]) == ("/readyz", "http")
    assert _http_get(item["startupProbe"]) == ("/healthz", "http")
    env = {var["name"]: var.get("value") for var in item["env"]}
    assert env["TRIAGED_HTTP__BIND_ADDRESS"] == "0.0.0.0"  # the kubelet probes the pod's IP, not loopback


def test_gpu_overlay_gives_each_worker_one_gpu_and_the_gpu_image() -> None:
    gpu = render_overlay("gpu")
    worker = k8s.container(gpu, "Deployment", "triaged-worker", "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["image"].endswith("-gpu")
    assert {var["name"]: var.get("value") for var in worker["env"]}["TRIAGED_MODEL__DEVICE"] == "cuda"
    tolerations = find(gpu, "Deployment", "triaged-worker")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    others = [
        item
        for workload, template in pod_templates(gpu)
        for item in containers(template["spec"])
        if (workload["metadata"]["name"], item["name"]) != ("triaged-worker", "worker")
    ]
    assert others and not any(item["image"].endswith("-gpu") for item in others)  # receivers stay on the CPU image
    assert not any(item["image"].endswith("-gpu") for item in containers_of(render_overlay("cpu")))
    assert "nvidia.com/gpu" not in json.dumps(render_overlay("cpu"))


def containers_of(objects: list[Obj]) -> list[Obj]:
    return [item for _, template in pod_templates(objects) for item in containers(template["spec"])]


def _site_cidrs() -> set[str]:
    site = (k8s.K8S_DIR / "site" / "dicom-sources.yaml").read_text()
    return {line.split("cidr:")[1].split("}")[0].strip() for line in site.splitlines() if "cidr:" in line}


def test_dicom_port_is_open_only_to_the_configured_cidrs(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    configured = _site_cidrs()
    assert configured and PLACEHOLDER_CIDR not in configured
    policy = find(objects, "NetworkPolicy", "triaged-receiver")
    receiver_labels = find(objects, "StatefulSet", "triaged-receiver")["spec"]["template"]["metadata"]["labels"]
    assert k8s.selector_matches(policy["spec"]["podSelector"], receiver_labels)
    assert "Ingress" in policy["spec"]["policyTypes"]
    dicom_sources: set[str] = set()
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and rule.get("ports"), f"rule {rule} opens every port or to everyone"
        if any(port["port"] == DICOM_PORT for port in rule["ports"]):
            assert all(set(peer) == {"ipBlock"} for peer in rule["from"]), rule
            dicom_sources |= {peer["ipBlock"]["cidr"] for peer in rule["from"]}
    assert dicom_sources == configured
    service = find(objects, "Service", "triaged-dicom")
    assert set(service["spec"]["loadBalancerSourceRanges"]) == configured
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # else the policy sees the node's address


def test_selectors_and_references_resolve(overlay: tuple[str, list[Obj]]) -> None:
    """Services, budgets and policies select pods that exist; volumes name claims and config maps that exist."""
    _, objects = overlay
    labels = [template["metadata"]["labels"] for _, template in pod_templates(objects)]
    for obj in objects:
        if obj["kind"] == "Service":
            selector = {"matchLabels": obj["spec"]["selector"]}
        elif obj["kind"] in {"PodDisruptionBudget"}:
            selector = obj["spec"]["selector"]
        elif obj["kind"] == "NetworkPolicy":
            selector = obj["spec"]["podSelector"]
        else:
            continue
        assert any(k8s.selector_matches(selector, pod) for pod in labels), f"{obj['kind']}/{obj['metadata']['name']}"
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    for workload, template in pod_templates(objects):
        for volume in template["spec"]["volumes"]:
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, workload["metadata"]["name"]
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
    statefulset = find(objects, "StatefulSet", "triaged-receiver")
    assert ("Service", statefulset["spec"]["serviceName"]) in names


def _setting_exists(env_name: str) -> bool:
    """``TRIAGED_WORKER__TORCH_THREADS`` names ``Settings.worker.torch_threads``."""
    model: Any = Settings
    for part in env_name.removeprefix("TRIAGED_").lower().split("__"):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        model = fields[part].annotation
    return True


def test_containers_give_triaged_settings_and_arguments_it_accepts(
    overlay: tuple[str, list[Obj]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, objects = overlay
    runner = CliRunner()
    for workload, template in pod_templates(objects):
        volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
        for item in containers(template["spec"]):
            where = (workload["metadata"]["name"], item["name"])
            env = {var["name"]: var.get("value", "postgresql+psycopg://u@db/triaged") for var in item["env"]}
            for name in env:
                assert not name.startswith("TRIAGED_") or name == "TRIAGED_CONFIG" or _setting_exists(name), where
            mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in item["volumeMounts"]}
            config_map = find(objects, "ConfigMap", mounts["/etc/triaged"]["configMap"]["name"])
            config = tmp_path / "config.toml"
            config.write_text(config_map["data"]["config.toml"])
            tomllib.loads(config.read_text())
            for name in [n for n in os.environ if n.startswith("TRIAGED_")]:
                monkeypatch.delenv(name)
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            monkeypatch.setenv("TRIAGED_CONFIG", str(config))
            settings = load_settings()
            assert settings.dicom.accept_unknown_peers is False, where
            assert settings.database_url.startswith("postgresql"), where
            result = runner.invoke(app, [*item["args"], "--help"])
            assert result.exit_code == 0, (where, item["args"], result.output)
