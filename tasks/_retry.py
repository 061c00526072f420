"""Retry condition shared by every stage task: retry transient errors, nothing else."""

from __future__ import annotations

from typing import Any

from gantry.errors import is_transient


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: True only when the failure is a TransientError."""
    exc = getattr(state, "data", None)
    return isinstance(exc, BaseException) and is_transient(exc)
