"""Every Gantry error is either transient (retried with the spec's bounded backoff) or
permanent (fails at once), and retry settings come from the spec alone.

The hierarchy is walked after importing every module of the project, so a class added
anywhere is checked: one missing from ``EXPECTED`` fails until someone decides its kind.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from typing import Literal

import pytest
from prefect import Task
from prefect.states import Failed

from gantry.errors import GantryError, PermanentError, TransientError, is_transient
from gantry.spec import RetryPolicy
from tasks._retry import retry_transient, with_retries
from tests.support import REPO_ROOT

pytestmark = pytest.mark.unit

Kind = Literal["transient", "permanent", "base"]
PACKAGES = ("gantry", "tasks", "flows")

#: Each error's kind. ``base``: groups a family, is neither, and is never raised itself.
EXPECTED: dict[str, Kind] = {
    "TransientError": "transient",
    "PermanentError": "permanent",
    # configuration and input
    "SpecError": "permanent",
    "ConfigError": "permanent",
    # tools and engines
    "ToolNotFoundError": "permanent",
    "CommandError": "permanent",
    "CommandTimeoutError": "transient",
    "DockerUnavailableError": "permanent",
    "BaseImageError": "permanent",
    "ServiceError": "permanent",
    # hub and weights
    "HubError": "base",
    "HubUnavailableError": "transient",
    "DownloadIncompleteError": "transient",
    "HubResponseError": "permanent",
    "RepoNotFoundError": "permanent",
    "RevisionNotFoundError": "permanent",
    "GatedRepoError": "permanent",
    "HubAuthError": "permanent",
    "UnsafePathError": "permanent",
    "CommitConflictError": "permanent",
    "EntryNotFoundError": "permanent",
    "BlobMissingError": "permanent",
    "ChecksumMismatchError": "permanent",
    "DiskFullError": "permanent",
    # build and registry
    "BuildError": "permanent",
    "WeightsInContextError": "permanent",
    "RegistryUnavailableError": "transient",
    "RegistryError": "permanent",
    # signing
    "WeightsKeyError": "permanent",
    "WeightsSignatureError": "permanent",
    "SigstoreUnavailableError": "transient",
    "SigningKeyError": "permanent",
    "SignatureVerificationError": "permanent",
    "SigningConfigError": "permanent",
    "ImageReferenceError": "permanent",
    "CosignError": "base",
    "CosignFailedError": "permanent",
    "CosignNetworkError": "transient",
    # scan
    "ScannerError": "permanent",
    "VulnDBUnavailableError": "permanent",
    "ScanPolicyError": "permanent",
    # smoke
    "ContainerStartError": "permanent",
    "ContainerEngineError": "transient",
    "HealthTimeoutError": "permanent",
    "ProbeError": "permanent",
    "AcceleratorError": "permanent",
    "StartPeriodTooShortError": "permanent",
    # register
    "MLflowUnavailableError": "transient",
    "RegistrationError": "permanent",
    # evaluate
    "EvalSetError": "permanent",
    "QualityGateError": "permanent",
    "EndpointUnavailableError": "transient",
    "EndpointResponseError": "permanent",
    # triggers (deployments, CI webhook)
    "DeploymentConfigError": "permanent",
    "WebhookError": "permanent",
    "WebhookSignatureError": "permanent",
    "WebhookBodyTooLargeError": "permanent",
    "WebhookContentTypeError": "permanent",
    "WebhookParameterError": "permanent",
    "WebhookConflictError": "permanent",
    "WebhookForbiddenError": "permanent",
    "WebhookTimeoutError": "permanent",
    "ReleaseInProgressError": "permanent",
    "DeploymentStatusUnreadableError": "permanent",
    "TriggerUnavailableError": "transient",
    # canary (router, deployment target)
    "RouterError": "permanent",
    "RouterUnavailableError": "transient",
    "MetricsUnavailableError": "transient",
    "LockServiceUnavailableError": "transient",
    "PrometheusError": "base",
    "PrometheusUnavailableError": "transient",
    "PrometheusQueryError": "permanent",
    "PrometheusResponseError": "permanent",
    "DeploymentNotFoundError": "permanent",
    "ChampionUnavailableError": "permanent",
    "CanaryLockedError": "permanent",
    "InvalidTransitionError": "permanent",
    "CanaryFailedError": "permanent",
    "ApprovalRejectedError": "permanent",
    # re-evaluation of live champions
    "ChampionImageMissingError": "permanent",
    "ReevaluationError": "permanent",
    # resource usage
    "StatsUnavailableError": "permanent",
    "ResourceLimitError": "permanent",
}


def _import_project() -> None:
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for mod in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if not mod.name.endswith("__main__"):
                importlib.import_module(mod.name)


def _all_errors() -> list[type[GantryError]]:
    _import_project()
    seen: list[type[GantryError]] = []
    todo: list[type[GantryError]] = list(GantryError.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen and cls.__module__.split(".")[0] in PACKAGES:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: c.__name__)


ERRORS = _all_errors()


def _kind(cls: type[GantryError]) -> Kind:
    transient, permanent = issubclass(cls, TransientError), issubclass(cls, PermanentError)
    assert not (transient and permanent), f"{cls.__name__} is both transient and permanent"
    return "transient" if transient else "permanent" if permanent else "base"


def test_every_error_is_in_the_table() -> None:
    names = [c.__name__ for c in ERRORS]
    assert len(names) == len(set(names)), "two error classes share a name"
    missing = sorted(set(names) - EXPECTED.keys())
    assert not missing, f"classify these in EXPECTED (transient or permanent): {missing}"
    gone = sorted(EXPECTED.keys() - set(names))
    assert not gone, f"EXPECTED lists classes that no longer exist: {gone}"


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_kind_matches_the_table(cls: type[GantryError]) -> None:
    kind = _kind(cls)
    assert kind == EXPECTED.get(cls.__name__), f"{cls.__name__} is {kind}"
    # What the tasks' retry condition decides, on a real Prefect Failed state.
    exc = cls.__new__(cls)
    assert is_transient(exc) == (kind == "transient")
    assert retry_transient(None, None, Failed(data=exc)) == (kind == "transient")


def test_non_gantry_exceptions_are_not_retried() -> None:
    for exc in (ValueError("x"), OSError("x"), KeyboardInterrupt()):
        assert not retry_transient(None, None, Failed(data=exc))


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((REPO_ROOT / pkg).rglob("*.py"))]


def _called_names(tree: ast.AST) -> list[tuple[str, int]]:
    return [(_func_name(n), n.lineno) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_base_classes_are_never_raised_themselves() -> None:
    """A base is neither kind, so raising one would dodge the taxonomy (and never retry)."""
    bases = {c.__name__ for c in ERRORS if _kind(c) == "base"} | {"GantryError"}
    found = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {name}(...)"
        for path in _sources()
        for name, line in _called_names(ast.parse(path.read_text(), str(path)))
        if name in bases
    ]
    assert not found, "raise a concrete transient or permanent class instead:\n" + "\n".join(found)


def _func_name(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def test_retry_settings_come_from_the_spec() -> None:
    """Only tasks/_retry.py turns the spec's policy into Prefect retry options."""
    prefect_calls = {"task", "flow", "Task", "Flow", "with_options"}
    knobs = {"retries", "retry_delay_seconds", "retry_jitter_factor"}
    found = [
        f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {_func_name(node)}({kw.arg}=...)"
        for path in _sources()
        if path != REPO_ROOT / "tasks" / "_retry.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call) and _func_name(node) in prefect_calls
        for kw in node.keywords
        if kw.arg in knobs
    ]
    assert not found, "retry options outside tasks/_retry.py:\n" + "\n".join(found)


def test_every_stage_task_retries_transient_errors_only() -> None:
    _import_project()
    tasks = [
        (mod.name, name, obj)
        for mod in pkgutil.iter_modules([str(REPO_ROOT / "tasks")], prefix="tasks.")
        for name, obj in vars(importlib.import_module(mod.name)).items()
        if isinstance(obj, Task) and obj.__module__ == mod.name
    ]
    assert len(tasks) >= 7
    for module, name, t in tasks:
        assert t.retry_condition_fn is retry_transient, f"{module}.{name}"
        assert t.retries == 0, f"{module}.{name} sets retries itself"


def test_policy_is_bounded_exponential_backoff_with_jitter() -> None:
    policy = RetryPolicy(attempts=6, delay_s=10, jitter=0.3, max_delay_s=60)
    assert policy.delays() == [10, 20, 40, 60, 60, 60]
    t = with_retries(_probe_task, policy)
    assert t.retries == 6
    assert t.retry_delay_seconds == [10, 20, 40, 60, 60, 60]
    assert t.retry_jitter_factor == 0.3
    assert t.retry_condition_fn is retry_transient
    assert with_retries(_probe_task, RetryPolicy(attempts=0)).retries == 0


def _probe(x: int) -> int:
    return x


_probe_task: Task[[int], int] = Task(_probe, retry_condition_fn=retry_transient)
