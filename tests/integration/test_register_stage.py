"""Stage `register` against a real MLflow SQLite store (no Docker, no server).

One store serves the module (creating its schema takes seconds); each test registers its
own model name so counts are its own.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from gantry.adapters.mlflow_registry import RELEASE_TAG, MlflowRegistry
from gantry.errors import MLflowUnavailableError
from gantry.settings import Settings
from gantry.spec import ReleaseSpec, Severity, parse_spec
from gantry.stages import register
from gantry.stages.build import BuildResult, Layer
from gantry.stages.register import RegisterResult, open_registry, record_run, source_uri
from gantry.stages.scan import ScanResult
from gantry.stages.sign import SignResult
from gantry.stages.weights import WeightsResult

pytestmark = pytest.mark.integration

COMMIT = "0123456789abcdef0123456789abcdef01234567"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def settings(state: Path) -> Settings:
    return Settings.from_env({"GANTRY_STATE_DIR": str(state)})


def _spec(name: str, state: Path, **mlflow: object) -> ReleaseSpec:
    uri = f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"
    return parse_spec(
        {
            "name": name,
            "source": {"repo_id": "gantry-demo/all-MiniLM-L6-v2", "revision": "v1"},
            "mlflow": {"tracking_uri": uri, **mlflow},
        }
    )


class Evidence:
    """Stage results with small real files behind them."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        snap = root / "weights" / COMMIT
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
        manifest = root / "weights" / f"{COMMIT}.manifest.json"
        manifest.write_text(json.dumps({"files": {"config.json": "sha256:00"}}))
        sig = root / "weights" / f"{COMMIT}.sig.json"
        sig.write_text('{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}')
        scan_dir = root / "scan"
        scan_dir.mkdir()
        for name in ("sbom.cdx.json", "vulnerabilities.json", "misconfigurations.json"):
            (scan_dir / name).write_text("{}")
        (scan_dir / "gate.json").write_text('{"passed": true}')
        self.record = root / "release.json"
        self.record.write_text('{"status": "running"}')
        self.eval_file = root / "eval-results.jsonl"
        self.eval_file.write_text('{"id": 1, "hit": true}\n')

        image = f"127.0.0.1:5075/gantry/minilm@{DIGEST}"
        self.weights = WeightsResult(
            repo_id="gantry-demo/all-MiniLM-L6-v2",
            revision="v1",
            commit=COMMIT,
            endpoint="http://127.0.0.1:5076",
            uri=f"hf://gantry-demo/all-MiniLM-L6-v2@{COMMIT}",
            manifest_digest="sha256:" + "cd" * 32,
            manifest_path=str(manifest),
            path=str(snap),
            file_count=1,
            total_bytes=2,
            downloaded_files=0,
            downloaded_bytes=0,
            verify_seconds=0.01,
            cached=True,
        )
        self.build = BuildResult(
            image=image,
            digest=DIGEST,
            repository="127.0.0.1:5075/gantry/minilm",
            tag="ctx-1234",
            image_id="sha256:" + "ef" * 32,
            context_digest="sha256:" + "12" * 32,
            dockerfile="dockerfiles/runtime/Dockerfile",
            base_images=("python:3.11-slim",),
            size_bytes=123_456_789,
            layers=(Layer(size_bytes=100, created_by="COPY . ."),),
            labels={},
            build_seconds=1.0,
            cached=True,
        )
        counts = {s.value: 0 for s in Severity} | {"HIGH": 2}
        self.scan = ScanResult(
            image=image,
            passed=True,
            threshold=Severity.CRITICAL,
            vulnerabilities_checked=True,
            db_status="fixture",
            db_updated_at=None,
            counts=counts,
            counts_counted=counts,
            counts_blocking={s.value: 0 for s in Severity},
            counts_suppressed={s.value: 0 for s in Severity},
            misconfig_counts={s.value: 0 for s in Severity},
            blocking=(),
            ignored_unfixed=0,
            allowlist_used=(),
            allowlist_expired=(),
            allowlist_unused=(),
            sbom_path=str(scan_dir / "sbom.cdx.json"),
            sbom_components=42,
            report_path=str(scan_dir / "vulnerabilities.json"),
            config_report_path=str(scan_dir / "misconfigurations.json"),
            decision_path=str(scan_dir / "gate.json"),
            os="debian 12",
            trivy_version="0.59.1",
            warnings=(),
            scan_seconds=1.0,
        )
        self.sign = SignResult(
            image=image,
            signer="builtin",
            signature_ref=f"127.0.0.1:5075/gantry/minilm:sha256-{'ab' * 32}.sig",
            public_key="/keys/cosign.pub",
            attestations={},
            weights_signature=str(sig),
            weights_public_key="/keys/weights.pub",
            weights_key_fingerprint="ff00",
            keys_generated=False,
            cached=True,
            sign_seconds=0.1,
        )


def _register(
    spec: ReleaseSpec,
    ev: Evidence,
    settings: Settings,
    evaluation: BaseModel | None = None,
    flow_run_id: str | None = None,
) -> RegisterResult:
    return register.run(
        spec,
        spec.release_id,
        ev.weights,
        ev.build,
        ev.scan,
        ev.sign,
        evaluation,
        None,
        ev.record,
        settings,
        flow_run_id=flow_run_id,
    )


def _counts(registry: MlflowRegistry, spec: ReleaseSpec) -> tuple[int, int]:
    """(runs, versions) tagged with the spec's release id."""
    exp = registry.ensure_experiment(spec.mlflow.experiment)
    runs = registry.client.search_runs(
        [exp], filter_string=f"tags.`{RELEASE_TAG}` = '{spec.release_id}'"
    )
    versions = registry.client.search_model_versions(f"name = '{spec.name}'")
    return len(runs), len(versions)


def test_register_creates_run_and_candidate_version(
    state: Path, settings: Settings, tmp_path: Path
) -> None:
    class Eval(BaseModel):
        score: float
        p95_ms: float
        results_path: str

    ev = Evidence(tmp_path)
    spec = _spec("reg-basic", state)
    evaluation = Eval(score=0.9, p95_ms=12.5, results_path=str(ev.eval_file))
    result = _register(spec, ev, settings, evaluation=evaluation)

    assert not result.cached
    assert result.version == "1"
    assert result.source == source_uri(ev.weights) == f"hf://gantry-demo/all-MiniLM-L6-v2@{COMMIT}"
    assert result.aliases == ("candidate",)
    assert result.tags[RELEASE_TAG] == spec.release_id
    assert result.tags["gantry.image_digest"] == DIGEST
    assert result.tags["gantry.image_ref"] == ev.build.image
    assert result.tags["gantry.weights_manifest_digest"] == ev.weights.manifest_digest
    assert result.tags["gantry.weights_uri"] == ev.weights.uri
    assert result.tags["gantry.image_signature_ref"] == ev.sign.signature_ref
    assert result.tags["gantry.weights_signature_path"] == ev.sign.weights_signature

    registry = open_registry(spec, settings)
    run = registry.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RELEASE_TAG] == spec.release_id
    assert run.data.params["source.repo_id"] == "gantry-demo/all-MiniLM-L6-v2"
    assert run.data.params["source.token_env"] == "[REDACTED]"
    m = run.data.metrics
    assert m["eval.score"] == 0.9 and m["eval.p95_ms"] == 12.5
    assert m["image.size_bytes"] == 123_456_789 and m["scan.findings.HIGH"] == 2
    # artifacts live under the state dir, not ./mlruns
    art = Path(run.info.artifact_uri.removeprefix("file://"))
    assert art.is_relative_to(state / "mlflow" / "artifacts")
    names = {p.relative_to(art).as_posix() for p in art.rglob("*") if p.is_file()}
    assert {
        f"weights/{COMMIT}.manifest.json",
        f"weights/{COMMIT}.sig.json",
        "scan/sbom.cdx.json",
        "scan/vulnerabilities.json",
        "scan/gate.json",
        "eval/eval-results.jsonl",
        "record/release.json",
        "results/build.json",
        "results/evaluate.json",
    } <= names
    assert not Path("mlruns").exists()


def test_rerun_creates_nothing(state: Path, settings: Settings, tmp_path: Path) -> None:
    ev, spec = Evidence(tmp_path), _spec("reg-rerun", state)
    first = _register(spec, ev, settings)
    again = _register(spec, ev, settings)
    assert again.cached and not first.cached
    assert (again.run_id, again.version) == (first.run_id, first.version)
    assert _counts(open_registry(spec, settings), spec) == (1, 1)


def test_killed_after_run_creation_finishes_cleanly(
    state: Path, settings: Settings, tmp_path: Path
) -> None:
    ev, spec = Evidence(tmp_path), _spec("reg-killed", state)
    registry = open_registry(spec, settings)
    exp = registry.ensure_experiment(spec.mlflow.experiment)
    orphan = registry.create_run(exp, spec.release_id, {})  # ...and then the process died

    result = _register(spec, ev, settings)
    assert result.run_id == orphan.info.run_id
    assert _counts(registry, spec) == (1, 1)
    assert registry.get_run(result.run_id).info.status == "FINISHED"


def test_killed_before_alias_finishes_cleanly(
    state: Path, settings: Settings, tmp_path: Path
) -> None:
    ev, spec = Evidence(tmp_path), _spec("reg-noalias", state)
    registry = open_registry(spec, settings)
    exp = registry.ensure_experiment(spec.mlflow.experiment)
    args = (ev.weights, ev.build, ev.scan, ev.sign, None, None, None)
    run_id = record_run(registry, exp, spec, spec.release_id, *args)
    registry.register(
        spec.name, source=source_uri(ev.weights), run_id=run_id, release_id=spec.release_id, tags={}
    )  # ...and then the process died before the alias

    result = _register(spec, ev, settings)
    assert result.cached and result.aliases == ("candidate",)
    assert _counts(registry, spec) == (1, 1)


def test_flow_run_id_is_tagged_on_run_and_version(
    state: Path, settings: Settings, tmp_path: Path
) -> None:
    """The Prefect task hands the flow run's id in as a plain value; outside a flow, none."""
    ev, spec = Evidence(tmp_path), _spec("reg-flow-run", state)
    result = _register(spec, ev, settings, flow_run_id="5f0c2a4e-flow-run")
    assert result.tags["gantry.prefect_flow_run_id"] == "5f0c2a4e-flow-run"
    run = open_registry(spec, settings).get_run(result.run_id)
    assert run.data.tags["gantry.prefect_flow_run_id"] == "5f0c2a4e-flow-run"

    other = _register(_spec("reg-no-flow-run", state), Evidence(tmp_path / "b"), settings)
    assert "gantry.prefect_flow_run_id" not in other.tags


def test_champion_metrics(state: Path, settings: Settings, tmp_path: Path) -> None:
    ev, spec = Evidence(tmp_path), _spec("reg-champion", state)
    registry = open_registry(spec, settings)
    assert registry.champion_metrics(spec.name) is None  # no model yet
    result = _register(spec, ev, settings)
    assert registry.champion_metrics(spec.name) is None  # a candidate, no champion
    assert registry.get_alias_version(spec.name, "champion") is None

    registry.set_alias(spec.name, "champion", result.version)
    metrics = registry.champion_metrics(spec.name)
    assert metrics is not None
    assert metrics["image.size_bytes"] == 123_456_789
    champion = registry.get_alias_version(spec.name, "champion")
    assert champion is not None and champion.version == result.version


def test_unreachable_server_is_transient_and_quick(
    state: Path, settings: Settings, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    ev = Evidence(tmp_path)
    spec = _spec("reg-down", state, tracking_uri=f"http://127.0.0.1:{port}", timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(MLflowUnavailableError) as info:
        _register(spec, ev, settings)
    assert time.monotonic() - t0 < 15
    assert "MLFLOW_TRACKING_URI" in str(info.value)
    # nothing half-registered in the default store either
    local = open_registry(_spec("reg-down", state), settings)
    assert local.find_version("reg-down", spec.release_id) is None
