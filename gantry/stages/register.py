"""Stage `register`: one MLflow run per release, and one registered model version, aliased
`candidate`.

The run holds the spec (as params), the release's numbers (as metrics) and its evidence
(manifest, SBOM, scan reports, signatures, eval results, the release record, as
artifacts). The model version's ``source`` is the weights' immutable address
``hf://<repo>@<commit>``: MLflow stores a version's source as metadata and never reads it
here (neither the SQLite store nor a server's source check rejects a host-named scheme
it cannot fetch), so nothing is copied into MLflow. Image and signature references are
tags on the version.

Idempotent: the run and the version both carry the tag ``gantry.release_id``. A re-run
first looks for the version (found: nothing is created, ``cached``), then for the run
(found: it is completed, not duplicated), so a run killed at any point finishes cleanly
when re-run. The run is finished before the version is created, so a version never points
at a half-logged run.

Here live the stage's contract (:class:`RegisterResult`), its pure helpers (params,
metrics, tags, the tracking store's fingerprint) and its entry point :func:`run`;
``tasks/register.py`` is its Prefect face (the task, the flow run's id, the artifact).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters.mlflow_registry import (
    CANDIDATE,
    MlflowRegistry,
    ModelVersionRef,
    is_sqlite,
    store_state,
)
from gantry.proc import SECRET_NAME, redact_text
from gantry.settings import Settings
from gantry.spec import ReleaseSpec
from gantry.stages.build import BuildResult
from gantry.stages.scan import ScanResult
from gantry.stages.sign import SignResult
from gantry.stages.weights import WeightsResult

log = logging.getLogger("gantry.register")

REDACTED = "[REDACTED]"
#: Spec keys whose values are never logged, whatever they hold.
#: MLflow's limits on param/metric keys and param values (mlflow.utils.validation).
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


class RegisterResult(BaseModel):
    """Where the release is recorded in MLflow."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tracking_uri: str = Field(description="The tracking store (credentials redacted).")
    experiment_id: str
    run_id: str = Field(description="The release's one run (tag gantry.release_id).")
    model_name: str
    version: str = Field(description="The registered model version.")
    source: str = Field(description="The version's source: hf://<repo>@<commit>.")
    aliases: tuple[str, ...] = Field(
        description="Aliases pointing at the version when the stage ran."
    )
    tags: dict[str, str] = Field(description="The version's tags.")
    cached: bool = Field(description="The version already existed; nothing was created.")
    register_seconds: float


# --- pure helpers ------------------------------------------------------------------------


def default_tracking_uri(settings: Settings) -> str:
    """$MLFLOW_TRACKING_URI, else the topology's default (as `gantry env status` says): SQLite
    under the state dir, or the embedded MLflow server for GANTRY_TOPOLOGY=multi."""
    return os.environ.get("MLFLOW_TRACKING_URI") or settings.default_tracking_uri


def tracking_uri_for(spec: ReleaseSpec, settings: Settings) -> str:
    return spec.mlflow.tracking_uri or default_tracking_uri(settings)


def with_tracking_uri(spec: ReleaseSpec, uri: str | None) -> ReleaseSpec:
    """``spec`` with its MLflow tracking URI replaced by ``uri`` (None, empty: as it is)."""
    if not uri:
        return spec
    return spec.model_copy(update={"mlflow": spec.mlflow.model_copy(update={"tracking_uri": uri})})


def tracking_store_state(spec: ReleaseSpec, settings: Settings) -> str | None:
    """The spec's tracking store's fingerprint (:func:`store_state`): None unless a local
    SQLite store, whose every committed write changes it."""
    return store_state(tracking_uri_for(spec, settings))


def model_name_for(spec: ReleaseSpec) -> str:
    return spec.mlflow.model_name or spec.name


def source_uri(weights: WeightsResult) -> str:
    """The weights' immutable address, the model version's source."""
    return f"hf://{weights.repo_id}@{weights.commit}"


def _key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:_MAX_KEY]


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, bool | int | float):
        text = json.dumps(value)
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    text = redact_text(text)  # e.g. user:password@ in a URL
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 1] + "…"


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``data`` flattened to ``a.b.c`` -> string; values under secret-looking keys redacted.

    Lists and empty mappings become JSON strings; MLflow's key and value limits are kept.
    """
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if SECRET_NAME.search(str(k)):
            out[_key(key)] = REDACTED
        elif isinstance(v, Mapping) and v:
            out.update(flatten_params(v, f"{key}."))
        else:
            out[_key(key)] = _param_value(v)
    return out


def spec_params(spec: ReleaseSpec) -> dict[str, str]:
    return flatten_params(spec.model_dump(mode="json"))


def numeric_fields(model: BaseModel | None, prefix: str) -> dict[str, float]:
    """Every finite number in ``model.model_dump()`` (nested mappings too) as
    ``<prefix>.<path>``; booleans, strings and lists are left out."""
    if model is None:
        return {}
    out: dict[str, float] = {}

    def walk(obj: Mapping[str, Any], path: str) -> None:
        for k, v in obj.items():
            key = f"{path}.{k}"
            if isinstance(v, Mapping):
                walk(v, key)
            elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[_key(key)] = float(v)

    walk(model.model_dump(), prefix)
    return out


def release_metrics(
    weights: WeightsResult,
    build: BuildResult,
    scan: ScanResult,
    evaluation: BaseModel | None,
    smoke: BaseModel | None,
) -> dict[str, float]:
    """Quality, latency and cold start (eval/smoke, read generically), image size, weights
    size, and findings per severity."""
    metrics: dict[str, float] = {
        "image.size_bytes": float(build.size_bytes),
        "image.layers": float(len(build.layers)),
        "weights.total_bytes": float(weights.total_bytes),
        "weights.file_count": float(weights.file_count),
        "scan.sbom_components": float(scan.sbom_components),
    }
    for sev, n in scan.counts.items():
        metrics[_key(f"scan.findings.{sev}")] = float(n)
    for sev, n in scan.counts_counted.items():
        metrics[_key(f"scan.counted.{sev}")] = float(n)
    metrics.update(numeric_fields(smoke, "smoke"))
    metrics.update(numeric_fields(evaluation, "eval"))
    return metrics


def _files_named_in(model: BaseModel | None) -> list[Path]:
    """Existing files named by a ``*_path`` field of ``model`` (e.g. an eval results file)."""
    if model is None:
        return []
    found = []
    for k, v in model.model_dump().items():
        if k.endswith("path") and isinstance(v, str) and v and Path(v).is_file():
            found.append(Path(v))
    return found


def release_artifacts(
    weights: WeightsResult,
    scan: ScanResult,
    sign: SignResult,
    evaluation: BaseModel | None,
    smoke: BaseModel | None,
    record: Path | None,
) -> list[tuple[Path, str]]:
    """(file, artifact dir) of every piece of evidence that exists on disk."""
    wanted: list[tuple[str | None, str]] = [
        (weights.manifest_path, "weights"),
        (sign.weights_signature, "weights"),
        (scan.sbom_path, "scan"),
        (scan.report_path, "scan"),
        (scan.config_report_path, "scan"),
        (scan.decision_path, "scan"),
        *((str(p), "eval") for p in _files_named_in(evaluation)),
        *((str(p), "smoke") for p in _files_named_in(smoke)),
        (str(record) if record else None, "record"),
    ]
    return [(Path(p), d) for p, d in wanted if p and Path(p).is_file()]


def version_tags(
    weights: WeightsResult,
    build: BuildResult,
    sign: SignResult,
    spec: ReleaseSpec,
    flow_run_id: str | None = None,
) -> dict[str, str]:
    tags = {
        "gantry.image_digest": build.digest,
        "gantry.image_ref": build.image,
        "gantry.weights_uri": weights.uri,
        "gantry.weights_endpoint": weights.endpoint,
        "gantry.weights_manifest_digest": weights.manifest_digest,
        "gantry.image_signature_ref": sign.signature_ref,
        "gantry.weights_signature_path": sign.weights_signature,
        "gantry.spec_digest": spec.digest(),
    }
    if flow_run_id:
        tags["gantry.prefect_flow_run_id"] = flow_run_id
    return tags


# --- the stage -------------------------------------------------------------------------


def open_registry(spec: ReleaseSpec, settings: Settings) -> MlflowRegistry:
    """The registry the spec names; a SQLite store keeps artifacts under the state dir."""
    uri = tracking_uri_for(spec, settings)
    root = settings.state_dir / "mlflow" / "artifacts" if is_sqlite(uri) else None
    return MlflowRegistry(uri, timeout_s=spec.mlflow.timeout_s, artifact_root=root)


def record_run(
    registry: MlflowRegistry,
    experiment_id: str,
    spec: ReleaseSpec,
    release_id: str,
    weights: WeightsResult,
    build: BuildResult,
    scan: ScanResult,
    sign: SignResult,
    evaluation: BaseModel | None,
    smoke: BaseModel | None,
    record: Path | None,
    *,
    flow_run_id: str | None = None,
) -> str:
    """Find or create the release's run, log everything to it, finish it; its id.

    ``flow_run_id`` (the Prefect flow run releasing it, if any) is tagged on the run.
    Safe to repeat: params and metrics already logged with the same value are skipped,
    and an artifact logged again replaces the one of the same name.
    """
    run = registry.find_run(experiment_id, release_id)
    run_tags = {
        "gantry.model": spec.name,
        "gantry.spec_digest": spec.digest(),
        "gantry.image_ref": build.image,
        "gantry.weights_uri": weights.uri,
    }
    if flow_run_id:
        run_tags["gantry.prefect_flow_run_id"] = flow_run_id
    if run is None:
        run = registry.create_run(experiment_id, release_id, run_tags)
        log.info("created MLflow run %s for release %s", run.info.run_id, release_id)
    else:
        log.info("re-using MLflow run %s of release %s", run.info.run_id, release_id)
    run_id = str(run.info.run_id)
    have_params, have_metrics = dict(run.data.params), dict(run.data.metrics)
    params = {k: v for k, v in spec_params(spec).items() if k not in have_params}
    metrics = release_metrics(weights, build, scan, evaluation, smoke)
    metrics = {k: v for k, v in metrics.items() if have_metrics.get(k) != v}
    registry.log_batch(run_id, params=params, metrics=metrics, tags=run_tags)
    for path, artifact_dir in release_artifacts(weights, scan, sign, evaluation, smoke, record):
        registry.log_artifact(run_id, path, artifact_dir)
    results: dict[str, BaseModel | None] = {
        "weights": weights,
        "build": build,
        "scan": scan,
        "sign": sign,
        "smoke": smoke,
        "evaluate": evaluation,
    }
    for name, result in results.items():
        if result is not None:
            registry.log_dict(run_id, result.model_dump(mode="json"), f"results/{name}.json")
    registry.finish_run(run_id)
    return run_id


def _result(
    registry: MlflowRegistry,
    experiment_id: str,
    ref: ModelVersionRef,
    *,
    cached: bool,
    t0: float,
) -> RegisterResult:
    return RegisterResult(
        tracking_uri=redact_text(registry.tracking_uri),
        experiment_id=experiment_id,
        run_id=ref.run_id or "",
        model_name=ref.name,
        version=ref.version,
        source=ref.source,
        aliases=ref.aliases,
        tags=dict(ref.tags),
        cached=cached,
        register_seconds=round(time.monotonic() - t0, 3),
    )


def run(
    spec: ReleaseSpec,
    release_id: str,
    weights: WeightsResult,
    build: BuildResult,
    scan: ScanResult,
    sign: SignResult,
    evaluation: BaseModel | None,
    smoke: BaseModel | None,
    record_path: Path | None,
    settings: Settings,
    *,
    flow_run_id: str | None = None,
) -> RegisterResult:
    """Record the release in MLflow and register its model version as `candidate`.

    Idempotent: a version already tagged with ``release_id`` is returned as is (``cached``;
    it only gets `candidate` if a killed run never set any alias); otherwise the release's
    run is found or created, completed, and one version is created from it. A
    ``flow_run_id`` (the Prefect flow run releasing it) is tagged on the run and version.
    """
    t0 = time.monotonic()
    registry = open_registry(spec, settings)
    model_name = model_name_for(spec)
    experiment_id = registry.ensure_experiment(spec.mlflow.experiment)

    existing = registry.find_version(model_name, release_id)
    if existing is not None:
        if not existing.aliases:  # killed between creating the version and aliasing it
            registry.set_alias(model_name, CANDIDATE, existing.version)
            existing = registry.get_version(model_name, existing.version)
        log.info("release %s is already version %s of %s", release_id, existing.version, model_name)
        return _result(registry, experiment_id, existing, cached=True, t0=t0)

    run_id = record_run(
        registry,
        experiment_id,
        spec,
        release_id,
        weights,
        build,
        scan,
        sign,
        evaluation,
        smoke,
        record_path,
        flow_run_id=flow_run_id,
    )
    ref = registry.register(
        model_name,
        source=source_uri(weights),
        run_id=run_id,
        release_id=release_id,
        tags=version_tags(weights, build, sign, spec, flow_run_id),
        description=f"Gantry release {release_id}: {build.image} serving {weights.uri}",
    )
    registry.set_alias(model_name, CANDIDATE, ref.version)
    ref = registry.get_version(model_name, ref.version)
    log.info("registered %s version %s (run %s) as %s", model_name, ref.version, run_id, CANDIDATE)
    return _result(registry, experiment_id, ref, cached=False, t0=t0)
