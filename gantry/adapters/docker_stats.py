"""Adapter for the Docker engine's container stats (``GET /containers/{id}/stats``).

Prefect-free. :func:`parse_stats` turns one stats JSON document into a :class:`StatsSample`
(pure; every recorded document under ``tests/data/docker-stats/`` is parsed in a test);
:func:`read_stats` asks the engine for one sample without waiting for a second one;
:class:`UsageSampler` samples a container in a background thread for as long as a block
runs and sums it up as a :class:`gantry.usage.UsageSummary`::

    with UsageSampler(client, running.id) as sampler:
        run_the_load()
    summary = sampler.summary()  # CPU cores and working-set MiB, p50/p99, restarts

Figures are those ``docker stats`` shows: CPU time is the cgroup's cumulative
``cpu_usage.total_usage``; memory is the working set, usage minus the inactive page cache
(``total_inactive_file`` on cgroup v1, ``inactive_file`` on v2, ``cache`` on old engines),
which the kernel reclaims before it OOM-kills anything.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

import docker.errors
import requests
from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters.docker_engine import DockerClient
from gantry.errors import (
    ContainerEngineError,
    DockerUnavailableError,
    GantryError,
    StatsUnavailableError,
)
from gantry.proc import redact_text
from gantry.usage import UsageSummary, summarize

log = logging.getLogger(__name__)

#: The time the engine writes as ``read`` for a container that is not running.
_ZERO_TIME_PREFIX = "0001-01-01"
#: cgroup v1 reports an unlimited container's ``hierarchical_memory_limit`` as ~2**63.
_UNLIMITED = 2**62


class StatsSample(BaseModel):
    """One reading of a container's cgroup, as the engine reported it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    read_at: datetime = Field(description="When the engine read the cgroup (its `read`).")
    cpu_seconds_total: float = Field(
        description="Cumulative CPU time of the container (cpu_usage.total_usage, in s)."
    )
    memory_bytes: int = Field(
        description="Working set: usage minus inactive page cache, as `docker stats` shows."
    )
    memory_limit_bytes: int | None = Field(description="The cgroup's limit; None: unlimited.")
    online_cpus: int | None = Field(description="CPUs the container may run on; None: unknown.")


def _working_set(memory: Mapping[str, Any]) -> int:
    usage = int(memory["usage"])
    stats = memory.get("stats") or {}
    # The docker CLI's own order: cgroup v1's hierarchical figure, v2's, then old engines'.
    for key in ("total_inactive_file", "inactive_file", "cache"):
        if key in stats:
            inactive = int(stats[key])
            return usage - inactive if inactive < usage else usage
    return usage


def _limit(memory: Mapping[str, Any], host_memory_bytes: int | None) -> int | None:
    limit = int(memory.get("limit") or 0)
    hierarchical = int((memory.get("stats") or {}).get("hierarchical_memory_limit") or 0)
    if limit <= 0 or limit >= _UNLIMITED or hierarchical >= _UNLIMITED:
        return None
    # The engine reports an unlimited container's limit as the host's memory (cgroup v2
    # has no other sign of it), so a caller that knows the host's memory can tell.
    if host_memory_bytes is not None and limit >= host_memory_bytes:
        return None
    return limit


def parse_stats(raw: Mapping[str, Any], *, host_memory_bytes: int | None = None) -> StatsSample:
    """One stats document (``stream=False``) as a :class:`StatsSample`.

    A container that is not running (created, exited, being removed) has no sample: the
    engine answers with a zero ``read`` time and empty ``memory_stats``, and this raises
    :class:`~gantry.errors.StatsUnavailableError` rather than report zeros as usage.
    ``host_memory_bytes`` (``docker info``'s ``MemTotal``) lets an unlimited container on
    cgroup v2 read as unlimited: the engine reports the host's memory as its limit.
    """
    read = str(raw.get("read") or "")
    memory = raw.get("memory_stats") or {}
    cpu = (raw.get("cpu_stats") or {}).get("cpu_usage") or {}
    name = str(raw.get("name") or raw.get("id") or "?").lstrip("/")
    if not read or read.startswith(_ZERO_TIME_PREFIX) or "usage" not in memory:
        raise StatsUnavailableError(
            f"container {name} has no stats to read: it is not running (read time "
            f"{read or 'missing'}, {'no' if 'usage' not in memory else 'some'} memory stats)"
        )
    if "total_usage" not in cpu:
        raise StatsUnavailableError(f"container {name}'s stats hold no CPU usage")
    online = (raw.get("cpu_stats") or {}).get("online_cpus")
    return StatsSample(
        read_at=parse_engine_time(read),
        cpu_seconds_total=int(cpu["total_usage"]) / 1e9,
        memory_bytes=_working_set(memory),
        memory_limit_bytes=_limit(memory, host_memory_bytes),
        online_cpus=int(online) if online else None,
    )


def parse_engine_time(text: str) -> datetime:
    """A time as the engine writes it (RFC 3339 with nanoseconds, ``Z``), aware, to the
    microsecond. Raises ValueError for anything else."""
    ts = text.replace("Z", "+00:00")
    head, dot, rest = ts.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        ts = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    return datetime.fromisoformat(ts)


def read_stats(
    container: Any, timeout_s: float, *, host_memory_bytes: int | None = None
) -> StatsSample | None:
    """One sample of ``container`` (a docker-py ``Container``); None when it is not running
    or no longer exists.

    Asks with ``stream=false&one-shot=true`` (API >= 1.41), so the engine does not wait
    for a second reading to fill ``precpu_stats`` (a CPU rate is the caller's difference
    of two samples). Docker 20.10 still answers on its stats collector's next tick, which
    comes once a second: a read takes up to ~1 s (2 s without one-shot); concurrent reads
    of several containers share one tick, so an exporter reads them in parallel.

    Raises ContainerEngineError (transient) for an engine 5xx or no answer within
    ``timeout_s``, DockerUnavailableError when the engine cannot be reached.
    """
    api = container.client.api
    cid = str(container.id)
    try:
        # docker-py's stats() has no per-call timeout (the client's is 600 s here), and an
        # exporter must not hang on one stuck container: the same request, with one.
        resp = api._get(
            api._url("/containers/{0}/stats", cid),
            params={"stream": False, "one-shot": True},
            timeout=timeout_s,
        )
        raw = api._result(resp, json=True)
    except docker.errors.NotFound:
        return None
    except ValueError:
        # An empty body: the container went away while the engine answered.
        return None
    except docker.errors.APIError as exc:
        detail = redact_text(str(exc.explanation or exc))
        if exc.is_server_error():
            raise ContainerEngineError(f"stats of container {cid[:12]} failed: {detail}") from None
        raise StatsUnavailableError(f"stats of container {cid[:12]} refused: {detail}") from None
    except requests.Timeout:
        raise ContainerEngineError(
            f"stats of container {cid[:12]} did not come within {timeout_s:g}s",
            fix="check the engine is not overloaded (`docker info`); the next sample retries",
        ) from None
    except requests.ConnectionError as exc:
        raise DockerUnavailableError(f"lost the Docker engine reading stats: {exc}") from None
    try:
        return parse_stats(raw, host_memory_bytes=host_memory_bytes)
    except StatsUnavailableError:
        return None


class UsageSampler:
    """Samples a container's CPU and memory every ``interval_s`` in a daemon thread while
    the ``with`` block runs; :meth:`summary` sums it up afterwards.

    CPU in cores is the CPU time between two consecutive samples over the engine's time
    between them; memory is each sample's working set. ``RestartCount`` and ``OOMKilled``
    are read from ``docker inspect`` at the start and the end. A failed reading never
    reaches the caller: it is logged and counted in ``missed``.
    """

    def __init__(
        self,
        client: DockerClient,
        container_id: str,
        interval_s: float = 1.0,
        *,
        timeout_s: float = 5.0,
    ) -> None:
        self.client = client
        self.container_id = container_id
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.samples: list[StatsSample] = []
        self.missed = 0
        self._restarts_start: int | None = None
        self._restarts_end: int | None = None
        self._oom_killed = False
        self._started = 0.0
        self._duration = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._container: Any = None

    def _inspect(self) -> dict[str, Any] | None:
        try:
            self._container = self.client.containers.get(self.container_id)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            log.warning("usage: cannot inspect container %s: %s", self.container_id[:12], exc)
            return None
        return dict(self._container.attrs)

    def sample_once(self) -> None:
        """Take one sample now (what the thread does every interval); never raises."""
        if self._container is None:
            return
        try:
            sample = read_stats(self._container, self.timeout_s)
        except (GantryError, docker.errors.DockerException, requests.RequestException) as exc:
            self.missed += 1
            log.warning("usage: a stats sample of %s failed: %s", self.container_id[:12], exc)
            return
        if sample is None:
            self.missed += 1
            return
        self.samples.append(sample)

    def _loop(self) -> None:
        # On a fixed beat, not a fixed pause: a read itself may take up to a second.
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception:  # the caller's block must never be killed by a sampler bug
                self.missed += 1
                log.exception("usage: sampling %s failed", self.container_id[:12])
            due = max(due + self.interval_s, time.monotonic())
            self._stop.wait(due - time.monotonic())

    def __enter__(self) -> UsageSampler:
        attrs = self._inspect()
        if attrs is not None:
            self._restarts_start = int(attrs.get("RestartCount") or 0)
        self._started = time.monotonic()
        self._thread = threading.Thread(
            target=self._loop, name=f"usage-{self.container_id[:12]}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + self.interval_s + 1)
        self._duration = time.monotonic() - self._started
        attrs = self._inspect()
        if attrs is not None:
            self._restarts_end = int(attrs.get("RestartCount") or 0)
            self._oom_killed = bool((attrs.get("State") or {}).get("OOMKilled"))

    def summary(self) -> UsageSummary:
        """The samples taken so far, summed up (see :func:`gantry.usage.summarize`)."""
        samples = list(self.samples)
        cpu: list[float] = []
        for a, b in itertools.pairwise(samples):
            wall = (b.read_at - a.read_at).total_seconds()
            used = b.cpu_seconds_total - a.cpu_seconds_total
            if wall > 0 and used >= 0:  # a counter that went back: the container restarted
                cpu.append(used / wall)
        restarts = 0
        if self._restarts_start is not None and self._restarts_end is not None:
            restarts = max(0, self._restarts_end - self._restarts_start)
        limits = [s.memory_limit_bytes for s in samples if s.memory_limit_bytes]
        return summarize(
            cpu_cores=cpu,
            memory_mb=[s.memory_bytes / 2**20 for s in samples],
            duration_s=self._duration or time.monotonic() - self._started,
            restarts=restarts,
            missed=self.missed,
            oom_killed=self._oom_killed,
            memory_limit_mb=limits[-1] / 2**20 if limits else None,
        )
