"""How fast bad input is answered: each command given bad input, run as a fresh process (as a user
types it), the wall time from start to exit 2, median of N runs, and which heavy libraries it imported.

Target (#24): under 1 s on a 2-core CPU for launch, plan, train, resume, status and report; none of
torch, Ray or MLflow imported on the way. `--help` is the floor: Python, typer and nothing of ours.

    python benchmarks/bad_input_latency.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "mlflow")

BAD_SPEC = "name: bad\ngrid: {attention.placement: [sideways]}\n"
BAD_CONFIG = "train: {steps: -1}\n"

# (what the user typed, why it is refused)
CASES = [
    (["--help"], "floor: the CLI's help (exit 0)"),
    (["launch", "bad.yaml"], "invalid grid value"),
    (["launch", "missing.yaml"], "spec file missing"),
    (["plan", "bad.yaml"], "invalid grid value"),
    (["train", "config.yaml"], "invalid config value"),
    (["resume", "x'or'1"], "not a sweep id"),
    (["resume", "some-sweep-1"], "no tracking store here"),
    (["status", "x'or'1"], "not a sweep id"),
    (["status", "some-sweep-1"], "no tracking store here"),
    (["report", "x'or'1"], "not a sweep id"),
    (["report", "some-sweep-1"], "no tracking store here"),
]


def run_once(args: list[str], folder: Path) -> tuple[float, int, set[str]]:
    """(wall seconds, exit code, heavy top-level packages imported) of one `ditsweep ARGS` process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return elapsed, done.returncode, {name for name in HEAVY if name in imported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    repeats = parser.parse_args().repeats
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}; median of {repeats} runs (-X importtime adds a few ms)\n")
    print("| command | refused because | exit | median s | max s | torch / Ray / MLflow imported |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="ditsweep-bench-") as tmp:
        folder = Path(tmp)
        (folder / "bad.yaml").write_text(BAD_SPEC)
        (folder / "config.yaml").write_text(BAD_CONFIG)
        for args, why in CASES:
            runs = [run_once(args, folder) for _ in range(repeats)]
            times = [t for t, _, _ in runs]
            heavy = set().union(*(h for _, _, h in runs))
            print(f"| `{' '.join(args)}` | {why} | {runs[0][1]} | {statistics.median(times):.2f} | {max(times):.2f} | "
                  f"{', '.join(sorted(heavy)) or 'none'} |", flush=True)


if __name__ == "__main__":
    main()
