"""Flow `release`: the stages, composed. No tool logic lives here."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

from prefect import Task, flow
from prefect.runtime import flow_run

from gantry.record import Recorder, ReleaseRecord, one_run_at_a_time
from gantry.settings import Settings, get_settings
from gantry.shared_records import shared_records
from gantry.spec import ReleaseSpec, RetryPolicy
from gantry.stages import evaluate as evaluate_stage
from gantry.stages import scan as scan_stage
from gantry.stages.evaluate import EvalResult
from gantry.stages.register import RegisterResult, tracking_store_state
from gantry.stages.scan import ScanResult
from gantry.stages.smoke import SmokeResult
from tasks._retry import with_retries
from tasks.build import build_task
from tasks.canary import canary_task
from tasks.evaluate import evaluate_task
from tasks.register import register_task
from tasks.scan import scan_task
from tasks.sign import sign_task
from tasks.smoke import smoke_task
from tasks.weights import weights_task

P = ParamSpec("P")
R = TypeVar("R")


class StageRunner(Protocol):
    """How a stage's task is called: as a Prefect task run, or (benchmarks) its plain
    function."""

    def __call__(self, task: Task[P, R], policy: RetryPolicy) -> Callable[P, R]: ...


def as_task_run(task: Task[P, R], policy: RetryPolicy) -> Callable[P, R]:
    """A Prefect task run with the spec's retry policy (transient errors only)."""
    return with_retries(task, policy)


def compose(spec: ReleaseSpec, run: StageRunner, *, flow_run_id: str | None) -> ReleaseRecord:
    """The stages in order, each recorded, each handed the typed results before it."""
    settings = get_settings()
    # On several hosts the records are also kept where every host reads them: a run
    # re-submitted to another worker resumes there. None on one machine.
    shared = shared_records(settings, spec.mlflow.timeout_s)
    with one_run_at_a_time(settings.releases_dir, spec.release_id):
        rec = Recorder(settings.releases_dir, spec, flow_run_id=flow_run_id, shared=shared)
        return _stages(spec, run, rec, settings)


def _stages(
    spec: ReleaseSpec, run: StageRunner, rec: Recorder, settings: Settings
) -> ReleaseRecord:
    policy = spec.retries
    weights = rec.run_stage(
        "weights", lambda: run(weights_task, policy)(spec.source, str(settings.weights_dir))
    )
    build = rec.run_stage("build", lambda: run(build_task, policy)(spec, weights))
    scan = rec.run_stage(
        "scan",
        lambda: run(scan_task, policy)(spec, build),
        reuse=(ScanResult, build.digest),
        stale=lambda earlier: scan_stage.stale_because(earlier, spec.scan),
    )
    sign = rec.run_stage("sign", lambda: run(sign_task, policy)(spec, build, scan, weights))
    # What smoke and evaluate consume: the image, the weights and their signatures. Named by
    # content and key, never by a path of this host: another host resumes on the same key.
    served = (
        f"{build.digest} {weights.manifest_digest} {sign.signature_ref} "
        f"{sign.weights_key_fingerprint}"
    )
    smoke = rec.run_stage(
        "smoke",
        lambda: run(smoke_task, policy)(spec, build, weights, sign),
        reuse=(SmokeResult, served),
    )
    # A local tracking store untouched since this release last succeeded holds its
    # version, with the `champion` alias on it: the stages below need not open it (MLflow's
    # import and store are most of a re-run). Any write since (another release, a
    # rollback, a re-evaluation tag) changes the fingerprint, and they ask the store.
    unchanged = rec.store_unchanged(tracking_store_state(spec, settings))
    eval_key = evaluate_stage.reuse_key(
        spec,
        settings,
        served,
        earlier=rec.last_result("evaluate", EvalResult),
        store_unchanged=unchanged,
    )
    evaluation = rec.run_stage(
        "evaluate",
        lambda: run(evaluate_task, policy)(spec, build, weights, sign),
        reuse=(EvalResult, eval_key) if eval_key else None,
    )
    registered = rec.run_stage(
        "register",
        lambda: run(register_task, policy)(spec, weights, build, scan, sign, evaluation, smoke),
        reuse=(RegisterResult, served),
        may_reuse=unchanged,
    )
    # Never re-used from an earlier record: the live deployment is the truth, and the stage
    # itself finds a release that is already champion (and only checks it serves). It starts
    # once the record is shared: whichever host rolls back later must read it.
    rec.run_stage(
        "canary",
        lambda: run(canary_task, policy)(
            spec,
            build,
            weights,
            sign,
            registered,
            known_champion=unchanged,
            record=str(rec.run_path),
        ),
        shared_first=True,
    )
    return rec.succeed(tracking_store_state=tracking_store_state(spec, settings))


@flow(
    name="release",
    flow_run_name="{spec.name}@{spec.source.revision}",
    persist_result=False,
    log_prints=False,
)
def release(spec: ReleaseSpec) -> ReleaseRecord:
    """Release one model: weights → build → scan → sign → smoke → evaluate → register →
    canary.

    Each stage is retried only on transient errors, with the spec's backoff; each skips its
    work when its content-addressed result already exists.

    Args:
        spec: What to release and how, with the fields of a spec YAML file
            (`gantry spec-schema`). The same spec resumes the same release.
    """
    return compose(spec, as_task_run, flow_run_id=flow_run.get_id())
