"""Processes the fixtures start, found and stopped by id: by process group, or by a marker variable
every descendant inherits in its environment (Ray's workers leave their node's group)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Send `signum` to the process group `proc` leads (started with start_new_session=True)."""
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:  # the whole group is gone already
        pass


def marked_processes(variable: str, marker: str) -> list[int]:
    """Live processes whose environment carries variable=marker (zombies have an empty environ)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{variable}={marker}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_marked(variable: str, marker: str, what: str, timeout: float = 30, poll_s: float = 0.3) -> None:
    """SIGKILL every process carrying variable=marker until none is left; RuntimeError naming `what`
    and the survivors if some outlive `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while leftovers := marked_processes(variable, marker):
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {what} still running after {timeout:.0f} s: {leftovers}")
        time.sleep(poll_s)
