"""Resource hygiene under a long-running `gantry serve`: consecutive demo releases started
as runs of the `release` deployment (as the UI, a schedule or the webhook start them) and
executed by the one worker; after each, what the machine holds.

    .venv/bin/python bench/hygiene.py [--releases 20] [--readme]

The releases alternate between the demo's two good revisions, so every one after the
first two resumes its earlier stages and runs a real canary (short windows) that promotes
it over the other. Counted after each: containers, networks and volumes in the engine,
images and dangling images, the worker's and the Prefect server's open file descriptors
and memory, processes left under the worker, and the state dir's size. Releases 1-2 are
the warm-up (first builds, first deployment); the table compares release 2 with the last.
Prints the table, writes bench/results/hygiene.json and, with --readme, the README's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import docker
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import Row, bench_env, free_port, report, splice_readme  # noqa: E402

BEGIN, END = "<!-- hygiene:begin -->", "<!-- hygiene:end -->"


def _spec(revision: str) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "examples" / "minilm-demo.yaml").read_text())
    data["source"]["revision"] = revision
    data["canary"] = {"window_s": 3, "min_requests": 5, "keep_warm_s": 0, "drain_s": 5}
    return dict(data)


def _proc(pid: int | None) -> dict[str, int]:
    """Open fds, resident memory (KiB), threads and live descendants of ``pid``."""
    if pid is None:
        return {"fds": -1, "rss_kib": -1, "threads": -1, "descendants": -1}
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    kids = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, timeout=30
    ).stdout.split()
    return {
        "fds": sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()),
        "rss_kib": int(status["VmRSS"].split()[0]),
        "threads": int(status["Threads"]),
        "descendants": len(kids),
    }


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _snapshot(
    client: docker.DockerClient, state: Path, worker: int | None, server: int | None
) -> dict[str, int]:
    images = client.images.list(all=True)
    snap = {
        "containers": len(client.containers.list(all=True)),
        "running_containers": len(client.containers.list()),
        "networks": len(client.networks.list()),
        "volumes": len(client.volumes.list()),
        "images": len(images),
        "dangling_images": len(client.images.list(filters={"dangling": True})),
        "state_dir_bytes": _du(state),
        **{f"state_{d.name}_bytes": _du(d) for d in sorted(state.iterdir()) if d.is_dir()},
        "scratch_entries": sum(
            1
            for d in (state / "weights" / "tmp", state / "build")
            if d.is_dir()
            for _ in d.iterdir()
        ),
    }
    snap.update({f"worker_{k}": v for k, v in _proc(worker).items()})
    snap.update({f"server_{k}": v for k, v in _proc(server).items()})
    return snap


async def _run(deployment: str, parameters: dict[str, Any], timeout_s: float) -> str:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        dep = await client.read_deployment_by_name(deployment)
        run = await client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        with anyio.fail_after(timeout_s):
            while True:
                run = await client.read_flow_run(run.id)
                if run.state is not None and run.state.is_final():
                    return str(run.state.type.value)
                await anyio.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--releases", type=int, default=20)
    ap.add_argument("--readme", action="store_true", help="update README's hygiene table")
    args = ap.parse_args()
    if args.releases < 3:
        raise SystemExit("--releases: at least 3 (two are the warm-up)")

    with bench_env("gantry-bench-hygiene-") as b:
        from gantry.localenv.services import prefect_service, worker_service
        from gantry.settings import Settings

        env = {**os.environ, **b.env, "GANTRY_WORKER_PORT": str(free_port())}
        os.environ.update(env)
        settings = Settings.from_env(env)
        served = subprocess.run(
            [sys.executable, "-m", "gantry.cli", "serve"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if served.returncode != 0:
            raise SystemExit(f"gantry serve failed:\n{served.stderr[-3000:]}")
        worker = worker_service(settings)
        client = docker.from_env()
        snaps: list[dict[str, Any]] = []
        try:
            for i in range(args.releases):
                revision = ("v1", "v2")[i % 2]
                t0 = time.monotonic()
                state = anyio.run(_run, "release/release", {"spec": _spec(revision)}, 1800)
                seconds = round(time.monotonic() - t0, 1)
                if state != "COMPLETED":
                    raise SystemExit(f"release {i + 1} ({revision}) ended {state}")
                snap = _snapshot(client, b.state, worker.pid(), prefect_service(settings).pid())
                snaps.append({"release": i + 1, "revision": revision, "seconds": seconds, **snap})
                print(f"release {i + 1:>2} {revision}: {seconds:6.1f}s {snap}", flush=True)
        finally:
            worker.stop()
            client.close()

    base, last = snaps[1], snaps[-1]
    n = len(snaps) - 2
    rows: list[Row] = []
    for key, unit, tolerance in (
        ("containers", "", 0),
        ("running_containers", "", 0),
        ("networks", "", 0),
        ("volumes", "", 0),
        ("images", "", 0),
        ("dangling_images", "", 0),
        ("scratch_entries", "", 0),
        ("worker_fds", "", 2),
        ("worker_descendants", "", 0),
        ("worker_rss_kib", " KiB", 0),
        ("server_fds", "", 5),
        ("state_dir_bytes", " B", 0),
    ):
        grew = last[key] - base[key]
        per = round(grew / n, 1)
        rows.append(
            Row(
                f"{key.replace('_', ' ')}{unit}: after release 2 / after release {len(snaps)}",
                base[key],
                last[key],
                round(last[key] / base[key], 3) if base[key] else None,
                f"growth {per:+g}/release",
                grew <= tolerance if tolerance or unit == "" else None,
            )
        )
    results = {"releases": snaps}
    table = report(results, rows, "hygiene", f"{len(snaps)} releases through `gantry serve`")
    if args.readme:
        splice_readme(table, begin=BEGIN, end=END)


if __name__ == "__main__":
    main()
