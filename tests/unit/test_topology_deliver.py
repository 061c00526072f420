"""`gantry topology deliver`: a signed delivery, with an id even when none is given."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gantry.cli_topology import cmd_deliver
from gantry.localenv.topology import Topology, TopologyPorts, save_topology
from gantry.webhook.signature import verify_signature
from tests.support import free_port

pytestmark = pytest.mark.unit

SECRET = b"s" * 40


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """A webhook receiver on 127.0.0.1 that keeps each request's headers and body."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen.append({"headers": headers, "body": body})
            self.send_response(202)
            self.end_headers()
            self.wfile.write(b'{"flow_run_id": "x"}')

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port, seen
    finally:
        server.shutdown()
        server.server_close()


def _topology(tmp_path: Path, webhook_port: int) -> Path:
    root = tmp_path / "topology"
    project = tmp_path / "project"
    (project / "examples").mkdir(parents=True)
    (project / "examples" / "m.yaml").write_text("{}")
    t = Topology(
        name="t",
        root=root,
        project_dir=project,
        workers=1,
        ports=TopologyPorts.from_base(webhook_port - 4),
    )
    save_topology(t)
    t.secrets_dir.mkdir(parents=True)
    t.webhook_secret_file.write_bytes(SECRET)
    return root


def _deliver(root: Path, tmp_path: Path, delivery: str | None) -> int:
    spec = tmp_path / "project" / "examples" / "m.yaml"
    return cmd_deliver(argparse.Namespace(root=str(root), spec=str(spec), delivery=delivery))


def test_a_delivery_without_an_id_gets_a_new_one_and_is_signed(
    tmp_path: Path, receiver: tuple[int, list[dict[str, Any]]]
) -> None:
    port, seen = receiver
    root = _topology(tmp_path, port)
    assert _deliver(root, tmp_path, None) == 0
    assert _deliver(root, tmp_path, None) == 0
    assert _deliver(root, tmp_path, "ci-41-1") == 0
    ids = [r["headers"]["x-gantry-delivery"] for r in seen]
    assert ids[0].startswith("gantry-cli-") and ids[1].startswith("gantry-cli-")
    assert ids[0] != ids[1] and ids[2] == "ci-41-1"
    for r in seen:
        assert json.loads(r["body"]) == {"spec_path": "examples/m.yaml"}
        assert verify_signature(r["body"], r["headers"], SECRET) == ["x-gantry-signature"]
