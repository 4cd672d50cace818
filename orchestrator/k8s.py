"""KubeRay RayJob manifests for a sweep spec (`ditsweep render-k8s SPEC`).

docker/kuberay/rayjob.yaml is the template: the renderer loads it and replaces only the job's name,
its entrypoint and the image, so the file and the rendered manifests cannot drift apart. Rendering
that file's own spec with that file's image and storage gives the file back, which a test checks.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

RAYJOB_TEMPLATE = Path(__file__).resolve().parents[1] / "docker" / "kuberay" / "rayjob.yaml"

# KubeRay names a RayJob's cluster "<job name>-<5 characters>" and so rejects RayJob names longer
# than 47 characters (53 for a RayCluster, less the suffix); both must be DNS-1035 labels.
MAX_RAYJOB_NAME_LENGTH = 47
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_NAME_PREFIX = "ditsweep-"


def rayjob_name(spec_path: str) -> str:
    """The RayJob name for a spec file: `ditsweep-` plus its stem, made a DNS-1035 label.

    `search_spaces/paper/placement_xs.yaml` -> `ditsweep-placement-xs`. A stem too long for
    KubeRay is cut and ends in six hex digits of its hash, so two long stems stay apart.
    """
    stem = re.sub(r"[^a-z0-9]+", "-", Path(spec_path).stem.lower()).strip("-")
    name = _NAME_PREFIX + stem if stem else _NAME_PREFIX.rstrip("-")
    if len(name) <= MAX_RAYJOB_NAME_LENGTH:
        return name
    digest = hashlib.sha256(stem.encode()).hexdigest()[:6]
    return name[: MAX_RAYJOB_NAME_LENGTH - len(digest) - 1].rstrip("-") + "-" + digest


def render_rayjob(
    spec_path: str,
    *,
    image: str,
    storage: str,
    name: str | None = None,
    namespace: str | None = None,
    template: Path = RAYJOB_TEMPLATE,
) -> dict[str, Any]:
    """A RayJob manifest that runs `ditsweep launch spec_path --storage storage --address auto`.

    spec_path is resolved inside the head pod, relative to the image's working directory
    (/home/ray/ditsweep, which holds search_spaces/), so name specs as in the repository.
    image replaces the image of every Ray and submitter container; storage is the shared Ray Tune
    storage every pod can reach (s3://bucket/prefix). name defaults to rayjob_name(spec_path).
    """
    if not storage:
        raise ValueError("storage is empty: pass the shared results URI, e.g. s3://ditsweep/results")
    job_name = rayjob_name(spec_path) if name is None else name
    _check_rayjob_name(job_name)
    manifest = _load_template(template)
    manifest["metadata"]["name"] = job_name
    if namespace is not None:
        manifest["metadata"]["namespace"] = namespace
    job = manifest["spec"]
    job["entrypoint"] = shlex.join(
        ["ditsweep", "launch", spec_path, "--storage", storage, "--address", "auto"]
    )
    for pod_template in _pod_templates(job):
        for container in pod_template["spec"]["containers"]:
            container["image"] = image
    return manifest


def _pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The submitter, head and worker pod templates of a RayJob spec."""
    cluster = job["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in job:
        templates.append(job["submitterPodTemplate"])
    return templates


def _check_rayjob_name(name: str) -> None:
    if len(name) > MAX_RAYJOB_NAME_LENGTH or not _DNS_1035_LABEL.fullmatch(name):
        raise ValueError(
            f"RayJob name {name!r} is not accepted by KubeRay: use at most "
            f"{MAX_RAYJOB_NAME_LENGTH} lowercase letters, digits and '-', starting with a letter "
            f"and ending with a letter or digit (e.g. {rayjob_name(name)!r})"
        )


def _load_template(template: Path) -> dict[str, Any]:
    if not template.is_file():
        raise FileNotFoundError(
            f"RayJob template {template} not found: render_rayjob reads "
            "docker/kuberay/rayjob.yaml from a ditsweep source checkout; pass template= to use "
            "another RayJob file"
        )
    manifest = yaml.safe_load(template.read_text())
    if not isinstance(manifest, dict) or manifest.get("kind") != "RayJob":
        raise ValueError(f"{template} is not a single RayJob manifest")
    return manifest
