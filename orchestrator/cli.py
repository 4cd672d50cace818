"""The `ditsweep` command line: each command parses its options and calls one plain function.

Exit codes: 0 success, 1 some trials failed, 2 bad input (with one message naming the problem).

Over 400 lines and still one job: the options of every command and their help, each command a few
lines that parse and call one plain function elsewhere; the options shared by several commands are
defined once here, which a file per command would have to import from a third place.
"""

from __future__ import annotations

import atexit
import functools
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from orchestrator.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED
from trainer.metric_names import IMAGES_PER_SEC, LOSS, PSNR_GAP, PSNR_TEST, PSNR_TRAIN, STEP

app = typer.Typer(
    help="Sweeps of local-attention diffusion transformers on Ray Tune, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a trial config key, e.g. --set train.steps=50 (repeatable)."),
]


class BadInput(Exception):
    """Anything the user can fix: reported as one message, exit code 2, nothing started."""


# The errors a user can fix, by module. An error can only come from a module that was imported, so
# only those are looked up: answering bad input never imports torch, Ray or MLflow just to name it.
_BAD_INPUT_ERRORS = {
    "orchestrator.cluster": "ClusterError",
    "orchestrator.report": "ReportError",
    "orchestrator.spec": "SpecError",
    "orchestrator.tracking": "TrackingError",
    "trainer.config": "ConfigError",
    "trainer.storage": "DataError",
    "trainer.fid_weights": "WeightsError",
}


def _bad_input_types() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[module], name) for module, name in _BAD_INPUT_ERRORS.items() if module in sys.modules]
    return (BadInput, *loaded)


def bounded_message(message: str, lines: int = 10, width: int = 1000) -> str:
    """The last guard on "a message of a few lines": whatever a check quoted, at most `lines` lines of
    at most `width` characters reach the terminal (checks shorten values themselves; see short_repr)."""
    kept = [line if len(line) <= width else f"{line[: width - 3]}..." for line in message.splitlines()[:lines]]
    if len(message.splitlines()) > lines:
        kept.append(f"... ({len(message.splitlines()) - lines} more lines)")
    return "\n".join(kept)


def handles_bad_input(command: Callable) -> Callable:
    """Turn the errors a user can fix into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except _bad_input_types() as err:
            typer.secho(f"error: {bounded_message(str(err))}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper


def stops_like_ctrl_c(command: Callable) -> Callable:
    """SIGTERM stops the command as Ctrl-C does (see orchestrator.interrupt); an interrupt that reaches
    here is one line and exit 130 (143 for SIGTERM), not a traceback or click's "Aborted!" and exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from orchestrator.interrupt import interrupted_exit_code, terminate_as_interrupt

        previous = signal.getsignal(signal.SIGTERM)
        terminate_as_interrupt()
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(interrupted_exit_code()) from None
        finally:
            if previous is not None:  # None: set outside Python, cannot be put back from here
                signal.signal(signal.SIGTERM, previous)

    return wrapper


SpecArgument = Annotated[Path, typer.Argument(help="Sweep spec YAML, e.g. search_spaces/placement.yaml.")]
TrackingOption = Annotated[
    Optional[str],
    typer.Option("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."),
]
AddressOption = Annotated[
    Optional[str], typer.Option("--address", help="Join a Ray cluster (auto, ray://host:10001); default in-process.")
]


PendingTimeoutOption = Annotated[
    float,
    typer.Option(
        "--pending-timeout", min=1, metavar="SECONDS",
        help="Stop the sweep (exit 1, unfinished trials KILLED and resumable) when its trials have waited "
        "this long for resources with none running.",
    ),
]


def _print_progress(total_steps: int) -> Callable[[dict, Optional[str]], None]:
    def report(metrics: dict, checkpoint: Optional[str]) -> None:
        parts = [f"step {metrics[STEP]:>6}/{total_steps}"]
        for key in (LOSS, IMAGES_PER_SEC, PSNR_TRAIN, PSNR_TEST, PSNR_GAP):
            if key in metrics:
                parts.append(f"{key}={metrics[key]:.4f}" if key != IMAGES_PER_SEC else f"img/s={metrics[key]:.0f}")
        print("  ".join(parts), flush=True)

    return report


@app.command()
@handles_bad_input
def train(
    config: Annotated[Path, typer.Argument(help="Trial config YAML (an empty file = all defaults).")],
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (checkpoints, curves, metrics).")] = None,
) -> None:
    """Run one trial alone: no Ray, no MLflow."""
    from trainer.config import load_config

    trial = load_config(config, set_ or [])
    from trainer.train import train as run_trial  # torch: only for a valid config
    out = out or Path("runs") / f"train-{datetime.now():%Y%m%d-%H%M%S}"
    print(f"training {trial.model.size} schedule={trial.schedule} data={trial.data.source} -> {out}", flush=True)
    final = run_trial(trial, _print_progress(trial.train.steps), out_dir=out)
    for key, value in final.items():
        print(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}")


@app.command()
@handles_bad_input
@stops_like_ctrl_c
def launch(
    spec: SpecArgument,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and stop.")] = False,
    tracking_uri: TrackingOption = None,
    storage: Annotated[
        Optional[str], typer.Option(help="Checkpoints and Tune results (default ./ditsweep_results; s3:// works).")
    ] = None,
    address: AddressOption = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun trials that already FINISHED.")] = False,
    pending_timeout: PendingTimeoutOption = 600.0,
    until_confident: Annotated[
        bool,
        typer.Option("--until-confident", help="After the grid, add the next data.shuffle_seed to each comparison "
                     "whose psnr_gap interval still crosses 0 and is wider than --target-halfwidth, round after "
                     "round, in the same sweep (the spec must have a data.shuffle_seed axis)."),
    ] = False,
    target_halfwidth: Annotated[
        Optional[float], typer.Option("--target-halfwidth", metavar="DB",
                                      help="With --until-confident: a comparison whose 95% half-width is at most "
                                           "this stops (default 0.1 dB).")
    ] = None,
    max_shuffles: Annotated[
        Optional[int], typer.Option("--max-shuffles", help="With --until-confident: training subsets per comparison "
                                                           "at most, the grid's included (default 8).")
    ] = None,
    max_added_trials: Annotated[
        Optional[int], typer.Option("--max-added-trials", help="With --until-confident: trials run beyond the grid, "
                                                               "all rounds together (default: as many as the grid).")
    ] = None,
) -> None:
    """Run a sweep on Ray Tune; every trial becomes an MLflow child run of the sweep's run."""
    from orchestrator import launch as workflow
    from orchestrator.plan import show_plan

    rule = _stopping_rule(until_confident, target_halfwidth, max_shuffles, max_added_trials)
    if dry_run:
        show_plan(spec, set_ or [], tracking_uri, force=force)
        return
    raise typer.Exit(workflow.launch(spec, set_ or [], tracking_uri=tracking_uri, storage=storage,
                                     address=address, force=force, pending_timeout_s=pending_timeout,
                                     until_confident=rule))


def _stopping_rule(until_confident: bool, target_halfwidth: float | None, max_shuffles: int | None,
                   max_added_trials: int | None):
    from orchestrator.adaptive import StoppingRule

    if not until_confident:
        if (target_halfwidth, max_shuffles, max_added_trials) != (None, None, None):
            raise BadInput("--target-halfwidth, --max-shuffles and --max-added-trials go with --until-confident")
        return None
    return StoppingRule(0.1 if target_halfwidth is None else target_halfwidth,
                        8 if max_shuffles is None else max_shuffles, max_added_trials)


@app.command()
@handles_bad_input
def plan(
    spec: SpecArgument,
    set_: SetOption = None,
    tracking_uri: TrackingOption = None,
    power: Annotated[
        Optional[float], typer.Option("--power", metavar="EFFECT",
                                      help="Also print the pairs (shuffles) a paired t test needs for 80% power "
                                           "at alpha 0.05 against this psnr_gap difference (dB); needs --sd or --from-sweep."),
    ] = None,
    sd: Annotated[Optional[float], typer.Option("--sd", help="With --power: the sd of the paired differences.")] = None,
    from_sweep: Annotated[
        Optional[str], typer.Option("--from-sweep", metavar="SWEEP_ID",
                                    help="With --power: read each comparison's sd from this finished sweep."),
    ] = None,
) -> None:
    """Print the trials a launch would run (cached or not) and the compute they need. Runs nothing."""
    from orchestrator.plan import show_plan

    if power is not None and (sd is None) == (from_sweep is None):
        raise BadInput("--power needs the sd of the paired differences: give --sd or --from-sweep SWEEP_ID (one of them)")
    if power is None and (sd is not None or from_sweep is not None):
        raise BadInput("--sd and --from-sweep go with --power EFFECT")
    shown = show_plan(spec, set_ or [], tracking_uri)
    if power is not None:
        from orchestrator.adaptive import show_power

        show_power(shown, power, sd=sd, sweep_id=from_sweep, tracking_uri=tracking_uri)


@app.command()
@handles_bad_input
@stops_like_ctrl_c
def resume(
    sweep_id: Annotated[str, typer.Argument(help="The sweep's id (its parent run's ditsweep.sweep_id tag).")],
    tracking_uri: TrackingOption = None,
    address: AddressOption = None,
    pending_timeout: PendingTimeoutOption = 600.0,
) -> None:
    """Continue a sweep whose driver died: finished trials stay, the others continue from checkpoints."""
    from orchestrator.spec import check_sweep_id

    check_sweep_id(sweep_id)
    from orchestrator import launch as workflow

    raise typer.Exit(workflow.resume(sweep_id, tracking_uri=tracking_uri, address=address,
                                     pending_timeout_s=pending_timeout))


@app.command()
@handles_bad_input
def status(
    sweep_id: Annotated[Optional[str], typer.Argument(help="Show one sweep's trials; omit to list sweeps.")] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """List sweeps, or one sweep's trials and their states."""
    from orchestrator.spec import check_sweep_id

    if sweep_id is not None:
        check_sweep_id(sweep_id)
    from orchestrator.status import status as sweep_status

    print(sweep_status(sweep_id, tracking_uri))


@app.command("prepare-data")
@handles_bad_input
@stops_like_ctrl_c
def prepare_data(
    src: Annotated[str, typer.Argument(help="Image folder, Parquet folder, LMDB or array (local path or s3://...).")],
    dst: Annotated[str, typer.Argument(help="Output folder (local path or s3://...).")],
    image_size: Annotated[int, typer.Option(help="Square size after center crop and resize.")] = 32,
    channels: Annotated[
        Optional[int],
        typer.Option(help="1 (grayscale) or 3 (RGB) for every image; default: 3 when any image is colour."),
    ] = None,
    skip_unreadable: Annotated[
        bool, typer.Option("--skip-unreadable", help="Leave out files that cannot be decoded (listed) instead of refusing.")
    ] = False,
    shard_mb: Annotated[
        Optional[float],
        typer.Option(help="Largest shard in MiB (default 256); a trial reads only the shards holding its images."),
    ] = None,
    address: Annotated[
        Optional[str],
        typer.Option("--address", help="Decode on the Ray cluster at this address (host:6379, auto, ray://host:10001) "
                     "through Ray Data; refused (exit 2) if it does not answer within 30 s."),
    ] = None,
    ray: Annotated[
        Optional[bool],
        typer.Option("--ray/--no-ray", help="Decode on Ray Data, or in this process. Default: Ray with --address, else "
                     "an in-process Ray on every core when 20,000 or more images are to be decoded on a machine "
                     "of 4 or more cores."),
    ] = None,
    stall_timeout: Annotated[
        float,
        typer.Option("--stall-timeout", min=1, metavar="SECONDS",
                     help="On Ray: stop (exit 1, resumable) when no part of a shard has been decoded for this long."),
    ] = 600.0,
) -> None:
    """Pack images (a folder, class folders, Parquet files, an LMDB, arrays) into memory-mapped uint8
    shards plus a manifest (count, size, each shard's sha256, conversions), written last.

    Every image mode is converted to one channel count, the EXIF orientation applied, and each image
    resized as ADM and DiT do (box halving, bicubic, center crop). Class subfolders give labels.
    Killed, the same command resumes after the shards already written; progress and ETA on stderr.
    On Ray Data (a cluster, or every local core for a large source) the pack is byte-identical."""
    if image_size < 2:
        raise BadInput(f"--image-size must be at least 2, got {image_size}")
    if channels not in (None, 1, 3):
        raise BadInput(f"--channels must be 1 or 3, got {channels}")
    if address is not None and ray is False:
        raise BadInput("--address decodes on that Ray cluster; --no-ray decodes in this process: give one of them")
    from orchestrator.prepare import PrepareStalled, ShardPlacement, prepare_pack

    placement = ShardPlacement(address, ray, stall_timeout_s=stall_timeout)
    try:
        manifest = prepare_pack(src, dst, image_size, channels, skip_unreadable, shard_mb, placement)
    except PrepareStalled as err:
        typer.secho(f"error: {bounded_message(str(err))}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_FAILED) from None
    for name, why in manifest.get("skipped", {}).items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    notes = [f"{count} {what}" for what, count in manifest.get("conversions", {}).items()]
    if manifest.get("exif_rotated"):
        notes.append(f"{manifest['exif_rotated']} turned upright (EXIF)")
    if "classes" in manifest:
        notes.append(f"{len(manifest['classes'])} classes")
    if manifest.get("skipped"):
        notes.append(f"{len(manifest['skipped'])} unreadable skipped")
    if placement.summary():
        notes.append(placement.summary())
    print(f"wrote {manifest['count']} images of {image_size}x{image_size}x{manifest['channels']} to {dst} "
          f"in {len(manifest['shards'])} shard(s)" + (f"; {', '.join(notes)}" if notes else ""))


@app.command()
@handles_bad_input
def report(
    sweep_id: Annotated[str, typer.Argument(help="The sweep's id (`ditsweep status` lists them).")],
    out: Annotated[
        Optional[Path], typer.Option(help="Output folder (default reports/SWEEP_ID); replaced as a whole.")
    ] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Comparison table (Markdown, CSV), plots and an HTML page of a sweep; also attached to its run."""
    from orchestrator.spec import check_sweep_id

    check_sweep_id(sweep_id)
    from orchestrator.tracking import require_store

    require_store(tracking_uri)  # before the report's plotting libraries are imported
    from orchestrator.report import report as build_report

    print(build_report(sweep_id, out, tracking_uri))


@app.command()
@handles_bad_input
def ui(
    tracking_uri: TrackingOption = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but loopback exposes the store to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 5000,
) -> None:
    """Start the MLflow UI on the store `launch` uses and print its address; Ctrl-C stops it."""
    from orchestrator.tracking import serve_ui

    raise typer.Exit(serve_ui(tracking_uri, host, port))


@app.command()
@handles_bad_input
@stops_like_ctrl_c
def submit(
    spec: SpecArgument,
    address: Annotated[
        str,
        typer.Option(help="The cluster's Ray dashboard, e.g. http://HEAD:8265 "
                          "(kubectl -n ditsweep port-forward svc/ditsweep-head-svc 8265:8265)."),
    ],
    set_: SetOption = None,
    storage: Annotated[
        Optional[str],
        typer.Option(help="Tune results every node can reach, e.g. s3://bucket/results "
                          "(default ./ditsweep_results in the job's working directory on the head)."),
    ] = None,
    tracking_uri: Annotated[
        Optional[str],
        typer.Option("--tracking-uri", help="MLflow store, also sent as MLFLOW_TRACKING_URI "
                                            "(default: the cluster's $MLFLOW_TRACKING_URI). No passwords in it."),
    ] = None,
    with_code: Annotated[
        bool,
        typer.Option("--with-code", help="Ship trainer/, orchestrator/ and pyproject.toml with the spec and run "
                                         "them (the cluster's Python still needs ditsweep's dependencies)."),
    ] = False,
    follow: Annotated[
        bool, typer.Option("--follow", help="Stream the job's logs; exit 0 if it SUCCEEDED, 1 if FAILED or STOPPED.")
    ] = False,
) -> None:
    """Submit `ditsweep launch SPEC --address auto` to a running Ray cluster as a Ray Job.

    The job carries the spec and, with --tracking-uri, MLFLOW_TRACKING_URI; never credentials.

    Credentials (AWS keys, MLflow or database passwords) must be in the cluster's own environment.

    Anyone who can list jobs reads what a job carries. On Kubernetes: Secrets (docker/kuberay/secrets.example.yaml).
    """
    from orchestrator import cluster

    raise typer.Exit(cluster.submit(spec, address, set_ or [], storage=storage, tracking_uri=tracking_uri,
                                    with_code=with_code, follow=follow))


@app.command("render-k8s")
@handles_bad_input
def render_k8s(
    spec: Annotated[
        Path, typer.Argument(help="Sweep spec YAML as named in the repository; the image holds search_spaces/.")
    ],
    image: Annotated[
        Optional[str], typer.Option(help="Image of every pod (default: the one in docker/kuberay/rayjob.yaml).")
    ] = None,
    storage: Annotated[
        Optional[str],
        typer.Option(help="Tune results every pod can reach (default: the one in docker/kuberay/rayjob.yaml)."),
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="RayJob name (default: ditsweep-<spec file stem>).")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Namespace to put in the manifest.")] = None,
) -> None:
    """Print a KubeRay RayJob manifest that runs the spec: `ditsweep render-k8s SPEC | kubectl apply -f -`."""
    from orchestrator import cluster

    print(cluster.render_k8s(spec, image=image, storage=storage, name=name, namespace=namespace), end="")


def main() -> None:  # pragma: no cover - console entry (`ditsweep`, `python -m orchestrator.cli`)
    """Run the command, then end the process without Python's teardown of its modules: with torch, Ray
    and MLflow loaded that teardown takes 1-3 s of a 2-core machine after the command is done. What was
    registered to run at exit still runs (threads joined, Ray's shutdown, logging's flush) first."""
    outcome = {"code": 1}  # an exception that escapes: the interpreter prints it, and the exit code is 1
    atexit.register(_end_now, outcome)  # registered before anything else: atexit runs it last
    try:
        app()
    except SystemExit as done:
        outcome["code"] = done.code if isinstance(done.code, int) else int(done.code is not None)
        raise


def _end_now(outcome: dict) -> None:
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), or a stream already closed
            pass
    os._exit(outcome["code"])


if __name__ == "__main__":  # pragma: no cover
    main()
