"""`gantry serve`: work pool, deployment and a worker against a real Prefect server; the
worker is a managed process that `gantry env down` stops."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gantry.localenv.services import worker_name, worker_service
from gantry.proc import pid_alive
from gantry.settings import Settings
from tests.support import REPO_ROOT, PrefectServer, free_port, gantry_cli

pytestmark = pytest.mark.integration


def _pool_state(server: PrefectServer) -> tuple[list[str], Any, dict[str, Any]]:
    from prefect.client.orchestration import PrefectClient

    from gantry.adapters.prefect_api import online_workers

    async def read() -> tuple[list[str], Any, dict[str, Any]]:
        async with PrefectClient(api=server.api_url) as client:
            return (
                await online_workers(client, "gantry-process"),
                await client.read_work_pool("gantry-process"),
                {
                    name: await client.read_deployment_by_name(f"{name}/{name}")
                    for name in ("release", "rollback", "reevaluate")
                },
            )

    return anyio.run(read)


def _run_deployment(server: PrefectServer, name: str, *, timeout_s: float) -> Any:
    """Start a run of deployment ``name`` and wait for its final state."""
    from prefect.client.orchestration import PrefectClient

    async def run() -> Any:
        async with PrefectClient(api=server.api_url) as client:
            deployment = await client.read_deployment_by_name(name)
            flow_run = await client.create_flow_run_from_deployment(deployment.id)
            with anyio.fail_after(timeout_s):
                while True:
                    flow_run = await client.read_flow_run(flow_run.id)
                    if flow_run.state is not None and flow_run.state.is_final():
                        return flow_run.state
                    await anyio.sleep(1)

    return anyio.run(run)


def test_serve_starts_a_worker_and_env_down_stops_it(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **prefect_server.env(),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "GANTRY_STATE_DIR": str(tmp_path / "state"),
        "GANTRY_WORKER_PORT": str(free_port()),
    }
    worker = worker_service(Settings.from_env(env))
    try:
        served = gantry_cli(env, "serve", timeout=240)
        assert served.returncode == 0, served.stderr[-3000:]
        assert served.stdout.splitlines()[-1] == prefect_server.ui_url
        assert "deployment release/release" in served.stdout
        assert "deployment rollback/rollback" in served.stdout

        pid = worker.pid()
        assert pid is not None and worker.healthy()
        assert (tmp_path / "state" / "services" / "worker.log").is_file()
        online, pool, deployments = _pool_state(prefect_server)
        assert worker_name() in online
        assert pool.type == "process"
        for deployment in deployments.values():
            assert deployment.work_pool_name == "gantry-process"
            assert deployment.enforce_parameter_schema
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}
            ]
        assert deployments["release"].parameters["spec"]["name"] == "minilm"
        rollback_schema = deployments["rollback"].parameter_openapi_schema
        assert rollback_schema["required"] == ["model"]
        assert deployments["rollback"].schedules == []
        assert deployments["reevaluate"].global_concurrency_limit is not None
        assert deployments["reevaluate"].global_concurrency_limit.limit == 1
        (schedule,) = deployments["reevaluate"].schedules
        assert schedule.active
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 * * * *", "UTC")

        # The schedule's runs are runs of the deployment on the worker: one, started now,
        # completes there (no model is deployed in this state dir, so it judges none).
        state = _run_deployment(prefect_server, "reevaluate/reevaluate", timeout_s=240)
        assert state.is_completed(), state

        # A second `gantry serve` finds everything up and changes nothing.
        again = gantry_cli(env, "serve", "--deployment", "release", timeout=240)
        assert again.returncode == 0, again.stderr[-3000:]
        assert worker.pid() == pid

        down = gantry_cli(env, "env", "down", timeout=120)
        assert down.returncode == 0, down.stderr[-3000:]
        assert not pid_alive(pid)
        assert worker.pid() is None
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{worker.url}/health", timeout=2)
    finally:
        worker.stop()
