"""GANTRY_TOPOLOGY and the tracking store it implies."""

from __future__ import annotations

from pathlib import Path

import pytest

from gantry.errors import ConfigError
from gantry.settings import Settings
from gantry.stages.register import default_tracking_uri

pytestmark = pytest.mark.unit


def _settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path), **env})


def test_single_is_the_default_and_keeps_sqlite(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    assert s.topology == "single"
    assert s.default_tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}"
    assert _settings(tmp_path, GANTRY_TOPOLOGY="").topology == "single"


def test_multi_points_at_the_embedded_server(tmp_path: Path) -> None:
    s = _settings(tmp_path, GANTRY_TOPOLOGY="multi")
    assert s.topology == "multi"
    assert (s.postgres_addr, s.mlflow_server_addr) == ("127.0.0.1:5079", "127.0.0.1:5080")
    assert s.default_tracking_uri == "http://127.0.0.1:5080"
    assert s.postgres_dir == tmp_path.resolve() / "postgres"
    assert s.mlflow_artifacts_dir == tmp_path.resolve() / "mlflow" / "artifacts-server"
    moved = _settings(
        tmp_path,
        GANTRY_TOPOLOGY="MULTI",
        GANTRY_MLFLOW_ADDR="127.0.0.1:6000",
        GANTRY_POSTGRES_ADDR="127.0.0.1:6001",
    )
    assert moved.default_tracking_uri == "http://127.0.0.1:6000"
    assert moved.postgres_addr == "127.0.0.1:6001"


@pytest.mark.parametrize("value", ["multiple", "cluster", "single,multi"])
def test_unknown_topology_names_the_variable(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="GANTRY_TOPOLOGY") as err:
        _settings(tmp_path, GANTRY_TOPOLOGY=value)
    assert "GANTRY_TOPOLOGY=multi" in str(err.value)


@pytest.mark.parametrize("var", ["GANTRY_POSTGRES_ADDR", "GANTRY_MLFLOW_ADDR"])
def test_bad_addresses_name_the_variable(tmp_path: Path, var: str) -> None:
    with pytest.raises(ConfigError, match=var):
        _settings(tmp_path, **{var: "localhost"})


def test_explicit_tracking_uri_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _settings(tmp_path, GANTRY_TOPOLOGY="multi")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(s) == "http://127.0.0.1:5080"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert default_tracking_uri(s) == "http://mlflow.internal:5000"


def test_multi_topology_never_makes_a_signing_key_of_one_host(tmp_path: Path) -> None:
    """A key generated on one worker would be that host's alone: the next host to run the
    release would sign again with its own and verify nothing the first one signed."""
    from gantry.keyring import resolve_keys
    from gantry.spec import SignOptions

    multi = Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path), "GANTRY_TOPOLOGY": "multi"})
    with pytest.raises(ConfigError, match="same key") as info:
        resolve_keys(SignOptions(), multi)
    assert "sign.key" in (info.value.fix or "") and not (tmp_path / "keys").exists()
    single = Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path)})
    assert resolve_keys(SignOptions(), single).generated  # one machine: made on first use
    assert not resolve_keys(SignOptions(), multi).generated  # now there is one to use


def test_hosts_that_share_a_deployments_dir_share_each_models_deployment(
    tmp_path: Path,
) -> None:
    """GANTRY_DEPLOYMENTS_DIR: hosts deploying through one engine name a model's
    deployment alike (one router, one status), wherever their state dirs are."""
    from gantry.stages.canary.state import DeploymentStore

    own = _settings(tmp_path / "a")
    assert own.deployments_dir == tmp_path / "a" / "deployments" and not own.deployments_shared
    shared = str(tmp_path / "deployments")
    a = _settings(tmp_path / "a", GANTRY_DEPLOYMENTS_DIR=shared)
    b = _settings(tmp_path / "b", GANTRY_DEPLOYMENTS_DIR=shared)
    assert a.deployments_shared and a.deployments_dir == b.deployments_dir
    store_a, store_b = (DeploymentStore(s.deployments_dir, "m") for s in (a, b))
    assert store_a.name == store_b.name and store_a.path == store_b.path
    lone = DeploymentStore(_settings(tmp_path / "b").deployments_dir, "m")
    assert lone.name != store_a.name  # another state dir's own deployments stay apart
