"""Faults injected into the real components, under the stages' real Prefect tasks.

Transient faults (hub 5xx, resets, stalls, a file cut short; the registry going away in
the middle of a push; a container killed on its first start; the MLflow server going away
in the middle of a registration) must end in success, with the retries in the log.
Permanent ones (content that hashes wrong, a refused token, a runtime that always crashes)
must fail at once, with their message, and no retry.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from gantry.adapters.containers import RELEASE_LABEL
from gantry.adapters.hub import _LogProgress
from gantry.adapters.mlflow_registry import RELEASE_TAG, MlflowRegistry
from gantry.adapters.registry import RegistryClient
from gantry.errors import ChecksumMismatchError, ContainerStartError, HubAuthError, is_transient
from gantry.localenv.services import ManagedProcess, registry_service
from gantry.manifest import WeightsManifest
from gantry.settings import Settings
from gantry.spec import ReleaseSpec, RetryPolicy, parse_spec
from gantry.stages.build import BuildResult
from gantry.stages.scan import ScanResult
from gantry.stages.sign import SignResult
from gantry.stages.weights import WeightsResult, WeightStore, verify_snapshot
from tasks._retry import with_retries
from tasks.build import build_task
from tasks.register import register_task
from tasks.scan import scan_task
from tasks.sign import sign_task
from tasks.smoke import smoke_task
from tasks.weights import weights_task
from tests.reliability.conftest import HubFaults, RetryLog, Scenario
from tests.reliability.netgate import TcpGate
from tests.support import GantryEnv, free_port

pytestmark = pytest.mark.reliability

#: Short delays: the faults below clear within a second or two.
POLICY = RetryPolicy(attempts=3, delay_s=0.5, jitter=0.2)
#: The release the stage faults act on. One name, so the image the registry test pushes
#: is the one the later stages find already built.
NAME = "rel-faults"


def _spec(repo_id: str, name: str, **over: Any) -> ReleaseSpec:
    data: dict[str, Any] = {
        "name": name,
        "source": {"repo_id": repo_id, "revision": "v1"},
        "scan": {"allow_offline": True},
        "smoke": {"accelerator": "cpu", "deadline_s": 60},
        "retries": POLICY.model_dump(),
    }
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_spec(data)


def _weights_leftovers(root: Path) -> list[str]:
    """What a download left in the weights cache that a finished one must not."""
    tmp = root / "tmp"
    return sorted(str(p.relative_to(root)) for p in tmp.iterdir()) if tmp.is_dir() else []


def _weights_lost(result: WeightsResult) -> list[str]:
    """Data lost or damaged in the cache: the snapshot must verify against its manifest."""
    manifest = WeightsManifest.model_validate_json(Path(result.manifest_path).read_bytes())
    try:
        verify_snapshot(Path(result.path), manifest)
    except ChecksumMismatchError as exc:
        return [f"snapshot does not verify: {exc.message}"]
    return []


# --- hub -> stage `weights` ------------------------------------------------------------------


@dataclass(frozen=True)
class HubCase:
    title: str
    rule: dict[str, Any]
    #: Retries of the stage task (Prefect); 0 when the hub client itself recovers.
    retries: int
    timeout_s: float = 10


TRANSIENT_HUB = {
    "api-500-twice": HubCase(
        "hub answers 500 to the next 2 model-info calls",
        {"mode": "status", "status": 500, "count": 2, "path_contains": "/api/models"},
        retries=2,
    ),
    "download-503": HubCase(
        "hub answers 503 to the model file's download",
        {"mode": "status", "status": 503, "path_contains": "onnx/model.onnx", "method": "GET"},
        retries=1,
    ),
    "api-reset": HubCase(
        "hub resets the connection of a model-info call",
        {"mode": "reset", "path_contains": "/api/models"},
        retries=1,
    ),
    "download-reset": HubCase(
        "hub resets the connection of the model file's download",
        {"mode": "reset", "path_contains": "onnx/model.onnx", "method": "GET"},
        retries=1,
    ),
    "api-stall": HubCase(
        "hub stalls a model-info call past the 2 s request timeout",
        {"mode": "stall", "stall_s": 6, "path_contains": "/api/models"},
        retries=1,
        timeout_s=2,
    ),
    "download-short": HubCase(
        "hub serves the model file cut to half its size (declared as complete)",
        {"mode": "short", "path_contains": "onnx/model.onnx"},
        retries=1,
    ),
    "download-stall": HubCase(
        "hub stalls the model file's download past the 2 s request timeout",
        {"mode": "stall", "stall_s": 6, "path_contains": "onnx/model.onnx", "method": "GET"},
        retries=0,  # the client resumes the download itself
        timeout_s=2,
    ),
    "download-cut": HubCase(
        "hub closes the connection half-way through the model file",
        {"mode": "truncate", "path_contains": "onnx/model.onnx"},
        retries=0,  # the client resumes with a Range request
    ),
}


@pytest.mark.parametrize("case", TRANSIENT_HUB.values(), ids=TRANSIENT_HUB.keys())
def test_transient_hub_fault_is_retried(
    case: HubCase,
    gantry_env: GantryEnv,
    prefect_api: str,
    hub_faults: HubFaults,
    retry_log: RetryLog,
    scenario: Scenario,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scenario.group, scenario.title = "transient: hub -> weights", case.title
    # Report progress often, so a stalled download exercises the progress logger too.
    monkeypatch.setattr(_LogProgress, "interval_s", 0.5)
    spec = _spec(gantry_env.repo_id, "rel-hub", source={"timeout_s": case.timeout_s})
    hub_faults.add(**case.rule)
    store = tmp_path / "weights"

    result = retry_log.run(lambda: with_retries(weights_task, POLICY)(spec.source, str(store)))

    assert not result.cached and result.downloaded_files == result.file_count
    assert hub_faults.pending() == [], "the fault was never hit"
    retries = retry_log.retries()
    assert len(retries) == case.retries, retries
    if retries:
        assert any(cls in retries[0] for cls in ("HubUnavailable", "DownloadIncomplete"))
    scenario.data_lost = _weights_lost(result) + _weights_leftovers(store)
    assert scenario.data_lost == []
    scenario.outcome = (
        f"succeeded after {len(retries)} stage retr{'y' if len(retries) == 1 else 'ies'}"
        if retries
        else "succeeded; the hub client resumed the download itself"
    )


def test_content_that_hashes_wrong_fails_at_once(
    gantry_env: GantryEnv,
    prefect_api: str,
    hub_faults: HubFaults,
    retry_log: RetryLog,
    scenario: Scenario,
    tmp_path: Path,
) -> None:
    scenario.group = "permanent: hub -> weights"
    scenario.title = "hub serves the model file with one byte flipped (full size)"
    spec = _spec(gantry_env.repo_id, "rel-hub")
    hub_faults.add(mode="corrupt", path_contains="onnx/model.onnx", count=5)
    store = tmp_path / "weights"
    t0 = time.monotonic()
    with pytest.raises(ChecksumMismatchError) as info:
        retry_log.run(lambda: with_retries(weights_task, POLICY)(spec.source, str(store)))
    elapsed = time.monotonic() - t0

    assert "checksum mismatch for onnx/model.onnx" in info.value.message
    assert info.value.expected != info.value.actual and "fix:" in str(info.value)
    assert retry_log.retries() == [] and not is_transient(info.value)
    assert hub_faults.pending()[0]["count"] == 4, "downloaded more than once"
    # Nothing unverified was kept: no snapshot, no blob with the bad content.
    ws = WeightStore(store)
    assert not list(ws.snapshots.rglob("*.manifest.json"))
    assert info.value.actual not in {p.name for p in ws.blobs.iterdir()}
    scenario.data_lost = _weights_leftovers(store)
    assert scenario.data_lost == []
    scenario.outcome = f"ChecksumMismatchError at once ({elapsed:.1f}s), no retry, nothing cached"


def test_refused_token_fails_at_once(
    gantry_env: GantryEnv,
    prefect_api: str,
    hub_faults: HubFaults,
    retry_log: RetryLog,
    scenario: Scenario,
    tmp_path: Path,
) -> None:
    scenario.group = "permanent: hub -> weights"
    scenario.title = "hub answers 403 to model info"
    spec = _spec(gantry_env.repo_id, "rel-hub")
    hub_faults.add(mode="status", status=403, path_contains="/api/models", count=5)
    with pytest.raises(HubAuthError, match="403") as info:
        retry_log.run(
            lambda: with_retries(weights_task, POLICY)(spec.source, str(tmp_path / "weights"))
        )
    assert "HF_TOKEN" in str(info.value)  # the fix names the variable
    assert retry_log.retries() == []
    assert hub_faults.pending()[0]["count"] == 4, "asked the hub more than once"
    scenario.outcome = "HubAuthError at once, naming $HF_TOKEN; no retry"


# --- registry -> stage `build` ---------------------------------------------------------------


class _OnLog(logging.Handler):
    """Calls ``action`` (once) when ``logger`` logs a message starting with ``prefix``:
    the fault lands exactly at that point of the stage, in the stage's own thread."""

    def __init__(self, prefix: str, action: Callable[[], None]) -> None:
        super().__init__(logging.INFO)
        self.prefix, self.action, self.fired = prefix, action, 0

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and record.getMessage().startswith(self.prefix):
            self.fired += 1
            self.action()


@contextlib.contextmanager
def _on_log(logger: str, prefix: str, action: Callable[[], None]) -> Iterator[_OnLog]:
    handler = _OnLog(prefix, action)
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.INFO)  # the trigger is an INFO line
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _outage(
    stop: Callable[[], None], start: Callable[[], object], down_s: float
) -> tuple[Callable[[], None], list[float]]:
    """An action that calls ``stop`` now and ``start`` ``down_s`` later (in a thread); the
    list gets the seconds the service was really down."""
    downtime: list[float] = []

    def restart(t0: float) -> None:
        time.sleep(down_s)
        start()
        downtime.append(time.monotonic() - t0)

    def action() -> None:
        stop()
        threading.Thread(target=restart, args=(time.monotonic(),), daemon=True).start()

    return action, downtime


def test_registry_down_during_push_is_retried(
    gantry_env: GantryEnv, prefect_api: str, retry_log: RetryLog, scenario: Scenario
) -> None:
    scenario.group = "transient: registry -> build"
    scenario.title = "registry process stopped as the push starts, back 1 s later"
    settings = Settings.from_env()
    spec = _spec(gantry_env.repo_id, NAME, retries={"delay_s": 2})
    weights = weights_task.fn(spec.source, str(settings.weights_dir))
    service = registry_service(settings)
    stop, downtime = _outage(service.stop, service.start, down_s=1.0)
    with _on_log("gantry.build", "pushing ", stop) as trigger:
        build = retry_log.run(lambda: with_retries(build_task, spec.retries)(spec, weights))

    assert trigger.fired == 1 and downtime, "the registry was never stopped mid-push"
    retries = retry_log.retries()
    assert retries and "RegistryUnavailableError" in retries[0], retries
    with RegistryClient(settings.registry) as registry:
        assert registry.manifest_digest(spec.image_repository, build.tag) == build.digest
        assert [t for t in registry.tags(spec.image_repository) if t.startswith("build-")] == [
            build.tag
        ]
    scenario.outcome = (
        f"succeeded after {len(retries)} stage retr{'y' if len(retries) == 1 else 'ies'} "
        f"(registry down {downtime[0]:.1f}s); one tag, digest as recorded"
    )


# --- containers -> stage `smoke`; MLflow server -> stage `register` ---------------------------


@dataclass(frozen=True)
class Signed:
    spec: ReleaseSpec
    weights: WeightsResult
    build: BuildResult
    scan: ScanResult
    sign: SignResult


@pytest.fixture(scope="module")
def signed(gantry_env: GantryEnv, prefect_api: str) -> Signed:
    """A release of the demo taken through sign by the stages themselves (no faults)."""
    settings = Settings.from_env()
    spec = _spec(gantry_env.repo_id, NAME)
    p = spec.retries
    weights = with_retries(weights_task, p)(spec.source, str(settings.weights_dir))
    build = with_retries(build_task, p)(spec, weights)
    scan = with_retries(scan_task, p)(spec, build)
    sign = with_retries(sign_task, p)(spec, build, scan, weights)
    return Signed(spec, weights, build, scan, sign)


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=120)
    yield client
    client.close()


def _labelled(client: docker.DockerClient, release_id: str) -> list[dict[str, Any]]:
    """The release's containers, as `docker ps -a` lists them."""
    labels = {"label": f"{RELEASE_LABEL}={release_id}"}
    return list(client.api.containers(all=True, filters=labels))


@contextlib.contextmanager
def _kill_first_start(client: docker.DockerClient, release_id: str) -> Iterator[list[str]]:
    """Kill (SIGKILL) the first container of ``release_id`` the moment it starts."""
    killed: list[str] = []
    events = client.events(
        decode=True,
        filters={"type": "container", "event": "start", "label": f"{RELEASE_LABEL}={release_id}"},
    )

    def watch() -> None:
        # Closing the stream (at the end of the block) ends the loop with an error.
        with contextlib.suppress(Exception):
            for event in events:
                client.containers.get(event["id"]).kill()
                killed.append(event["id"])
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        events.close()
        thread.join(timeout=10)


def test_container_killed_on_first_start_is_started_again(
    signed: Signed,
    engine: docker.DockerClient,
    retry_log: RetryLog,
    scenario: Scenario,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scenario.group = "transient: container -> smoke"
    scenario.title = "the smoke container is SIGKILLed the moment it first starts"
    s = signed
    caplog.set_level(logging.INFO, logger="gantry.smoke")
    with _kill_first_start(engine, s.spec.release_id) as killed:
        result = retry_log.run(
            lambda: with_retries(smoke_task, s.spec.retries)(s.spec, s.build, s.weights, s.sign)
        )

    assert len(killed) == 1
    assert result.attempts == 2 and result.container_id != killed[0]
    restarts = [r.getMessage() for r in caplog.records if "starting it again" in r.getMessage()]
    assert len(restarts) == 1 and "code 137 on start 1 of 2" in restarts[0], restarts
    assert retry_log.retries() == []  # the stage restarted the container; no task retry
    assert _labelled(engine, s.spec.release_id) == []
    scenario.outcome = "succeeded on the 2nd container start (smoke.start_attempts), none left"


def test_container_that_always_exits_fails_with_its_log(
    signed: Signed,
    engine: docker.DockerClient,
    retry_log: RetryLog,
    scenario: Scenario,
) -> None:
    scenario.group = "permanent: container -> smoke"
    scenario.title = "the runtime exits on every start (invalid GANTRY_DEVICE)"
    s = signed
    spec = _spec(s.spec.source.repo_id, NAME, runtime={"env": {"GANTRY_DEVICE": "tpu"}})
    t0 = time.monotonic()
    with pytest.raises(ContainerStartError) as info:
        retry_log.run(
            lambda: with_retries(smoke_task, spec.retries)(spec, s.build, s.weights, s.sign)
        )
    elapsed = time.monotonic() - t0

    assert info.value.exit_code == 2
    assert "GANTRY_DEVICE='tpu'" in info.value.logs_tail  # the runtime's own words
    assert retry_log.retries() == [] and not is_transient(info.value)
    assert _labelled(engine, spec.release_id) == []
    scenario.outcome = (
        f"ContainerStartError after {spec.smoke.start_attempts} starts ({elapsed:.1f}s), "
        "exit code and log tail in the message; no task retry, no container left"
    )


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` on SQLite, as a production tracking server runs. It takes
    a while to start: it starts with the module, in a thread, and the test waits for it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    process = ManagedProcess(
        name="mlflow",
        argv=[
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        host="127.0.0.1",
        port=port,
        health_path="/health",
        run_dir=root,
        startup_timeout_s=180,
    )
    server = MlflowServer(process)
    try:
        yield server
    finally:
        server.starting.join(timeout=200)
        process.stop()


class MlflowServer:
    def __init__(self, process: ManagedProcess) -> None:
        self.process = process
        self.error: BaseException | None = None
        self.starting = threading.Thread(target=self._start, daemon=True)
        self.starting.start()

    def _start(self) -> None:
        try:
            self.process.start()
        except BaseException as exc:  # re-raised in the test's thread by ready()
            self.error = exc

    def ready(self) -> ManagedProcess:
        self.starting.join(timeout=200)
        if self.error is not None:
            raise self.error
        assert self.process.healthy(), "the MLflow server did not start"
        return self.process


def test_mlflow_unreachable_during_register_is_retried(
    signed: Signed,
    mlflow_server: MlflowServer,
    retry_log: RetryLog,
    scenario: Scenario,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scenario.group = "transient: MLflow -> register"
    scenario.title = (
        "network to the MLflow server cut (refused, open connections reset) right after the "
        "release's run is created, back 1 s later"
    )
    s, server = signed, mlflow_server.ready()
    with TcpGate((server.host, server.port)) as gate:
        spec = _spec(
            s.spec.source.repo_id,
            NAME,
            mlflow={"tracking_uri": f"http://127.0.0.1:{gate.port}", "timeout_s": 30},
            retries={"delay_s": 2},
        )
        caplog.set_level(logging.INFO, logger="gantry.register")
        cut, downtime = _outage(gate.close, gate.open, down_s=1.0)
        with _on_log("gantry.register", "created MLflow run", cut) as trigger:
            result = retry_log.run(
                lambda: with_retries(register_task, spec.retries)(
                    spec, s.weights, s.build, s.scan, s.sign
                )
            )
    assert trigger.fired == 1 and downtime

    retries = retry_log.retries()
    assert retries and all("MLflowUnavailableError" in r for r in retries), retries
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("re-using MLflow run") for m in messages)  # not a second run
    registry = MlflowRegistry(server.url, timeout_s=30)
    exp = registry.ensure_experiment(spec.mlflow.experiment)
    runs = registry.client.search_runs(
        [exp], filter_string=f"tags.`{RELEASE_TAG}` = '{spec.release_id}'"
    )
    versions = registry.client.search_model_versions(f"name = '{spec.name}'")
    assert [r.info.run_id for r in runs] == [result.run_id]
    assert runs[0].info.status == "FINISHED"
    assert [v.version for v in versions] == [result.version]
    assert "candidate" in result.aliases
    scenario.data_lost = [
        f"metric {k} missing"
        for k in ("image.size_bytes", "weights.total_bytes")
        if k not in runs[0].data.metrics
    ]
    assert scenario.data_lost == []
    scenario.outcome = (
        f"succeeded after {len(retries)} stage retr{'y' if len(retries) == 1 else 'ies'}; "
        "the run was re-used: one run, one version, alias candidate"
    )
