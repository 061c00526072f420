"""prefect.yaml → deployments: what Gantry's registration refuses, before any API call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from gantry.adapters.prefect_api import load_project, register_deployments
from gantry.errors import DeploymentConfigError
from tests.support import REPO_ROOT

pytestmark = pytest.mark.unit

HEAD = (
    "name: t\npull:\n  - prefect.deployments.steps.set_working_directory:\n      directory: '/x'\n"
)
RELEASE = (
    "deployments:\n  - name: release\n    entrypoint: flows/release.py:release\n"
    "    work_pool: {name: gantry-process}\n"
)


class NoCalls:
    """Stands in for the Prefect client: these cases must fail before talking to it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the client was called ({name}) before the config was checked")


def _register(tmp_path: Path, text: str, *names: str) -> None:
    path = tmp_path / "prefect.yaml"
    path.write_text(text)
    client: Any = NoCalls()

    async def run() -> None:
        await register_deployments(client, REPO_ROOT, env={}, names=names, prefect_file=path)

    anyio.run(run)


def test_env_placeholders_are_filled_and_missing_ones_named(tmp_path: Path) -> None:
    path = tmp_path / "prefect.yaml"
    path.write_text(HEAD.replace("/x", "{{ $PROJ }}/sub") + RELEASE)
    assert load_project(path, {"PROJ": "/srv"}).pull[0] == {
        "prefect.deployments.steps.set_working_directory": {"directory": "/srv/sub"}
    }
    with pytest.raises(DeploymentConfigError, match="not set: PROJ"):
        load_project(path, {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (HEAD.replace("/x", "{{ prefect.variables.dir }}") + RELEASE, "placeholders"),
        (
            HEAD + "build:\n  - some.step: {}\n" + RELEASE,
            "build: Value error, build/push steps are not run",
        ),
        (HEAD + RELEASE + "    triggers: []\n", "triggers: not supported"),
        (HEAD + RELEASE.replace("flows/release.py:release", "release"), "entrypoint"),
        (HEAD + RELEASE.replace("    work_pool: {name: gantry-process}\n", ""), "work_pool"),
        (HEAD + "deployments: []\n", "deployments"),
    ],
)
def test_project_keys_gantry_does_not_model_are_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "prefect.yaml"
    path.write_text(text)
    with pytest.raises(DeploymentConfigError, match=message):
        load_project(path, {})


def test_unknown_deployment_name(tmp_path: Path) -> None:
    with pytest.raises(DeploymentConfigError, match="no deployment named nope"):
        _register(tmp_path, HEAD + RELEASE, "nope")


def test_missing_entrypoint_file(tmp_path: Path) -> None:
    text = HEAD + RELEASE.replace("flows/release.py", "flows/absent.py")
    with pytest.raises(DeploymentConfigError, match=r"flows/absent.py:release does not exist"):
        _register(tmp_path, text)


def test_default_parameters_that_do_not_fit_the_flow(tmp_path: Path) -> None:
    text = HEAD + RELEASE + "    parameters:\n      spec: {name: minilm}\n"
    with pytest.raises(DeploymentConfigError, match="default parameters do not fit") as exc:
        _register(tmp_path, text)
    assert "source" in str(exc.value)


def test_bad_schedule(tmp_path: Path) -> None:
    text = HEAD + RELEASE + "    schedules:\n      - cron: '0 3 * * *'\n        interval: 60\n"
    with pytest.raises(DeploymentConfigError, match="invalid schedule"):
        _register(tmp_path, text)


def test_the_cli_runs_the_flow_of_the_deployment_of_the_same_name() -> None:
    from prefect import Flow

    from gantry.adapters.prefect_api import FLOW_ENTRYPOINTS, local_flow

    env = {"GANTRY_PROJECT_DIR": str(REPO_ROOT), "GANTRY_STATE_DIR": "/nonexistent"}
    deployments = {d.name: d for d in load_project(REPO_ROOT / "prefect.yaml", env).deployments}
    assert set(FLOW_ENTRYPOINTS) == set(deployments)
    for name, dotted in FLOW_ENTRYPOINTS.items():
        module, func = dotted.split(":")
        assert deployments[name].entrypoint == f"{module.replace('.', '/')}.py:{func}"
        flow = local_flow(name)
        assert isinstance(flow, Flow) and flow.name == name
        assert flow.fn.__module__ == module  # imported as the package module, not a script
