"""The chat measures (part of bench/run.py): time to first token of the SmolLM2 chat demo on
the llama.cpp runtime, through the deployment's router vs straight to its server, in one run.

The chat demo is published to the bench's hub by upload and released with `gantry release`
(the first release deploys it as the champion behind the router). Then the same streamed
prompts go alternately to the router's endpoint and to the server container's own address
on its Docker network, one at a time (llama.cpp serves one request at a time, so
concurrency would measure queueing, not the router).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import docker
import httpx

from bench.common import ROOT, Row

MODEL = "bench-chat"
SERVED = "smollm2-chat"


def _ttft_ms(http: httpx.Client, base: str, prompt: str) -> float:
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
        "max_tokens": 16,
    }
    t0 = time.perf_counter()
    with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        first: float | None = None
        for line in r.iter_lines():
            if first is None and line.startswith("data:") and line[5:].strip() != "[DONE]":
                delta = json.loads(line[5:])["choices"][0].get("delta", {})
                if delta.get("content"):
                    first = (time.perf_counter() - t0) * 1000
    if first is None:
        raise SystemExit(f"{base}: no content token streamed for {prompt!r}")
    return first


def _server_address(state: Path) -> str:
    """The champion server's address on its Docker network (reachable from this host)."""
    from gantry.deploy.docker import MODEL_LABEL, ROLE_LABEL, SLOT_LABEL

    (path,) = (state / "deployments").glob(f"gantry-{MODEL}-*/status.json")
    status = json.loads(path.read_text())
    client = docker.from_env()
    try:
        (server,) = client.containers.list(
            filters={
                "label": [
                    f"{MODEL_LABEL}={MODEL}",
                    f"{ROLE_LABEL}=server",
                    f"{SLOT_LABEL}={status['champion']['slot']}",
                ]
            }
        )
        ip = next(iter(server.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    finally:
        client.close()
    return f"http://{ip}:{status['runtime_port']}"


def measure(ctx: Any) -> tuple[dict[str, Any], list[Row]]:
    from gantry.localhub.chat_demo import assemble_chat_demo
    from gantry.localhub.store import HubStore
    from gantry.scoring import percentiles

    b = ctx.bench
    assemble_chat_demo(HubStore(b.settings.hub_dir / "store"), b.settings.demo_wheels_dir)
    spec = b.spec(MODEL, base="smollm2-chat.yaml", mlflow={"model_name": MODEL})
    record, seconds = b.release(spec)
    ev = record["stages"]["evaluate"]["result"]
    router = record["stages"]["canary"]["result"]["endpoint"].rstrip("/")
    direct = _server_address(b.state)
    prompts = [
        json.loads(line)["prompt"]
        for line in (ROOT / "examples" / "eval" / "smollm2-chat.jsonl").read_text().splitlines()
    ]
    n = max(10 * ctx.repeat, 20)
    via_router: list[float] = []
    to_server: list[float] = []
    with httpx.Client(timeout=60, trust_env=False) as http:
        _ttft_ms(http, direct, prompts[0])  # warm both paths' connections and caches
        _ttft_ms(http, router, prompts[0])
        k = 1
        for i in range(n):
            # Alternate which goes first, so a drift in the machine's load hits both. Every
            # request asks the next question: llama.cpp reuses the cached prefix of the
            # previous prompt, and a question asked twice in a row would make whichever
            # path came second look fast.
            pair = [(router, via_router), (direct, to_server)]
            for base, out in pair if i % 2 == 0 else reversed(pair):
                out.append(_ttft_ms(http, base, prompts[k % len(prompts)]))
                k += 1
    r50, r95, _ = percentiles(via_router)
    d50, d95, _ = percentiles(to_server)
    data = {
        "requests_each": n,
        "release_s": round(seconds, 1),
        "router_ttft_ms": {"p50": round(r50, 1), "p95": round(r95, 1)},
        "direct_ttft_ms": {"p50": round(d50, 1), "p95": round(d95, 1)},
        "evaluate_ttft_ms": {k: ev[f"ttft_{k}_ms"] for k in ("p50", "p95", "p99")},
    }
    rows = [
        Row(
            "chat TTFT p50, router vs server (ms)",
            round(r50, 1),
            round(d50, 1),
            round(r50 / d50, 3),
            "<= 1.10",
            r50 / d50 <= 1.10,
        ),
        Row(
            "chat TTFT p95, router vs server (ms)",
            round(r95, 1),
            round(d95, 1),
            round(r95 / d95, 3),
            "<= 1.20",
            r95 / d95 <= 1.20,
        ),
    ]
    return data, rows
