"""Release records where every host can read them (``GANTRY_TOPOLOGY=multi``).

A worker host keeps its records under its own state dir, as one machine does. With several
hosts, each run of a release is also an MLflow run in the experiment
``gantry-release-records`` of the tracking server all hosts share: the record is its
artifact ``record.json`` (replaced at every write) and its status a tag. A host that runs a
release another host ran before (a flow run re-submitted after its worker died) reads the
earlier runs from there and re-uses the stages done elsewhere, as the host that did them
would; `gantry rollback` and a canary that must start a champion released elsewhere read
its record from there too.

Only what is re-derivable stays per host: weights blobs and the wheelhouse are
content-addressed and verified on use, so a host that misses them fetches them again; a
scan's report files are a host's own too, so another host scans again
(:func:`gantry.stages.scan.stale_because`).

Usage::

    shared = shared_records(settings)  # None on one machine
    rec = Recorder(settings.releases_dir, spec, flow_run_id=None, shared=shared)
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from gantry.adapters.mlflow_registry import MlflowRegistry, is_sqlite
from gantry.errors import ConfigError
from gantry.proc import redact_text
from gantry.record import (
    MAX_RUNS_LOOKED_BACK,
    ReleaseRecord,
    SharedRun,
    StageStatus,
    serving_record,
)
from gantry.settings import Settings
from gantry.stages.register import default_tracking_uri

log = logging.getLogger(__name__)

EXPERIMENT: Final = "gantry-release-records"
RELEASE_TAG: Final = "gantry.record.release_id"
RUN_TAG: Final = "gantry.record.run_id"
STATUS_TAG: Final = "gantry.record.status"
HOST_TAG: Final = "gantry.record.host"
FLOW_RUN_TAG: Final = "gantry.record.flow_run_id"
ARTIFACT: Final = "record.json"
#: Files of a run another host needs to start its version: the weights' signature bundle.
FILES: Final = "files"

_FINAL = {StageStatus.SUCCEEDED: "FINISHED", StageStatus.FAILED: "FAILED"}


class SharedRecords:
    """Release records in an MLflow tracking server (see the module docstring).

    Every call may raise :class:`~gantry.errors.MLflowUnavailableError` (transient) when
    the server cannot be reached; callers decide whether that fails them.
    """

    def __init__(self, registry: MlflowRegistry, *, host: str | None = None) -> None:
        self.registry = registry
        self.host = host or socket.gethostname()
        self._experiment: str | None = None
        self._mlflow_run: dict[str, str] = {}  # a record's run_id -> its MLflow run
        self._files_sent: set[tuple[str, str]] = set()  # (MLflow run, file) uploaded

    @property
    def where(self) -> str:
        """The tracking server, for messages (credentials redacted)."""
        return redact_text(self.registry.tracking_uri)

    def _experiment_id(self) -> str:
        if self._experiment is None:
            self._experiment = self.registry.ensure_experiment(EXPERIMENT)
        return self._experiment

    def put(self, record: ReleaseRecord) -> None:
        """Store ``record`` (one run of a release) as it is now; the first call for a run
        creates its MLflow run, a run that has finished is ended as FINISHED or FAILED."""
        if record.run_id is None:
            raise ValueError("a record without run_id cannot be shared")
        run = self._mlflow_run.get(record.run_id)
        if run is None:
            run = self.registry.start_run(
                self._experiment_id(),
                record.release_id,
                {
                    RELEASE_TAG: record.release_id,
                    RUN_TAG: record.run_id,
                    HOST_TAG: self.host,
                    FLOW_RUN_TAG: record.flow_run_id or "",
                    "gantry.model": record.model,
                },
            )
            self._mlflow_run[record.run_id] = run
        # The signature before the record that names it: a reader never finds a run whose
        # record says signed and whose signature is not there yet.
        signature = _weights_signature(record)
        sent = (run, str(signature))
        if signature is not None and sent not in self._files_sent and signature.is_file():
            self.registry.log_artifact(run, signature, FILES)
            self._files_sent.add(sent)
        self.registry.log_text(run, record.model_dump_json(indent=2), ARTIFACT)
        self.registry.log_batch(run, tags={STATUS_TAG: record.status.value})
        if (final := _FINAL.get(record.status)) is not None:
            self.registry.finish_run(run, final)

    def runs(self, release_id: str, limit: int) -> list[SharedRun]:
        """The runs of ``release_id`` stored here, newest first, not yet read."""
        found = self.registry.tagged_runs(self._experiment_id(), RELEASE_TAG, release_id, limit)
        return [
            SharedRun(
                run_id=run.data.tags.get(RUN_TAG, ""),
                started_at=datetime.fromtimestamp(run.info.start_time / 1000, UTC),
                host=run.data.tags.get(HOST_TAG, ""),
                mlflow_run_id=str(run.info.run_id),
            )
            for run in found
            if run.data.tags.get(RUN_TAG)
        ]

    def read(self, run: SharedRun) -> ReleaseRecord | None:
        """The record of one stored run; None when it has none yet (its host died between
        creating the run and writing the record, which then held no stage anyway).

        Raises ValueError when the stored record does not read as one (another Gantry
        version's): the caller treats that as a gap, as in a host's own history.
        """
        text = self.registry.read_text(run.mlflow_run_id, ARTIFACT)
        if text is None:
            return None
        try:
            return ReleaseRecord.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(
                f"the record of run {run.mlflow_run_id} ({run.host}) is unreadable: {exc}"
            ) from None

    def weights_signature(self, release_id: str, manifest_digest: str) -> str | None:
        """The weights signature bundle a run of ``release_id`` made over the manifest
        ``manifest_digest`` (signed with the key every host shares); None if none is kept."""
        for run in self.runs(release_id, MAX_RUNS_LOOKED_BACK):
            try:
                rec = self.read(run)
            except ValueError:
                continue
            signature = _weights_signature(rec) if rec is not None else None
            weights = rec.stages["weights"].result if rec is not None else None
            if signature is None or not weights:
                continue
            if weights.get("manifest_digest") != manifest_digest:
                continue
            text = self.registry.read_text(run.mlflow_run_id, f"{FILES}/{signature.name}")
            if text is not None:
                return text
        return None

    def history(self, release_id: str, limit: int) -> Iterator[ReleaseRecord]:
        """The records of ``release_id``'s runs, newest first; stops at an unreadable one."""
        for run in self.runs(release_id, limit):
            try:
                rec = self.read(run)
            except ValueError as exc:
                log.warning("%s; older runs are not looked at", exc)
                return
            if rec is not None and rec.release_id == release_id:
                yield rec


def _weights_signature(record: ReleaseRecord) -> Path | None:
    """The weights signature file a run's `sign` stage names, once it succeeded."""
    sign = record.stages.get("sign")
    if sign is None or sign.status != StageStatus.SUCCEEDED or not sign.result:
        return None
    path = sign.result.get("weights_signature")
    return Path(path) if isinstance(path, str) and path else None


def shared_records(settings: Settings, timeout_s: float = 30) -> SharedRecords | None:
    """The shared record store of ``settings``'s topology: None on one machine (records
    are local files), else the tracking server every host uses (``MLFLOW_TRACKING_URI``,
    or the embedded MLflow server): the records are the hosts' state, not the model's, so a
    spec's own ``mlflow.tracking_uri`` does not move them."""
    if settings.topology != "multi":
        return None
    tracking_uri = default_tracking_uri(settings)
    if is_sqlite(tracking_uri) or "://" not in tracking_uri:
        raise ConfigError(
            f"GANTRY_TOPOLOGY=multi keeps release records where every host reads them, but "
            f"the tracking store {redact_text(tracking_uri)} is a file of this host",
            fix="unset MLFLOW_TRACKING_URI (`gantry env up` runs an MLflow server on "
            "PostgreSQL), or point it at the MLflow server the hosts share",
        )
    return SharedRecords(MlflowRegistry(tracking_uri, timeout_s=timeout_s))


def serving_record_for(settings: Settings, release_id: str) -> Path:
    """:func:`~gantry.record.serving_record` with the topology's share: on several hosts, a
    release run elsewhere is started from the record read from the tracking server."""
    return serving_record(settings.releases_dir, release_id, shared_records(settings))
