"""The one executor of the canary's transition table: applies effects, in order.

:meth:`Deployment.handle` asks :func:`~gantry.stages.canary.machine.transition` what an
event means and applies its effects one by one against the deploy target, MLflow and
the status file. Each effect is idempotent, so the effects of a transition killed half-way
are simply applied again by the recovery that follows (see the machine's docstring).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from gantry.adapters.haproxy import Slot
from gantry.adapters.mlflow_registry import CHAMPION, ModelVersionRef
from gantry.deploy.router import Target
from gantry.errors import ChampionUnavailableError, GantryError
from gantry.stages.canary import machine as m
from gantry.stages.canary.state import (
    CanaryStatus,
    DeploymentStatus,
    DeploymentStore,
    Phase,
    Served,
    now,
)

log = logging.getLogger("gantry.canary")


class Registry(Protocol):
    """What the canary asks of the model registry (MLflow's is the one implementation)."""

    def set_alias(self, model_name: str, alias: str, version: str) -> None: ...

    def set_version_tags(self, model_name: str, version: str, tags: Mapping[str, str]) -> None: ...

    def get_alias_version(self, model_name: str, alias: str) -> ModelVersionRef | None: ...


@dataclass
class Hooks:
    """What the Prefect layer plugs in: progress reports, approval, events."""

    progress: Callable[[CanaryStatus], None] = lambda _s: None
    approve: Callable[[CanaryStatus], bool] | None = None
    event: Callable[[str, Mapping[str, Any]], None] = lambda _n, _p: None


class Deployment:
    """One model's deployment: its status, changed only through :meth:`handle`.

    ``registry`` is opened on first use (a re-run that only checks the champion serves
    never needs MLflow); ``revive`` starts a recorded version again in its slot.
    """

    def __init__(
        self,
        store: DeploymentStore,
        status: DeploymentStatus,
        target: Target,
        registry: Callable[[], Registry],
        revive: Callable[[Served], None],
        *,
        hooks: Hooks | None = None,
        drain_s: float = 0.0,
    ) -> None:
        self.store, self.status, self.target = store, status, target
        self.hooks = hooks or Hooks()
        self.drain_s = drain_s
        self._open_registry, self._revive = registry, revive
        #: Versions this executor had to start again (EnsureServing found them down).
        self.started: list[str] = []
        #: Cold start (s) of each server this executor started with a launch.
        self.cold_starts: dict[Slot, float] = {}
        #: When the router actually took the rolled-back candidate's traffic away (the
        #: transition knows only when it decided to).
        self._weight_zero_at: datetime | None = None

    @functools.cached_property
    def registry(self) -> Registry:
        return self._open_registry()

    @property
    def model(self) -> str:
        return self.status.model

    def handle(self, event: m.Event) -> DeploymentStatus:
        """Apply ``event``: the transition's effects in order; the new status."""
        new, effects = m.transition(self.status, event)
        self.apply(effects)
        self.status = self._observed(new)
        return self.status

    def _observed(self, status: DeploymentStatus) -> DeploymentStatus:
        """``status`` with what only applying the effects tells: the router's port, and
        when the router really took the candidate's traffic away."""
        status = status.model_copy(update={"port": self.target.port or status.port})
        c = status.canary
        if self._weight_zero_at is not None and c is not None and c.weight_zero_at:
            status.canary = c.model_copy(update={"weight_zero_at": self._weight_zero_at})
        return status

    def apply(self, effects: tuple[m.Effect, ...]) -> None:
        for effect in effects:
            self.apply_one(effect)

    def apply_one(self, effect: m.Effect) -> None:
        t = self.target
        match effect:
            case m.Persist(status=status):
                status = self._observed(status)
                self.store.save(status)
                self.status = status
                if status.canary is not None:
                    self.hooks.progress(status.canary)
            case m.EnsureRouter(weights=weights):
                t.ensure(weights)
            case m.StartServer(slot=slot, launch=launch, deadline_s=deadline):
                self.cold_starts[slot] = t.start(slot, launch)
                t.readmit(slot)
                t.wait_server_up(slot, deadline)
            case m.EnsureServing(served=served, died_is_error=died_is_error):
                self._ensure_serving(served, died_is_error)
            case m.Readmit(slot=slot):
                t.readmit(slot)
            case m.SetWeights(weights=weights):
                t.set_weights(weights)
                c, cand = self.status.canary, self.status.candidate
                if (
                    c is not None
                    and cand is not None
                    and c.phase is Phase.ROLLING_BACK
                    and weights.get(cand.slot) == 0
                ):
                    self._weight_zero_at = now()
            case m.Drain(slot=slot):
                if t.state(slot).detail != "missing" and t.router_running():
                    t.retire(slot, self.drain_s)
            case m.Remove(slot=slot):
                t.remove(slot)
            case m.RemoveUnused(in_use=in_use):
                for slot in Slot:
                    if slot not in in_use and t.state(slot).detail != "missing":
                        log.warning("removing %s: no version of the deployment uses it", slot)
                        t.remove(slot)
            case m.SetAlias(version=version):
                self.registry.set_alias(self.model, CHAMPION, version)
            case m.TagVersion(version=version, tags=tags, best_effort=best_effort):
                try:
                    self.registry.set_version_tags(self.model, version, tags)
                except GantryError as exc:
                    if not best_effort:
                        raise
                    log.warning("could not tag version %s of %s: %s", version, self.model, exc)
            case m.Archive(canary=canary):
                self.store.archive_canary(canary)
            case m.Emit(name=name, payload=payload):
                self.hooks.event(name, payload)

    def _ensure_serving(self, served: Served, died_is_error: bool) -> None:
        state = self.target.state(served.slot)
        if state.running:
            return
        if state.detail != "missing" and died_is_error:
            raise ChampionUnavailableError(
                f"the champion of {self.model} (version {served.version}, container "
                f"{self.target.server_name(served.slot)}) is not serving: {state.detail}. "
                f"Its last log lines:\n{self.target.logs(served.slot)}"
            )
        log.warning(
            "version %s of %s is not running (%s); starting it again",
            served.version,
            self.model,
            state.detail,
        )
        self._revive(served)
        self.started.append(served.version)
