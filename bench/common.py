"""What every benchmark shares: an isolated Gantry environment on real services, releases
run the way users run them, and one way to report ratios."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Bench:
    """A running benchmark environment: its settings and the env for `gantry` processes."""

    settings: Any
    env: dict[str, str]

    @property
    def state(self) -> Path:
        return Path(self.settings.state_dir)

    def spec(self, name: str, base: str = "minilm-demo.yaml", **over: Any) -> Path:
        """A spec file: ``examples/<base>`` named ``name``, with ``over`` merged in."""
        data = yaml.safe_load((ROOT / "examples" / base).read_text())
        data = _merge({**data, "name": name}, over)
        ev = data.get("evaluate") or {}
        if ev.get("dataset") and not Path(ev["dataset"]).is_absolute():
            ev["dataset"] = str(ROOT / ev["dataset"])
        path = self.state / "specs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data))
        return path

    def release(
        self,
        spec: Path,
        *,
        direct: bool = False,
        env: dict[str, str] | None = None,
        expect_rc: int = 0,
    ) -> tuple[dict[str, Any], float]:
        """One release as its own process: `gantry release` (through Prefect), or with
        ``direct`` the same stage functions called in order (bench/direct.py). Its record
        and its wall time."""
        argv = (
            [sys.executable, str(ROOT / "bench" / "direct.py"), str(spec)]
            if direct
            else [sys.executable, "-m", "gantry.cli", "release", str(spec)]
        )
        t0 = time.perf_counter()
        done = subprocess.run(
            argv,
            env={**os.environ, **self.env, **(env or {})},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        seconds = time.perf_counter() - t0
        if done.returncode != expect_rc:
            raise SystemExit(
                f"{' '.join(argv[1:])} exited {done.returncode}, not {expect_rc}:\n"
                f"{done.stderr[-3000:]}"
            )
        record = json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())
        return dict(record), seconds

    def clear_deployments(self) -> None:
        """Remove the live deployments releases leave (router + servers per model)."""
        import docker

        from gantry.deploy.docker import remove_deployments

        client = docker.from_env()
        try:
            remove_deployments(client, self.settings.deployments_dir)
        finally:
            client.close()


@contextlib.contextmanager
def bench_env(prefix: str) -> Iterator[Bench]:
    """A private state dir, free ports, the demo hub repository, and the registry, hub and
    Prefect server running. Wheels and base images come from the shared cache, as in any
    second run. Everything (deployments included) is removed afterwards."""
    state = Path(tempfile.mkdtemp(prefix=prefix))
    env = {
        "GANTRY_STATE_DIR": str(state),
        "GANTRY_CACHE_DIR": str(ROOT / ".gantry" / "cache"),
        "GANTRY_LOCAL_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
        "GANTRY_HUB_ADDR": f"127.0.0.1:{free_port()}",
        "GANTRY_PREFECT_PORT": str(free_port()),
        "GANTRY_PROMETHEUS_ADDR": f"127.0.0.1:{free_port()}",
        "GANTRY_EXPORTER_ADDR": f"127.0.0.1:{free_port()}",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    os.environ.update(env)
    os.environ.pop("GANTRY_PROMETHEUS_URL", None)
    from gantry.localenv.services import (
        hub_service,
        metrics_services,
        prefect_env,
        prefect_service,
        registry_service,
    )
    from gantry.localhub.demo import assemble_demo
    from gantry.localhub.store import HubStore
    from gantry.settings import Settings

    settings = Settings.from_env()
    assemble_demo(HubStore(settings.hub_dir / "store"), settings.demo_wheels_dir)
    services = [registry_service(settings), hub_service(settings), prefect_service(settings)]
    bench = Bench(settings, env)
    try:
        for s in services:
            s.start()
        env.update(prefect_env(settings))
        env["HF_ENDPOINT"] = settings.hub_url
        os.environ.update(env)
        yield bench
    finally:
        bench.clear_deployments()
        # The canary starts the exporter and Prometheus on first use.
        for s in [*reversed(services), *metrics_services(settings)]:
            s.stop()
        shutil.rmtree(state, ignore_errors=True)


@dataclass(frozen=True)
class Row:
    """One line of the table: ``a`` against ``b`` (same unit), their ratio, the goal."""

    measure: str
    a: float | str
    b: float | str
    ratio: float | None
    goal: str
    met: bool | None = None


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    docker_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        docker_version = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "docker": docker_version,
    }


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        f"Measured {meta['when'][:16].replace('T', ' ')} UTC on {m['cpus']} vCPUs "
        f"({m['cpu'] or 'unknown CPU'}), {m['memory_gib']} GiB, Docker {m['docker']}, "
        f"Python {m['python']}; {meta['note']}",
        "",
        "| measure | a | b | a/b | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        ratio = "" if r.ratio is None else _fmt(r.ratio)
        lines.append(f"| {r.measure} | {_fmt(r.a)} | {_fmt(r.b)} | {ratio} | {r.goal} | {met} |")
    return "\n".join(lines)


def report(results: dict[str, Any], rows: list[Row], name: str, note: str) -> str:
    """Stamp ``results`` with the machine and time, print the table, write the JSON to
    ``bench/results/<name>.json`` (and a timestamped copy); the table as markdown."""
    results["machine"] = machine()
    results["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["note"] = note
    results["rows"] = [r.__dict__ for r in rows]
    width = max(len(r.measure) for r in rows)
    print(f"\n{'measure':<{width}} {'a':>9} {'b':>9} {'a/b':>7} met  goal")
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        ratio = "" if r.ratio is None else _fmt(r.ratio)
        print(f"{r.measure:<{width}} {_fmt(r.a):>9} {_fmt(r.b):>9} {ratio:>7} {met:>3}  {r.goal}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    (RESULTS / f"{name}.json").write_text(text)
    (RESULTS / f"{name}-{results['when'].replace(':', '')}.json").write_text(text)
    return markdown(rows, results)


def splice_readme(
    table: str, *, begin: str = BEGIN, end: str = END, readme: Path = ROOT / "README.md"
) -> None:
    """Put ``table`` between the ``begin`` and ``end`` markers of the README."""
    text = readme.read_text()
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"README has no {begin} … {end} markers (in this order)")
    readme.write_text(text[: start + len(begin)] + "\n" + table + "\n" + text[stop:])
