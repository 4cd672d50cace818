"""`ditsweep prepare-data`: its options and its call to `orchestrator.prepare.prepare_pack`, in a module of
its own; `orchestrator.cli` registers it on the one Typer app, in the order `ditsweep --help` lists it.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from orchestrator.cli_guards import BadInput, bounded_message, handles_bad_input, stops_like_ctrl_c
from orchestrator.exit_codes import EXIT_FAILED


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
