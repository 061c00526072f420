"""The HAProxy router on the real engine: it comes up or says why, weights change live and
survive a configuration reload, a taken endpoint port is a clear error. (That nothing a
model server can reach steers it: tests/reliability/test_hostile.py.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gantry.adapters.haproxy import CONFIG_PATH, Slot
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
    # An older configuration is reloaded in place (SIGUSR2 to HAProxy's master), and the
    # router reads the file as rewritten (a bind-mounted file would show it the old one).
    marker = target.deployment_dir / "haproxy.cfg.loaded"
    marker.write_text("an older template")
    router = target.client.containers.get(target.router_name)
    target.config_path.write_text(target.config_path.read_text() + "# stale\n")
    old_inode = target.config_path.stat().st_ino
    target.ensure({Slot.A: 100})
    assert target.config_path.stat().st_ino != old_inode  # rewritten by rename
    assert target.client.containers.get(target.router_name).id == router.id
    assert target.current_weights() == {Slot.A: 30, Slot.B: 70}
    assert marker.read_text() != "an older template"
    seen = router.exec_run(["cat", CONFIG_PATH]).output.decode()
    assert seen == target.config_path.read_text() and "# stale" not in seen
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
