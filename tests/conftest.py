"""Shared fixtures and the test tiers.

Tiers (markers): ``unit`` (pure functions), ``contract`` (recorded tool outputs, golden
argv), ``integration`` (real Docker engine, registry, hub endpoint, Prefect), ``e2e`` (a
whole release). ``make test`` runs them all; a tool that is missing fails the test, it
never skips silently.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in {
        "unit": "pure functions, no I/O beyond tmp_path",
        "contract": "recorded tool outputs and golden argv",
        "integration": "real Docker engine, registry, hub endpoint or Prefect server",
        "e2e": "a whole release through the CLI",
    }.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


from tests.support import gantry_env  # noqa: E402,F401  (the session fixture)
