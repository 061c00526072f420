"""The release record: one JSON file per release with every stage's outcome.

Written atomically after every stage, so a run killed at any point leaves a record that
says how far it got. ``<state dir>/releases/<release-id>.json`` holds the latest run of a
release, a symlink to that run's own file under ``releases/history/`` (``run_record``),
which stays unchanged once the run ends. What a deployment runs points at that file, so a
later run of the same spec that fails cannot take away what `gantry rollback`,
re-evaluation and `gantry verify` need of the version that serves.

Records are private (0600, in a 0700 directory) and hold no secret: the spec is stored as
:func:`stored_spec` redacts it, as MLflow's params are (a valid spec holds none anyway).

With several hosts (``GANTRY_TOPOLOGY=multi``) every write is also sent to a
:class:`RecordShare` (:mod:`gantry.shared_records`: the tracking server), and the earlier
runs a stage is re-used from are this host's and the share's, newest first: a release
re-submitted to another worker resumes where the dead one stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

import gantry
from gantry.atomicfile import point_atomic, private_dir, sweep_stale_prefix, write_atomic
from gantry.errors import GantryError, ReleaseInProgressError
from gantry.locks import lock_for
from gantry.proc import REDACTED, SECRET_NAME, redact_text
from gantry.settings import get_settings
from gantry.spec import ReleaseSpec

log = logging.getLogger("gantry.record")

#: The pipeline's stages, in order. A stage not yet run in a record is ``pending``.
STAGES = ("weights", "build", "scan", "sign", "smoke", "evaluate", "register", "canary")

T = TypeVar("T", bound=BaseModel)

#: How many earlier runs of a release a stage's last result is looked for in.
MAX_RUNS_LOOKED_BACK = 20

#: After a write to the share failed, the next ones are not tried for this long (each
#: would wait for its timeout in front of the stage); the run's last write always is.
SHARE_RETRY_S = 30.0


class StageStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class StageError(BaseModel):
    type: str = Field(description="Exception class name.")
    message: str
    transient: bool


class StageRecord(BaseModel):
    status: StageStatus = StageStatus.PENDING
    cached: bool = False
    duration_s: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: StageError | None = None
    inputs: str | None = Field(
        default=None,
        description="Fingerprint of what the stage consumed (digests); a re-run of the release "
        "re-uses the result when it is unchanged.",
    )


class ReleaseRecord(BaseModel):
    release_id: str
    model: str
    status: StageStatus = StageStatus.RUNNING
    spec: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None = None
    flow_run_id: str | None = None
    run_id: str | None = Field(
        default=None,
        description="This run's own id; the shared record store (several hosts) keys runs by it.",
    )
    gantry_version: str = gantry.__version__
    stages: dict[str, StageRecord]
    error: StageError | None = None
    run_record: str | None = Field(
        default=None,
        description="This run's own record file, unchanged once the run ends (the latest "
        "record of the release points at it while it is the latest run).",
    )
    tracking_store_state: str | None = Field(
        default=None,
        description="Fingerprint of a local MLflow store when the release succeeded: a "
        "re-run that finds it unchanged knows the registration and the champion alias "
        "are as this run left them, without opening the store.",
    )


def _now() -> datetime:
    return datetime.now(UTC)


class SharedRun(BaseModel):
    """One run of a release in the shared store, before its record is read."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    started_at: datetime
    host: str = Field(description="The host that ran it.")
    mlflow_run_id: str


class RecordShare(Protocol):
    """Where the records of a release's runs are kept for every host to read."""

    @property
    def where(self) -> str: ...

    def put(self, record: ReleaseRecord) -> None: ...

    def runs(self, release_id: str, limit: int) -> list[SharedRun]: ...

    def read(self, run: SharedRun) -> ReleaseRecord | None: ...

    def history(self, release_id: str, limit: int) -> Iterator[ReleaseRecord]: ...


#: Records are the owner's alone (and so is their directory: :func:`private_dir`).
RECORD_MODE = 0o600


def stored_spec(spec: ReleaseSpec) -> dict[str, Any]:
    """The spec as a record keeps it: values under secret-named runtime.env keys and
    credentials in URLs redacted (the spec's validation refuses both; this is the guard
    for a spec built around it)."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return redact_text(node) if isinstance(node, str) else node

    data: dict[str, Any] = scrub(spec.model_dump(mode="json"))
    env = data.get("runtime", {}).get("env", {})
    for key in env:
        if SECRET_NAME.search(key):
            env[key] = REDACTED
    return data


def record_path(releases_dir: Path, release_id: str) -> Path:
    return releases_dir / f"{release_id}.json"


def _error_of(exc: BaseException) -> StageError:
    from gantry.errors import is_transient

    # Notes carry what went wrong while cleaning up after it (a rollback that failed too).
    message = "\n".join([str(exc), *getattr(exc, "__notes__", ())])
    return StageError(
        type=type(exc).__name__, message=redact_text(message), transient=is_transient(exc)
    )


def _succeeded(stage: StageRecord | None, result_type: type[T]) -> T | None:
    """The result of ``stage`` if it succeeded and still reads as ``result_type``."""
    if stage is None or stage.status != StageStatus.SUCCEEDED:
        return None
    try:
        return result_type.model_validate(stage.result)
    except ValueError:
        return None  # a result of an older Gantry version: run the stage again


class Recorder:
    """Keeps one release record up to date on disk as the stages run."""

    def __init__(
        self,
        releases_dir: Path,
        spec: ReleaseSpec,
        *,
        flow_run_id: str | None,
        shared: RecordShare | None = None,
    ) -> None:
        self.path = record_path(releases_dir, spec.release_id)
        self.record = ReleaseRecord(
            release_id=spec.release_id,
            model=spec.name,
            spec=stored_spec(spec),
            started_at=_now(),
            flow_run_id=flow_run_id,
            run_id=uuid.uuid4().hex,
            stages={name: StageRecord() for name in STAGES},
        )
        private_dir(releases_dir)
        self.shared = shared
        self._share_failed_at: float | None = None
        self._shared_runs: list[SharedRun] | None = None
        self._shared_read: dict[str, ReleaseRecord | None] = {}
        self.previous: ReleaseRecord | None = None
        self._unreadable = False
        self._history = private_dir(self.path.parent / "history")
        # A run killed while writing its own record leaves that file's temp behind, and no
        # later write of the same name comes to sweep it: this release's next run does.
        sweep_stale_prefix(self._history, f"{self.path.stem}.")
        self._archived: Path | None = None
        if self.path.exists():
            try:
                self.previous = load_record(self.path)
            except ValueError:
                log.warning("previous record %s is unreadable; nothing will be reused", self.path)
                self._unreadable = True
            own = self.previous.run_record if self.previous else None
            if own and Path(own).is_file():
                self._archived = Path(own)  # already kept under its own name
            else:
                self._archive_previous()  # a record of an older Gantry, or unreadable
        stamp = self.record.started_at.strftime("%Y%m%dT%H%M%S.%f")
        self.run_path = self._history / f"{self.path.stem}.{stamp}.{uuid.uuid4().hex[:8]}.json"
        self.record.run_record = str(self.run_path)
        self.write()
        point_atomic(self.path, self.run_path)

    def _archive_previous(self) -> None:
        # Microseconds and a random suffix: two runs in one second must not overwrite.
        stamp = datetime.fromtimestamp(self.path.stat().st_mtime, UTC).strftime("%Y%m%dT%H%M%S.%f")
        self._archived = self._history / f"{self.path.stem}.{stamp}.{uuid.uuid4().hex[:8]}.json"
        os.replace(self.path, self._archived)

    def _earlier_runs(self) -> Iterator[ReleaseRecord]:
        """This release's earlier runs, newest first: this host's, and with a share the
        other hosts' too."""
        if self._unreadable:
            return  # reuse nothing rather than guess
        if self.shared is None:
            yield from self._local_runs()
            return
        local = list(self._local_runs())
        try:
            shared = self._list_shared()
        except GantryError as exc:
            log.warning(
                "earlier runs of %s on other hosts are unknown (%s): only this host's are re-used",
                self.record.release_id,
                exc,
            )
            yield from local
            return
        # A run of this host is in both; its own copy is never behind the share's.
        mine = {r.run_id for r in local if r.run_id} | {self.record.run_id}
        entries: list[tuple[datetime, ReleaseRecord | SharedRun]] = [
            (r.started_at, r) for r in local
        ]
        entries += [(s.started_at, s) for s in shared if s.run_id not in mine]
        entries.sort(key=lambda e: e[0], reverse=True)
        for _, item in entries[:MAX_RUNS_LOOKED_BACK]:
            if isinstance(item, ReleaseRecord):
                yield item
                continue
            try:
                rec = self._read_shared(item)
            except (GantryError, ValueError) as exc:
                log.warning(
                    "run %s of %s (%s) cannot be read: %s; older runs are not looked at",
                    item.run_id,
                    self.record.release_id,
                    item.host,
                    exc,
                )
                return  # a gap in the chain, as below
            if rec is not None and rec.release_id == self.record.release_id:
                yield rec

    def _list_shared(self) -> list[SharedRun]:
        assert self.shared is not None
        if self._shared_runs is None:
            self._shared_runs = self.shared.runs(self.record.release_id, MAX_RUNS_LOOKED_BACK)
        return self._shared_runs

    def _read_shared(self, run: SharedRun) -> ReleaseRecord | None:
        assert self.shared is not None
        if run.run_id not in self._shared_read:
            self._shared_read[run.run_id] = self.shared.read(run)
        return self._shared_read[run.run_id]

    def _local_runs(self) -> Iterator[ReleaseRecord]:
        """The previous run of this release on this host, then the archived ones."""
        if self.previous is None:
            return
        yield self.previous
        older = sorted(  # the stamp in the name sorts by time
            (
                p
                for p in self._history.glob(f"{self.path.stem}.*.json")
                if p not in (self._archived, self.run_path)
            ),
            reverse=True,
        )
        for path in older[: MAX_RUNS_LOOKED_BACK - 1]:
            try:
                rec = load_record(path)
            except (OSError, ValueError):
                return  # a gap in the chain: what came before it is not known to be current
            if rec.release_id == self.record.release_id:
                yield rec

    def write(self, *, share: bool = True) -> None:
        write_atomic(self.run_path, self.record.model_dump_json(indent=2), mode=RECORD_MODE)
        if share:
            self._share(strict=False)

    def share(self) -> None:
        """Send the record to the share now, failing (MLflowUnavailableError, transient)
        when it cannot be reached: before a version may serve, every host must be able to
        read how to start it again (`gantry rollback` from any of them)."""
        self._share(strict=True)

    def _share(self, *, strict: bool, last: bool = False) -> None:
        if self.shared is None:
            return
        backing_off = (
            self._share_failed_at is not None
            and time.monotonic() - self._share_failed_at < SHARE_RETRY_S
        )
        if backing_off and not (strict or last):
            return
        try:
            self.shared.put(self.record)
        except GantryError as exc:
            if strict:
                raise
            self._share_failed_at = time.monotonic()
            # Only a cost, never a wrong result: another host re-runs what it cannot see.
            log.warning(
                "the record of %s could not be written to %s (%s); this host's copy is "
                "complete, and other hosts see this run once a later write gets through",
                self.record.release_id,
                self.shared.where,
                exc,
            )
        else:
            self._share_failed_at = None

    def _last_ran(self, name: str) -> StageRecord | None:
        """The stage as it last ran in this release's runs. Runs that failed or were
        killed before it (it is skipped or pending there) are looked through, so a failure
        upstream of it does not cost a finished evaluation."""
        for rec in self._earlier_runs():
            st = rec.stages.get(name)
            if st is not None and st.status not in (StageStatus.SKIPPED, StageStatus.PENDING):
                return st
        return None

    def _reusable(
        self,
        name: str,
        result_type: type[T],
        inputs: str,
        stale: Callable[[T], str | None] | None = None,
    ) -> T | None:
        prev = self._last_ran(name)
        if prev is None or prev.inputs != inputs:
            return None
        result = _succeeded(prev, result_type)
        if result is not None and stale is not None and (why := stale(result)) is not None:
            log.info("stage %s: its earlier result is not re-used: %s", name, why)
            return None
        return result

    def last_result(self, name: str, result_type: type[T]) -> T | None:
        """The stage's result where it last ran in this release and succeeded, if any."""
        return _succeeded(self._last_ran(name), result_type)

    def run_stage(
        self,
        name: str,
        fn: Callable[[], T],
        *,
        reuse: tuple[type[T], str] | None = None,
        may_reuse: bool = True,
        stale: Callable[[T], str | None] | None = None,
        shared_first: bool = False,
    ) -> T:
        """Run one stage, recording its outcome; on failure the later stages are skipped
        and the exception propagates (so the flow run fails with it).

        With ``reuse=(ResultType, inputs)``, a stage whose last run in this release (see
        :meth:`_last_ran`) succeeded on the same ``inputs`` (a fingerprint of the digests
        it consumed) is not run again: its result is taken over and marked cached. Resume,
        don't redo.
        ``may_reuse=False`` records the inputs (for the next run) but runs the stage;
        ``stale`` says why a result with the same inputs has expired since (None: it has not).
        ``shared_first``: the stage starts only once the record is in the share (:meth:`share`).
        """
        st = self.record.stages[name]
        st.status, st.started_at = StageStatus.RUNNING, _now()
        st.inputs = reuse[1] if reuse else None
        if reuse and may_reuse and (prior := self._reusable(name, *reuse, stale)) is not None:
            st.status, st.result, st.cached = (
                StageStatus.SUCCEEDED,
                json.loads(prior.model_dump_json()),
                True,
            )
            st.duration_s, st.finished_at = 0.0, _now()
            self.write()
            log.info("stage %s: re-used from an earlier run (inputs unchanged)", name)
            return prior
        self.write()
        t0 = time.monotonic()
        try:
            if shared_first:
                self.share()
            result = fn()
        except BaseException as exc:
            st.status, st.error = StageStatus.FAILED, _error_of(exc)
            st.duration_s, st.finished_at = round(time.monotonic() - t0, 3), _now()
            self._finish(StageStatus.FAILED, skip_after=name, error=st.error)
            raise
        st.status, st.result = StageStatus.SUCCEEDED, json.loads(result.model_dump_json())
        st.cached = bool(getattr(result, "cached", False))
        st.duration_s, st.finished_at = round(time.monotonic() - t0, 3), _now()
        self.write()
        log.info("stage %s %s in %.1fs", name, "cached" if st.cached else "done", st.duration_s)
        return result

    def _finish(
        self, status: StageStatus, *, skip_after: str | None = None, error: StageError | None = None
    ) -> None:
        if skip_after is not None:
            for later in STAGES[STAGES.index(skip_after) + 1 :]:
                self.record.stages[later].status = StageStatus.SKIPPED
        self.record.status, self.record.error = status, error
        self.record.finished_at = _now()
        self.write(share=False)
        self._share(strict=False, last=True)

    def store_unchanged(self, state: str | None) -> bool:
        """Whether the tracking store is exactly as the last succeeded run of this release
        left it (``state``: its fingerprint now; None, unknown). Runs since that failed
        do not matter: had one written to the store, the fingerprint would differ."""
        if state is None:
            return False
        done = next((r for r in self._earlier_runs() if r.status == StageStatus.SUCCEEDED), None)
        return done is not None and done.tracking_store_state == state

    def succeed(self, *, tracking_store_state: str | None = None) -> ReleaseRecord:
        self.record.tracking_store_state = tracking_store_state
        self._finish(StageStatus.SUCCEEDED)
        return self.record


@contextlib.contextmanager
def one_run_at_a_time(releases_dir: Path, release_id: str) -> Iterator[None]:
    """Refuse a second run of a release while one runs: two would share one record and
    race to build, register and deploy the same thing. The lock dies with its holder."""

    def busy(other: str) -> ReleaseInProgressError:
        return ReleaseInProgressError(
            f"release {release_id} is already running ({other})",
            fix="wait for that run to finish (its record and Prefect flow run show where it "
            "is); re-running the spec afterwards resumes what is left",
        )

    lock = lock_for(
        get_settings(),
        f"gantry-release-{release_id}",
        releases_dir / "locks" / f"{release_id}.lock",
    )
    with lock(wait_s=0, holder=f"release {release_id}", busy=busy):
        yield


def write_failed_record(releases_dir: Path, spec: ReleaseSpec, exc: BaseException) -> Path:
    """A record for a run that failed before its flow could record anything (e.g. the
    orchestrator was unreachable), so `gantry release` always has a record to point at."""
    path = record_path(releases_dir, spec.release_id)
    private_dir(releases_dir)
    rec = ReleaseRecord(
        release_id=spec.release_id,
        model=spec.name,
        spec=spec.model_dump(mode="json"),
        started_at=_now(),
        finished_at=_now(),
        status=StageStatus.FAILED,
        stages={name: StageRecord(status=StageStatus.SKIPPED) for name in STAGES},
        error=_error_of(exc),
    )
    write_atomic(path, rec.model_dump_json(indent=2), mode=RECORD_MODE)
    return path


def _deployable(rec: ReleaseRecord) -> bool:
    """Whether the run got through what a deployment needs: build, weights, signatures."""
    return all(
        rec.stages.get(s) is not None and rec.stages[s].status == StageStatus.SUCCEEDED
        for s in ("weights", "build", "sign")
    )


def serving_record(releases_dir: Path, release_id: str, shared: RecordShare | None = None) -> Path:
    """The record to start ``release_id`` from: its newest run that got through `sign`
    (build, weights and signatures are what a deployment needs), else the latest record
    (whose reading then says what is missing).

    With a share, a release no run of this host got that far is looked for there, and the
    record found is kept under this host's ``history/`` (another host ran it)."""
    latest = record_path(releases_dir, release_id)
    runs = sorted((releases_dir / "history").glob(f"{latest.stem}.*.json"), reverse=True)
    for path in (latest, *runs):
        try:
            rec = load_record(path)
        except (OSError, ValueError):
            continue
        if rec.release_id == release_id and _deployable(rec):
            return (
                Path(rec.run_record) if rec.run_record and Path(rec.run_record).is_file() else path
            )
    if shared is not None:
        for rec in shared.history(release_id, MAX_RUNS_LOOKED_BACK):
            if _deployable(rec):
                return _keep_shared(releases_dir, rec)
    return latest


def _keep_shared(releases_dir: Path, rec: ReleaseRecord) -> Path:
    """A copy of another host's record under this host's history, pointing at itself."""
    history = private_dir(private_dir(releases_dir) / "history")
    stamp = rec.started_at.strftime("%Y%m%dT%H%M%S.%f")
    path = history / f"{rec.release_id}.{stamp}.{(rec.run_id or uuid.uuid4().hex)[:8]}.json"
    kept = rec.model_copy(update={"run_record": str(path)})
    write_atomic(path, kept.model_dump_json(indent=2), mode=RECORD_MODE)
    log.info(
        "record of %s read from the shared store (another host ran it): %s", rec.release_id, path
    )
    return path


def load_record(path: Path) -> ReleaseRecord:
    return ReleaseRecord.model_validate_json(path.read_bytes())
