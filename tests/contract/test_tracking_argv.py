"""Golden argv of the multi topology's tracking pair: PostgreSQL (through setpriv when
Gantry runs as root) and the MLflow server, whose backend URI carries no password."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gantry.errors import ToolNotFoundError
from gantry.localenv import services
from gantry.localenv.services import mlflow_server_service, postgres_bin, postgres_service
from gantry.settings import Settings

pytestmark = pytest.mark.contract


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(
        {
            "GANTRY_STATE_DIR": str(tmp_path),
            "GANTRY_TOPOLOGY": "multi",
            "GANTRY_POSTGRES_ADDR": "127.0.0.1:6079",
            "GANTRY_MLFLOW_ADDR": "127.0.0.1:6080",
        }
    )


def test_postgres_argv_as_another_user(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    pg = postgres_service(settings)
    root = settings.postgres_dir
    assert pg.argv == [
        str(postgres_bin("postgres")),
        "-D",
        str(root / "data"),
        "-h",
        "127.0.0.1",
        "-p",
        "6079",
        "-k",
        str(root / "run"),
    ]
    assert pg.account is None
    assert pg.url == "postgresql://gantry@127.0.0.1:6079/mlflow"


def test_postgres_argv_as_root_switches_to_the_postgres_user(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    pg = postgres_service(settings)
    assert pg.account is not None and pg.account.pw_name == "postgres"
    assert pg.argv[:5] == [
        pg.argv[0],
        f"--reuid={pg.account.pw_uid}",
        f"--regid={pg.account.pw_gid}",
        "--init-groups",
        "--",
    ]
    assert Path(pg.argv[0]).name == "setpriv"
    assert pg.argv[5] == str(postgres_bin("postgres"))


def test_mlflow_server_argv(settings: Settings) -> None:
    ml = mlflow_server_service(settings)
    assert ml.argv[1:] == [
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        "postgresql+psycopg2://gantry@127.0.0.1:6079/mlflow",
        "--serve-artifacts",
        "--artifacts-destination",
        str(settings.mlflow_artifacts_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "6080",
        "--workers",
        "1",
    ]
    assert ml.env == {"PGPASSFILE": str(settings.postgres_dir / "pgpass")}
    assert ml.health_path == "/health"


def test_bin_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANTRY_POSTGRES_BIN_DIR", str(tmp_path))
    with pytest.raises(ToolNotFoundError, match="GANTRY_POSTGRES_BIN_DIR"):
        postgres_bin("initdb")
    tool = tmp_path / "initdb"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert postgres_bin("initdb") == tool


def test_missing_postgres_says_make_system_deps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GANTRY_POSTGRES_BIN_DIR", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ToolNotFoundError, match="make system-deps"):
        postgres_bin("no-such-postgres-tool")
    assert services.POSTGRES_SYSTEM_USER == "postgres"
