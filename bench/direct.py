"""A release without the orchestrator: the release flow's stages, each the plain function
of its Prefect task, called in order in this one process (no flow run, no task runs, no
retries). The baseline that `bench/run.py` compares `gantry release` with.

    python bench/direct.py SPEC.yaml     # prints the record's path last, like gantry release
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from prefect import Task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.release import compose
from gantry.record import record_path
from gantry.settings import get_settings
from gantry.spec import RetryPolicy, load_spec

P = ParamSpec("P")
R = TypeVar("R")


def plain(task: Task[P, R], policy: RetryPolicy) -> Callable[P, R]:
    """The task's own function: what the stage does, without Prefect around it."""
    return task.fn


def main() -> None:
    spec = load_spec(Path(sys.argv[1]))
    compose(spec, plain, flow_run_id=None)
    print(record_path(get_settings().releases_dir, spec.release_id))
    gc.freeze()  # as `gantry` does: no garbage collection of everything at exit


if __name__ == "__main__":
    main()
