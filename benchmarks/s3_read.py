"""Reading an image folder from S3 against reading it from a local folder, in the same run.

    python benchmarks/s3_read.py                  # 3,000 PNGs of 32x32, 5 interleaved repeats: ~1 min on 2 cores

Writes N small RGB PNGs to a temporary local folder and uploads the same files to a moto S3 server
on 127.0.0.1, in a process of its own (a real S3 API over HTTP on loopback, as a MinIO next to the cluster would be). Then,
interleaved (local, S3, local, S3, ...), each the best of `--repeats`:

    local: trainer.data.load_images(<folder>)                   list, decode, check
    s3:    trainer.data.load_images(s3://bucket/folder, cache_dir=<fresh folder each time>)
           list, fetch every object (concurrently), write the cache copy, decode, check

Both decode the same files the same way, so the ratio is what fetching over S3 adds. Prints, last:
`s3_files_per_s=... local_files_per_s=... s3_over_local_time=...`
(target: s3_files_per_s >= 3000, or s3_over_local_time <= 2).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from _common import best_times, machine  # first: puts the repository root on sys.path
from PIL import Image

import trainer.storage
from trainer.data import load_images


def write_pngs(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        # Two levels of folders, as a class-per-folder data set would have.
        path = folder / f"class_{index % 10}" / f"{index:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)


def upload(folder: Path, bucket: str) -> None:
    import boto3

    client = boto3.session.Session().client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*.png")):
        client.put_object(Bucket=bucket, Key=f"images/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own (as any S3 server is: it must not share this process's GIL)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit("moto server did not start within 120 s") from None
            time.sleep(0.3)
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "fake", "AWS_SECRET_ACCESS_KEY": "fake", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
    })
    return server, endpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=3000, help="number of PNGs")
    parser.add_argument("--size", type=int, default=32, help="side of each PNG in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the best of each is kept")
    parser.add_argument("--sequential", action="store_true",
                        help="also time S3 with one GET at a time (trainer.storage.FETCH_THREADS = 1), the old rate")
    args = parser.parse_args()

    server, endpoint = start_moto()
    scratch = Path(tempfile.mkdtemp(prefix="ditsweep-bench-s3-"))
    try:
        local = scratch / "images"
        write_pngs(local, args.files, args.size)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        upload(local, bucket)
        uri = f"s3://{bucket}/images"

        def read_local() -> None:
            assert len(load_images(str(local), args.size)) == args.files

        def read_s3() -> None:
            cache = scratch / f"cache-{uuid.uuid4().hex[:8]}"  # a first load every time: nothing cached
            assert len(load_images(uri, args.size, cache_dir=str(cache))) == args.files
            shutil.rmtree(cache)

        def read_s3_sequential() -> None:
            threads, trainer.storage.FETCH_THREADS = trainer.storage.FETCH_THREADS, 1
            try:
                read_s3()
            finally:
                trainer.storage.FETCH_THREADS = threads

        candidates = {"local": read_local, "s3": read_s3}
        if args.sequential:
            candidates["s3_sequential"] = read_s3_sequential
        started = time.perf_counter()
        best = best_times(candidates, repeats=args.repeats)
        took = time.perf_counter() - started
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        shutil.rmtree(scratch, ignore_errors=True)

    local_rate, s3_rate = args.files / best["local"], args.files / best["s3"]
    print(f"machine: {machine()}")
    print(f"{args.files} PNGs of {args.size}x{args.size}, moto S3 at {endpoint}, best of {args.repeats} "
          f"interleaved ({took:.0f} s in all)")
    print(f"local: {best['local']:.3f} s  ({local_rate:,.0f} files/s)")
    print(f"s3:    {best['s3']:.3f} s  ({s3_rate:,.0f} files/s, {trainer.storage.FETCH_THREADS} GETs in flight)")
    if "s3_sequential" in best:
        print(f"s3, one GET at a time: {best['s3_sequential']:.3f} s  ({args.files / best['s3_sequential']:,.0f} files/s)")
    met = s3_rate >= 3000 or best["s3"] / best["local"] <= 2.0
    print(f"target (>= 3000 files/s from S3, or within 2x of local): {'met' if met else 'missed'}")
    print(f"s3_files_per_s={s3_rate:.0f} local_files_per_s={local_rate:.0f} s3_over_local_time={best['s3'] / best['local']:.2f}")


if __name__ == "__main__":
    main()
