"""A trial's load time and resident memory: the whole pool in memory (what every trial did before packs
were sharded) against a trial gathering its images from a single-file pack and from a sharded pack.

    nice -n 15 python benchmarks/pack_memory.py              # 200,000 images of 32x32 RGB (614 MB a pack)
    python benchmarks/pack_memory.py --pool 20000            # smaller

Writes one random pool of --pool images twice into a temporary folder: as a single-file pack
(``images.npy`` + a manifest with its sha256, the format before shards) and as a sharded pack
(`trainer.prepare.prepare_images`, --shard-mb). Then each case runs in a fresh process, so that its peak
resident memory is its own: RssAnon of /proc/self/status after loading, with the images still held,
minus before (the imports and a first tiny load excluded, so torch's own first allocations are not
counted): the private memory a trial holds. RssFile is reported beside it: the pages of a memory map
the trial touched (with the kernel's fault-around, up to 64 KiB each), shared page cache that the
kernel reclaims under pressure, not memory the trial owns:

    whole pool:  trainer.data.load_images(pack)       every image in memory, as PoolCache held it before
    single-file: trainer.pool.load_subsets(config)    memory-mapped; hashes the one file once per process
    sharded:     trainer.pool.load_subsets(config)    memory-mapped; hashes only the shards it reads

at each --num-images (the training subset; --test-images held out, FID off). Prints one line per case
and, last, `pool_mb=... whole_mb=... sharded_mb_per_1k_images=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, machine  # first: puts the repository root on sys.path

from trainer.packs import LEGACY_IMAGES_NAME, MANIFEST_NAME, npy_bytes
from trainer.prepare import prepare_images
from trainer.storage import file_sha256, write_atomically

CASE = """
import json, sys, time
import torch
from trainer.config import build_config
from trainer.data import load_images
from trainer.pool import load_subsets

def resident_kib():  # (anonymous, file-backed) resident KiB: a memory map's pages are file-backed
    fields = dict(line.split(":") for line in open("/proc/self/status") if line.startswith(("RssAnon", "RssFile")))
    return int(fields["RssAnon"].split()[0]), int(fields["RssFile"].split()[0])

kind, pack, num_images, test_images = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = build_config({"data": {"source": pack, "image_size": 32, "num_images": num_images,
                                "test_images": test_images}})
warm = build_config({"data": {"source": "digits", "image_size": 8, "num_images": 16, "test_images": 16}})
load_subsets(warm, torch.device("cpu"))  # torch's first allocations and threads, not the data's
before, start = resident_kib(), time.perf_counter()
if kind == "whole":
    held = load_images(pack, 32)
else:
    held = load_subsets(config, torch.device("cpu"))
seconds = time.perf_counter() - start
after = resident_kib()
print(json.dumps({"seconds": seconds, "mb": (after[0] - before[0]) / 1024, "file_mb": (after[1] - before[1]) / 1024}))
"""


def write_single_file_pack(folder: Path, images: np.ndarray) -> None:
    """The format prepare-data wrote before shards: one images.npy and a manifest with its sha256."""
    folder.mkdir(parents=True)
    write_atomically(folder / LEGACY_IMAGES_NAME, npy_bytes(images))
    manifest = {"count": len(images), "image_size": images.shape[1], "channels": images.shape[-1],
                "sha256": file_sha256(folder / LEGACY_IMAGES_NAME), "source": "random"}
    write_atomically(folder / MANIFEST_NAME, json.dumps(manifest).encode())


def run_case(kind: str, pack: Path, num_images: int, test_images: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", CASE, kind, str(pack), str(num_images), str(test_images)],
                            capture_output=True, text=True, env=env, timeout=600, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=200_000, help="images in the pool")
    parser.add_argument("--num-images", type=int, nargs="+", default=[1_000, 10_000], help="training subsets")
    parser.add_argument("--test-images", type=int, default=1_000)
    parser.add_argument("--shard-mb", type=float, default=16.0, help="shard size of the sharded pack")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="ditsweep-pack-memory-") as scratch:
        root = Path(scratch)
        images = np.random.default_rng(0).integers(0, 256, (args.pool, 32, 32, 3), dtype=np.uint8)
        started = time.perf_counter()
        write_single_file_pack(root / "single", images)
        np.save(root / "pool.npy", images)
        del images
        prepare_images(str(root / "pool.npy"), str(root / "sharded"), 32, shard_mb=args.shard_mb)
        (root / "pool.npy").unlink()
        shards = len(json.loads((root / "sharded" / MANIFEST_NAME).read_text())["shards"])
        print(f"wrote both packs of {args.pool:,} images in {time.perf_counter() - started:.1f} s "
              f"(sharded: {shards} shards of <= {args.shard_mb:g} MiB)")
        pool_mb = args.pool * 32 * 32 * 3 / (1 << 20)
        whole = run_case("whole", root / "single", args.num_images[0], args.test_images)
        print(f"whole pool in memory: {whole['seconds']:.2f} s, +{whole['mb']:.0f} MiB private, "
              f"+{whole['file_mb']:.0f} MiB mapped file pages (pool {pool_mb:.0f} MiB)")
        per_1k = []
        for num_images in args.num_images:
            for kind in ("single", "sharded"):
                case = run_case("subset", root / kind, num_images, args.test_images)
                gathered = (num_images + args.test_images) * 32 * 32 * 3 / (1 << 20)
                print(f"{kind:>7} pack, N={num_images:,} + {args.test_images:,} held out: {case['seconds']:.2f} s, "
                      f"+{case['mb']:.0f} MiB private, +{case['file_mb']:.0f} MiB mapped file pages "
                      f"(the gathered images: {gathered:.0f} MiB)")
                if kind == "sharded":
                    per_1k.append(case["mb"] / ((num_images + args.test_images) / 1000))
        print(f"pool_mb={pool_mb:.0f} whole_mb={whole['mb']:.0f} sharded_mb_per_1k_images={max(per_1k):.1f}")


if __name__ == "__main__":
    main()
