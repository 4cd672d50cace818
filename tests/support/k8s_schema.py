"""Validating Kubernetes manifests offline, shared by the manifest and the render-k8s tests.

RayCluster/RayJob against the KubeRay CRDs in shared/kuberay-crds (beside or inside the repository)
with unknown fields made errors, their pod templates and the core kinds against the Kubernetes
schemas of the kubernetes-validate package, plus what the KubeRay operator checks beyond the CRDs.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from kubernetes_validate import utils as kubernetes_validate

from orchestrator.k8s import MAX_RAYJOB_NAME_LENGTH
from tests.support.ci import in_ci, missing

REPO = Path(__file__).resolve().parents[2]
# The oldest and the newest Kubernetes whose schemas the manifests must pass.
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]

DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_RAYCLUSTER_NAME_LENGTH = 53  # KubeRay: its longest Service suffix must still fit in 63


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod template of a workload manifest, by where it sits."""
    if doc["kind"] == "Deployment":
        return {"template": doc["spec"]["template"]}
    cluster = ray_cluster_spec(doc)
    templates = {"headGroupSpec.template": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        templates[f"workerGroupSpecs[{group['groupName']}].template"] = group["template"]
    if "submitterPodTemplate" in doc["spec"]:
        templates["submitterPodTemplate"] = doc["spec"]["submitterPodTemplate"]
    return templates


# Where the KubeRay CRDs are looked for, in order.
CRD_DIRS = [REPO / "shared" / "kuberay-crds", REPO.parent / "shared" / "kuberay-crds"]
CRDS_MISSING = "KubeRay CRDs not found in shared/kuberay-crds beside or inside the repository"


def crd_dir() -> Path | None:
    """The CRDs' folder; None where they are absent (a failure under CI=true)."""
    found = next((candidate for candidate in CRD_DIRS if candidate.is_dir()), None)
    if found is None and in_ci():
        missing(CRDS_MISSING)
    return found


def closed(schema: Any) -> Any:
    """The schema with unknown fields forbidden wherever the API server would prune them.

    CRD schemas are structural: the API server silently drops fields it does not know (unless
    x-kubernetes-preserve-unknown-fields), so a misspelt field would vanish instead of failing.
    Forbidding them here turns that silent drop into a test failure.
    """
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


_CRD_VALIDATORS: dict[str, jsonschema.protocols.Validator] = {}


def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """The CRD's schema, closed; a test that needs it skips where the CRDs are absent (fails in CI)."""
    if crd_dir() is None:
        missing(CRDS_MISSING)
    if kind not in _CRD_VALIDATORS:
        # libyaml's loader when present: the CRDs are 40,000 lines and the pure-Python one is slow.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load((crd_dir() / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
        (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
        # OpenAPI v3 schemas follow JSON Schema draft 4 (boolean exclusiveMinimum and the like).
        _CRD_VALIDATORS[kind] = jsonschema.Draft4Validator(closed(v1["schema"]["openAPIV3Schema"]))
    return _CRD_VALIDATORS[kind]


def validate_core(doc: dict[str, Any]) -> None:
    """Validate against the Kubernetes OpenAPI schemas, strict (unknown fields are errors)."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def validate_manifest(doc: dict[str, Any]) -> None:
    """Core kinds directly; Ray kinds against their CRD, and each of their pod templates against
    the core PodTemplateSpec schema (wrapped in a PodTemplate)."""
    if doc["apiVersion"] != "ray.io/v1":
        validate_core(doc)
        return
    if crd_dir() is not None:
        crd_validator(doc["kind"]).validate(doc)
    else:  # only this check is left out: the pod templates and whatever the test asserts next still run
        warnings.warn(f"{CRDS_MISSING}: {doc['kind']} not checked against its CRD", stacklevel=2)
    for where, template in pod_templates(doc).items():
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        try:
            validate_core(wrapper)
        except jsonschema.ValidationError as error:
            raise AssertionError(f"{where}: {error.message} at {list(error.absolute_path)}") from error


def check_kuberay_rules(doc: dict[str, Any]) -> None:
    """What the KubeRay operator rejects or assumes beyond the CRD schema."""
    name = doc["metadata"]["name"]
    limit = MAX_RAYJOB_NAME_LENGTH if doc["kind"] == "RayJob" else MAX_RAYCLUSTER_NAME_LENGTH
    assert len(name) <= limit and DNS_1035_LABEL.fullmatch(name), f"{doc['kind']} name {name!r}"
    cluster = ray_cluster_spec(doc)
    # KubeRay treats the first container of each Ray pod as the Ray container.
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["name"] == "ray-head"
    for group in cluster["workerGroupSpecs"]:
        assert group["template"]["spec"]["containers"][0]["name"] == "ray-worker"
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
