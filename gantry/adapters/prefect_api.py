"""Prefect API adapter: work pools, deployments from prefect.yaml, runs of a deployment.

Deployments are registered through the Prefect client rather than `prefect deploy`:
Prefect 3.8.8's `prefect deploy` aborts after the first deployment it creates (its
"is a worker online?" hint sends ``offset: null`` to ``/work_pools/…/workers/filter``,
which the 3.8.8 server answers with 422), so ``--all`` never reaches the second one; and
a subprocess per registration costs several seconds of imports. This module reads the
same prefect.yaml, fills ``{{ $ENV_VAR }}`` placeholders, loads each flow
from its entrypoint to build the parameter schema exactly as `prefect deploy` does, and
upserts the deployment. Keys it does not model are refused, never ignored.

Every call is bounded: by ``anyio.fail_after`` here, on top of the client's own
request timeout.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gantry.errors import ConfigError, DeploymentConfigError, TriggerUnavailableError

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import WorkPool

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


class WorkPoolRef(BaseModel):
    """``work_pool:`` of a deployment in prefect.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    work_queue_name: str | None = None
    job_variables: dict[str, Any] = Field(default_factory=dict)


class ScheduleConfig(BaseModel):
    """One entry of ``schedules:``; the fields of Prefect's ``construct_schedule``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cron: str | None = None
    interval: float | None = Field(default=None, gt=0)
    rrule: str | None = None
    anchor_date: str | None = None
    timezone: str | None = None
    active: bool = True


class DeploymentConfig(BaseModel):
    """One entry of ``deployments:`` in prefect.yaml (the keys Gantry registers)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    entrypoint: str = Field(pattern=r"^[^:]+\.py:[A-Za-z_][A-Za-z0-9_]*$")
    description: str | None = None
    version: str | None = None
    tags: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    enforce_parameter_schema: bool = True
    work_pool: WorkPoolRef
    schedules: list[ScheduleConfig] = Field(default_factory=list)
    concurrency_limit: int | None = Field(
        default=None, ge=1, description="Runs of this deployment at once; more wait."
    )
    pull: list[dict[str, Any]] | None = None


class ProjectConfig(BaseModel):
    """prefect.yaml, as far as Gantry's registration goes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    prefect_version: str | None = Field(default=None, alias="prefect-version")
    build: list[Any] | None = None
    push: list[Any] | None = None
    pull: list[dict[str, Any]] = Field(default_factory=list)
    deployments: list[DeploymentConfig] = Field(min_length=1)

    @field_validator("build", "push")
    @classmethod
    def _no_steps(cls, v: list[Any] | None) -> None:
        if v:
            # Images are built by the release itself; a project image is the operator's.
            raise ValueError("build/push steps are not run by Gantry's registration")
        return None


class RegisteredDeployment(BaseModel):
    """A deployment as the server now has it."""

    model_config = ConfigDict(frozen=True)

    id: UUID
    name: str
    flow_name: str
    work_pool: str

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


class StartedRun(BaseModel):
    """A flow run created from a deployment."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: UUID
    name: str
    url: str


def flow_run_url(ui_url: str, flow_run_id: UUID | str) -> str:
    """The Prefect UI page of a flow run.

    >>> flow_run_url("http://127.0.0.1:4275", "0b6f…")
    'http://127.0.0.1:4275/runs/flow-run/0b6f…'
    """
    return f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


def load_project(prefect_file: Path, env: Mapping[str, str]) -> ProjectConfig:
    """Read prefect.yaml, filling ``{{ $VAR }}`` from ``env`` as `prefect deploy` does."""
    try:
        raw = yaml.safe_load(prefect_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeploymentConfigError(
            f"{prefect_file} does not exist", fix="run from the project root, or pass its path"
        ) from None
    except yaml.YAMLError as exc:
        raise DeploymentConfigError(f"{prefect_file} is not valid YAML: {exc}") from None
    missing: set[str] = set()
    unsupported: set[str] = set()
    resolved = _fill_placeholders(raw, env, missing, unsupported)
    if missing:
        raise DeploymentConfigError(
            f"{prefect_file} uses environment variables that are not set: "
            f"{', '.join(sorted(missing))}",
            fix="export them before registering the deployments",
        )
    if unsupported:
        raise DeploymentConfigError(
            f"{prefect_file} uses placeholders Gantry does not fill: "
            f"{', '.join(sorted(unsupported))}",
            fix="use {{ $ENV_VAR }} placeholders only",
        )
    try:
        return ProjectConfig.model_validate(resolved)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: "
            + (
                "not supported by Gantry's registration"
                if e["type"] == "extra_forbidden"
                else e["msg"]
            )
            for e in exc.errors()
        )
        raise DeploymentConfigError(
            f"{prefect_file} cannot be registered: {problems}",
            fix="correct the keys named above (see prefect.yaml's comments)",
        ) from None


def _fill_placeholders(
    node: Any, env: Mapping[str, str], missing: set[str], unsupported: set[str]
) -> Any:
    if isinstance(node, dict):
        return {k: _fill_placeholders(v, env, missing, unsupported) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill_placeholders(v, env, missing, unsupported) for v in node]
    if not isinstance(node, str):
        return node

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if not name.startswith("$"):
            unsupported.add(m.group(0))
        elif (value := env.get(name[1:])) is not None:
            return value
        else:
            missing.add(name[1:])
        return m.group(0)

    return _PLACEHOLDER.sub(fill, node)


async def ensure_work_pool(
    client: PrefectClient, name: str, *, pool_type: str = "process", timeout_s: float = 30
) -> WorkPool:
    """The work pool ``name``, created with the type's default job template if missing."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    if pool_type != "process":
        raise DeploymentConfigError(
            f"work pool {name!r} does not exist and Gantry only creates `process` pools",
            fix=f"create it with `prefect work-pool create {name} --type {pool_type}`",
        )
    with _bounded(timeout_s, f"creating work pool {name!r}"):
        try:
            pool = await client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=pool_type,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
            log.info("created work pool %s (%s)", name, pool_type)
            return pool
        except ObjectAlreadyExists:
            pool = await client.read_work_pool(name)
    if pool.type != pool_type:
        raise DeploymentConfigError(
            f"work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}",
            fix="point prefect.yaml's work_pool.name at another pool, or run a worker of "
            f"type {pool.type!r} for it",
        )
    return pool


async def register_deployments(
    client: PrefectClient,
    project_dir: Path,
    *,
    env: Mapping[str, str],
    names: Sequence[str] = (),
    prefect_file: Path | None = None,
    timeout_s: float = 60,
) -> list[RegisteredDeployment]:
    """Upsert the deployments of ``project_dir``/prefect.yaml (only ``names`` if given).

    Work pools must exist (:func:`ensure_work_pool`). Each flow is imported from its
    entrypoint to build its parameter schema; the deployment's default parameters are
    checked against it here, so a broken default fails at registration instead of at the
    first run.
    """
    from prefect.utilities.callables import parameter_schema

    project = load_project(prefect_file or project_dir / "prefect.yaml", env)
    chosen = [d for d in project.deployments if not names or d.name in names]
    if unknown := sorted(set(names) - {d.name for d in project.deployments}):
        raise DeploymentConfigError(
            f"prefect.yaml has no deployment named {', '.join(unknown)}",
            fix=f"choose from {', '.join(d.name for d in project.deployments)}",
        )
    # Every flow loads and every default fits before anything is registered.
    loaded = []
    for dep in chosen:
        flow = _load_flow(project_dir, dep)
        schema = parameter_schema(flow).model_dump_for_openapi()
        _check_defaults(dep, schema)
        loaded.append((dep, flow, schema, _schedules(dep)))
    out: list[RegisteredDeployment] = []
    for dep, flow, schema, schedules in loaded:
        with _bounded(timeout_s, f"registering deployment {dep.name!r}"):
            flow_id = await client.create_flow_from_name(flow.name)
            deployment_id = await client.create_deployment(
                flow_id=flow_id,
                name=dep.name,
                version=dep.version,
                description=dep.description or flow.description,
                entrypoint=dep.entrypoint,
                work_pool_name=dep.work_pool.name,
                work_queue_name=dep.work_pool.work_queue_name,
                job_variables=dep.work_pool.job_variables,
                tags=dep.tags,
                parameters=dep.parameters,
                parameter_openapi_schema=schema,
                enforce_parameter_schema=dep.enforce_parameter_schema,
                pull_steps=dep.pull if dep.pull is not None else project.pull,
                schedules=schedules,
                concurrency_limit=dep.concurrency_limit,
            )
        registered = RegisteredDeployment(
            id=deployment_id, name=dep.name, flow_name=flow.name, work_pool=dep.work_pool.name
        )
        log.info("registered deployment %s (%s)", registered.full_name, deployment_id)
        out.append(registered)
    return out


async def online_workers(client: PrefectClient, pool: str, *, timeout_s: float = 30) -> list[str]:
    """Names of the workers the server sees polling ``pool``."""
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    with _bounded(timeout_s, f"listing workers of {pool!r}"):
        # offset/limit explicitly: the 3.8.8 client sends null for them, which the
        # 3.8.8 server refuses with 422.
        workers = await client.read_workers_for_work_pool(
            pool,
            worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])),
            offset=0,
            limit=200,
        )
    return [w.name for w in workers]


def online_workers_at(api_url: str, pool: str, *, timeout_s: float = 10) -> list[str]:
    """:func:`online_workers` of the server at ``api_url``, from a process whose own
    Prefect settings point elsewhere (the REST call the client makes); [] while it does
    not answer."""
    try:
        r = httpx.post(
            f"{api_url}/work_pools/{pool}/workers/filter",
            json={"offset": 0, "limit": 200, "workers": {"status": {"any_": ["ONLINE"]}}},
            timeout=timeout_s,
        )
    except httpx.HTTPError:
        return []
    return [str(w["name"]) for w in r.json()] if r.status_code == 200 else []


#: The automation that marks a flow run crashed once its heartbeats stop (its host died).
CRASH_DETECTION = "gantry-crash-silent-flow-runs"


async def ensure_crash_detection(
    client: PrefectClient, *, heartbeat_s: int, timeout_s: float = 30
) -> bool:
    """Prefect's zombie-run recipe: a flow run whose heartbeats (every ``heartbeat_s``, the
    workers' ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``) stop for three periods without a final
    state is set to Crashed, so a killed host's run does not stay Running for ever. Returns
    whether it was created (False: it exists)."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with _bounded(timeout_s, "setting up crash detection"):
        if await client.read_automations_by_name(CRASH_DETECTION):
            return False
        final = ("Completed", "Failed", "Cancelled", "Crashed")
        await client.create_automation(
            AutomationCore(
                name=CRASH_DETECTION,
                description="A flow run whose host stopped sending heartbeats is crashed "
                "(gantry topology).",
                trigger=EventTrigger(
                    after={"prefect.flow-run.heartbeat"},
                    expect={
                        "prefect.flow-run.heartbeat",
                        *(f"prefect.flow-run.{s}" for s in final),
                    },
                    match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                    for_each={"prefect.resource.id"},
                    posture=Posture.Proactive,
                    threshold=1,
                    within=timedelta(seconds=3 * heartbeat_s),
                ),
                actions=[
                    ChangeFlowRunState(
                        state=StateType.CRASHED,
                        message=f"no heartbeat for {3 * heartbeat_s}s: its host is gone",
                    )
                ],
            )
        )
    return True


class PrefectRunStarter:
    """Starts runs of one deployment; a repeated ``idempotency_key`` returns the same run.

    ``deployment`` is ``flow/deployment`` (e.g. ``release/release``); ``ui_url`` the base
    of the Prefect UI, for the run's link.
    """

    def __init__(
        self, client: PrefectClient, *, deployment: str, ui_url: str, timeout_s: float = 30
    ) -> None:
        self.client = client
        self.deployment = deployment
        self.ui_url = ui_url
        self.timeout_s = timeout_s

    async def start(
        self, parameters: dict[str, Any], *, idempotency_key: str, tags: Sequence[str] = ()
    ) -> StartedRun:
        from prefect.exceptions import ObjectNotFound

        try:
            with _bounded(self.timeout_s, f"starting a run of {self.deployment}"):
                deployment = await self.client.read_deployment_by_name(self.deployment)
                run = await self.client.create_flow_run_from_deployment(
                    deployment.id,
                    parameters=parameters,
                    idempotency_key=idempotency_key,
                    tags=list(tags),
                )
        except ObjectNotFound:
            raise TriggerUnavailableError(
                f"deployment {self.deployment} does not exist on the Prefect server",
                fix="`gantry serve` (or `make serve`) registers the deployments of prefect.yaml",
            ) from None
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code < 500:
                raise DeploymentConfigError(
                    f"Prefect refused a run of {self.deployment}: "
                    f"{exc.response.status_code} {exc.response.text[:500]}",
                    fix="re-register the deployment (`gantry serve`): its parameter schema "
                    "may be older than this Gantry",
                ) from None
            raise TriggerUnavailableError(
                f"Prefect answered {exc.response.status_code} when starting a run of "
                f"{self.deployment}",
                fix="check the Prefect server's log; the sender may retry the delivery",
            ) from None
        except httpx.HTTPError as exc:
            raise TriggerUnavailableError(
                f"cannot reach the Prefect API to start a run of {self.deployment}: {exc}",
                fix="start it (`gantry serve`) or fix PREFECT_API_URL",
            ) from None
        return StartedRun(flow_run_id=run.id, name=run.name, url=flow_run_url(self.ui_url, run.id))


@contextlib.contextmanager
def _bounded(timeout_s: float, what: str) -> Iterator[None]:
    """``anyio.fail_after`` that raises TriggerUnavailableError naming what timed out."""
    try:
        with anyio.fail_after(timeout_s):
            yield
    except TimeoutError:
        raise TriggerUnavailableError(
            f"{what} took longer than {timeout_s:.0f}s",
            fix="check the Prefect server (`gantry env status`) and PREFECT_API_URL",
        ) from None


#: The flows `gantry release|rollback|reevaluate` run in-process, by the dotted form of
#: prefect.yaml's entrypoints (tests/unit/test_prefect_registration.py keeps them equal):
#: the CLI runs the very flow a deployment of that name runs, and ``gantry/`` itself never
#: imports the orchestration layer above it.
FLOW_ENTRYPOINTS = {
    "release": "flows.release:release",
    "rollback": "flows.rollback:rollback",
    "reevaluate": "flows.reevaluate:reevaluate",
}


def local_flow(name: str) -> Any:
    """The flow of prefect.yaml's deployment ``name``, imported here to run in-process."""
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(FLOW_ENTRYPOINTS[name], use_placeholder_flow=False)


def _load_flow(project_dir: Path, dep: DeploymentConfig) -> Any:
    from prefect.flows import load_flow_from_entrypoint

    path, func = dep.entrypoint.rsplit(":", 1)
    if not (project_dir / path).is_file():
        raise DeploymentConfigError(
            f"deployment {dep.name!r}: entrypoint {dep.entrypoint} does not exist under "
            f"{project_dir}",
            fix="correct `entrypoint:` in prefect.yaml, or register only other deployments "
            "(`gantry serve --deployment NAME`)",
        )
    try:
        return load_flow_from_entrypoint(f"{project_dir / path}:{func}", use_placeholder_flow=False)
    except Exception as exc:  # an import error in the flow's module, or no such flow
        raise DeploymentConfigError(
            f"deployment {dep.name!r}: cannot load flow {dep.entrypoint}: "
            f"{type(exc).__name__}: {exc}",
            fix="fix the flow module so `python -c 'import …'` works in this environment",
        ) from None


def _check_defaults(dep: DeploymentConfig, schema: dict[str, Any]) -> None:
    """Validate the defaults as the server validates a run's parameters, except that a
    parameter left out of the defaults may still come with each run."""
    from prefect.utilities.schema_tools.validation import ValidationError as SchemaError
    from prefect.utilities.schema_tools.validation import validate

    given = {**schema, "required": [r for r in schema.get("required", []) if r in dep.parameters]}
    try:
        validate(dep.parameters, given, raise_on_error=True)
    except SchemaError as exc:
        raise DeploymentConfigError(
            f"deployment {dep.name!r}: its default parameters do not fit the flow: {exc}",
            fix="correct `parameters:` of that deployment in prefect.yaml",
        ) from None


def _schedules(dep: DeploymentConfig) -> list[Any]:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import construct_schedule

    out = []
    for s in dep.schedules:
        try:
            schedule = construct_schedule(
                interval=s.interval,
                anchor_date=s.anchor_date,
                cron=s.cron,
                rrule=s.rrule,
                timezone=s.timezone,
            )
        except ValueError as exc:
            raise DeploymentConfigError(
                f"deployment {dep.name!r}: invalid schedule: {exc}",
                fix="give exactly one of cron, interval (seconds) or rrule",
            ) from None
        out.append(DeploymentScheduleCreate(schedule=schedule, active=s.active))
    return out


async def aload_secret(name: str, timeout_s: float) -> str:
    """The string a Prefect Secret block holds; a missing or empty one is a ConfigError."""
    from prefect.blocks.system import Secret

    try:
        with anyio.fail_after(timeout_s):
            block: Secret[str] = await Secret.aload(name)
    except TimeoutError:
        raise ConfigError(
            f"loading Prefect Secret block {name!r} took longer than {timeout_s:.0f}s",
            fix="check PREFECT_API_URL and the Prefect server",
        ) from None
    except ValueError as exc:  # Prefect's "Unable to find block document named …"
        raise ConfigError(
            f"Prefect Secret block {name!r} cannot be loaded: {exc}",
            fix=f"create it (`prefect block create secret`) or correct the name {name!r}",
        ) from None
    value = block.get()
    if not isinstance(value, str) or not value:
        raise ConfigError(f"Prefect Secret block {name!r} holds no string secret")
    return value


def prefect_starter(
    deployment: str, timeout_s: float
) -> Callable[[], contextlib.AbstractAsyncContextManager[PrefectRunStarter]]:
    """Starts runs through the Prefect API this process is configured for
    (``PREFECT_API_URL``); links point at ``PREFECT_UI_URL``."""

    @contextlib.asynccontextmanager
    async def factory() -> AsyncIterator[PrefectRunStarter]:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

        ui_url = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api")
        async with get_client() as client:
            try:
                with anyio.fail_after(timeout_s):
                    await client.read_deployment_by_name(deployment)
            except Exception as exc:  # not fatal: `gantry serve` may register it later
                log.warning(
                    "deployment %s is not available yet (%s); deliveries get 503 until it is",
                    deployment,
                    "not found" if isinstance(exc, ObjectNotFound) else repr(exc),
                )
            yield PrefectRunStarter(
                client,
                deployment=deployment,
                ui_url=ui_url,
                timeout_s=timeout_s,
            )

    return factory
