"""A steady, bounded load on a model endpoint, from a process of its own.

Open loop: requests start at a fixed rate whatever the answers take (a closed loop would
slow down exactly when the service struggles, and hide failures). Used by the canary tests
and benchmarks to prove that no client request fails while traffic shifts:

    python -m gantry.loadgen http://127.0.0.1:8090 --rps 20 --out load.json
    python -m gantry.loadgen http://127.0.0.1:8090 --protocol chat --model smollm2 --rps 2

Runs until ``--duration`` or SIGTERM/SIGINT, then writes a JSON summary (sent, ok,
failed, each failure, latency percentiles, and per second counts).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx

from gantry.scoring import percentiles

#: Short chat answers: the load measures serving, not generation length.
CHAT_MAX_TOKENS = 8


class Load:
    """Sends ``rps`` embedding (or short chat) requests per second to ``endpoint``."""

    def __init__(
        self,
        endpoint: str,
        rps: float,
        model: str,
        timeout_s: float = 30,
        protocol: Literal["embeddings", "chat"] = "embeddings",
    ) -> None:
        self.endpoint, self.rps, self.model = endpoint.rstrip("/"), rps, model
        self.protocol = protocol
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.ok = 0
        self.failures: list[dict[str, Any]] = []
        self.latencies_ms: list[float] = []
        self.per_second: Counter[int] = Counter()
        self._client = httpx.Client(
            timeout=timeout_s, trust_env=False, limits=httpx.Limits(max_connections=64)
        )

    def _one(self, i: int, t_start: float) -> None:
        t0 = time.monotonic()
        err: str | None = None
        try:
            if self.protocol == "chat":
                r = self._client.post(
                    f"{self.endpoint}/v1/chat/completions",
                    json={
                        "model": self.model,
                        "messages": [{"role": "user", "content": f"Say hello ({i})."}],
                        "max_tokens": CHAT_MAX_TOKENS,
                        "temperature": 0,
                    },
                )
            else:
                r = self._client.post(
                    f"{self.endpoint}/v1/embeddings",
                    json={"model": self.model, "input": [f"steady load request {i}"]},
                )
            if r.status_code != 200:
                err = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            err = f"{type(exc).__name__}: {exc}"
        ms = (time.monotonic() - t0) * 1000
        with self._lock:
            self.per_second[int(t0 - t_start)] += 1
            if err is None:
                self.ok += 1
                self.latencies_ms.append(ms)
            else:
                self.failures.append({"at_s": round(t0 - t_start, 3), "error": err})

    def run(self, duration_s: float | None) -> dict[str, Any]:
        t_start = time.monotonic()
        interval = 1.0 / self.rps
        i = 0
        with ThreadPoolExecutor(max_workers=64) as pool:
            while not self.stop.is_set():
                due = t_start + i * interval
                if duration_s is not None and due - t_start >= duration_s:
                    break
                delay = due - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    break
                pool.submit(self._one, i, t_start)
                i += 1
        self._client.close()
        wall = time.monotonic() - t_start
        p50, p95, p99 = percentiles(self.latencies_ms)
        return {
            "endpoint": self.endpoint,
            "protocol": self.protocol,
            "rps_target": self.rps,
            "sent": i,
            "ok": self.ok,
            "failed": len(self.failures),
            "failures": self.failures[:200],
            "wall_s": round(wall, 3),
            "latency_ms": {"p50": round(p50, 2), "p95": round(p95, 2), "p99": round(p99, 2)},
            "per_second": [self.per_second.get(s, 0) for s in range(int(wall) + 1)],
        }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gantry.loadgen", description=__doc__)
    p.add_argument("endpoint", help="base URL, e.g. http://127.0.0.1:8090")
    p.add_argument("--rps", type=float, default=20.0, help="requests per second (default 20)")
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until SIGTERM)")
    p.add_argument("--model", default="minilm", help="model name sent in the request body")
    p.add_argument(
        "--protocol",
        choices=["embeddings", "chat"],
        default="embeddings",
        help=f"/v1/embeddings, or /v1/chat/completions with max_tokens {CHAT_MAX_TOKENS}",
    )
    p.add_argument("--out", type=Path, help="write the JSON summary here (default: stdout)")
    p.add_argument("--ready-file", type=Path, help="touched once the first request was sent")
    args = p.parse_args(argv)
    if args.rps <= 0:
        p.error("--rps must be positive")
    load = Load(args.endpoint, args.rps, args.model, protocol=args.protocol)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: load.stop.set())
    if args.ready_file:
        threading.Timer(1.0 / args.rps + 0.05, args.ready_file.touch).start()
    summary = load.run(args.duration)
    text = json.dumps(summary, indent=2)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
