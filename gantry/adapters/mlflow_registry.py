"""MLflow tracking and model registry, behind the few calls stage `register` needs.

Prefect-free. Every MLflow failure leaves as a Gantry error: connection refused, timeouts,
429 and 5xx as :class:`MLflowUnavailableError` (transient, retried), anything else as
:class:`RegistrationError` (permanent). Releases are found again by the tag
``gantry.release_id`` on their run and on their model version, which is what makes
registering a release idempotent.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar
from urllib.parse import unquote, urlparse

from gantry.errors import GantryError, MLflowUnavailableError, RegistrationError
from gantry.proc import redact_text

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

RELEASE_TAG: Final = "gantry.release_id"
CANDIDATE: Final = "candidate"
CHAMPION: Final = "champion"

#: MLflow's own HTTP retries (default 7, backoff factor 2: minutes of waiting) are turned
#: off: the Prefect task already retries transient failures with the spec's policy, and
#: every step of a registration is safe to repeat.
HTTP_MAX_RETRIES: Final = 0
HTTP_BACKOFF_FACTOR: Final = 1

T = TypeVar("T")

_TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})
_NETWORK_TEXT = re.compile(
    r"failed with (timeout )?exception|Max retries exceeded|Connection (refused|reset|aborted)"
    r"|timed? ?out|Name or service not known|Temporary failure in name resolution",
    re.I,
)


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered model version, as much of it as Gantry reads."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///…`` URI; None for in-memory or non-SQLite URIs."""
    if not is_sqlite(uri):
        return None
    path = unquote(urlparse(uri).path)
    # sqlite:///rel.db has path "/rel.db" (relative); sqlite:////abs.db has "//abs.db".
    if not path or path in {"/", "/:memory:"}:
        return None
    return Path(path[1:])


def store_state(uri: str) -> str | None:
    """A fingerprint that changes whenever a local SQLite tracking store commits a write:
    the file's identity, size and mtime, and SQLite's own file change counter (header
    bytes 24-27, bumped by every committed transaction in rollback-journal mode, even two
    in one mtime tick). None where no such promise holds: a server's store, a missing
    file, a WAL-mode database (its commits land in the -wal file first), or a transaction
    in flight (a hot journal)."""
    path = sqlite_path(uri)
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            header = f.read(100)
        if Path(f"{path}-journal").exists() or Path(f"{path}-wal").exists():
            return None
    except OSError:
        return None
    # Bytes 18 and 19 are the file format write/read versions: 2 means WAL.
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0") or header[18] == 2:
        return None
    counter = int.from_bytes(header[24:28], "big")
    return f"sqlite:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{counter}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _is_transient(exc: BaseException) -> bool:
    import requests
    from mlflow.exceptions import MlflowException, RestException

    for e in _chain(exc):
        if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if "database is locked" in str(e):  # SQLite busy with another writer
            return True
        if isinstance(e, MlflowException):
            if e.error_code in _TRANSIENT_CODES:
                return True
            # A server's own error answer (RestException, or a non-JSON body) carries its
            # status; a local store's MlflowException defaults to 500 and means nothing here.
            from_server = isinstance(e, RestException) or e.message.startswith("API request to")
            if from_server and e.get_http_status_code() >= 500:  # type: ignore[no-untyped-call]
                return True
            if e.message.startswith("API request to") and _NETWORK_TEXT.search(e.message):
                return True
    return False


def _error_code(exc: BaseException) -> str | None:
    from mlflow.exceptions import MlflowException

    for e in _chain(exc):
        if isinstance(e, MlflowException):
            return str(e.error_code)
    return None


def map_error(exc: BaseException, *, action: str, uri: str) -> GantryError:
    """Translate an exception raised by MLflow into the Gantry error to raise instead."""
    if isinstance(exc, GantryError):
        return exc
    shown = redact_text(uri)
    detail = redact_text(str(exc).strip().splitlines()[0][:500]) if str(exc).strip() else ""
    detail = detail or type(exc).__name__
    if _is_transient(exc):
        return MLflowUnavailableError(f"MLflow at {shown} is unavailable ({action}): {detail}")
    code = _error_code(exc)
    if code in {"PERMISSION_DENIED", "UNAUTHENTICATED"}:
        fix = (
            "give the tracking server credentials: MLFLOW_TRACKING_TOKEN, or "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    elif is_sqlite(uri):
        fix = (
            f"check that {shown} is a writable MLflow SQLite database (or set "
            "MLFLOW_TRACKING_URI / mlflow.tracking_uri to another store)"
        )
    else:
        fix = (
            "correct the request named above (mlflow.model_name, mlflow.experiment), or point "
            "MLFLOW_TRACKING_URI / mlflow.tracking_uri at a compatible MLflow 3 server"
        )
    return RegistrationError(
        f"MLflow at {shown} refused to {action}: {detail}"
        + (f" [{code}]" if code and code not in detail else ""),
        fix=fix,
    )


def _ref(mv: ModelVersion) -> ModelVersionRef:
    return ModelVersionRef(
        name=str(mv.name),
        version=str(mv.version),
        source=str(mv.source),
        run_id=mv.run_id or None,
        tags=dict(mv.tags or {}),
        aliases=tuple(mv.aliases or ()),
    )


def _quote(value: str) -> str:
    """A string literal for MLflow's search filter language."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class MlflowRegistry:
    """An MLflow tracking store and model registry at ``tracking_uri``.

    ``timeout_s`` bounds each HTTP request to a remote server (MLflow reads it from
    MLFLOW_HTTP_REQUEST_TIMEOUT, a process-wide setting, so it is set here). For a SQLite
    store the database directory is created, and new experiments keep their artifacts in
    ``artifact_root`` (default: ``artifacts/`` beside the database), never in ./mlruns.
    """

    def __init__(
        self, tracking_uri: str, *, timeout_s: float, artifact_root: Path | None = None
    ) -> None:
        self.tracking_uri = tracking_uri
        self.timeout_s = timeout_s
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(HTTP_MAX_RETRIES)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(HTTP_BACKOFF_FACTOR)
        # Ending a run on a server prints "View run … at: http://…" to stdout, whose last
        # line is the record path `gantry release` promises; logs say where runs are.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        # Nor a progress bar on stderr per artifact read (records read from the server).
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        db = sqlite_path(tracking_uri)
        if artifact_root is None and db is not None:
            artifact_root = db.parent / "artifacts"
        self.artifact_root = artifact_root.resolve() if artifact_root is not None else None
        try:
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            from mlflow import MlflowClient  # imported late: it takes seconds

            self._client: MlflowClient = MlflowClient(
                tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
        except Exception as exc:
            raise map_error(exc, action="open the tracking store", uri=tracking_uri) from exc

    @property
    def client(self) -> MlflowClient:
        """The underlying client, for calls this adapter does not wrap (tests, tooling)."""
        return self._client

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            raise map_error(exc, action=action, uri=self.tracking_uri) from exc

    # --- tracking ----------------------------------------------------------------------

    def ensure_experiment(self, name: str) -> str:
        """The id of experiment ``name``, created (artifacts under the root) if missing."""

        def go() -> str:
            from mlflow.exceptions import MlflowException

            exp = self._client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self._client.restore_experiment(exp.experiment_id)
                return str(exp.experiment_id)
            location = None
            if self.artifact_root is not None:
                self.artifact_root.mkdir(parents=True, exist_ok=True)
                location = self.artifact_root.as_uri()
            try:
                return str(self._client.create_experiment(name, artifact_location=location))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # another process created it between the two calls
                again = self._client.get_experiment_by_name(name)
                if again is None:
                    raise
                return str(again.experiment_id)

        return self._call(f"get or create experiment {name!r}", go)

    def find_run(self, experiment_id: str, release_id: str) -> Run | None:
        """The active run tagged with ``release_id``; the oldest one if there are several."""

        def go() -> Run | None:
            runs = self._client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{RELEASE_TAG}` = {_quote(release_id)}",
                order_by=["attributes.start_time ASC"],
                max_results=10,
            )
            return runs[0] if runs else None

        return self._call(f"search runs of release {release_id}", go)

    def create_run(self, experiment_id: str, release_id: str, tags: Mapping[str, str]) -> Run:
        """A new run named after the release and tagged with it."""
        all_tags = {**tags, RELEASE_TAG: release_id}
        return self._call(
            f"create a run for release {release_id}",
            lambda: self._client.create_run(experiment_id, tags=all_tags, run_name=release_id),
        )

    def start_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
        """A new run that belongs to no release (no ``gantry.release_id`` tag, so a
        release's run is never mistaken for it); its id."""
        run = self._call(
            f"create run {run_name!r}",
            lambda: self._client.create_run(experiment_id, tags=dict(tags), run_name=run_name),
        )
        return str(run.info.run_id)

    def get_run(self, run_id: str) -> Run:
        return self._call(f"read run {run_id}", lambda: self._client.get_run(run_id))

    def log_batch(
        self,
        run_id: str,
        *,
        params: Mapping[str, str] = {},
        metrics: Mapping[str, float] = {},
        tags: Mapping[str, str] = {},
    ) -> None:
        """Log params, metrics and tags, chunked to MLflow's per-request limits."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        p = [Param(k, v) for k, v in params.items()]
        m = [Metric(k, v, now, 0) for k, v in metrics.items()]
        t = [RunTag(k, v) for k, v in tags.items()]

        def go() -> None:
            # 100 params+tags and 1000 metrics per request (mlflow.utils.validation)
            for i in range(0, len(p), 100):
                self._client.log_batch(run_id, params=p[i : i + 100])
            for i in range(0, len(t), 100):
                self._client.log_batch(run_id, tags=t[i : i + 100])
            for i in range(0, len(m), 1000):
                self._client.log_batch(run_id, metrics=m[i : i + 1000])

        self._call(f"log to run {run_id}", go)

    def log_artifact(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None:
        """Copy ``path`` into the run's artifacts (under ``artifact_dir``); same name replaces."""
        self._call(
            f"log artifact {path.name} to run {run_id}",
            lambda: self._client.log_artifact(run_id, str(path), artifact_dir),
        )

    def log_dict(self, run_id: str, data: Mapping[str, object], artifact_file: str) -> None:
        """Write ``data`` as JSON into the run's artifacts at ``artifact_file``."""
        self._call(
            f"log {artifact_file} to run {run_id}",
            lambda: self._client.log_dict(run_id, dict(data), artifact_file),
        )

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        """End the run as ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        self._call(f"finish run {run_id}", lambda: self._client.set_terminated(run_id, status))

    def tagged_runs(self, experiment_id: str, tag: str, value: str, limit: int) -> list[Run]:
        """Runs of the experiment whose ``tag`` is ``value``, newest first (at most ``limit``)."""
        return self._call(
            f"search runs with {tag}={value}",
            lambda: list(
                self._client.search_runs(
                    [experiment_id],
                    filter_string=f"tags.`{tag}` = {_quote(value)}",
                    order_by=["attributes.start_time DESC"],
                    max_results=limit,
                )
            ),
        )

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Write ``text`` into the run's artifacts at ``artifact_file`` (same name replaces)."""
        self._call(
            f"log {artifact_file} to run {run_id}",
            lambda: self._client.log_text(run_id, text, artifact_file),
        )

    def read_text(self, run_id: str, artifact_file: str) -> str | None:
        """The text of one of the run's artifacts; None when the run has no such artifact."""

        def go() -> str | None:
            import tempfile

            from mlflow.exceptions import MlflowException

            with tempfile.TemporaryDirectory(prefix="gantry-artifact-") as tmp:
                try:
                    path = self._client.download_artifacts(run_id, artifact_file, tmp)
                except MlflowException as exc:
                    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                        return None
                    raise
                except FileNotFoundError:
                    return None
                return Path(path).read_text(encoding="utf-8")

        return self._call(f"read {artifact_file} of run {run_id}", go)

    # --- registry ----------------------------------------------------------------------

    def find_version(self, model_name: str, release_id: str) -> ModelVersionRef | None:
        """The version of ``model_name`` tagged with ``release_id`` (the oldest if several)."""

        def go() -> ModelVersionRef | None:
            found = self._client.search_model_versions(
                f"name = {_quote(model_name)} and tags.`{RELEASE_TAG}` = {_quote(release_id)}"
            )
            refs = sorted((_ref(mv) for mv in found), key=lambda r: int(r.version))
            return refs[0] if refs else None

        return self._call(f"search versions of {model_name!r} for release {release_id}", go)

    def register(
        self,
        model_name: str,
        *,
        source: str,
        run_id: str,
        release_id: str,
        tags: Mapping[str, str],
        description: str | None = None,
    ) -> ModelVersionRef:
        """A new version of ``model_name`` (created if missing) tagged with ``release_id``.

        Not idempotent by itself: call :meth:`find_version` first.
        """

        def go() -> ModelVersionRef:
            from mlflow.exceptions import MlflowException

            try:
                self._client.create_registered_model(model_name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            mv = self._client.create_model_version(
                model_name,
                source,
                run_id=run_id,
                tags={**tags, RELEASE_TAG: release_id},
                description=description,
            )
            return _ref(mv)

        return self._call(f"register a version of {model_name!r}", go)

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version`` (moving it from any other version)."""
        self._call(
            f"set alias {alias!r} of {model_name!r} to version {version}",
            lambda: self._client.set_registered_model_alias(model_name, alias, version),
        )

    def set_version_tags(self, model_name: str, version: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags on one version."""

        def go() -> None:
            for key, value in tags.items():
                self._client.set_model_version_tag(model_name, version, key, value)

        self._call(f"tag version {version} of {model_name!r}", go)

    def get_version(self, model_name: str, version: str) -> ModelVersionRef:
        return self._call(
            f"read version {version} of {model_name!r}",
            lambda: _ref(self._client.get_model_version(model_name, version)),
        )

    def get_alias_version(self, model_name: str, alias: str) -> ModelVersionRef | None:
        """The version ``alias`` points at; None when the model or the alias does not exist."""

        def go() -> ModelVersionRef | None:
            from mlflow.exceptions import MlflowException

            try:
                model = self._client.get_registered_model(model_name)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise
            # Looking the alias up in the model avoids get_model_version_by_alias, which
            # answers a missing alias with INVALID_PARAMETER_VALUE, like a real error.
            version = (model.aliases or {}).get(alias)
            if version is None:
                return None
            return _ref(self._client.get_model_version(model_name, str(version)))

        return self._call(f"read alias {alias!r} of {model_name!r}", go)

    def champion_metrics(self, model_name: str) -> dict[str, float] | None:
        """Metrics of the run behind the ``champion`` version; None without a champion."""
        champion = self.get_alias_version(model_name, CHAMPION)
        if champion is None or champion.run_id is None:
            return None
        run_id = champion.run_id
        run = self.get_run(run_id)
        return {str(k): float(v) for k, v in run.data.metrics.items()}
