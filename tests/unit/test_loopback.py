"""The loopback relay of `gantry topology`: only tunnels with the token, only to the
ports it may serve, bytes copied both ways (real sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from gantry.localenv.loopback import PortRange, Relay, header, parse_header

TOKEN = secrets.token_hex(32)


def test_port_ranges_parse_and_refuse_nonsense() -> None:
    assert PortRange.parse("32768-60999") == PortRange(low=32768, high=60999)
    assert 5175 in PortRange.parse("5175") and 5176 not in PortRange.parse("5175")
    assert str(PortRange.parse("5175")) == "5175"
    for bad in ("", "x", "10-5", "0", "70000"):
        with pytest.raises(ValueError):
            PortRange.parse(bad)


def test_a_header_names_its_port_and_a_wrong_one_is_refused_without_echoing_the_token() -> None:
    allowed = [PortRange.parse("32768-60999"), PortRange.parse("5175")]
    assert parse_header(header(TOKEN, 5175), TOKEN, allowed) == 5175
    assert parse_header(header(TOKEN, 40000), TOKEN, allowed) == 40000
    refusals = {
        header("0" * 64, 5175): "wrong token",
        header(TOKEN, 22): "outside",
        header(TOKEN, 5175).replace(b" 1 ", b" 2 "): "version",
        b"GET / HTTP/1.1\r\n": "not a loopback",
        header(TOKEN, 5175).replace(b"5175", b"ssh"): "not a number",
    }
    for line, why in refusals.items():
        with pytest.raises(ValueError, match=why) as info:
            parse_header(line, TOKEN, allowed)
        assert TOKEN not in str(info.value)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data.upper())
        await writer.drain()
    writer.close()


async def _through(relay_port: int, first: bytes, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
    writer.write(first + payload)
    await writer.drain()
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return got


def test_the_relay_tunnels_to_allowed_loopback_ports_only() -> None:
    async def scenario() -> tuple[bytes, bytes, bytes, bytes]:
        upstream = await asyncio.start_server(_echo, "127.0.0.1", 0)
        up_port = upstream.sockets[0].getsockname()[1]
        relay = Relay(TOKEN, [PortRange(low=up_port, high=up_port)])
        server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with upstream, server:
            ok = await _through(port, header(TOKEN, up_port), b"hello")
            big = await _through(port, header(TOKEN, up_port), b"x" * 300_000)
            wrong = await _through(port, header("f" * 64, up_port), b"hello")
            other = await _through(port, header(TOKEN, up_port + 1), b"hello")
        return ok, big, wrong, other

    ok, big, wrong, other = asyncio.run(scenario())
    assert ok == b"HELLO"
    assert big == b"X" * 300_000
    # Refused tunnels are closed before a byte reaches (or comes back from) the upstream.
    assert wrong == b"" and other == b""


def test_a_relay_refuses_a_short_token() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        Relay("short", [PortRange.parse("5175")])
