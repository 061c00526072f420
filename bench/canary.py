"""The canary's measures (part of bench/run.py): decision times and the cost of a good
canary, from real releases of one model through `gantry release`.

- a good canary (10 -> 50 -> 100 %, the spec's default analysis window): the whole stage
  and its traffic shift (first step to promotion) vs the sum of its analysis windows;
- a candidate that fails a check (the degraded model, caught by the quality probes): from
  the failing check to the candidate's weight reaching 0, and from the start of its step;
- a candidate that crashes mid-window (its container killed): from the kill, as seen from
  outside, to weight 0, vs the window it would otherwise have waited out.
"""

from __future__ import annotations

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

from bench.common import ROOT, Row

MODEL = "bench-canary"


def _spec(ctx: Any, revision: str, window: float, **extra: Any) -> Path:
    over: dict[str, Any] = {
        "source": {"revision": revision},
        "mlflow": {"model_name": MODEL},
        "canary": {"window_s": window, "keep_warm_s": 0, **extra},
    }
    if revision == "degraded":
        over["evaluate"] = {"threshold": 0.2, "tolerance": 1.0}
    name = f"{MODEL}-{revision}-{len(extra)}"
    return Path(ctx.bench.spec(name, **over))


def _status(state: Path) -> dict[str, Any]:
    (path,) = (state / "deployments").glob(f"gantry-{MODEL}-*/status.json")
    return dict(json.loads(path.read_text()))


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def measure(ctx: Any) -> tuple[dict[str, Any], list[Row]]:
    from gantry.spec import CanaryOptions

    b = ctx.bench
    ctx.cold()  # the caches, filled once
    w = float(CanaryOptions().window_s)
    results: dict[str, Any] = {"window_s": w}
    b.release(_spec(ctx, "v1", w))  # the first champion

    # 1. a good canary: two analysed steps, then promotion.
    good, _ = b.release(_spec(ctx, "v2", w))
    stage = good["stages"]["canary"]
    verdicts = stage["result"]["verdicts"]
    windows = len(verdicts) * w
    shift = _ts(verdicts[-1]["finished_at"]) - _ts(verdicts[0]["started_at"])
    results["good"] = {
        "stage_s": stage["duration_s"],
        "shift_s": round(shift, 2),
        "windows_s": windows,
        "shift_ratio": round(shift / windows, 3),
        "stage_ratio": round(stage["duration_s"] / windows, 3),
    }

    # 2. a failing check: the quality probes catch the degraded model.
    b.release(_spec(ctx, "degraded", w), expect_rc=1)
    c = _status(b.state)["canary"]
    step_start = _ts(c["verdicts"][-1]["started_at"])
    results["quality_failure"] = {
        "check_to_weight0_s": round(_ts(c["weight_zero_at"]) - _ts(c["first_failure_at"]), 3),
        "step_start_to_weight0_s": round(_ts(c["weight_zero_at"]) - step_start, 3),
        # From the moment the quality probes' scores are known in Gantry: through the
        # exporter, a scrape and a query for the Prometheus source; at once for the log.
        "scored_to_weight0_s": round(
            _ts(c["weight_zero_at"]) - _ts(c["verdicts"][-1]["quality_at"]), 3
        ),
    }
    # 2b. the same failure decided from the router's access log (canary.metrics: router-log).
    b.release(_spec(ctx, "degraded", w, metrics="router-log"), expect_rc=1)
    c = _status(b.state)["canary"]
    results["quality_failure_router_log"] = {
        "scored_to_weight0_s": round(
            _ts(c["weight_zero_at"]) - _ts(c["verdicts"][-1]["quality_at"]), 3
        ),
    }

    # 3. a crash mid-window: v1's weights again as a new candidate, its container killed.
    spec = _spec(ctx, "v1", 3 * w, min_requests=5)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gantry.cli", "release", str(spec)],
        env={**os.environ, **b.env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 900
    while True:
        try:
            st = _status(b.state)
            if st["canary"]["phase"] == "progressing" and st.get("candidate"):
                break
        except (ValueError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit("the crash canary never started its analysis")
        time.sleep(0.1)
    time.sleep(1.0)  # well inside the window
    client = docker.from_env()
    try:
        name = next(
            c.name
            for c in client.containers.list(filters={"label": f"ai.gantry.model={MODEL}"})
            if c.name.endswith(f"-{st['candidate']['slot']}")
        )
        killed_at = time.time()
        client.containers.get(name).kill()
    finally:
        client.close()
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 1:
        raise SystemExit(f"the crash canary exited {proc.returncode}, not 1:\n{err[-3000:]}")
    c = _status(b.state)["canary"]
    results["crash"] = {
        "kill_to_weight0_s": round(_ts(c["weight_zero_at"]) - killed_at, 3),
        "window_s": 3 * w,
    }
    b.clear_deployments()

    g, q, k = results["good"], results["quality_failure"], results["crash"]
    ql = results["quality_failure_router_log"]
    scrape_s = 1.0  # the embedded Prometheus scrapes the exporter every second
    return results, [
        Row(
            f"good canary: traffic shift / its {len(verdicts)} windows of {w:g} s (s)",
            g["shift_s"],
            g["windows_s"],
            g["shift_ratio"],
            "<= 1.1",
            g["shift_ratio"] <= 1.1,
        ),
        Row(
            "good canary: whole stage / its windows (s)",
            g["stage_s"],
            g["windows_s"],
            g["stage_ratio"],
            "<= 1.1",
            g["stage_ratio"] <= 1.1,
        ),
        Row(
            "degraded candidate: failing check -> weight 0 (s)",
            q["check_to_weight0_s"],
            "",
            None,
            f"<= window + 5 s ({w + 5:g})",
            q["check_to_weight0_s"] <= w + 5,
        ),
        Row(
            "degraded candidate: start of its step -> weight 0 (s)",
            q["step_start_to_weight0_s"],
            "",
            None,
            f"<= window + 5 s ({w + 5:g})",
            q["step_start_to_weight0_s"] <= w + 5,
        ),
        Row(
            "degraded candidate: scores known -> weight 0, prometheus / router-log (s)",
            q["scored_to_weight0_s"],
            ql["scored_to_weight0_s"],
            round(q["scored_to_weight0_s"] / max(ql["scored_to_weight0_s"], 0.001), 1),
            f"prometheus <= scrape + 2 s ({scrape_s + 2:g})",
            q["scored_to_weight0_s"] <= scrape_s + 2,
        ),
        Row(
            "crashed candidate: kill -> weight 0 / its window (s)",
            k["kill_to_weight0_s"],
            k["window_s"],
            round(k["kill_to_weight0_s"] / k["window_s"], 3),
            "<= 5 s",
            k["kill_to_weight0_s"] <= 5,
        ),
    ]
