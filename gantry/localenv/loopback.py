"""The engine host's loopback, reachable from a topology's worker containers.

A worker host of ``gantry topology up`` drives the machine's Docker engine through its
socket, so what it starts publishes ports on the *engine host's* 127.0.0.1 (the model's
router, a candidate, the registry the engine pushes to). Inside the worker's own network
namespace 127.0.0.1 is the worker itself. Two halves bridge that, without publishing any
of those ports where a candidate container could reach them:

- ``forward`` runs in the worker. iptables redirects the worker's TCP connections to
  127.0.0.1 on the engine's port range (and the registry's port) to it; it reads each
  connection's original port (``SO_ORIGINAL_DST``) and opens a tunnel to the relay.
- ``relay`` runs on the engine host (a container on the host network), listening only on
  the topology network's gateway address. A tunnel starts with one line,
  ``GANTRY-LOOPBACK 1 <token> <port>``; the relay checks the token (a secret only the
  worker containers hold: candidates can reach the gateway address, not the token) and that
  the port is one it may serve, then connects to 127.0.0.1:<port> and copies bytes both
  ways. A refused tunnel is closed at once and logged with its cause.

    python -m gantry.localenv.loopback relay --listen 172.30.0.1:5190 \\
        --token-file /run/gantry/relay.token --ports 32768-60999 --ports 5175
    python -m gantry.localenv.loopback forward --listen 127.0.0.1:15001 \\
        --relay 172.30.0.1:5190 --token-file /run/gantry/relay.token
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("gantry.loopback")

MAGIC = "GANTRY-LOOPBACK"
VERSION = "1"
#: linux/netfilter_ipv4.h: the address a connection had before iptables redirected it.
SO_ORIGINAL_DST = 80
#: A tunnel's first line must arrive within this; a stalled or hostile peer is dropped.
HEADER_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
_MAX_HEADER = 256
_CHUNK = 64 * 1024


class PortRange(BaseModel):
    """An inclusive TCP port range, e.g. ``32768-60999`` or ``5175``."""

    model_config = ConfigDict(frozen=True)

    low: int = Field(ge=1, le=65535)
    high: int = Field(ge=1, le=65535)

    @classmethod
    def parse(cls, text: str) -> PortRange:
        low, _, high = text.strip().partition("-")
        try:
            lo, hi = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"{text!r} is not PORT or LOW-HIGH") from None
        if lo > hi:
            raise ValueError(f"{text!r}: the range is empty")
        return cls(low=lo, high=hi)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return f"{self.low}" if self.low == self.high else f"{self.low}-{self.high}"


def header(token: str, port: int) -> bytes:
    """The first line of a tunnel to 127.0.0.1:``port``."""
    return f"{MAGIC} {VERSION} {token} {port}\n".encode()


def parse_header(line: bytes, token: str, allowed: Sequence[PortRange]) -> int:
    """The port a tunnel's first ``line`` asks for; ValueError naming why it is refused
    (never echoing the token it carried)."""
    parts = line.decode("ascii", "replace").strip().split(" ")
    if len(parts) != 4 or parts[0] != MAGIC:
        raise ValueError("not a loopback tunnel header")
    if parts[1] != VERSION:
        raise ValueError(f"protocol version {parts[1][:8]!r}, this relay speaks {VERSION}")
    if not hmac.compare_digest(parts[2].encode(), token.encode()):
        raise ValueError("wrong token")
    try:
        port = int(parts[3])
    except ValueError:
        raise ValueError("the port is not a number") from None
    if not any(port in r for r in allowed):
        raise ValueError(f"port {port} is outside {', '.join(map(str, allowed))}")
    return port


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Copy both ways until both sides are done, then close both."""
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    finally:
        for w in (a[1], b[1]):
            w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()


class Relay:
    """The engine host's half: tunnels with the right token to allowed loopback ports."""

    def __init__(self, token: str, allowed: Sequence[PortRange]) -> None:
        if len(token) < 32:
            raise ValueError("the relay token must be at least 32 characters")
        self.token = token
        self.allowed = tuple(allowed)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            line = await asyncio.wait_for(reader.readline(), HEADER_TIMEOUT_S)
            if len(line) > _MAX_HEADER or not line.endswith(b"\n"):
                raise ValueError("no header line")
            port = parse_header(line, self.token, self.allowed)
        except (TimeoutError, ValueError, ConnectionError, asyncio.LimitOverrunError) as exc:
            log.warning("refused a tunnel from %s: %s", peer, exc or "no header in time")
            writer.close()
            return
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT_S
            )
        except (TimeoutError, OSError) as exc:
            # What the worker's client sees as a reset: nothing listens there.
            log.info("tunnel from %s: 127.0.0.1:%d: %s", peer, port, exc or "timed out")
            writer.close()
            return
        await _splice((reader, writer), upstream)

    async def serve(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self.handle, host, port, limit=_MAX_HEADER * 4)
        log.info(
            "relay on %s:%d to 127.0.0.1 ports %s", host, port, ", ".join(map(str, self.allowed))
        )
        async with server:
            await server.serve_forever()


def original_port(sock: socket.socket) -> int:
    """The destination port a connection redirected by iptables was opened to."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port: int = struct.unpack_from("!H", raw, 2)[0]
    return port


class Forwarder:
    """The worker's half: each redirected connection becomes a tunnel to the relay."""

    def __init__(self, relay_host: str, relay_port: int, token: str) -> None:
        self.relay = (relay_host, relay_port)
        self.token = token

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            port = original_port(sock)
            if port == sock.getsockname()[1]:
                # Straight to this port, not redirected (a readiness check): no tunnel.
                writer.close()
                return
            upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.relay), CONNECT_TIMEOUT_S
            )
        except (TimeoutError, OSError) as exc:
            log.warning("no tunnel to the relay %s:%d: %s", *self.relay, exc or "timed out")
            writer.close()
            return
        upstream[1].write(header(self.token, port))
        await _splice((reader, writer), upstream)

    async def serve(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self.handle, host, port)
        log.info("forwarding redirected connections on %s:%d to %s:%d", host, port, *self.relay)
        async with server:
            await server.serve_forever()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def _token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise SystemExit(f"cannot read the relay token {path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gantry.localenv.loopback")
    sub = p.add_subparsers(dest="role", required=True)
    r = sub.add_parser("relay", help="the engine host's half")
    r.add_argument("--listen", type=_hostport, required=True, help="GATEWAY:PORT")
    r.add_argument("--token-file", type=Path, required=True)
    r.add_argument("--ports", action="append", type=PortRange.parse, required=True)
    f = sub.add_parser("forward", help="the worker's half")
    f.add_argument("--listen", type=_hostport, required=True, help="127.0.0.1:PORT")
    f.add_argument("--relay", type=_hostport, required=True, help="GATEWAY:PORT")
    f.add_argument("--token-file", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = _token(args.token_file)
    if args.role == "relay":
        asyncio.run(Relay(token, args.ports).serve(*args.listen))
    else:
        asyncio.run(Forwarder(args.relay[0], args.relay[1], token).serve(*args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
