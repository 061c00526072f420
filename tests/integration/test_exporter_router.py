"""The metrics exporter against a real router and model server on the engine: requests
counted once each per slot and version (also across log streams reopened after a quiet
spell), the deployment's scrape targets written from the containers' labels, and the
router's own HAProxy exporter answering on its published port."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gantry.adapters.haproxy import Slot
from gantry.deploy.docker import (
    DEPLOYMENT_LABEL,
    MODEL_LABEL,
    ROLE_LABEL,
    SLOT_LABEL,
    VERSION_LABEL,
    DockerTarget,
)
from gantry.metrics import exporter as exp
from tests.integration.test_router import make_target  # noqa: F401 - the fixture
from tests.support import GantryEnv

pytestmark = pytest.mark.integration

SERVER = r"""
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def _send(self, code, body, ctype="application/json"):
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/metrics":
            return self._send(200, b"gantry_runtime_model_loaded 1\n", "text/plain")
        self._send(200, b'{"status": "ok"}')
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self._send(503 if self.path == "/fail" else 200, b'{"data": []}')
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 8080), H).serve_forever()
"""


@pytest.fixture
def served(gantry_env: GantryEnv, make_target: Any) -> Iterator[DockerTarget]:  # noqa: F811
    target: DockerTarget = make_target("metrics")
    target.ensure({Slot.A: 100, Slot.B: 0})
    target.client.containers.run(
        "python:3.11-slim-bookworm",
        ["python", "-c", SERVER],
        name=target.server_name(Slot.A),
        network=target.name,
        labels={
            DEPLOYMENT_LABEL: target.name,
            MODEL_LABEL: target.model,
            ROLE_LABEL: "server",
            SLOT_LABEL: "a",
            VERSION_LABEL: "3",
        },
        ports={"8080/tcp": ("127.0.0.1", None)},
        user="65534",
        detach=True,
    )
    target.wait_server_up(Slot.A, 60)
    yield target


def _count(ex: exp.Exporter, **labels: str) -> float:
    want = set(labels.items())
    total = 0.0
    for key, v in ex.store.requests.items():
        if want <= set(zip(exp._REQ_LABELS, key, strict=True)):
            total += v
    return total


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_requests_are_counted_once_per_slot_and_version(
    served: DockerTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stream quiet for a second is reopened: what it already counted must not count twice.
    monkeypatch.setattr(exp, "FOLLOW_TIMEOUT_S", 1.0)
    # Only this state dir's deployments: one recorded here, and another engine-wide.
    (tmp_path / "deployments" / served.name).mkdir(parents=True)
    ex = exp.Exporter(
        tmp_path / "targets", interval_s=0.5, deployments_dir=tmp_path / "deployments"
    )
    loop = threading.Thread(target=ex.run, daemon=True)
    loop.start()
    try:
        _wait(lambda: served.name in ex.followed_deployments(), 20, "the router is not followed")
        with httpx.Client(base_url=served.endpoint, timeout=10) as http:
            for _ in range(5):
                assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 200
            assert http.post("/fail", json={}).status_code == 503
            ok = {"deployment": served.name, "slot": "a", "version": "3", "outcome": "success"}
            _wait(lambda: _count(ex, **ok) == 5, 15, "the 5 requests were not counted")
            time.sleep(3)  # several reopened streams
            for _ in range(3):
                http.post("/v1/embeddings", json={"input": "y"})
            _wait(lambda: _count(ex, **ok) == 8, 15, "the 3 later requests were not counted")
            time.sleep(2)
        assert _count(ex, **ok) == 8  # exactly: nothing read twice
        assert _count(ex, deployment=served.name, outcome="failure", code="5xx") == 1

        assert [p.stem for p in (tmp_path / "targets").glob("*.json")] == [served.name]
        groups = json.loads((tmp_path / "targets" / f"{served.name}.json").read_text())
        by = {g["labels"]["component"] + g["labels"].get("slot", ""): g for g in groups}
        assert by["runtimea"]["labels"]["version"] == "3"
        runtime = httpx.get(f"http://{by['runtimea']['targets'][0]}/metrics", timeout=5)
        assert "gantry_runtime_model_loaded 1" in runtime.text
        router = httpx.get(f"http://{by['router']['targets'][0]}/metrics", timeout=5)
        assert 'haproxy_server_weight{proxy="model",server="a"} 100' in router.text
    finally:
        ex.stop()
        loop.join(timeout=10)
