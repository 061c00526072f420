"""A deployment's durable state and its lock, under ``<state dir>/deployments/<model>/``.

``status.json`` (:class:`DeploymentStatus`) says what serves where (champion, candidate,
a previous champion kept warm, a champion being withdrawn by ``gantry rollback``) and
holds the current canary's :class:`CanaryStatus`. It is written atomically before every
action (see :mod:`gantry.stages.canary.machine`), so whatever kills a run, the next one
(or ``gantry rollback``) knows what to finish or undo. Finished canaries are kept under
``history/``.

``lock`` is an advisory ``flock``: one canary (or rollback) per model at a time. The
kernel drops it when its holder dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters.haproxy import Slot
from gantry.atomicfile import write_atomic
from gantry.errors import CanaryLockedError, ConfigError, DeploymentStatusUnreadableError
from gantry.locks import lock_for
from gantry.settings import get_settings
from gantry.stages.canary.analysis import StepVerdict

log = logging.getLogger(__name__)


def now() -> datetime:
    return datetime.now(UTC)


class Phase(StrEnum):
    """Where a canary is. Only ``succeeded`` and ``rolled-back`` are final."""

    INITIALIZING = "initializing"
    """Candidate verified and starting beside the champion; it has no traffic yet."""
    PROGRESSING = "progressing"
    """The candidate holds ``weight`` % of traffic and its analysis window is running."""
    WAITING_APPROVAL = "waiting-approval"
    """Every window passed; a person must approve the step to 100 %."""
    PROMOTING = "promoting"
    """Every check passed: traffic goes to the candidate and the alias moves. A run
    killed here is finished (not rolled back) when the release is run again."""
    SUCCEEDED = "succeeded"
    """The candidate is the champion; the previous one may still be kept warm."""
    ROLLING_BACK = "rolling-back"
    """A check failed (or a rollback was asked for): the candidate is being taken out."""
    ROLLED_BACK = "rolled-back"
    """The champion serves all traffic again; the candidate is gone."""

    @property
    def final(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.ROLLED_BACK)


class CanaryStatus(BaseModel):
    """The durable status of one canary (written at every transition)."""

    model_config = ConfigDict(validate_assignment=True)

    model: str
    release_id: str
    candidate_version: str
    champion_version: str | None
    phase: Phase = Phase.INITIALIZING
    weight: int = 0
    step: int = Field(default=0, description="Index into `steps` of the current step.")
    steps: tuple[int, ...]
    failed_checks: tuple[str, ...] = ()
    verdicts: list[StepVerdict] = Field(default_factory=list)
    started_at: datetime = Field(default_factory=now)
    last_transition_at: datetime = Field(default_factory=now)
    first_failure_at: datetime | None = Field(
        default=None, description="When a check first failed (decision-time measurements)."
    )
    weight_zero_at: datetime | None = Field(
        default=None, description="When a rollback took the candidate's weight to 0."
    )
    decided_at: datetime | None = None
    message: str = ""

    @property
    def active(self) -> bool:
        return not self.phase.final

    def to(self, phase: Phase, message: str | None = None, at: datetime | None = None) -> None:
        self.phase, self.last_transition_at = phase, at or now()
        if message is not None:
            self.message = message
        if phase.final:
            self.decided_at = self.last_transition_at


class Served(BaseModel):
    """One model version placed in one router slot."""

    model_config = ConfigDict(frozen=True)

    version: str = Field(description="MLflow model version.")
    release_id: str
    record: str = Field(description="Release record: how to start this version again.")
    image: str = Field(description="The image, by digest.")
    slot: Slot


class DeploymentStatus(BaseModel):
    """What the model's deployment looks like (the desired state Gantry reconciles to)."""

    model_config = ConfigDict(validate_assignment=True)

    model: str = Field(description="MLflow registered model name.")
    name: str = Field(description="Docker-safe name: prefix of the containers and network.")
    port: int | None = Field(default=None, description="Endpoint port on 127.0.0.1.")
    runtime_port: int | None = Field(default=None, description="Port the servers listen on.")
    health_path: str | None = None
    champion: Served | None = None
    candidate: Served | None = None
    previous: Served | None = Field(
        default=None, description="The champion before the last promotion, kept warm."
    )
    previous_warm_until: datetime | None = None
    previous_retired: bool = Field(
        default=True, description="The previous champion's container was removed."
    )
    withdrawing: Served | None = Field(
        default=None,
        description="A champion `gantry rollback` is taking out (the previous one serves "
        "again); set until its server is removed, so a killed rollback is finished.",
    )
    canary: CanaryStatus | None = None
    updated_at: datetime = Field(default_factory=now)

    def slot_of(self, version: str) -> Slot | None:
        for s in (self.champion, self.candidate, self.previous):
            if s is not None and s.version == version:
                return s.slot
        return None

    @property
    def active_canary(self) -> CanaryStatus | None:
        """The canary in progress (not finished), if any."""
        return self.canary if self.canary is not None and self.canary.active else None

    def slots_in_use(self) -> frozenset[Slot]:
        """The slots some version of the deployment accounts for; anything in another
        slot is an orphan (a run killed between starting a container and recording it)."""
        used = {s.slot for s in (self.champion, self.candidate, self.withdrawing) if s}
        if self.previous is not None and not self.previous_retired:
            used.add(self.previous.slot)
        return frozenset(used)

    def free_slot(self) -> Slot:
        """The slot the champion does not use."""
        return self.champion.slot.other if self.champion else Slot.A


_SAFE = re.compile(r"[^a-z0-9-]+")


def deployment_name(model: str, namespace: str) -> str:
    """A Docker-safe name for ``model`` in one state dir (``namespace``): two state dirs
    (the demo's and a test run's) on one engine never share a container or network."""
    slug = _SAFE.sub("-", model.lower()).strip("-")[:40] or "model"
    # The model's own name is hashed in too: MLflow allows names that slug alike.
    tag = hashlib.sha256(f"{namespace}\0{model}".encode()).hexdigest()[:6]
    return f"gantry-{slug}-{tag}"


class DeploymentStore:
    """Reads and writes one model's status; the directory is created on first write."""

    def __init__(self, deployments_dir: Path, model: str) -> None:
        if not model or "/" in model or model in (".", ".."):
            raise ConfigError(f"{model!r} is not a usable model name for a deployment")
        self.model = model
        self.name = deployment_name(model, str(deployments_dir.resolve()))
        self.dir = deployments_dir / self.name
        self.path = self.dir / "status.json"

    @property
    def router_config(self) -> Path:
        return self.dir / "haproxy.cfg"

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> DeploymentStatus:
        """The stored status; a fresh one when the model was never deployed here."""
        if not self.path.is_file():
            return DeploymentStatus(model=self.model, name=self.name)
        try:
            status = DeploymentStatus.model_validate_json(self.path.read_bytes())
        except ValueError as exc:
            raise DeploymentStatusUnreadableError(
                f"deployment status {self.path} is unreadable: {exc}",
                fix=f"run `gantry rollback {self.model}`: it keeps the damaged file beside it "
                "and rebuilds the status from the running containers and MLflow's champion",
            ) from None
        return status

    def set_aside(self) -> Path:
        """Move the (damaged) status file out of the way, kept under a new name."""
        kept = self.path.with_name(f"status.json.unreadable-{now().strftime('%Y%m%dT%H%M%S%f')}")
        self.path.replace(kept)
        return kept

    def save(self, status: DeploymentStatus) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        status.updated_at = now()
        write_atomic(self.path, status.model_dump_json(indent=2))

    def archive_canary(self, canary: CanaryStatus) -> Path:
        """Keep a finished canary's status under ``history/`` (never overwritten)."""
        hist = self.dir / "history"
        hist.mkdir(parents=True, exist_ok=True)
        stamp = canary.started_at.strftime("%Y%m%dT%H%M%S.%f")
        path = hist / f"{stamp}-{canary.release_id}.json"
        write_atomic(path, canary.model_dump_json(indent=2))
        return path

    @contextlib.contextmanager
    def lock(self, wait_s: float, holder: str) -> Iterator[None]:
        """Hold the deployment's lock; wait up to ``wait_s`` for another holder, then fail
        with who holds it. ``holder`` (e.g. the release id) is written for that message."""

        def busy(other: str) -> CanaryLockedError:
            return CanaryLockedError(
                f"another canary or rollback of {self.model} is running ({other}); "
                f"waited {wait_s:.0f}s",
                fix="wait for it to finish (its Prefect flow run shows the progress), "
                "raise canary.lock_wait_s, or cancel that run and then run "
                f"`gantry rollback {self.model}`",
            )

        # Named by model, not self.name: that is per state dir, and each host has its own.
        lock = lock_for(get_settings(), f"gantry-deploy-{self.model}", self.dir / "lock")
        with lock(wait_s=wait_s, holder=holder, busy=busy):
            yield
