"""Ray Job submission and KubeRay manifests: `ditsweep submit` and `ditsweep render-k8s`.

A submitted job runs `ditsweep launch SPEC --address auto` as the sweep's driver inside the cluster,
with the spec (and, with `with_code`, the source) shipped as the job's working_dir.

Resources are checked before the job goes: a trial that one of the cluster's current nodes can hold
is submitted at once. Otherwise only the cluster knows whether its autoscaler can add a node that
holds it (node types live in the head's GCS, which the dashboard does not show), so the job is
submitted and `submit` waits, bounded, for the driver's own check (`launch` runs it before any MLflow
run exists): a refusal there is exit 2 here, with the driver's message (with `follow`, the streamed
logs show it and the FAILED job is exit 1). The job carries
no secrets: its entrypoint, runtime_env and metadata are readable by anyone who can list the
cluster's jobs, so S3 keys, MLflow credentials and database passwords must come from the cluster's
own environment (on Kubernetes, the Secrets of docker/kuberay/secrets.example.yaml).

Ray is imported lazily (only `ray.job_submission`): Ray Tune stays in orchestrator/sweep.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from orchestrator.display import ACCEPTED_LINE, first_line
from orchestrator.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from orchestrator.interrupt import interrupted_exit_code
from orchestrator.k8s import RAYJOB_TEMPLATE, render_rayjob
from orchestrator.resources import Cluster, ResourcesError, check_trial_fits, trial_request
from orchestrator.plan import check_storage_is_shared
from orchestrator.spec import SweepSpec, check_tag_value, expand, load_spec

SOURCE_ROOT = Path(__file__).resolve().parents[1]
# What --with-code ships: the two packages and the project file beside them.
SOURCE_ITEMS = ("trainer", "orchestrator", "pyproject.toml")
# `scheme://user:password@host`: a password inside a URI.
_URI_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
_POLL_S = 2.0
# How long `submit` waits for the driver's resource check when no current node holds a trial.
PREFLIGHT_WAIT_S = 180.0
END_OF_STREAM_WAIT_S = 60.0  # how long a job's status may lag its log stream's end


class ClusterError(ValueError):
    """The cluster cannot be reached or cannot be asked for this job; nothing was submitted."""


# ---------------------------------------------------------------------------------------------
# Ray Job submission


def submit(
    spec_path: str | Path,
    address: str,
    overrides: list[str],
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    with_code: bool = False,
    follow: bool = False,
) -> int:
    """Submit the launch of a spec as a Ray Job; with `follow`, stream its logs until it ends."""
    spec, trials = _validated(spec_path, overrides)
    _refuse_credentials({"--tracking-uri": tracking_uri, "--storage": storage,
                         **{f"--set {item.split('=', 1)[0]}": item for item in overrides}})
    check_tag_value("--storage", storage)
    check_tracking_reachable(tracking_uri, address, nodes=1)
    entrypoint = launch_entrypoint(Path(spec_path).name, overrides, storage, tracking_uri, with_code)
    env_vars = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    with tempfile.TemporaryDirectory(prefix="ditsweep-job-") as working_dir:
        stage_working_dir(spec_path, Path(working_dir), with_code)
        client = job_client(address)
        nodes = alive_nodes(address, follow)
        if nodes is not None:  # what the driver's `launch --address auto` would refuse, refused here
            check_storage_is_shared(storage, address, lambda _: len(nodes))
            check_tracking_reachable(tracking_uri, address, len(nodes))
        fits_now = nodes is not None and fits_a_current_node(spec, nodes, follow)
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": working_dir, "env_vars": env_vars},
                metadata={"ditsweep.spec": spec.name, "ditsweep.trials": str(len(trials))},
                # The driver needs a CPU slot but never a GPU: it must not hold a GPU worker's place.
                entrypoint_num_cpus=1,
                entrypoint_num_gpus=0,
            )
        except (OSError, RuntimeError) as err:
            raise ClusterError(f"the Ray cluster at {address!r} did not take the job: {first_line(err)}") from None
    print(f"submitted Ray job {job_id} to {address}: sweep {spec.name!r}, "
          f"{len(trials)} trial{'s' if len(trials) != 1 else ''}")
    print(f"  entrypoint: {entrypoint}")
    print(f"  logs:   ray job logs --follow --address {address} {job_id}   (or submit with --follow)")
    print(f"  status: ray job status --address {address} {job_id}")
    print(f"  stop:   ray job stop --address {address} {job_id}", flush=True)
    if follow:
        return follow_job(client, job_id, address)
    return EXIT_OK if fits_now else await_preflight(client, job_id, address)


def alive_nodes(address: str, follow: bool = False) -> list[dict[str, float]] | None:
    """The resources of each alive node of the cluster, asked through the dashboard's state API; None
    (the driver decides) when the dashboard does not say."""
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], limit=10_000, timeout=30,
                           raise_on_missing_output=False)
    except Exception as err:  # noqa: BLE001 - Ray raises its own exception types here
        print(f"the Ray dashboard at {address} did not list its nodes ({first_line(err)}); submitting, {_then(follow)}",
              file=sys.stderr, flush=True)
        return None
    return [{k: float(v) for k, v in dict(n.resources_total).items()} for n in nodes]


def _then(follow: bool) -> str:
    return ("its logs show the driver's check of what the cluster's autoscaler can add" if follow else
            f"then waiting up to {PREFLIGHT_WAIT_S:.0f} s for the driver to check what the cluster's autoscaler can add")


def fits_a_current_node(spec: SweepSpec, nodes: list[dict[str, float]], follow: bool = False) -> bool:
    """Can one of the cluster's alive nodes hold a trial? False (the driver decides) when none can."""
    try:
        return check_trial_fits(trial_request(spec.resources), Cluster(nodes=nodes)).when == "now"
    except ResourcesError:  # no current node; whether a node type could is the driver's call
        print(f"no current node of the cluster holds a trial ({_asked(spec)}); submitting, {_then(follow)}",
              file=sys.stderr, flush=True)
        return False


_LOOPBACK_HOSTS = ("localhost", "127.", "::1", "[::1]", "0.0.0.0")


def check_tracking_reachable(tracking_uri: str | None, address: str, nodes: int) -> None:
    """A tracking URI the job's driver can write to and the user read back. A relative sqlite path lands
    in the job's working directory (a copy Ray unpacks and discards); on a cluster of several nodes the
    driver may run on any of them, so a file or a loopback server names a different one each time."""
    if not tracking_uri:
        return
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        raise ClusterError(f"--tracking-uri {tracking_uri!r} is relative to the job's working directory, which Ray "
                           "unpacks for the job and discards; give an absolute path or a tracking server")
    host = urlsplit(tracking_uri).hostname or ""
    local = "://" not in tracking_uri or tracking_uri.startswith(("sqlite:", "file:")) or host.startswith(_LOOPBACK_HOSTS)
    if local and nodes > 1:
        raise ClusterError(f"--tracking-uri {tracking_uri!r} is local to one machine, but the Ray cluster at "
                           f"{address} has {nodes} nodes and the job's driver may run on any of them; give a "
                           "tracking server every node reaches, e.g. http://mlflow.NAMESPACE:5000")


def _asked(spec: SweepSpec) -> str:
    return f"resources.cpu={spec.resources.cpu:g}, resources.gpu={spec.resources.gpu:g}"


def await_preflight(client, job_id: str, address: str, wait_s: float = PREFLIGHT_WAIT_S) -> int:
    """The driver's verdict on resources: EXIT_BAD_INPUT (its message printed) when it refused the
    sweep, EXIT_OK once it accepted it (or after `wait_s` with no verdict yet, saying so)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        info, logs = _job_state(client, job_id, address, with_logs=True)
        accepted = ACCEPTED_LINE.search(logs)
        if accepted:
            waiting = [line for line in logs[accepted.end():].splitlines() if line.startswith("waiting for ")]
            print(f"job {job_id}: the driver accepted the sweep" + (f"; {waiting[0]}" if waiting else ""), flush=True)
            return EXIT_OK
        if info.status == "SUCCEEDED":  # e.g. every trial had FINISHED already
            print(f"job {job_id} SUCCEEDED", flush=True)
            return EXIT_OK
        if info.status.is_terminal():
            if info.driver_exit_code == EXIT_BAD_INPUT:
                lines = [line for line in logs.splitlines() if line.strip()][-5:]
                print(f"job {job_id} refused by its driver:", *lines, sep="\n  ", file=sys.stderr, flush=True)
                return EXIT_BAD_INPUT
            print(f"job {job_id} {info.status} before its sweep started (driver exit code "
                  f"{info.driver_exit_code}): ray job logs --address {address} {job_id}", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(_POLL_S)
    print(f"job {job_id}: no word from its driver in {wait_s:.0f} s (its environment may still be set up); "
          f"follow it: ray job logs --follow --address {address} {job_id}", file=sys.stderr, flush=True)
    return EXIT_OK


def _validated(spec_path: str | Path, overrides: list[str]) -> tuple[SweepSpec, list]:
    """The same checks `launch` starts with, here before anything reaches the cluster."""
    spec = load_spec(spec_path)
    return spec, expand(spec, overrides)


def _refuse_credentials(values: dict[str, str | None]) -> None:
    for option, value in values.items():
        if value and _URI_PASSWORD.search(value):
            raise ClusterError(
                f"{option} holds a password (user:password@...): a Ray Job's entrypoint and "
                "environment are readable by anyone who can list the cluster's jobs. Give the "
                "cluster the value in its own environment (on Kubernetes a Secret, see "
                "docker/kuberay/secrets.example.yaml) and leave the option out"
            )


def launch_entrypoint(
    spec_name: str, overrides: list[str], storage: str | None, tracking_uri: str | None, with_code: bool
) -> str:
    """`ditsweep launch ...` as the job's shell command, run in the job's working_dir.

    With shipped code it is `python -m orchestrator.cli`, so the shipped packages (found in the
    working directory) are the ones that run, not a ditsweep installed in the cluster's image.
    """
    command = ["python", "-m", "orchestrator.cli"] if with_code else ["ditsweep"]
    argv = [*command, "launch", spec_name, "--address", "auto"]
    for item in overrides:
        argv += ["--set", item]
    if storage:
        argv += ["--storage", storage]
    if tracking_uri:
        argv += ["--tracking-uri", tracking_uri]
    return shlex.join(argv)


def stage_working_dir(spec_path: str | Path, folder: Path, with_code: bool) -> None:
    """Fill `folder` with what the job needs: the spec, and with `with_code` the source."""
    shutil.copy2(spec_path, folder / Path(spec_path).name)
    if not with_code:
        return
    if not all((SOURCE_ROOT / item).exists() for item in SOURCE_ITEMS):
        raise ClusterError(
            f"--with-code ships {', '.join(SOURCE_ITEMS)} from a ditsweep source checkout, but "
            f"{SOURCE_ROOT} is not one; run ditsweep from a checkout or use an image with ditsweep"
        )
    for item in SOURCE_ITEMS:
        source = SOURCE_ROOT / item
        if source.is_dir():
            shutil.copytree(source, folder / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, folder / item)


def job_client(address: str):
    """A JobSubmissionClient for the dashboard at `address` (http://HEAD:8265)."""
    _probe(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Not Ray's INFO lines about uploads and sockets (the job SDK sets its loggers to INFO).
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise ClusterError(
            f"the Ray cluster at {address!r} wants a token: export RAY_AUTH_MODE=token and the "
            "cluster's token in RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token)"
        ) from None
    except (OSError, RuntimeError, ValueError) as err:
        raise ClusterError(f"cannot reach a Ray dashboard at {address!r}: {first_line(err)}") from None


def _probe(address: str) -> None:
    """Fail in seconds on a dead or unroutable address (the client itself waits without limit)."""
    if "://" in address and not address.startswith(("http://", "https://")):
        raise ClusterError(
            f"--address {address!r} is not a Ray dashboard address: give its HTTP URL, "
            "e.g. http://HEAD:8265 (a ray:// client address does not take jobs)"
        )
    url = urlsplit(address if "://" in address else f"http://{address}")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        with socket.create_connection((url.hostname or "", port), timeout=10):
            pass
    except (OSError, ValueError) as err:
        raise ClusterError(
            f"cannot reach a Ray dashboard at {address!r} ({err}); is the head running and its "
            "dashboard port forwarded (kubectl port-forward svc/ditsweep-head-svc 8265:8265)?"
        ) from None


def follow_job(client, job_id: str, address: str) -> int:
    """Print the job's logs as they come; 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED."""
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)
            printed += len(chunk)

    stream_broken = False
    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on "
              f"(ray job stop --address {address} {job_id} stops it)", file=sys.stderr)
        return interrupted_exit_code()
    except Exception as err:  # noqa: BLE001 - a dropped log stream: poll for the end instead
        print(f"[ditsweep] log stream interrupted ({first_line(err)}); waiting for the job to end",
              file=sys.stderr, flush=True)
        stream_broken = True
    # The stream closes when the job ends, and its status can lag a moment: that wait is bounded. A stream
    # that broke leaves a running sweep, followed (as asked) for as long as it runs.
    info = _wait_until_terminal(client, job_id, address, None if stream_broken else END_OF_STREAM_WAIT_S)
    if info is None:
        print(f"the job's log stream ended, but job {job_id} has not ended {END_OF_STREAM_WAIT_S:.0f} s later; "
              f"follow it: ray job logs --follow --address {address} {job_id}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    if stream_broken:
        print(client.get_job_logs(job_id)[printed:], end="", flush=True)
    if info.status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", flush=True)
        return EXIT_OK
    if info.driver_exit_code is not None:  # the driver's own error is in the logs above
        print(f"job {job_id} {info.status}: the driver exited with code {info.driver_exit_code}", file=sys.stderr)
    else:  # it never ran (e.g. its runtime_env failed) or was stopped: Ray says why
        print(f"job {job_id} {info.status}: {info.message or 'no message from Ray'}", file=sys.stderr)
    return EXIT_FAILED


def _wait_until_terminal(client, job_id: str, address: str, timeout_s: float | None):
    """The job's info once it has ended, or None when `timeout_s` passed first (None: no limit). Each
    poll is bounded by the dashboard answering."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not (info := _job_state(client, job_id, address)[0]).status.is_terminal():
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(_POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic())))
    return info


def _job_state(client, job_id: str, address: str, with_logs: bool = False):
    """(job info, its logs so far or None), or ClusterError naming the dashboard if it stopped answering."""
    try:
        return client.get_job_info(job_id), client.get_job_logs(job_id) if with_logs else None
    except (OSError, RuntimeError) as err:
        raise ClusterError(f"lost the Ray dashboard at {address!r} ({first_line(err)}); the job may "
                           f"still run: ray job status --address {address} {job_id}") from None


# ---------------------------------------------------------------------------------------------
# KubeRay manifests


def render_k8s(
    spec_path: str | Path,
    *,
    image: str | None = None,
    storage: str | None = None,
    name: str | None = None,
    namespace: str | None = None,
) -> str:
    """The RayJob manifest (YAML) that runs the spec; image and storage default to rayjob.yaml's."""
    _validated(spec_path, [])
    if storage is not None and "://" not in storage:
        raise ClusterError(f"--storage {storage!r} is a local folder, but a RayJob's trials run in pods of their own: "
                           "a trial retried in another pod could not read its checkpoints; give shared storage "
                           "such as --storage s3://bucket/prefix")
    check_tag_value("--storage", storage)
    if Path(spec_path).is_absolute() or ".." in Path(spec_path).parts:
        print(f"note: the RayJob runs {spec_path} inside the image (relative to /home/ray/ditsweep); "
              "name the spec as in the repository, or use `ditsweep submit` for one the image lacks",
              file=sys.stderr)
    try:
        default_image, default_storage = template_defaults()
        manifest = render_rayjob(
            str(spec_path),
            image=image or default_image,
            storage=storage or default_storage,
            name=name,
            namespace=namespace,
        )
    except (FileNotFoundError, ValueError) as err:
        raise ClusterError(str(err)) from None
    return yaml.safe_dump(manifest, sort_keys=False)


def template_defaults(template: Path = RAYJOB_TEMPLATE) -> tuple[str, str]:
    """(image, storage) of the RayJob template, so render-k8s's defaults cannot drift from it."""
    if not template.is_file():
        raise FileNotFoundError(f"RayJob template {template} not found: render-k8s needs a ditsweep source checkout")
    job = yaml.safe_load(template.read_text())["spec"]
    argv = shlex.split(job["entrypoint"])
    image = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    return image, argv[argv.index("--storage") + 1]
