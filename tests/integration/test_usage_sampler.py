"""UsageSampler on the real Docker engine: a container that holds ~100 MiB and keeps one
core busy is seen doing so; an OOM kill and a container that vanishes mid-sampling are
reported, never raised into the caller's block."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest

from gantry.adapters.docker_stats import UsageSampler, read_stats

pytestmark = pytest.mark.integration

IMAGE = "python:3.11-slim-bookworm"  # built locally by `make env` (gantry.localenv)
LABEL = "ai.gantry.test"
#: Touch 100 MiB (bytes * n writes every page), burn one core for 6 s, then idle.
ALLOCATE_AND_BURN = (
    "import time\n"
    "held = b'x' * (100 * 2**20)\n"
    "end = time.monotonic() + 6\n"
    "while time.monotonic() < end: pass\n"
    "time.sleep(600)\n"
)


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    c = docker.from_env(timeout=120)
    c.images.get(IMAGE)  # missing: fail (run `make env`), never skip
    yield c
    for k in c.containers.list(all=True, filters={"label": f"{LABEL}=usage-sampler"}):
        k.remove(force=True)
    c.close()


def _run(client: docker.DockerClient, code: str, mem: str) -> Any:
    return client.containers.run(
        IMAGE,
        ["python", "-c", code],
        detach=True,
        mem_limit=mem,
        memswap_limit=mem,
        nano_cpus=1_000_000_000,
        labels={LABEL: "usage-sampler"},
    )


def test_sampler_sees_the_allocation_and_the_cpu(client: docker.DockerClient) -> None:
    c = _run(client, ALLOCATE_AND_BURN, "512m")
    try:
        time.sleep(1.0)  # python up and the bytes allocated (a memset of 100 MiB)
        with UsageSampler(client, c.id, interval_s=1.0) as sampler:
            time.sleep(4.5)
        s = sampler.summary()
        print(f"\nusage: {s.model_dump_json()}")
        assert s.samples >= 3 and s.conclusive and s.missed_samples == 0
        assert s.memory_p99_mb is not None and s.memory_p99_mb >= 100
        assert s.peak_memory_mb is not None and s.peak_memory_mb < 200
        assert s.cpu_p99_cores is not None and s.cpu_p99_cores > 0.5  # one core, limit 1
        assert s.cpu_p99_cores <= 1.1
        assert s.memory_limit_mb == 512 and s.restarts == 0 and not s.oom_killed
        assert 4 <= s.duration_s < 10
    finally:
        c.remove(force=True)


def test_oom_kill_is_reported(client: docker.DockerClient) -> None:
    c = _run(client, "import time\nheld = b'x' * (300 * 2**20)\ntime.sleep(60)\n", "128m")
    try:
        with UsageSampler(client, c.id, interval_s=1.0) as sampler:
            c.wait(timeout=60)
        s = sampler.summary()
        assert s.oom_killed and s.memory_limit_mb in (None, 128)
        assert s.samples <= 1 and not s.conclusive  # killed within the first second
    finally:
        c.remove(force=True)


def test_a_vanished_container_never_reaches_the_caller(client: docker.DockerClient) -> None:
    c = _run(client, "import time\ntime.sleep(600)\n", "128m")
    with UsageSampler(client, c.id, interval_s=0.5) as sampler:
        time.sleep(1.5)
        c.remove(force=True)
        time.sleep(1.5)
    s = sampler.summary()
    assert s.samples >= 1 and s.missed_samples >= 1
    assert read_stats(c, 5) is None  # gone: None, not an error
