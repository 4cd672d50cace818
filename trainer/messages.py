"""Refusals as people read them: the error of a config the trainer would reject (`ConfigError`) and
the helpers that keep any message about bad input a few short lines, whatever the input holds (a
value from a file or the command line can be megabytes long). Used by the config schema, the YAML
reader and the orchestrator's spec checks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration the trainer would reject; the message names the field and the value."""


_SHORT_REPR = 80  # characters of a value quoted in an error message
_MESSAGE_LINES = 5  # problems listed in one validation message


def short_repr(value: Any, limit: int = _SHORT_REPR) -> str:
    """repr(value) cut to about `limit` characters, for error messages: a value from a file or the command
    line can be megabytes long, and a message must stay a few lines."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 3]}... ({len(text)} characters)"


def short_path(path: str | Path, limit: int = _SHORT_REPR) -> str:
    """A file path quoted in an error message: whole when short, else its end, where the file's own
    name is (a deep temporary or cluster folder must not push the name out of the message)."""
    text = str(path)
    return repr(text) if len(text) <= limit else repr(f"...{text[-(limit - 3):]}")


def short_text(text: str, limit: int = 200) -> str:
    """One line of at most about `limit` characters (for messages quoting foreign text, e.g. a YAML error)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else f"{line[: limit - 3]}..."


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: `field.path: message (got value)`; values, keys and the number of lines
    are bounded (short_repr), whatever the input holds."""
    lines = []
    problems = err.errors()
    for problem in problems[:_MESSAGE_LINES]:
        loc = ".".join(str(p) if len(str(p)) <= 40 else short_repr(str(p), 40) for p in problem["loc"])
        path = ".".join(p for p in (prefix, loc) if p)
        msg = short_text(problem["msg"].removeprefix("Value error, "), 300)
        got = problem.get("input")
        shown = "" if isinstance(got, dict) or problem["type"] == "value_error" else f" (got {short_repr(got)})"
        # Checks across sections (TrialConfig._consistent) have no location; their message names the field.
        lines.append(f"{path}: {msg}{shown}" if path else f"{msg}{shown}")
    if len(problems) > _MESSAGE_LINES:
        lines.append(f"... and {len(problems) - _MESSAGE_LINES} more problems")
    return "\n".join(lines)
