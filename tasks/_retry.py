"""Retry condition shared by every stage task: retry transient errors, nothing else."""

from __future__ import annotations

from typing import Any, ParamSpec, TypeVar

from prefect import Task

from gantry.errors import is_transient
from gantry.spec import RetryPolicy

P = ParamSpec("P")
R = TypeVar("R")


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: True only when the failure is a TransientError."""
    exc = getattr(state, "data", None)
    return isinstance(exc, BaseException) and is_transient(exc)


def with_retries(task: Task[P, R], policy: RetryPolicy) -> Task[P, R]:
    """``task`` with the spec's retry policy: exponential backoff with jitter, bounded."""
    return task.with_options(
        retries=policy.attempts,
        retry_delay_seconds=policy.delays() or 0,
        retry_jitter_factor=policy.jitter,
    )
