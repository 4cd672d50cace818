"""What every `ditsweep` command runs inside: an error the user can fix becomes one short message and
exit code 2 (`handles_bad_input`), and Ctrl-C or SIGTERM one line and exit 130 or 143
(`stops_like_ctrl_c`), never a traceback. `orchestrator.cli` and the command modules beside it
(`orchestrator.cli_prepare`) wrap their commands in these.
"""

from __future__ import annotations

import functools
import signal
import sys
from typing import Callable

import typer

from orchestrator.exit_codes import EXIT_BAD_INPUT


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
