"""Exclusive locks held by a live process: ``flock`` on a file, so the kernel drops a lock
the moment its holder dies (SIGKILL included) and no stale lock ever needs clearing.

    with exclusive(path, wait_s=60, holder=release_id, busy=lambda who: MyLockedError(who)):
        ...  # nobody else holds ``path`` meanwhile

Where several hosts share the work (``GANTRY_TOPOLOGY=multi``) a file lock would be taken
once per host: `prefect_exclusive` is the same lock as a Prefect global concurrency limit
with a lease, and `lock_for` picks the one for the topology.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from gantry.errors import LockServiceUnavailableError

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    from gantry.settings import Settings

log = logging.getLogger(__name__)


def holder_of(path: Path) -> str:
    """Who holds (or last held) the lock at ``path``: "<holder>, pid <pid>"."""
    try:
        data = json.loads(path.read_text() or "{}")
        return f"{data.get('holder', '?')}, pid {data.get('pid', '?')}"
    except (OSError, ValueError):
        return "unknown holder"


@contextlib.contextmanager
def exclusive(
    path: Path, *, wait_s: float, holder: str, busy: Callable[[str], Exception]
) -> Iterator[None]:
    """Hold the lock at ``path``; wait up to ``wait_s`` for another holder, then raise
    ``busy(who holds it)``. ``holder`` is written into the file for that message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, announced = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            other = holder_of(path)
            if time.monotonic() >= deadline:
                raise busy(other)
            if not announced:
                log.info("waiting for %s, held by %s", path, other)
                announced = True
            time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock


# --- across hosts: a Prefect global concurrency limit held with a lease ------------------

#: Seconds a lease lasts without renewal: the server's minimum (it refuses less than 60 s).
#: The holder renews it every 3/4 of this (Prefect's own renewal thread), so only a dead
#: (or cut-off) holder lets it lapse.
LEASE_S = 60.0


def _limit_name(name: str) -> str:
    # Prefect names refuse "/", "%", "&", ">", "<"; variable names take only [A-Za-z0-9_-].
    # A name that needed changing gets a hash of itself, so "a.b" and "a-b" stay two locks.
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", name)
    if safe != name:
        safe = f"{safe[:200]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return safe


def _holder_variable(name: str) -> str:
    return f"{_limit_name(name)}-holder"[:255]


def _lease_holder() -> ConcurrencyLeaseHolder | None:
    """The flow run taking the lock, so Prefect's UI shows the lease's holder."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx else None
    return ConcurrencyLeaseHolder(type="flow_run", id=run.id) if run else None


def _ensure_limit(client: SyncPrefectClient, name: str) -> None:
    """Create the limit (1 slot) on first use; another host creating it first is fine."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.read_global_concurrency_limit_by_name(name)
        return
    except ObjectNotFound:
        pass
    with contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def prefect_holder_of(client: SyncPrefectClient, name: str) -> str:
    """Who holds (or last held) the Prefect lock ``name``: "<holder>, host <h>, pid <pid>"."""
    var = client.read_variable_by_name(_holder_variable(name))
    value = var.value if var else None
    if not isinstance(value, dict):
        return "unknown holder"
    return f"{value.get('holder', '?')}, host {value.get('host', '?')}, pid {value.get('pid', '?')}"


def _write_holder(client: SyncPrefectClient, name: str, holder: str) -> None:
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate
    from prefect.exceptions import ObjectAlreadyExists

    var = _holder_variable(name)
    value = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid()}
    try:
        client.create_variable(VariableCreate(name=var, value=value))
    except ObjectAlreadyExists:
        client.update_variable(VariableUpdate(name=var, value=value))


def _acquire(
    client: SyncPrefectClient,
    name: str,
    *,
    wait_s: float,
    holder: str,
    busy: Callable[[str], Exception],
    lease_s: float,
) -> UUID:
    """Take the slot of ``name`` (waiting up to ``wait_s``); the lease's id."""
    import httpx

    _ensure_limit(client, name)
    deadline, announced = time.monotonic() + wait_s, False
    while True:
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[name],
                slots=1,
                mode="concurrency",
                lease_duration=lease_s,
                holder=_lease_holder(),
            )
            break
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:  # Locked: the slot is taken
                raise
        other = prefect_holder_of(client, name)
        if time.monotonic() >= deadline:
            raise busy(other)
        if not announced:
            log.info("waiting for lock %s, held by %s", name, other)
            announced = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    lease_id = UUID(response.json()["lease_id"])
    _write_holder(client, name, holder)
    return lease_id


@contextlib.contextmanager
def prefect_exclusive(
    name: str,
    *,
    wait_s: float,
    holder: str,
    busy: Callable[[str], Exception],
    lease_s: float = LEASE_S,
) -> Iterator[None]:
    """Hold the cross-host lock ``name``: a Prefect global concurrency limit of one slot,
    created on first use, taken with a lease of ``lease_s`` that a background thread renews
    (Prefect's ``maintain_concurrency_lease``) and released on exit. Same contract as
    `exclusive`: wait up to ``wait_s``, then raise ``busy(who holds it)``; ``holder`` is
    kept in the Prefect variable ``<name>-holder`` for that message.

    A holder that dies (SIGKILL, a lost host) stops renewing; the server's repossessor,
    which looks for expired leases every ``server.services.repossessor.loop_seconds``
    (15 s by default), frees the slot within ``lease_s`` + 15 s + about a second after the
    last renewal, i.e. at most ~76 s after the holder died with the default 60 s lease (the
    server's minimum; measured on Prefect 3.8.8: freed 65.7 s after a SIGKILL 2 s into a
    hold, 47.0 s after one 20 s past a renewal). If renewal
    fails (the API gone for longer than Prefect's 3 retries), Prefect cancels the body
    rather than leave it running without the lock.

        with prefect_exclusive("gantry-deploy-chat", wait_s=60, holder="rel-1", busy=Err):
            ...  # no other host holds "gantry-deploy-chat" meanwhile
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.settings import PREFECT_API_URL

    limit = _limit_name(name)
    with get_client(sync_client=True) as client:
        try:
            lease_id = _acquire(
                client, limit, wait_s=wait_s, holder=holder, busy=busy, lease_s=lease_s
            )
        except httpx.TransportError as exc:
            raise LockServiceUnavailableError(
                f"the Prefect API ({PREFECT_API_URL.value() or 'unset'}) did not answer while "
                f"taking lock {limit}: {exc}"
            ) from exc
        try:
            with maintain_concurrency_lease(lease_id, lease_s, raise_on_lease_renewal_failure=True):
                yield
        finally:
            try:
                client.release_concurrency_slots_with_lease(lease_id)
            except (httpx.TransportError, httpx.HTTPStatusError):
                log.warning("could not release lock %s; its lease lapses by itself", limit)


def lock_for(
    settings: Settings, name: str, path: Path
) -> Callable[..., contextlib.AbstractContextManager[None]]:
    """The lock to take for ``name``: the file lock at ``path`` on one machine
    (``GANTRY_TOPOLOGY=single``), the Prefect lock ``name`` when several hosts share the
    work (``multi``). Both are called as ``lock(wait_s=…, holder=…, busy=…)``.

        with lock_for(settings, f"gantry-release-{rid}", lock_path)(wait_s=0, holder=h, busy=b):
            ...
    """
    if settings.topology == "multi":
        return functools.partial(prefect_exclusive, name)
    return functools.partial(exclusive, path)
