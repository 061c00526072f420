"""The HAProxy router on the real engine: it comes up or says why, weights change live and
survive a configuration reload, a taken endpoint port is a clear error, and nothing a
model server can reach steers it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gantry.adapters.haproxy import AccessRecord, Slot
from gantry.deploy.docker import DockerTarget
from gantry.errors import RouterError, RouterUnavailableError
from tests.support import SHARED_CACHE, GantryEnv

pytestmark = pytest.mark.integration


@pytest.fixture
def make_target(gantry_env: GantryEnv, tmp_path: Path) -> Iterator[object]:
    import docker

    from gantry.deploy.docker import ROUTER_IMAGE
    from gantry.localenv.baseimages import ensure_base_image

    client = docker.from_env()
    made: list[DockerTarget] = []
    ensure_base_image(
        ROUTER_IMAGE,
        docker_client=client,
        work_dir=SHARED_CACHE / "base-images",
        log=__import__("logging").getLogger("test"),
    )

    def make(name: str, *, health_path: str = "/health", port: int | None = None) -> DockerTarget:
        t = DockerTarget(
            client,
            model=f"router-test-{name}",
            name=f"gantry-router-test-{name}-{tmp_path.name[-6:]}",
            config_path=tmp_path / name / "haproxy.cfg",
            runtime_port=8080,
            health_path=health_path,
            port=port,
        )
        made.append(t)
        return t

    yield make
    for t in made:
        t.remove_all()
    client.close()


def test_weights_change_live_and_survive_a_reload(make_target: object) -> None:
    target = make_target("reload")  # type: ignore[operator]
    target.ensure({Slot.A: 100, Slot.B: 0})
    assert target.current_weights() == {Slot.A: 100, Slot.B: 0}
    target.set_weights({Slot.A: 30, Slot.B: 70})
    assert target.current_weights() == {Slot.A: 30, Slot.B: 70}
    assert "weight 70" in target.config_path.read_text()  # a restart would keep them
    # An older configuration is reloaded in place (SIGUSR2 to HAProxy's master).
    marker = target.config_path.with_name("haproxy.cfg.loaded")
    marker.write_text("an older template")
    router_id = target.client.containers.get(target.router_name).id
    target.ensure({Slot.A: 100})
    assert target.client.containers.get(target.router_name).id == router_id
    assert target.current_weights() == {Slot.A: 30, Slot.B: 70}
    assert marker.read_text() != "an older template"
    with pytest.raises(ValueError, match="at least one slot"):
        target.set_weights({Slot.A: 0, Slot.B: 0})


def test_a_router_that_does_not_come_up_shows_its_log(make_target: object) -> None:
    target = make_target("broken", health_path="/bad path")  # type: ignore[operator]
    with pytest.raises(RouterUnavailableError) as info:
        target.ensure({Slot.A: 100})
    text = str(info.value)
    assert "did not come up" in text and "ALERT" in text


def test_a_taken_endpoint_port_is_a_clear_error(make_target: object) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        target = make_target("port", port=port)  # type: ignore[operator]
        with pytest.raises(RouterError) as info:
            target.ensure({Slot.A: 100})
    assert f"port {port}" in str(info.value) and "canary.port" in str(info.value)


# A stand-in model server: answers /health, and echoes the request's headers as JSON, so a
# test sees what reached the server (the router strips what must not).
ECHO_SERVER = r"""
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 8080), H).serve_forever()
"""


def _echo_servers(target: DockerTarget) -> None:
    """Both slots served by the echo server (the base image's python), on the deployment's
    network under the slots' names, labelled so that remove_all() takes them."""
    from gantry.deploy.docker import DEPLOYMENT_LABEL

    for slot in Slot:
        target.client.containers.run(
            "python:3.11-slim-bookworm",
            ["python", "-c", ECHO_SERVER],
            name=target.server_name(slot),
            network=target.name,
            labels={DEPLOYMENT_LABEL: target.name},
            user="65534",
            detach=True,
        )
    for slot in Slot:
        target.wait_server_up(slot, 60)


def test_the_candidate_cannot_reach_the_routers_controls(make_target: object) -> None:
    """What a model server can do from inside the deployment: the runtime API is not on
    the network (only on a socket the router alone mounts), a forged routing or probe
    header is ignored, and the probe token never reaches a server."""
    import httpx

    target: DockerTarget = make_target("hostile")  # type: ignore[operator]
    target.ensure({Slot.A: 100, Slot.B: 0})
    _echo_servers(target)
    candidate = target.client.containers.get(target.server_name(Slot.B))

    # 1. The runtime API: nothing answers on the router's address (9999 was its old port),
    #    while the host still changes weights through the socket.
    probe = (
        "import socket, sys\n"
        f"host = socket.gethostbyname({target.router_name!r})\n"
        "for port in (9999, 8404, 1936):\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=3).close()\n"
        "        sys.exit(f'the router answers on {port}')\n"
        "    except OSError:\n"
        "        pass\n"
        "print('unreachable')\n"
    )
    rc, out = candidate.exec_run(["python", "-c", probe])
    assert rc == 0 and out.decode().strip() == "unreachable", out.decode()
    mounts = {m["Destination"] for m in candidate.attrs["Mounts"]}
    assert "/run/gantry" not in mounts
    assert target.current_weights() == {Slot.A: 100, Slot.B: 0}

    # 2. A client's forged headers: every request still goes by weight (slot a), and none
    #    is logged as a probe (the canary would leave it out of its statistics).
    target.observe()
    forged = {"x-gantry-route": "b", "x-gantry-probe": "quality", "x-gantry-probe-token": "0" * 64}
    with httpx.Client(base_url=target.endpoint, timeout=10, trust_env=False) as http:
        for _ in range(5):
            r = http.get("/health", headers=forged)
            assert r.status_code == 200
            assert not {k for k in r.json() if k.startswith("x-gantry")}, r.json()
        # Gantry's own probe, with the token: routed to b, logged as a probe, and the token
        # stripped before it reached the (untrusted) server.
        r = http.get("/health", headers=target.probe_headers(Slot.B, "quality"))
        assert r.status_code == 200
        seen = r.json()
        assert seen.get("x-gantry-route") == "b" and "x-gantry-probe-token" not in seen
    deadline = time.monotonic() + 10
    records: list[AccessRecord] = []
    while len(records) < 6 and time.monotonic() < deadline:
        records += target.observe()
        time.sleep(0.2)
    assert [(r.server, r.probe) for r in records] == [("a", "")] * 5 + [("b", "quality")]
