"""The `ditsweep` command line: each command parses its options and calls one plain function.

Exit codes: 0 success, 1 some trials failed, 2 bad input (with one message naming the problem).

The options of every command and their help, each command a few lines that parse and call one plain
function elsewhere; the options shared by several commands are defined once here. `prepare-data`, whose
options share nothing with the others, is in orchestrator.cli_prepare and registered here in its place
in the list; the guards every command runs inside (bad input -> exit 2, Ctrl-C and SIGTERM -> 130 and
143) are orchestrator.cli_guards'.
"""

from __future__ import annotations

import atexit
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from orchestrator.cli_guards import BadInput, handles_bad_input, stops_like_ctrl_c
from orchestrator.cli_prepare import prepare_data
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


app.command("prepare-data")(prepare_data)  # orchestrator/cli_prepare.py


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
