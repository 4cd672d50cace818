"""SIGTERM stops a command the way Ctrl-C does. It is what Kubernetes sends a pod it evicts and what
`ray job stop` sends a job's driver: the sweep's unfinished trials end KILLED and resumable, the resume
command is printed, and the command exits 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).

`ray.init` installs handlers of its own for SIGTERM (Python's `sys.exit`, then a native one that dumps
a stack and aborts with exit 134), so `terminate_as_interrupt` is called again once Ray is up.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from orchestrator.exit_codes import EXIT_INTERRUPTED, EXIT_TERMINATED

_EXIT_CODES = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}
INTERRUPTED_EXIT_CODES = frozenset(_EXIT_CODES.values())  # a command stopped by Ctrl-C or SIGTERM
_LAST = {"signum": signal.SIGINT}  # the signal that stopped the command


def terminate_as_interrupt() -> None:
    """From now on SIGTERM does whatever SIGINT does at that moment: Tune's graceful stop while a sweep
    runs, asyncio's cancellation while logs stream, else KeyboardInterrupt. Python allows signal
    handlers only in the main thread; elsewhere nothing changes."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    _LAST["signum"] = signum
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a script) or left to the system: stop all the same
        raise KeyboardInterrupt


def interrupted_exit_code() -> int:
    """The exit code of a command stopped by a signal: 130 after Ctrl-C, 143 after SIGTERM."""
    return _EXIT_CODES[_LAST["signum"]]
