"""HAProxy as the canary router: its configuration, its runtime API, its access log.

Prefect-free. The configuration is rendered here (two server slots, ``a`` and ``b``, one
per model version, found by container name through Docker's DNS); weights and server
states then change through HAProxy's runtime API without dropping a connection, and
every request is logged as one ``gantry-access`` line that :func:`parse_access_line`
reads back for the canary analysis (per-server status and latency).

The model servers share a network with the router and are untrusted (the candidate is
what is being tested), so nothing they can reach steers the router: the runtime API is a
unix socket in a host directory mounted into the router alone, and the routing and probe
headers count only on requests that carry the deployment's probe token, which the router
strips before forwarding (:func:`probe_headers`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gantry.errors import RouterError, RouterUnavailableError

log = logging.getLogger(__name__)

BACKEND = "model"
FRONTEND_PORT = 8080
#: HAProxy's built-in Prometheus exporter (server weights, states, sessions, 5xx): read-only,
#: published on loopback for Prometheus.
METRICS_PORT = 8405
#: The router's configuration directory (a read-only bind mount of a host directory) and
#: the file in it HAProxy is started with.
CONFIG_DIR = "/usr/local/etc/haproxy"
CONFIG_PATH = f"{CONFIG_DIR}/haproxy.cfg"
#: Where the router's runtime API socket lives inside its container: a bind mount of a
#: host directory that no model server mounts (the network reaches no admin listener).
ADMIN_DIR = "/run/gantry"
ADMIN_SOCKET = "admin.sock"
#: Requests carrying this header go to the named slot (quality and synthetic probes).
ROUTE_HEADER = "x-gantry-route"
#: Marks Gantry's own probe requests in the access log: `quality` probes (big eval-set
#: batches) are left out of the latency and error statistics, `synthetic` ones are not.
PROBE_HEADER = "x-gantry-probe"
#: The deployment's probe token: without it, the two headers above are removed, so a
#: client can neither pick its server nor hide its requests from the canary's statistics.
TOKEN_HEADER = "x-gantry-probe-token"  # noqa: S105 - a header name
_TOKEN = re.compile(r"^[0-9a-f]{32,128}$")
#: HAProxy server weights go up to 256; Gantry speaks percent.
MAX_WEIGHT = 100
_ACCESS = re.compile(
    r"gantry-access server=(?P<server>\S+) status=(?P<status>-?\d+) ta=(?P<ta>-?\d+) "
    r"tr=(?P<tr>-?\d+) retries=(?P<retries>\+?-?\d+) term=(?P<term>\S+)"
    r"(?: probe=(?P<probe>\S*))?"
)


class Slot(StrEnum):
    """One of the router's two server slots; champion and candidate take one each."""

    A = "a"
    B = "b"

    @property
    def other(self) -> Slot:
        return Slot.B if self is Slot.A else Slot.A


class ServerState(StrEnum):
    """Admin states of a server (`set server <b>/<s> state …`)."""

    READY = "ready"
    DRAIN = "drain"  # no new connections; those in flight finish
    MAINT = "maint"  # out of rotation, health checks stopped


class RouterConfig(BaseModel):
    """What the rendered configuration depends on."""

    model_config = ConfigDict(frozen=True)

    deployment: str = Field(description="Names the slot containers `<deployment>-a|b`.")
    runtime_port: int = Field(ge=1, le=65535)
    health_path: str = "/health"
    probe_token: str = Field(
        pattern=_TOKEN.pattern,
        description="Lets Gantry's probes (only) route by header; hex: no quoting needed.",
    )
    weights: Mapping[Slot, int] = Field(default_factory=dict)
    timeout_server_s: int = Field(default=120, ge=1)


def probe_headers(token: str, slot: Slot, kind: str) -> dict[str, str]:
    """Headers of one of Gantry's probes: sent to ``slot``, logged as ``kind``."""
    return {ROUTE_HEADER: slot.value, PROBE_HEADER: kind, TOKEN_HEADER: token}


def slot_host(deployment: str, slot: Slot) -> str:
    """The container name (and DNS name on the deployment network) of a slot."""
    return f"{deployment}-{slot.value}"


def render_config(cfg: RouterConfig) -> str:
    """The haproxy.cfg of a deployment (pure; golden-tested).

    Why each setting: the runtime API on a unix socket in a directory only the host and
    the router mount changes weights live (no model server can reach it); the routing and
    probe headers are dropped from requests without the probe token, which is itself
    dropped before a request reaches a server; `resolvers docker` finds each slot's
    container by name, so a container restarted with a new address is followed;
    `init-addr none` lets the router start while a slot is empty; `retry-on` +
    `redispatch` send a request that hit a dead or vanished server to the other one, which
    is what keeps client requests from failing while a crashed candidate is taken out.
    The `metrics` frontend is HAProxy's own Prometheus exporter: read-only (a model server
    on the network can read the weights there, never change them).
    `http-no-delay`: a chat answer streams token by token; without it HAProxy holds small
    chunks back (MSG_MORE, Nagle) and tokens reached clients in batches, the first one
    tens of milliseconds late. One-write answers (embeddings) are not affected.
    """
    servers = []
    for slot in Slot:
        weight = int(cfg.weights.get(slot, 0))
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight of slot {slot} must be 0-{MAX_WEIGHT}, not {weight}")
        servers.append(
            f"    use-server {slot.value} if {{ req.hdr({ROUTE_HEADER}) -m str {slot.value} }}\n"
        )
    for slot in Slot:
        weight = int(cfg.weights.get(slot, 0))
        servers.append(
            f"    server {slot.value} {slot_host(cfg.deployment, slot)}:{cfg.runtime_port} "
            f"weight {weight}\n"
        )
    health = cfg.health_path if cfg.health_path.startswith("/") else f"/{cfg.health_path}"
    return (
        f"# Rendered by Gantry for deployment {cfg.deployment}. Re-rendered on every weight\n"
        "# change, so a restarted router comes back with the current weights.\n"
        "global\n"
        "    log stdout format raw local0 info\n"
        # 666: the socket belongs to the container's haproxy user; the host directory's own
        # mode (the deployment's, under the state dir) is what keeps other users out.
        f"    stats socket {ADMIN_DIR}/{ADMIN_SOCKET} mode 666 level admin\n"
        "    stats timeout 10s\n"
        "    maxconn 4096\n"
        "\n"
        "resolvers docker\n"
        "    nameserver dns 127.0.0.11:53\n"
        "    resolve_retries 3\n"
        "    timeout resolve 1s\n"
        "    timeout retry 1s\n"
        "    hold valid 2s\n"
        "    hold nx 1s\n"
        "    hold obsolete 1s\n"
        "\n"
        "defaults\n"
        "    mode http\n"
        "    log global\n"
        '    log-format "gantry-access server=%s status=%ST ta=%Ta tr=%Tr retries=%rc '
        'term=%tsc probe=%[capture.req.hdr(0)]"\n'
        "    option dontlognull\n"
        "    option http-no-delay\n"
        "    timeout connect 1s\n"
        "    timeout client 60s\n"
        f"    timeout server {cfg.timeout_server_s}s\n"
        "    timeout http-request 10s\n"
        "    timeout http-keep-alive 10s\n"
        "    timeout queue 30s\n"
        "    retries 3\n"
        "    option redispatch 1\n"
        "    retry-on conn-failure empty-response junk-response response-timeout\n"
        "\n"
        "frontend inference\n"
        f"    bind :{FRONTEND_PORT}\n"
        f"    acl gantry_probe req.hdr({TOKEN_HEADER}) -m str {cfg.probe_token}\n"
        f"    http-request del-header {ROUTE_HEADER} unless gantry_probe\n"
        f"    http-request del-header {PROBE_HEADER} unless gantry_probe\n"
        f"    http-request del-header {TOKEN_HEADER}\n"
        f"    http-request capture req.hdr({PROBE_HEADER}) len 16\n"
        f"    default_backend {BACKEND}\n"
        "\n"
        "frontend metrics\n"
        f"    bind :{METRICS_PORT}\n"
        "    no log\n"
        "    http-request use-service prometheus-exporter if { path /metrics }\n"
        "    http-request return status 404\n"
        "\n"
        f"backend {BACKEND}\n"
        "    balance roundrobin\n"
        "    option httpchk\n"
        f"    http-check send meth GET uri {health}\n"
        "    http-check expect status 200\n"
        "    default-server check inter 1s fastinter 500ms downinter 1s fall 2 rise 1 "
        "resolvers docker resolve-prefer ipv4 init-addr none\n" + "".join(servers)
    )


# --- runtime API ---------------------------------------------------------------------------


class ServerStat(BaseModel):
    """One server's line of `show stat` (the fields the canary uses)."""

    model_config = ConfigDict(frozen=True)

    name: str
    status: str = Field(description="UP, DOWN, MAINT, DRAIN, NOLB, … (with check details).")
    weight: int
    current_sessions: int = Field(description="scur: connections open now.")
    total_sessions: int = Field(description="stot")
    connection_errors: int = Field(description="econ")
    response_errors: int = Field(description="eresp")
    retries: int = Field(description="wretr")
    redispatches: int = Field(description="wredis")
    http_5xx: int = Field(description="hrsp_5xx")
    address: str = Field(default="", description="addr: the resolved address, if any.")

    @property
    def up(self) -> bool:
        return self.status.startswith("UP")


def _int(row: Mapping[str, str], key: str) -> int:
    value = row.get(key) or "0"
    return int(value) if value.lstrip("-").isdigit() else 0


def parse_show_stat(text: str, backend: str = BACKEND) -> dict[str, ServerStat]:
    """The servers of ``backend`` in `show stat` CSV output, by name."""
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise RouterError(f"unexpected `show stat` output: {text[:200]!r}")
    reader = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
    out: dict[str, ServerStat] = {}
    for row in reader:
        if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        out[row["svname"]] = ServerStat(
            name=row["svname"],
            status=row.get("status") or "",
            weight=_int(row, "weight"),
            current_sessions=_int(row, "scur"),
            total_sessions=_int(row, "stot"),
            connection_errors=_int(row, "econ"),
            response_errors=_int(row, "eresp"),
            retries=_int(row, "wretr"),
            redispatches=_int(row, "wredis"),
            http_5xx=_int(row, "hrsp_5xx"),
            address=row.get("addr") or "",
        )
    return out


def parse_server_weights(text: str) -> dict[str, int]:
    """``srv_name -> srv_uweight`` from `show servers state` (a version line, a ``#`` header,
    then one space-separated row per server)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    header = next((ln[2:].split() for ln in lines if ln.startswith("# ")), None)
    if header is None or "srv_name" not in header or "srv_uweight" not in header:
        raise RouterError(f"unexpected `show servers state` output: {text[:200]!r}")
    name_i, weight_i = header.index("srv_name"), header.index("srv_uweight")
    out: dict[str, int] = {}
    for ln in lines:
        cols = ln.split()
        if ln.startswith("#") or len(cols) < len(header):
            continue
        out[cols[name_i]] = int(cols[weight_i])
    return out


@contextlib.contextmanager
def _unix_address(path: Path) -> Iterator[str]:
    """``path`` as a unix socket address: through ``/proc/self/fd`` of its directory when it
    is longer than ``sun_path`` allows (deep state dirs, pytest's tmp dirs)."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class RuntimeAPI:
    """HAProxy's runtime API on its unix socket: one command per connection, with a timeout."""

    def __init__(self, socket_path: Path, timeout_s: float = 5.0) -> None:
        self.socket_path, self.timeout_s = socket_path, timeout_s

    def command(self, line: str) -> str:
        """Send one command; its answer. Transient when the router does not answer."""
        if "\n" in line or ";" in line:
            raise ValueError(f"one runtime API command at a time, not {line!r}")
        try:
            with (
                _unix_address(self.socket_path) as address,
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s,
            ):
                s.settimeout(self.timeout_s)
                s.connect(address)
                s.sendall(line.encode() + b"\n")
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise RouterUnavailableError(
                f"the router's runtime API at {self.socket_path} did not answer "
                f"`{line.split()[0]}`: {exc}",
                fix="check the router container is running (`docker ps --filter "
                "label=ai.gantry.role=router`); `gantry rollback MODEL` recreates it",
            ) from None
        return b"".join(chunks).decode("utf-8", errors="replace")

    def _checked(self, line: str) -> None:
        answer = self.command(line).strip()
        # Successful `set` commands answer nothing (or a notice about a changed address).
        if answer and not answer.lower().startswith(("no need to change", "ip changed")):
            raise RouterError(f"router refused `{line}`: {answer[:300]}")

    def set_weight(self, slot: Slot, weight: int) -> None:
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be 0-{MAX_WEIGHT}, not {weight}")
        self._checked(f"set server {BACKEND}/{slot.value} weight {weight}")

    def set_state(self, slot: Slot, state: ServerState) -> None:
        self._checked(f"set server {BACKEND}/{slot.value} state {state.value}")

    def stats(self) -> dict[str, ServerStat]:
        return parse_show_stat(self.command("show stat"))

    def weights(self) -> dict[str, int]:
        """The weight set for each server (also for one in maintenance, whose `show stat`
        weight stays at the configured one)."""
        return parse_server_weights(self.command(f"show servers state {BACKEND}"))

    def alive(self) -> bool:
        try:
            return "Name: HAProxy" in self.command("show info")
        except RouterUnavailableError:
            return False

    def wait_alive(self, deadline_s: float, gone: Callable[[], str | None] | None = None) -> None:
        """Until the API answers; ``gone`` says why waiting is pointless (the process
        exited), so a router that cannot start fails at once, not at the deadline."""
        end = time.monotonic() + deadline_s
        while not self.alive():
            if gone is not None and (why := gone()):
                raise RouterUnavailableError(
                    f"the router stopped before its runtime API answered: {why}",
                    fix="read the router container's log (`docker logs <deployment>-router`)",
                )
            if time.monotonic() > end:
                raise RouterUnavailableError(
                    f"the router's runtime API at {self.socket_path} did not come up "
                    f"within {deadline_s:.0f}s",
                    fix="read the router container's log (`docker logs <deployment>-router`)",
                )
            time.sleep(0.2)


# --- access log ----------------------------------------------------------------------------


class AccessRecord(BaseModel):
    """One request as the router logged it."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    server: str = Field(description="Slot that answered; `<NOSRV>` when none could.")
    status: int = Field(description="HTTP status sent to the client; -1 when none was.")
    total_ms: int = Field(description="%Ta: time the request was active in the router.")
    response_ms: int = Field(description="%Tr: server's time to the response headers, -1: none.")
    retries: int
    redispatched: bool
    termination: str = Field(description="%tsc: `----` for a normal end.")
    probe: str = Field(default="", description="Gantry's probe kind; empty for live traffic.")

    @property
    def failed(self) -> bool:
        """What a client saw as a failure: no answer, or a 5xx."""
        return self.status < 0 or self.status >= 500


def parse_access_line(line: str) -> AccessRecord | None:
    """A ``<RFC 3339 timestamp> gantry-access …`` line (``docker logs -t``); None for others."""
    stamp, _, rest = line.strip().partition(" ")
    m = _ACCESS.search(rest)
    if not m:
        return None
    try:
        # Docker writes nanoseconds; Python parses up to microseconds.
        at = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    retries = m["retries"]
    return AccessRecord(
        at=at,
        server=m["server"],
        status=int(m["status"]),
        total_ms=int(m["ta"]),
        response_ms=int(m["tr"]),
        retries=abs(int(retries.lstrip("+"))),
        redispatched=retries.startswith("+"),
        termination=m["term"],
        probe="" if m["probe"] in (None, "-") else m["probe"],
    )
