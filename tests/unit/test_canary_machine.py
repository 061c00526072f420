"""The canary's transition table, row by row: every (phase, event) pair, with the run
killed after each effect of the transition and the deployment then recovered by the next
release of the model (its own, or another's) or by `gantry rollback`.

The world the effects act on is a deployment target and a model registry held in memory
(the protocols the canary speaks; the real Docker target and MLflow are exercised by
tests/e2e/test_canary.py and tests/reliability/test_crash.py). The status file is real.
After every recovery the end state must be settled and consistent: no canary or rollback
half-done, the champion's container running in its slot with 100 % of the router's
weight, MLflow's `champion` alias on it, no container in a slot the status does not
account for, and the file on disk saying exactly that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gantry.adapters.haproxy import AccessRecord, Slot
from gantry.deploy.docker import VERSION_LABEL
from gantry.deploy.router import Launch, RoutedState, ServerState
from gantry.errors import InvalidTransitionError
from gantry.stages.canary import machine as m
from gantry.stages.canary.analysis import CheckResult, StepVerdict
from gantry.stages.canary.executor import Deployment
from gantry.stages.canary.state import (
    CanaryStatus,
    DeploymentStatus,
    DeploymentStore,
    Phase,
    Served,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
V1 = Served(version="1", release_id="m-1", record="r1.json", image="img@sha256:1", slot=Slot.A)
V2 = Served(version="2", release_id="m-2", record="r2.json", image="img@sha256:2", slot=Slot.B)


@dataclass
class World:
    """A deploy target (router + two slots) and a model registry, in memory."""

    running: dict[Slot, str] = field(default_factory=dict)  # slot -> version
    weights: dict[Slot, int] = field(default_factory=dict)
    router: bool = True
    alias: str | None = None
    tags: dict[str, dict[str, str]] = field(default_factory=dict)

    # --- Target ----------------------------------------------------------------------------
    model = "m"
    name = "gantry-m"
    endpoint = "http://127.0.0.1:1"
    port: int | None = 8090

    def router_running(self) -> bool:
        return self.router

    def routed(self, slot: Slot) -> RoutedState | None:
        return RoutedState(up=slot in self.running, parked=False, detail="UP")

    def wait_server_up(self, slot: Slot, deadline_s: float) -> None:
        assert slot in self.running

    def ensure(self, weights: Mapping[Slot, int]) -> None:
        if not self.router:
            self.router, self.weights = True, dict(weights)

    def set_weights(self, weights: Mapping[Slot, int]) -> None:
        assert self.router
        self.weights.update(weights)

    def retire(self, slot: Slot, drain_s: float) -> None:
        self.weights[slot] = 0

    def readmit(self, slot: Slot) -> None:
        assert self.router

    def observe(self) -> list[AccessRecord]:
        return []

    def probe_headers(self, slot: Slot, kind: str) -> dict[str, str]:
        return {}

    def start(self, slot: Slot, launch: Launch) -> float:
        self.running[slot] = launch.labels[VERSION_LABEL]
        return 0.5

    def state(self, slot: Slot) -> ServerState:
        return ServerState(
            running=slot in self.running, detail="running" if slot in self.running else "missing"
        )

    def remove(self, slot: Slot) -> None:
        self.running.pop(slot, None)

    def server_name(self, slot: Slot) -> str:
        return f"m-{slot}"

    def logs(self, slot: Slot, tail: int = 40) -> str:
        return ""

    # --- Registry --------------------------------------------------------------------------
    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        self.alias = version

    def set_version_tags(self, model_name: str, version: str, tags: Mapping[str, str]) -> None:
        self.tags.setdefault(version, {}).update(tags)

    def get_alias_version(self, model_name: str, alias: str) -> None:  # pragma: no cover
        raise AssertionError("the executor never reads the alias")

    def revive(self, served: Served) -> None:
        """Start a recorded version again (the real one reads its release record)."""
        self.running[served.slot] = served.version


def _launch(version: str) -> Launch:
    return Launch(
        image=f"img@sha256:{version}",
        weights_dir=Path("/w"),
        mount_point="/models",
        port=8080,
        health_path="/health",
        env={},
        args=(),
        cpus=1.0,
        memory_mb=512,
        gpus=None,
        deadline_s=30,
        labels={VERSION_LABEL: version},
    )


def _verdict(passed: bool) -> StepVerdict:
    check = CheckResult(name="quality", passed=passed, observed=0.5, limit=0.9, detail="q")
    return StepVerdict(
        step=0,
        weight=10,
        started_at=T0,
        finished_at=T0 + timedelta(seconds=30),
        passed=passed,
        checks=(check,),
        candidate_requests=50,
        champion_requests=450,
        synthetic_requests=0,
    )


def _canary(phase: Phase, *, steps: tuple[int, ...], verdicts: int = 0) -> CanaryStatus:
    return CanaryStatus(
        model="m",
        release_id="m-2",
        candidate_version="2",
        champion_version="1",
        phase=phase,
        weight=10 if phase is not Phase.INITIALIZING else 0,
        step=0,
        steps=steps,
        verdicts=[_verdict(True)] * verdicts,
        started_at=T0,
    )


def _scenario(phase: Phase | None) -> tuple[DeploymentStatus, World]:
    """A deployment in ``phase`` and the world as it is there."""
    base = {"model": "m", "name": "gantry-m", "port": 8090}
    idle_world = World(running={Slot.A: "1"}, weights={Slot.A: 100, Slot.B: 0}, alias="1")
    mid_world = World(
        running={Slot.A: "1", Slot.B: "2"}, weights={Slot.A: 90, Slot.B: 10}, alias="1"
    )
    match phase:
        case None:
            return DeploymentStatus(**base, champion=V1), idle_world
        case Phase.INITIALIZING:
            c = _canary(phase, steps=(10, 50, 100))
            w = World(
                running={Slot.A: "1", Slot.B: "2"}, weights={Slot.A: 100, Slot.B: 0}, alias="1"
            )
            return DeploymentStatus(**base, champion=V1, candidate=V2, canary=c), w
        case Phase.PROGRESSING | Phase.ROLLING_BACK:
            c = _canary(phase, steps=(10, 50, 100))
            return DeploymentStatus(**base, champion=V1, candidate=V2, canary=c), mid_world
        case Phase.WAITING_APPROVAL | Phase.PROMOTING:
            c = _canary(phase, steps=(10, 100), verdicts=1)
            return DeploymentStatus(**base, champion=V1, candidate=V2, canary=c), mid_world
        case Phase.SUCCEEDED:
            c = _canary(phase, steps=(10, 100), verdicts=1)
            status = DeploymentStatus(
                **base,
                champion=V2,
                previous=V1,
                previous_retired=False,
                previous_warm_until=T0 + timedelta(hours=1),
                canary=c,
            )
            w = World(
                running={Slot.A: "1", Slot.B: "2"}, weights={Slot.A: 0, Slot.B: 100}, alias="2"
            )
            return status, w
        case Phase.ROLLED_BACK:
            c = _canary(phase, steps=(10, 100))
            return DeploymentStatus(**base, champion=V1, canary=c), idle_world
    raise AssertionError(phase)


#: name -> (event, what it presupposes of the world)
EVENTS: dict[str, Callable[[], m.Event]] = {
    "begin": lambda: m.Begin(V2, V1, (10, 50, 100), _launch("2"), 30, at=T0),
    "shift": lambda: m.Shift(0, 10, at=T0),
    "judged-pass": lambda: m.Judged(_verdict(True), at=T0),
    "judged-fail": lambda: m.Judged(_verdict(False), at=T0),
    "await-approval": lambda: m.AwaitApproval(at=T0),
    "promote": lambda: m.Promote(keep_warm_s=60, at=T0),
    "abort": lambda: m.Abort("a check failed", ("quality",), at=T0),
    "recover-same": lambda: m.Recover("m-2", keep_warm_s=60, at=T0),
    "recover-other": lambda: m.Recover("m-3", keep_warm_s=60, at=T0),
    "rollback": lambda: m.RollbackRequested(at=T0),
    "retire-force": lambda: m.RetirePrevious(force=True, at=T0),
    "retire-due": lambda: m.RetirePrevious(force=False, at=T0),
    "adopt": lambda: m.Adopt(V1, at=T0),
}
PHASES: list[Phase | None] = [None, *Phase]


def _release(release_id: str) -> Callable[[Deployment, World], None]:
    """What a release does to the deployment before its own canary (stages/canary/run.py):
    recover what an earlier run left, then adopt MLflow's champion if the deployment serves
    another version."""

    def recover(dep: Deployment, world: World) -> None:
        dep.handle(m.Recover(release_id, keep_warm_s=60, at=T0))
        champ = dep.status.champion
        if world.alias is not None and (champ is None or champ.version != world.alias):
            dep.handle(m.Adopt({"1": V1, "2": V2}[world.alias], at=T0))

    return recover


def _rollback(dep: Deployment) -> None:
    dep.handle(m.RollbackRequested(at=T0))


RECOVERIES: dict[str, Callable[[Deployment, World], None]] = {
    "next run of the same release": _release("m-2"),
    "another release": _release("m-3"),
    "gantry rollback": lambda dep, _world: _rollback(dep),
}

#: Which (phase, event) pairs are transitions; every other pair must be refused.
VALID = {
    (None, "begin"),
    (Phase.ROLLED_BACK, "begin"),
    (Phase.INITIALIZING, "shift"),
    (Phase.PROGRESSING, "shift"),
    (Phase.PROGRESSING, "judged-pass"),
    (Phase.PROGRESSING, "judged-fail"),
    (Phase.WAITING_APPROVAL, "promote"),
    (Phase.PROMOTING, "promote"),
    *((p, "abort") for p in Phase if not p.final),
    *((p, e) for p in PHASES for e in ("recover-same", "recover-other", "rollback")),
    *((p, e) for p in PHASES for e in ("retire-force", "retire-due")),
    (None, "adopt"),
    (Phase.SUCCEEDED, "adopt"),
    (Phase.ROLLED_BACK, "adopt"),
}


def _executor(store: DeploymentStore, status: DeploymentStatus, world: World) -> Deployment:
    return Deployment(store, status, world, lambda: world, world.revive)


def _settled(store: DeploymentStore, dep: Deployment, world: World) -> None:
    status = dep.status
    assert status.active_canary is None and status.withdrawing is None
    assert status.candidate is None
    champ = status.champion
    assert champ is not None
    assert world.running.get(champ.slot) == champ.version, world
    assert world.weights.get(champ.slot) == 100 and world.weights.get(champ.slot.other, 0) == 0
    assert world.alias == champ.version, f"alias on {world.alias}, champion {champ.version}"
    assert set(world.running) <= status.slots_in_use(), world
    if status.previous is not None and not status.previous_retired:
        assert world.running.get(status.previous.slot) == status.previous.version
    on_disk = store.load().model_dump(exclude={"updated_at"})
    assert on_disk == status.model_dump(exclude={"updated_at"})


def _rows() -> Iterator[tuple[Phase | None, str]]:
    for phase in PHASES:
        for event in EVENTS:
            yield phase, event


@pytest.mark.parametrize(("phase", "event"), list(_rows()), ids=lambda v: str(v))
def test_every_phase_event_pair_with_a_crash_after_each_effect(
    tmp_path: Path, phase: Phase | None, event: str
) -> None:
    status, _world = _scenario(phase)
    before = status.model_dump()
    if (phase, event) not in VALID:
        with pytest.raises(InvalidTransitionError):
            m.transition(status, EVENTS[event]())
        assert status.model_dump() == before  # nothing changed, nothing to apply
        return
    _new, effects = m.transition(status, EVENTS[event]())
    assert status.model_dump() == before, "transition must not change its input"
    for crash_after in range(len(effects) + 1):
        for how, recovery in RECOVERIES.items():
            status, world = _scenario(phase)
            if event == "adopt":
                world.alias = V1.version  # Adopt is sent when MLflow names that version
            store = DeploymentStore(tmp_path / f"{crash_after}-{how}", "m")
            store.save(status)
            dep = _executor(store, status, world)
            for effect in effects[:crash_after]:
                dep.apply_one(effect)
            # The next run starts from what is on disk, as after a SIGKILL.
            after = _executor(store, store.load(), world)
            recovery(after, world)
            where = (
                f"{phase}/{event}, killed after {crash_after} of {len(effects)} effects, then {how}"
            )
            try:
                _settled(store, after, world)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from None


def test_a_promotion_killed_after_the_alias_moved_and_recovered_by_another_release() -> None:
    """The row the old code got wrong: recovery rolled the candidate back but left the
    `champion` alias on it."""
    status, world = _scenario(Phase.PROMOTING)
    _new, effects = m.transition(status, m.Promote(at=T0))
    alias_at = next(i for i, e in enumerate(effects) if isinstance(e, m.SetAlias))
    store = DeploymentStore(Path("/nonexistent-never-written"), "m")
    written: list[DeploymentStatus] = []
    store.save = written.append  # type: ignore[method-assign,assignment]
    store.archive_canary = lambda canary: Path("x")  # type: ignore[method-assign]
    dep = _executor(store, status, world)
    for effect in effects[: alias_at + 1]:
        dep.apply_one(effect)
    assert world.alias == "2" and written[-1].canary and written[-1].canary.phase is Phase.PROMOTING
    after = _executor(store, written[-1], world)
    after.handle(m.Recover("m-3", at=T0))
    assert after.status.champion == V1 and world.alias == "1"
    assert world.running == {Slot.A: "1"} and world.weights[Slot.A] == 100
    assert world.tags["2"]["gantry.canary.outcome"] == "rolled-back"


def test_a_first_deployment_that_fails_leaves_nothing_running(tmp_path: Path) -> None:
    status = DeploymentStatus(model="m", name="gantry-m")
    world = World(router=False)
    store = DeploymentStore(tmp_path, "m")
    dep = _executor(store, status, world)
    dep.handle(m.Begin(V2, None, (10, 100), _launch("2"), 30, at=T0))
    assert dep.status.canary is not None and dep.status.canary.steps == (100,)
    assert world.running == {Slot.B: "2"} and world.weights == {Slot.B: 100}
    with pytest.raises(InvalidTransitionError):
        dep.handle(m.Shift(0, 10, at=T0))  # nothing to compare with
    dep.handle(m.Abort("no answer", ("health",), at=T0))
    assert world.running == {} and world.alias is None
    assert dep.status.canary is not None and dep.status.canary.phase is Phase.ROLLED_BACK


def test_a_first_deployment_promotes_without_analysis(tmp_path: Path) -> None:
    world = World(router=False)
    dep = _executor(DeploymentStore(tmp_path, "m"), DeploymentStatus(model="m", name="g"), world)
    dep.handle(m.Begin(V2, None, (10, 100), _launch("2"), 30, at=T0))
    dep.handle(m.Promote(at=T0))
    assert dep.status.champion == V2 and dep.status.previous is None and world.alias == "2"
    assert world.tags["2"]["gantry.canary.outcome"] == "deployed"


def test_keep_warm_retirement_waits_for_its_time(tmp_path: Path) -> None:
    status, world = _scenario(Phase.SUCCEEDED)
    store = DeploymentStore(tmp_path, "m")
    dep = _executor(store, status, world)
    dep.handle(m.RetirePrevious(force=False, at=T0))
    assert Slot.A in world.running and not dep.status.previous_retired
    dep.handle(m.RetirePrevious(force=False, at=T0 + timedelta(hours=2)))
    assert world.running == {Slot.B: "2"} and dep.status.previous_retired


def test_rollback_after_promotion_gives_traffic_and_alias_back(tmp_path: Path) -> None:
    status, world = _scenario(Phase.SUCCEEDED)
    dep = _executor(DeploymentStore(tmp_path, "m"), status, world)
    events: list[str] = []
    dep.hooks.event = lambda name, _payload: events.append(name)
    dep.handle(m.RollbackRequested(at=T0))
    assert dep.status.champion == V1 and world.alias == "1" and world.running == {Slot.A: "1"}
    assert world.tags["2"]["gantry.canary.outcome"] == "rolled-back-after-promotion"
    assert events == [m.EVENT_ROLLBACK]


def test_the_table_has_a_row_for_every_pair() -> None:
    rows = list(_rows())
    assert len(rows) == len(PHASES) * len(EVENTS) == 104
    assert set(rows) >= VALID
