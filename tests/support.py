"""Test support: an isolated Gantry environment on real services."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Content-verified downloads (wheels, base-image rootfs) are shared with `make demo`.
SHARED_CACHE = REPO_ROOT / ".gantry" / "cache"


def gantry_cli(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`gantry ARGS` as a user (or a host) runs it, from the checkout, to the end."""
    return subprocess.run(
        [sys.executable, "-m", "gantry.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GantryEnv:
    """Services started for this test session, isolated from the user's own state."""

    env: dict[str, str]
    state_dir: Path
    hub_url: str
    registry: str
    repo_id: str
    revisions: dict[str, str]

    def settings(self) -> object:
        from gantry.settings import Settings

        return Settings.from_env(self.env)

    def hub_stats(self) -> dict[str, object]:
        return dict(httpx.get(f"{self.hub_url}/_gantry/stats", timeout=10).json())

    def reset_hub_stats(self) -> None:
        httpx.delete(f"{self.hub_url}/_gantry/stats", timeout=10).raise_for_status()


@pytest.fixture(scope="session")
def gantry_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GantryEnv]:
    """Registry and Hub endpoint on free ports with a private state dir; torn down after."""
    from gantry.localenv.services import hub_service, metrics_services, registry_service
    from gantry.localhub.demo import assemble_demo
    from gantry.localhub.store import HubStore
    from gantry.settings import Settings

    state = tmp_path_factory.mktemp("gantry-state")
    env = {
        "GANTRY_STATE_DIR": str(state),
        "GANTRY_CACHE_DIR": str(SHARED_CACHE),
        "GANTRY_LOCAL_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
        "GANTRY_HUB_ADDR": f"127.0.0.1:{free_port()}",
        "GANTRY_PREFECT_PORT": str(free_port()),
        "GANTRY_PROMETHEUS_ADDR": f"127.0.0.1:{free_port()}",
        "GANTRY_EXPORTER_ADDR": f"127.0.0.1:{free_port()}",
    }
    saved = {k: os.environ.get(k) for k in [*env, "HF_ENDPOINT", "GANTRY_REGISTRY"]}
    os.environ.update(env)
    os.environ.pop("GANTRY_REGISTRY", None)
    settings = Settings.from_env()
    demo = assemble_demo(HubStore(settings.hub_dir / "store"), settings.demo_wheels_dir)
    services = [registry_service(settings), hub_service(settings)]
    try:
        for s in services:
            s.start()
        os.environ["HF_ENDPOINT"] = settings.hub_url
        yield GantryEnv(
            env={**env, "HF_ENDPOINT": settings.hub_url},
            state_dir=state,
            hub_url=settings.hub_url,
            registry=settings.registry,
            repo_id=demo.repo_id,
            revisions=demo.revisions(),
        )
    finally:
        # The canary starts the exporter and Prometheus on first use.
        for s in [*reversed(services), *metrics_services(settings)]:
            s.stop()
        _remove_test_deployments(settings.deployments_dir)
        _remove_test_images(settings.registry)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _remove_test_deployments(deployments_dir: Path) -> None:
    """Routers and model servers that releases of this session deployed (stage canary)."""
    with contextlib.suppress(Exception):
        import docker

        from gantry.deploy.docker import remove_deployments

        client = docker.from_env(timeout=60)
        remove_deployments(client, deployments_dir)
        client.close()


def _remove_test_images(registry: str) -> None:
    """Untag what this session pushed to its private registry (layers stay cached)."""
    with contextlib.suppress(Exception):
        import docker

        client = docker.from_env(timeout=60)
        for image in client.images.list():
            for tag in image.tags:
                if tag.startswith(registry + "/"):
                    with contextlib.suppress(Exception):
                        client.images.remove(tag, noprune=True)
        client.close()


@contextlib.contextmanager
def tracking_server() -> Iterator[str]:
    """The multi topology's tracking store, on free ports in a state dir of its own:
    Debian's PostgreSQL and an MLflow server on it (~10 s to start); yields its URL."""
    from gantry.localenv.services import mlflow_server_service, postgres_service
    from gantry.settings import Settings

    # As root PostgreSQL runs as `postgres`, which must enter every directory above its
    # cluster: not pytest's 0700 tmp dirs.
    control = Path(tempfile.mkdtemp(prefix="gantry-tracking-"))
    control.chmod(0o755)
    settings = Settings.from_env(
        {
            "GANTRY_STATE_DIR": str(control),
            "GANTRY_TOPOLOGY": "multi",
            "GANTRY_POSTGRES_ADDR": f"127.0.0.1:{free_port()}",
            "GANTRY_MLFLOW_ADDR": f"127.0.0.1:{free_port()}",
        }
    )
    pg, server = postgres_service(settings), mlflow_server_service(settings)
    try:
        pg.start()
        server.start()
        yield settings.mlflow_server_url
    finally:
        server.stop()  # first: its connections would hold the database up
        pg.stop()
        shutil.rmtree(control, ignore_errors=True)


@dataclass
class PrefectServer:
    """A Prefect server of this test session: its own port, PREFECT_HOME and database."""

    api_url: str
    state_dir: Path

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def env(self) -> dict[str, str]:
        """Environment for a `gantry` subprocess that talks to this server."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@contextlib.contextmanager
def embedded_prefect(
    env: GantryEnv, *, remove_deployments: bool = False
) -> Iterator[tuple[dict[str, str], Any]]:
    """The embedded Prefect server of ``env``'s state dir, started for one test module (as
    `gantry release` would find it); yields (the env for `gantry` processes, the settings)
    and stops it afterwards, with ``remove_deployments`` also every live deployment."""
    from gantry.localenv.services import prefect_env, prefect_service
    from gantry.settings import Settings

    settings = Settings.from_env(env.env)
    svc = prefect_service(settings)
    svc.start()
    try:
        yield {**env.env, **prefect_env(settings)}, settings
    finally:
        svc.stop()
        if remove_deployments:
            import docker

            from gantry.deploy.docker import remove_deployments as remove

            client = docker.from_env()
            try:
                remove(client, settings.deployments_dir)
            finally:
                client.close()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One real Prefect server (SQLite) shared by the tests that need an API; ~15 s to start."""
    from gantry.localenv.services import prefect_service
    from gantry.settings import Settings

    state = tmp_path_factory.mktemp("prefect-server")
    settings = Settings.from_env(
        {"GANTRY_STATE_DIR": str(state), "GANTRY_PREFECT_PORT": str(free_port())}
    )
    service = prefect_service(settings)
    service.start()
    try:
        yield PrefectServer(api_url=settings.prefect_api_url, state_dir=state)
    finally:
        service.stop()


class GantryProcess:
    """`gantry ARGS` in a process of its own (and its own process group, to kill it whole),
    its output in unnamed files rather than pipes: a pipe nobody reads while the test waits
    on something else fills at 64 KiB, and the release stops mid-stage on its next log line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        # They live as long as this object (closed, and gone, when it is collected).
        self._out = tempfile.TemporaryFile("w+b")  # noqa: SIM115
        self._err = tempfile.TemporaryFile("w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gantry.cli", *args],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            text=True,
            stdout=self._out,
            stderr=self._err,
            cwd=REPO_ROOT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the exit (``subprocess.TimeoutExpired`` past ``timeout``); stdout, stderr."""
        self.proc.wait(timeout=timeout)
        return self.output()

    def finish(self, timeout: float | None = None) -> tuple[int, str, str]:
        """Exit code, stdout and stderr, once it exits."""
        out, err = self.communicate(timeout)
        return self.proc.wait(), out, err

    def output(self) -> tuple[str, str]:
        """Stdout and stderr so far (the process may still run)."""
        return self._read(self._out), self._read(self._err)

    @staticmethod
    def _read(f: IO[bytes]) -> str:
        # pread, not seek + read: the child shares the file's offset and would go on writing
        # wherever a seek left it.
        fd = f.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", errors="replace")


def gantry_popen(env: dict[str, str], *args: str) -> GantryProcess:
    """`gantry ARGS` started, not waited for (see `GantryProcess`)."""
    return GantryProcess(env, *args)


def gantry_release(
    env: dict[str, str], spec: Path, timeout: float = 900
) -> tuple[int, dict[str, Any], str]:
    """`gantry release SPEC`: its exit code, the release record it printed, its stderr."""
    rc, out, err = gantry_popen(env, "release", str(spec)).finish(timeout)
    record = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    return rc, record, err


class SteadyLoad:
    """`python -m gantry.loadgen` in a process of its own."""

    def __init__(
        self,
        endpoint: str,
        out: Path,
        rps: float = 20,
        *,
        protocol: str = "embeddings",
        model: str = "minilm",
    ) -> None:
        self.out = out
        self.started = time.time()
        ready = out.with_suffix(".ready")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "gantry.loadgen", endpoint, "--rps", str(rps)),
                *("--protocol", protocol, "--model", model),
                *("--out", str(out), "--ready-file", str(ready)),
            ],
            cwd=REPO_ROOT,
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline, "the load generator did not start"
            time.sleep(0.1)

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        return dict(json.loads(self.out.read_text()))
