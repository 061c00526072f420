"""The canary as one transition table: ``transition(status, event) -> (status, effects)``.

Every change to a model's live traffic is an :data:`Event` here: a canary's start, its
steps and verdicts, approval, promotion, rollback (a failed check, ``gantry rollback``),
the keep-warm retirement of the previous champion, and the recovery of whatever a killed
run left. :func:`transition` is pure: it says what the status becomes and which
:data:`Effect` s bring the world (router weights, servers, MLflow's `champion` alias and
tags, the status file) there. :class:`~gantry.stages.canary.executor.Deployment` applies
them in order.

Why that order is safe to repeat: a transition first persists the phase it is in
(``promoting``, ``rolling-back``, a champion being ``withdrawing``), then acts, then
persists the outcome. Every effect is idempotent (set this weight, this alias; remove
that server), so a run killed after any effect leaves a status whose phase says what to
finish, and :class:`Recover` (the next release of the model) or :class:`RollbackRequested`
(``gantry rollback``) applies the same effects again: there is one rollback path.

    >>> from gantry.adapters.haproxy import Slot
    >>> s = DeploymentStatus(model="m", name="gantry-m", champion=Served(
    ...     version="1", release_id="m-1", record="r", image="i", slot=Slot.A))
    >>> transition(s, RetirePrevious(force=True))[1]
    ()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gantry.adapters.haproxy import Slot
from gantry.deploy.router import Launch
from gantry.errors import DeploymentNotFoundError, InvalidTransitionError
from gantry.stages.canary.analysis import (
    StepVerdict,
    analysed_steps,
    describe_failure,
    query_tags,
    verdict_summary,
)
from gantry.stages.canary.state import CanaryStatus, DeploymentStatus, Phase, Served, now

EVENT_PROMOTED = "gantry.canary.promoted"
EVENT_ROLLED_BACK = "gantry.canary.rolled-back"
EVENT_ROLLBACK = "gantry.rollback"

# --- effects: what the executor does, in order -------------------------------------------


@dataclass(frozen=True)
class Persist:
    """Write this status (atomically) and report the canary's progress."""

    status: DeploymentStatus


@dataclass(frozen=True)
class EnsureRouter:
    """Create the router with ``weights`` if it is missing or dead; else keep it."""

    weights: Mapping[Slot, int]


@dataclass(frozen=True)
class StartServer:
    """Start ``launch`` in ``slot`` (replacing what is there) and wait until the router's
    health check sees it up."""

    slot: Slot
    launch: Launch
    deadline_s: float


@dataclass(frozen=True)
class EnsureServing:
    """Make sure ``served`` runs; start it again from its release record if it is missing
    (or dead, unless ``died_is_error``)."""

    served: Served
    died_is_error: bool = False


@dataclass(frozen=True)
class Readmit:
    """Put a drained slot back into the router's rotation (its weight still decides)."""

    slot: Slot


@dataclass(frozen=True)
class SetWeights:
    """Change the router's weights live."""

    weights: Mapping[Slot, int]


@dataclass(frozen=True)
class Drain:
    """Weight 0 and let requests in flight finish (skipped if nothing runs there)."""

    slot: Slot


@dataclass(frozen=True)
class Remove:
    """Stop and remove the slot's server (idempotent)."""

    slot: Slot


@dataclass(frozen=True)
class RemoveUnused:
    """Remove servers in slots the status does not account for (orphans of a crash)."""

    in_use: frozenset[Slot]


@dataclass(frozen=True)
class SetAlias:
    """Point MLflow's `champion` alias at ``version``."""

    version: str


@dataclass(frozen=True)
class TagVersion:
    """Set tags on a model version; ``best_effort``: a failure is logged, not raised
    (a superseded version MLflow may no longer have)."""

    version: str
    tags: Mapping[str, str]
    best_effort: bool = False


@dataclass(frozen=True)
class Archive:
    """Keep a finished canary's status under the deployment's ``history/``."""

    canary: CanaryStatus


@dataclass(frozen=True)
class Emit:
    """A Prefect event (``gantry.canary.promoted``, ...)."""

    name: str
    payload: Mapping[str, Any]


Effect = (
    Persist
    | EnsureRouter
    | StartServer
    | EnsureServing
    | Readmit
    | SetWeights
    | Drain
    | Remove
    | RemoveUnused
    | SetAlias
    | TagVersion
    | Archive
    | Emit
)

# --- events: what happened, or what was asked for ----------------------------------------


@dataclass(frozen=True)
class Begin:
    """A canary of ``candidate`` starts beside ``champion`` (None: a first deployment,
    which goes straight to 100 %)."""

    candidate: Served
    champion: Served | None
    steps: tuple[int, ...]
    launch: Launch
    deadline_s: float
    at: datetime = field(default_factory=now)


@dataclass(frozen=True)
class Shift:
    """Step ``step`` of the canary: the candidate gets ``weight`` % of the traffic."""

    step: int
    weight: int
    at: datetime = field(default_factory=now)


@dataclass(frozen=True)
class Judged:
    """The current step's analysis window ended with ``verdict``; a failed one rolls the
    candidate back at once."""

    verdict: StepVerdict
    at: datetime = field(default_factory=now)


@dataclass(frozen=True)
class AwaitApproval:
    """Every window passed and a person must approve the step to 100 %."""

    at: datetime = field(default_factory=now)


@dataclass(frozen=True)
class Promote:
    """The candidate takes all traffic and the `champion` alias; the old champion is kept
    warm for ``keep_warm_s``."""

    keep_warm_s: float = 0.0
    at: datetime = field(default_factory=now)


@dataclass(frozen=True)
class Abort:
    """The candidate is rolled back: ``reason`` and the checks that failed."""

    reason: str
    checks: tuple[str, ...] = ()
    at: datetime = field(default_factory=now)


@dataclass(frozen=True)
class Recover:
    """Release ``release_id`` takes the deployment's lock: whatever an earlier run left
    unfinished is finished (its own promotion, a withdrawal) or rolled back (any other
    canary), and orphan servers are removed."""

    release_id: str
    keep_warm_s: float = 0.0
    at: datetime = field(default_factory=now)


@dataclass(frozen=True)
class RollbackRequested:
    """``gantry rollback``: abort a canary, else give traffic and the alias back to the
    previous champion, else make sure the champion serves."""

    at: datetime = field(default_factory=now)


@dataclass(frozen=True)
class RetirePrevious:
    """Remove the warm previous champion once its time is up (or now, ``force``)."""

    force: bool = False
    at: datetime = field(default_factory=now)


@dataclass(frozen=True)
class Adopt:
    """``served`` is the champion (MLflow says so) and must serve all traffic here."""

    served: Served
    at: datetime = field(default_factory=now)


Event = (
    Begin
    | Shift
    | Judged
    | AwaitApproval
    | Promote
    | Abort
    | Recover
    | RollbackRequested
    | RetirePrevious
    | Adopt
)

Effects = tuple[Effect, ...]


# --- the table -----------------------------------------------------------------------------


def transition(status: DeploymentStatus, event: Event) -> tuple[DeploymentStatus, Effects]:
    """The status after ``event`` and the effects that get the world there, in order.

    ``status`` is not changed. An event that does not apply in the current phase raises
    :class:`~gantry.errors.InvalidTransitionError` (nothing to apply).
    """
    s = status.model_copy(deep=True)
    match event:
        case Begin():
            return _begin(s, event)
        case Shift():
            return _shift(s, event)
        case Judged():
            return _judged(s, event)
        case AwaitApproval():
            c = _require(s, event, Phase.PROGRESSING)
            _require_all_judged(s, c, event)
            c.to(Phase.WAITING_APPROVAL, "waiting for a person to approve the step to 100 %")
            return s, (Persist(_snap(s)),)
        case Promote():
            c = _require(
                s, event, Phase.INITIALIZING, Phase.PROGRESSING, Phase.WAITING_APPROVAL,
                Phase.PROMOTING,
            )  # fmt: skip
            if c.phase in (Phase.INITIALIZING, Phase.PROGRESSING):
                _require_all_judged(s, c, event)
            return _promote(s, event.keep_warm_s, event.at)
        case Abort():
            _require(s, event, *_ACTIVE)
            return _abort(s, event.reason, event.checks, event.at)
        case Recover():
            return _recover(s, event)
        case RollbackRequested():
            return _rollback_requested(s, event.at)
        case RetirePrevious():
            return _retire_previous(s, event)
        case Adopt():
            _require_idle(s, event)
            return _adopt(s, event.served)
    raise AssertionError(f"unknown event {event!r}")  # pragma: no cover - exhaustive


_ACTIVE = tuple(p for p in Phase if not p.final)


def phase_of(status: DeploymentStatus) -> Phase | None:
    """The phase the table is in: the canary's, or None when no canary ever ran."""
    return status.canary.phase if status.canary is not None else None


def _invalid(s: DeploymentStatus, event: Event, why: str) -> InvalidTransitionError:
    return InvalidTransitionError(
        f"{type(event).__name__} does not apply to the deployment of {s.model} "
        f"(phase {phase_of(s) or 'none'}): {why}",
        fix=f"run `gantry rollback {s.model}` to bring the deployment to a known state",
    )


def _require(s: DeploymentStatus, event: Event, *phases: Phase) -> CanaryStatus:
    c = s.canary
    if c is None or c.phase not in phases or s.withdrawing is not None:
        raise _invalid(s, event, f"it needs a canary in {', '.join(phases)}")
    return c


def _require_idle(s: DeploymentStatus, event: Event) -> None:
    if s.active_canary is not None or s.withdrawing is not None:
        raise _invalid(s, event, "another change of the deployment is unfinished")


def _require_all_judged(s: DeploymentStatus, c: CanaryStatus, event: Event) -> None:
    want = len(analysed_steps(c.steps)) if s.champion is not None else 0
    if len(c.verdicts) != want or not all(v.passed for v in c.verdicts):
        raise _invalid(s, event, f"{len(c.verdicts)} of {want} analysed steps passed")


def _snap(s: DeploymentStatus) -> DeploymentStatus:
    return s.model_copy(deep=True)


def _begin(s: DeploymentStatus, ev: Begin) -> tuple[DeploymentStatus, Effects]:
    _require_idle(s, ev)
    if s.previous is not None and not s.previous_retired:
        raise _invalid(s, ev, "the previous champion still holds the candidate's slot")
    champ, cand = ev.champion, ev.candidate
    if champ is not None and champ.slot == cand.slot:
        raise _invalid(s, ev, "the candidate's slot is the champion's")
    s.champion, s.candidate = champ, cand
    s.canary = CanaryStatus(
        model=s.model,
        release_id=cand.release_id,
        candidate_version=cand.version,
        champion_version=champ.version if champ else None,
        steps=ev.steps if champ else (100,),
        started_at=ev.at,
        last_transition_at=ev.at,
    )
    # The candidate is recorded before it starts: a crash leaves nothing unknown.
    return s, (
        Persist(_snap(s)),
        EnsureRouter({(champ or cand).slot: 100}),
        StartServer(cand.slot, ev.launch, ev.deadline_s),
    )


def _shift(s: DeploymentStatus, ev: Shift) -> tuple[DeploymentStatus, Effects]:
    c = _require(s, ev, Phase.INITIALIZING, Phase.PROGRESSING)
    champ, cand = s.champion, s.candidate
    if champ is None or cand is None:
        raise _invalid(s, ev, "a step needs a champion and a candidate")
    if not 0 < ev.weight < 100 or len(c.verdicts) != ev.step:
        raise _invalid(s, ev, f"step {ev.step} at {ev.weight} % after {len(c.verdicts)} verdicts")
    c.step, c.weight = ev.step, ev.weight
    c.to(Phase.PROGRESSING, f"{ev.weight} % of traffic on version {cand.version}", ev.at)
    return s, (Persist(_snap(s)), SetWeights({cand.slot: ev.weight, champ.slot: 100 - ev.weight}))


def _judged(s: DeploymentStatus, ev: Judged) -> tuple[DeploymentStatus, Effects]:
    c = _require(s, ev, Phase.PROGRESSING)
    v = ev.verdict
    if v.step != c.step or len(c.verdicts) != c.step:
        raise _invalid(s, ev, f"a verdict of step {v.step} while step {c.step} is running")
    c.verdicts.append(v)
    if v.passed:
        return s, (Persist(_snap(s)),)
    # The window ends the moment a check fails: that is when the failure was seen.
    c.first_failure_at = v.finished_at
    reason = f"step {v.step + 1} at {v.weight} %: {describe_failure(v.checks)}"
    return _abort(s, reason, v.failed_checks, ev.at)


def _promote(
    s: DeploymentStatus, keep_warm_s: float, at: datetime
) -> tuple[DeploymentStatus, Effects]:
    c, cand, champ = s.canary, s.candidate, s.champion
    assert c is not None and cand is not None
    c.to(Phase.PROMOTING, at=at)
    effects: list[Effect] = [Persist(_snap(s))]
    weights = {cand.slot: 100}
    if champ is not None and champ.slot != cand.slot:
        weights[champ.slot] = 0
    effects += [SetWeights(weights), SetAlias(cand.version)]
    if champ is not None and champ.version != cand.version:
        effects.append(
            TagVersion(
                champ.version,
                {"gantry.superseded_by": cand.version, "gantry.retired_at": at.isoformat()},
                best_effort=True,
            )
        )
    effects.append(
        TagVersion(
            cand.version,
            {
                "gantry.canary.outcome": "promoted" if champ else "deployed",
                "gantry.canary.decision_s": f"{(at - c.started_at).total_seconds():.1f}",
                "gantry.canary.verdicts": verdict_summary(c.verdicts)[:5000],
                **query_tags(c.verdicts),
                "gantry.promoted_at": at.isoformat(),
            },
        )
    )
    c.weight = 100
    s.previous = champ if champ is not None and champ.slot != cand.slot else None
    s.previous_warm_until = at + timedelta(seconds=keep_warm_s) if champ else None
    s.previous_retired = s.previous is None
    s.champion, s.candidate = cand, None
    c.to(Phase.SUCCEEDED, f"version {cand.version} is the champion", at)
    effects += [
        Archive(c.model_copy(deep=True)),
        Persist(_snap(s)),
        Emit(
            EVENT_PROMOTED,
            {
                "model": s.model,
                "version": cand.version,
                "previous_version": champ.version if champ else None,
                "release_id": cand.release_id,
            },
        ),
    ]
    return s, tuple(effects)


def _abort(
    s: DeploymentStatus, reason: str, checks: tuple[str, ...], at: datetime
) -> tuple[DeploymentStatus, Effects]:
    """Champion back to 100 % (started again first if it died) with the `champion` alias
    on it (a promotion may have moved it), candidate drained and removed, verdict kept."""
    c, cand, champ = s.canary, s.candidate, s.champion
    if c is not None:
        if checks:
            c.failed_checks = checks
            c.first_failure_at = c.first_failure_at or at
        c.to(Phase.ROLLING_BACK, reason, at)
    effects: list[Effect] = [Persist(_snap(s))]
    if champ is not None and cand is not None and champ.slot != cand.slot:
        effects += [
            EnsureServing(champ),
            Readmit(champ.slot),
            SetWeights({champ.slot: 100, cand.slot: 0}),
            SetAlias(champ.version),
        ]
        if c is not None:
            c.weight, c.weight_zero_at = 0, at
        effects += [Persist(_snap(s)), Drain(cand.slot), Remove(cand.slot)]
    elif cand is not None:
        # No champion to fall back to (a first deployment that failed): nothing serves.
        effects.append(Remove(cand.slot))
    s.candidate = None
    if c is not None:
        c.to(Phase.ROLLED_BACK, reason, at)
        effects.append(Archive(c.model_copy(deep=True)))
    effects.append(Persist(_snap(s)))
    if cand is not None and c is not None:
        tags = {
            "gantry.canary.outcome": "rolled-back",
            "gantry.canary.reason": reason[:5000],
            "gantry.canary.failed_checks": ",".join(checks),
            "gantry.canary.verdicts": verdict_summary(c.verdicts)[:5000],
            **query_tags(c.verdicts),
        }
        if c.decided_at is not None:
            tags["gantry.canary.decision_s"] = (
                f"{(c.decided_at - c.started_at).total_seconds():.1f}"
            )
        effects += [
            TagVersion(cand.version, tags),
            Emit(
                EVENT_ROLLED_BACK,
                {
                    "model": s.model,
                    "version": cand.version,
                    "release_id": cand.release_id,
                    "reason": reason,
                    "failed_checks": list(checks),
                },
            ),
        ]
    return s, tuple(effects)


def _finish_withdrawal(s: DeploymentStatus, at: datetime) -> tuple[DeploymentStatus, Effects]:
    """The previous champion (now ``champion``) serves 100 % with the alias; the one
    withdrawn is tagged, drained and removed."""
    champ, gone = s.champion, s.withdrawing
    assert champ is not None and gone is not None
    s.withdrawing = None
    return s, (
        EnsureServing(champ),
        Readmit(champ.slot),
        SetWeights({champ.slot: 100, gone.slot: 0}),
        SetAlias(champ.version),
        TagVersion(
            gone.version,
            {
                "gantry.canary.outcome": "rolled-back-after-promotion",
                "gantry.rolled_back_at": at.isoformat(),
            },
        ),
        Drain(gone.slot),
        Remove(gone.slot),
        Persist(_snap(s)),
        Emit(
            EVENT_ROLLBACK,
            {"model": s.model, "version": champ.version, "removed_version": gone.version},
        ),
    )


def _recover(s: DeploymentStatus, ev: Recover) -> tuple[DeploymentStatus, Effects]:
    effects: Effects = ()
    if s.withdrawing is not None:
        s, effects = _finish_withdrawal(s, ev.at)
    c = s.active_canary
    if c is not None:
        if c.phase is Phase.PROMOTING and c.release_id == ev.release_id:
            s, more = _promote(s, ev.keep_warm_s, ev.at)
        else:
            reason = f"the canary of release {c.release_id} was interrupted in phase {c.phase}"
            s, more = _abort(s, reason, (), ev.at)
        effects += more
    return s, (*effects, RemoveUnused(s.slots_in_use()))


def _rollback_requested(s: DeploymentStatus, at: datetime) -> tuple[DeploymentStatus, Effects]:
    if s.withdrawing is not None:
        return _finish_withdrawal(s, at)
    c = s.active_canary
    if c is not None:
        s, effects = _abort(s, f"rollback requested (canary was {c.phase})", ("manual",), at)
        return s, (*effects, RemoveUnused(s.slots_in_use()))
    champ, prev = s.champion, s.previous
    if champ is not None and prev is not None:
        # Recorded first: a rollback killed half-way is finished, never undone.
        s.champion, s.withdrawing, s.previous = prev, champ, None
        s.previous_retired, s.previous_warm_until = True, None
        intent = Persist(_snap(s))
        s, effects = _finish_withdrawal(s, at)
        return s, (intent, *effects)
    if champ is None:
        raise DeploymentNotFoundError(f"{s.model} has no champion deployed to go back to")
    return s, (
        EnsureServing(champ),
        SetWeights({champ.slot: 100, champ.slot.other: 0}),
        RemoveUnused(s.slots_in_use()),
        Persist(_snap(s)),
    )


def _retire_previous(s: DeploymentStatus, ev: RetirePrevious) -> tuple[DeploymentStatus, Effects]:
    prev, until = s.previous, s.previous_warm_until
    if prev is None or s.previous_retired:
        return s, ()
    if not ev.force and until is not None and until > ev.at:
        return s, ()
    # Recorded first: a run killed before the removal leaves a container no status
    # accounts for, which the next Recover removes; never a "warm" champion that is gone.
    s.previous_retired = True
    return s, (Persist(_snap(s)), Drain(prev.slot), Remove(prev.slot))


def _adopt(s: DeploymentStatus, served: Served) -> tuple[DeploymentStatus, Effects]:
    """MLflow's champion takes over the deployment: whatever the status said served before
    (another version, a warm previous one in its slot) is no longer accounted for.

    Acted on first, recorded last: until the status names ``served``, it disagrees with
    MLflow's alias, and that disagreement is what makes the next release adopt it again.
    """
    s.champion = served
    if s.previous is not None and (s.previous.slot == served.slot or s.previous == served):
        s.previous, s.previous_retired, s.previous_warm_until = None, True, None
    return s, (
        EnsureRouter({served.slot: 100}),
        EnsureServing(served),
        SetWeights({served.slot: 100, served.slot.other: 0}),
        RemoveUnused(s.slots_in_use()),
        Persist(_snap(s)),
    )


def finishes_promotion(status: DeploymentStatus, release_id: str) -> bool:
    """Whether :class:`Recover` by ``release_id`` completes that release's own promotion."""
    c = status.active_canary
    return c is not None and c.phase is Phase.PROMOTING and c.release_id == release_id
