"""Shared fixtures and the test tiers.

Tiers (markers): ``unit`` (pure functions), ``contract`` (recorded tool outputs, golden
argv), ``integration`` (real Docker engine, registry, hub endpoint, Prefect), ``e2e`` (a
whole release), ``reliability`` (faults, kills and hostile input; tests/reliability
writes what it tried to .gantry/reliability/results.json). ``make test`` runs them all;
a tool that is missing fails the test, it never skips silently.
"""

from __future__ import annotations

import os

import pytest

from gantry.stages.scan import TRUST_FIXTURE_DB_ENV

# The trivy DB that tests/trivydb.py builds (planted findings) counts in this suite and in
# the processes it starts; outside it, Gantry refuses such a DB.
os.environ[TRUST_FIXTURE_DB_ENV] = "1"


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in {
        "unit": "pure functions, no I/O beyond tmp_path",
        "contract": "recorded tool outputs and golden argv",
        "integration": "real Docker engine, registry, hub endpoint or Prefect server",
        "e2e": "a whole release through the CLI",
        "reliability": "injected faults, killed runs and hostile input on the real components",
    }.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


from tests.support import gantry_env, prefect_server  # noqa: E402,F401  (session fixtures)
