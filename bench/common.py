"""What every benchmark starts with: an isolated Gantry environment on real services."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def bench_env(prefix: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """A private state dir, free ports, the demo hub repository, and the registry, hub and
    Prefect server running; yields (settings, environment for `gantry` subprocesses).
    Wheels and base images come from the shared cache, as in any second run. Everything
    (deployments included) is removed afterwards."""
    state = Path(tempfile.mkdtemp(prefix=prefix))
    env = {
        "GANTRY_STATE_DIR": str(state),
        "GANTRY_CACHE_DIR": str(ROOT / ".gantry" / "cache"),
        "GANTRY_LOCAL_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
        "GANTRY_HUB_ADDR": f"127.0.0.1:{free_port()}",
        "GANTRY_PREFECT_PORT": str(free_port()),
    }
    os.environ.update(env)
    import docker

    from gantry.deploy.docker import remove_deployments
    from gantry.localenv.services import hub_service, prefect_env, prefect_service, registry_service
    from gantry.localhub.demo import assemble_demo
    from gantry.localhub.store import HubStore
    from gantry.settings import Settings

    settings = Settings.from_env()
    assemble_demo(HubStore(settings.hub_dir / "store"), settings.demo_wheels_dir)
    services = [registry_service(settings), hub_service(settings), prefect_service(settings)]
    try:
        for s in services:
            s.start()
        env.update(prefect_env(settings))
        env["HF_ENDPOINT"] = settings.hub_url
        os.environ.update(env)
        yield settings, env
    finally:
        client = docker.from_env()
        remove_deployments(client, settings.deployments_dir)
        client.close()
        for s in reversed(services):
            s.stop()
        shutil.rmtree(state, ignore_errors=True)


Row = tuple[str, object, object, object, str]


def report(results: dict[str, Any], rows: list[Row], latest: str, prefix: str) -> None:
    """Stamp ``results`` with the machine and time, print ``rows`` (measure, a, b, a/b,
    goal) as a table, and write the JSON to bench/results/<latest> and a timestamped copy."""
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    results["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"{'measure':<40} {'a':>9} {'b':>9} {'a/b':>7}  goal")
    for name, a, b, ratio, goal in rows:
        print(f"{name:<40} {a!s:>9} {b!s:>9} {ratio!s:>7}  {goal}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    (out / latest).write_text(text)
    (out / f"{prefix}-{results['when'].replace(':', '')}.json").write_text(text)
