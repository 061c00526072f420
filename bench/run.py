"""Release benchmarks: ratios measured side by side in one run.

    .venv/bin/python bench/run.py [--repeat N]

Runs against real services started for the benchmark (isolated state dir, free ports;
wheels and base images come from the shared cache, as in a normal second run). Measures:

- cold release (empty state, Docker layer cache off) vs a cached re-run of the same spec;
- image rebuild after a code-only change vs a cold build of the same context;
- sha256 throughput of the weights verification vs `sha256sum` on the same files.

Prints a table and writes JSON to bench/results/ (latest.json and a timestamped copy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import Row, bench_env, report  # noqa: E402 - after the path is set


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _gantry_release(env: dict[str, str], spec: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "gantry.cli", "release", str(spec)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"release failed:\n{done.stderr[-3000:]}")
    record: dict[str, Any] = json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each cheap measurement")
    args = ap.parse_args()

    results: dict[str, Any] = {}
    with bench_env("gantry-bench-") as (settings, env):
        # Imported once the environment names the benchmark's state dir.
        from gantry.adapters.docker_engine import connect
        from gantry.localhub.demo import assemble_demo
        from gantry.localhub.store import HubStore
        from gantry.manifest import hash_many, sha256_file
        from gantry.spec import parse_spec
        from tasks.build import build_image
        from tasks.weights import WeightStore, fetch_weights

        client = connect()
        state = settings.state_dir
        demo = assemble_demo(HubStore(settings.hub_dir / "store"), settings.demo_wheels_dir)
        spec_path = state / "spec.yaml"
        spec_path.write_text((ROOT / "examples" / "minilm-demo.yaml").read_text())

        # 1. cold release vs cached re-run, through the CLI and the Prefect server.
        cold = _timed(lambda: _gantry_release({**env, "GANTRY_BUILD_NO_CACHE": "1"}, spec_path))
        cached_runs = [_timed(lambda: _gantry_release(env, spec_path)) for _ in range(args.repeat)]
        record = _gantry_release(env, spec_path)
        assert record["stages"]["weights"]["cached"] and record["stages"]["build"]["cached"]
        cached = statistics.median(cached_runs)
        results["release"] = {
            "cold_s": round(cold, 2),
            "cached_s": round(cached, 2),
            "cached_runs_s": [round(x, 2) for x in cached_runs],
            "ratio": round(cached / cold, 3),
        }

        # 2. code-only rebuild vs cold build of the same runtime (stage function, in-process).
        spec = parse_spec({"name": "bench", "source": {"repo_id": demo.repo_id, "revision": "v1"}})
        weights = fetch_weights(spec.source, WeightStore(settings.weights_dir))
        rt = state / "runtime"
        shutil.copytree(
            ROOT / "dockerfiles" / "runtime", rt, ignore=shutil.ignore_patterns("__pycache__")
        )
        spec_rt = parse_spec(
            {**spec.model_dump(mode="json"), "runtime": {"dockerfile_dir": str(rt)}}
        )
        os.environ["GANTRY_BUILD_NO_CACHE"] = "1"
        cold_build = build_image(spec_rt, weights, settings, client).build_seconds
        del os.environ["GANTRY_BUILD_NO_CACHE"]
        app = rt / "server" / "gantry_runtime" / "app.py"
        rebuilds = []
        for i in range(args.repeat):
            app.write_text(app.read_text() + f"\n# code-only change {i}\n")
            r = build_image(spec_rt, weights, settings, client)
            assert not r.cached
            rebuilds.append(r.build_seconds)
        rebuild = statistics.median(rebuilds)
        results["rebuild"] = {
            "cold_build_s": round(cold_build, 2),
            "code_change_s": round(rebuild, 2),
            "runs_s": rebuilds,
            "ratio": round(rebuild / cold_build, 3),
        }

        # 3. weights verification throughput vs sha256sum on the same files.
        files = [Path(weights.path) / p for p in ("onnx/model.onnx", "tokenizer.json", "vocab.txt")]
        size = sum(f.stat().st_size for f in files)
        ours = statistics.median(
            [_timed(lambda: hash_many(files, sha256_file)) for _ in range(args.repeat)]
        )
        ref = statistics.median(
            [
                _timed(
                    lambda: subprocess.run(
                        ["sha256sum", *map(str, files)],
                        capture_output=True,
                        check=True,
                        timeout=120,
                    )
                )
                for _ in range(args.repeat)
            ]
        )
        results["hashing"] = {
            "bytes": size,
            "gantry_mib_s": round(size / ours / 2**20, 1),
            "sha256sum_mib_s": round(size / ref / 2**20, 1),
            "ratio": round(ref / ours, 3),
        }
    client.close()

    rows: list[Row] = [
        (
            "cached re-run / cold release",
            results["release"]["cached_s"],
            results["release"]["cold_s"],
            results["release"]["ratio"],
            "<= 0.05",
        ),
        (
            "code-only rebuild / cold build",
            results["rebuild"]["code_change_s"],
            results["rebuild"]["cold_build_s"],
            results["rebuild"]["ratio"],
            "<= 0.15",
        ),
        (
            "gantry hash / sha256sum (MiB/s)",
            results["hashing"]["gantry_mib_s"],
            results["hashing"]["sha256sum_mib_s"],
            results["hashing"]["ratio"],
            ">= 0.9",
        ),
    ]
    report(results, rows, "latest.json", "release")


if __name__ == "__main__":
    main()
