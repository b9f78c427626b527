"""A missing build artefact (a .deb, an RPM, a Slurm release root, a tool to read them): a skip on a developer's
machine, a failure in CI.

Responsible for: one decision, read from the environment at each call: with `SLINFER_REQUIRE_ARTEFACTS=1` (set
by `.ci/run` for `make check-packages`) a test that cannot find what it checks fails, saying what is missing;
otherwise it skips, saying the same.
Not responsible for: building anything (the Makefile's targets), or finding the artefacts (each test module).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

# The variable CI sets: a package test that finds nothing to check must not pass by skipping.
REQUIRE_ENV = "SLINFER_REQUIRE_ARTEFACTS"


def required() -> bool:
    """Whether missing artefacts fail (CI) rather than skip."""
    return os.environ.get(REQUIRE_ENV, "") == "1"


def missing(reason: str) -> NoReturn:
    """Skips the test for `reason`, or fails it where artefacts are required."""
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: a missing artefact fails the test)", pytrace=False)
    pytest.skip(reason)
