"""Missing tools: a skip on a developer's machine, a failure in CI (CI=true, as GitHub Actions, GitLab
and most CI services set it), where everything the suite needs is installed and a skip would hide a
check that never ran."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> NoReturn:
    """Skip the test saying why, or under CI=true fail it saying why."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the suite's tools must be installed in CI)", pytrace=False)
    pytest.skip(reason)
