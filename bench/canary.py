"""Canary benchmarks: decision times and the cost of a good canary, in one run.

    .venv/bin/python bench/canary.py [--window 10]

Real releases through `gantry release` on services started for the benchmark (isolated
state dir, free ports; wheels and base images from the shared cache). Measures:

- a good canary (10 -> 50 -> 100 %): its whole stage time and its traffic shift (first
  step to promotion) vs the sum of its analysis windows;
- a candidate that fails a check (the degraded model, caught by the quality probes):
  from the failing check to the candidate's weight reaching 0;
- a candidate that crashes mid-window (its container killed): from the kill, as seen
  from outside, to weight 0, vs the analysis window it would otherwise have waited out.

Prints a table and writes bench/results/canary.json (and a timestamped copy).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import Row, bench_env, report  # noqa: E402 - after the path is set

MODEL = "bench-canary"


def _spec(state: Path, revision: str, window: float, **extra: Any) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "minilm-demo.yaml").read_text())
    data["source"]["revision"] = revision
    data["mlflow"] = {"model_name": MODEL}
    data["canary"] = {"window_s": window, "interval_s": 0.5, "keep_warm_s": 0, **extra}
    if revision == "degraded":
        data["evaluate"].update(threshold=0.2, tolerance=1.0)
    path = state / f"{revision}-{window}-{len(extra)}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _release(env: dict[str, str], spec: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gantry.cli", "release", str(spec)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _record(proc: subprocess.Popen[str], expect_rc: int) -> dict[str, Any]:
    out, err = proc.communicate(timeout=1800)
    if proc.returncode != expect_rc:
        raise SystemExit(f"release exited {proc.returncode}, not {expect_rc}:\n{err[-3000:]}")
    return dict(json.loads(Path(out.strip().splitlines()[-1]).read_text()))


def _status(state: Path) -> dict[str, Any]:
    (path,) = (state / "deployments").glob(f"gantry-{MODEL}-*/status.json")
    return dict(json.loads(path.read_text()))


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--window", type=float, default=10.0, help="analysis window (s)")
    args = ap.parse_args()
    w = args.window

    client = docker.from_env()
    results: dict[str, Any] = {"window_s": w}
    with bench_env("gantry-bench-canary-") as (settings, env):
        state = settings.state_dir
        _record(_release(env, _spec(state, "v1", w)), 0)  # the first champion

        # 1. a good canary: two windows, then promotion.
        good = _record(_release(env, _spec(state, "v2", w)), 0)
        stage = good["stages"]["canary"]
        res = stage["result"]
        verdicts = res["verdicts"]
        windows = len(verdicts) * w
        shift = _ts(verdicts[-1]["finished_at"]) - _ts(verdicts[0]["started_at"])
        results["good"] = {
            "stage_s": stage["duration_s"],
            "shift_s": round(shift, 2),
            "windows_s": windows,
            "cold_start_s": res["cold_start_s"],
            "shift_ratio": round(shift / windows, 3),
            "stage_ratio": round(stage["duration_s"] / windows, 3),
        }

        # 2. a failing check (quality probes catch the degraded model).
        _record(_release(env, _spec(state, "degraded", w)), 1)
        c = _status(state)["canary"]
        results["quality_failure"] = {
            "check_to_weight0_s": round(_ts(c["weight_zero_at"]) - _ts(c["first_failure_at"]), 3),
            "step_start_to_weight0_s": round(
                _ts(c["weight_zero_at"]) - _ts(c["last_transition_at"])
                if c["verdicts"] == []
                else _ts(c["weight_zero_at"]) - _ts(c["verdicts"][0]["started_at"]),
                3,
            ),
        }

        # 3. a crash mid-window (the v1 weights again, as a new candidate).
        proc = _release(env, _spec(state, "v1", 3 * w, min_requests=5))
        deadline = time.monotonic() + 900
        while True:
            try:
                st = _status(state)
                if st["canary"]["phase"] == "progressing" and st.get("candidate"):
                    break
            except (ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise SystemExit("the crash canary never started its analysis")
            time.sleep(0.1)
        time.sleep(1.0)  # well inside the window
        name = next(
            c.name
            for c in client.containers.list(filters={"label": f"ai.gantry.model={MODEL}"})
            if c.name.endswith(f"-{st['candidate']['slot']}")
        )
        killed_at = time.time()
        client.containers.get(name).kill()
        _record(proc, 1)
        c = _status(state)["canary"]
        results["crash"] = {
            "kill_to_weight0_s": round(_ts(c["weight_zero_at"]) - killed_at, 3),
            "window_s": 3 * w,
        }
    client.close()

    g, q, k = results["good"], results["quality_failure"], results["crash"]
    rows: list[Row] = [
        ("good canary: shift / windows", g["shift_s"], g["windows_s"], g["shift_ratio"], "<= 1.1"),
        ("good canary: stage / windows", g["stage_s"], g["windows_s"], g["stage_ratio"], "-"),
        ("failing check -> weight 0 (s)", q["check_to_weight0_s"], "", "", "<= window + 5 s"),
        (
            "crash -> weight 0 (s) / window",
            k["kill_to_weight0_s"],
            k["window_s"],
            round(k["kill_to_weight0_s"] / k["window_s"], 3),
            "<= 1",
        ),
    ]
    report(results, rows, "canary.json", "canary")


if __name__ == "__main__":
    main()
