"""The multi topology's tracking store: Debian's PostgreSQL and an MLflow tracking server
on it, as managed services, used through Gantry's own MLflow adapter over HTTP (registered
model, version, alias; an artifact uploaded and downloaded through ``--serve-artifacts``),
and the data still there after both are stopped and started again."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gantry.adapters.mlflow_registry import MlflowRegistry
from gantry.cli import _env_summary
from gantry.localenv.services import (
    ManagedProcess,
    PostgresProcess,
    mlflow_server_service,
    postgres_password,
    postgres_password_file,
    postgres_service,
    tracking_services,
)
from gantry.settings import Settings
from tests.support import free_port

pytestmark = pytest.mark.integration

MODEL = "tracking-server-test"
# The form the register stage gives a version's source (weights by commit): the server
# validates sources, so this is the one that must pass.
SOURCE = "hf://sentence-transformers/all-MiniLM-L6-v2@" + "c" * 40


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: as root, PostgreSQL runs as the `postgres` user, which must
    # be able to enter every directory above its cluster (pytest's base dir is 0700).
    path = Path(tempfile.mkdtemp(prefix="gantry-tracking-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings(state_dir: Path) -> Settings:
    return Settings.from_env(
        {
            "GANTRY_STATE_DIR": str(state_dir),
            "GANTRY_TOPOLOGY": "multi",
            "GANTRY_POSTGRES_ADDR": f"127.0.0.1:{free_port()}",
            "GANTRY_MLFLOW_ADDR": f"127.0.0.1:{free_port()}",
        }
    )


@pytest.fixture
def services(settings: Settings) -> Iterator[tuple[PostgresProcess, ManagedProcess]]:
    pg = postgres_service(settings)
    try:
        yield pg, mlflow_server_service(settings)
    finally:
        # The server first: its connections would otherwise hold the database up.
        mlflow_server_service(settings).stop()
        pg.stop()


def _registry(settings: Settings) -> MlflowRegistry:
    return MlflowRegistry(settings.default_tracking_uri, timeout_s=30)


def test_tracking_services_by_topology(settings: Settings) -> None:
    assert [s.name for s in tracking_services(settings)] == ["postgres", "mlflow"]
    single = settings.model_copy(update={"topology": "single"})
    assert tracking_services(single) == []
    assert settings.default_tracking_uri == f"http://{settings.mlflow_server_addr}"


def test_tracking_server_on_postgres_persists_across_restarts(
    settings: Settings,
    services: tuple[PostgresProcess, ManagedProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pg, mlflow = services
    first = pg.start()
    assert first.healthy and first.pid is not None
    assert (settings.postgres_dir / "data" / "PG_VERSION").read_text().strip().isdigit()
    again = pg.start()
    assert again.pid == first.pid  # idempotent: a healthy server is left alone
    server = mlflow.start()
    assert server.healthy and mlflow.start().pid == server.pid

    # The generated password: 0600, and nowhere it could be shown.
    password = postgres_password(settings)
    assert password
    assert stat.S_IMODE(postgres_password_file(settings).stat().st_mode) == 0o600
    for svc in (pg, mlflow):
        assert password not in " ".join(svc.argv)
        assert password not in "".join(svc.env.values())
        assert password not in svc.status().model_dump_json()
        assert password not in svc.logfile.read_text(errors="replace")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = _env_summary(settings)
    assert summary["topology"] == "multi" and summary["mlflow_embedded_server"] is True
    assert summary["mlflow_tracking_uri"] == mlflow.url
    listed = dict(summary["services"])  # type: ignore[call-overload]
    assert listed["postgres"]["healthy"] and listed["mlflow"]["healthy"]
    assert listed["postgres"]["url"] == f"postgresql://gantry@{settings.postgres_addr}/mlflow"
    assert password not in json.dumps(summary)
    if os.geteuid() == 0:
        assert (settings.postgres_dir / "data").stat().st_uid != 0

    registry = _registry(settings)
    exp = registry.ensure_experiment("tracking-server")
    run_id = registry.start_run(exp, "artifacts", {"purpose": "test"})
    payload = tmp_path / "payload.txt"
    payload.write_text("served by the tracking server\n")
    registry.log_artifact(run_id, payload, "files")
    registry.finish_run(run_id)
    # --serve-artifacts: the client only ever saw mlflow-artifacts:/, the server wrote here.
    assert registry.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert list(settings.mlflow_artifacts_dir.rglob("payload.txt"))
    version = registry.register(
        MODEL, source=SOURCE, run_id=run_id, release_id="r-1", tags={"k": "v"}
    )
    registry.set_alias(MODEL, "candidate", version.version)
    by_alias = registry.client.get_model_version_by_alias(MODEL, "candidate")
    assert by_alias.version == version.version

    mlflow.stop()
    pg.stop()
    assert not pg.status().running and not mlflow.status().running

    # A fresh pair of processes on the same state dir: the cluster is reused (no initdb),
    # and everything written above is still there.
    pg2, mlflow2 = postgres_service(settings), mlflow_server_service(settings)
    assert pg2.start().healthy and mlflow2.start().healthy
    registry = _registry(settings)
    ref = registry.get_alias_version(MODEL, "candidate")
    assert ref is not None and ref.version == version.version and ref.tags["k"] == "v"
    # (search answers with empty aliases in MLflow 3: compare what it does fill in)
    found = registry.find_version(MODEL, "r-1")
    assert found is not None and (found.version, found.source) == (ref.version, SOURCE)
    out = Path(registry.client.download_artifacts(run_id, "files/payload.txt", str(tmp_path)))
    assert out.read_text() == payload.read_text()
