"""Plain HTTP only to a registry that really is on this machine: one predicate, on the
parsed address, shared by the registry client, trivy (--insecure) and cosign."""

from __future__ import annotations

import pytest

from gantry.adapters import trivy
from gantry.adapters.cosign import RegistryAccess
from gantry.adapters.registry import RegistryClient, is_loopback
from gantry.signing.image import registry_access

pytestmark = pytest.mark.unit

LOOPBACK = ["127.0.0.1:5075", "127.0.0.2", "localhost:5000", "[::1]:5000", "[::1]"]
REMOTE = [
    "127.evil.example:5000",  # a prefix match took these for local
    "localhost.evil.example",
    "127.0.0.1.nip.io:5000",
    "[::1].evil.example",
    "[::1]:x",
    "127.0.0.1:notaport",
    "10.0.0.1:5000",
    "registry.example.com",
    "0x7f.1",
]


@pytest.mark.parametrize("address", LOOPBACK)
def test_loopback_addresses_get_plain_http(address: str) -> None:
    assert is_loopback(address)
    with RegistryClient(address) as client:
        assert client.base == f"http://{address}"
    assert trivy.is_loopback_registry(f"{address}/gantry/m@sha256:{'a' * 64}")


@pytest.mark.parametrize("address", REMOTE)
def test_anything_else_gets_https(address: str) -> None:
    assert not is_loopback(address)
    with RegistryClient(address) as client:
        assert client.base == f"https://{address}"
    assert not trivy.is_loopback_registry(f"{address}/gantry/m:1")


def test_cosign_gets_plain_http_only_for_loopback() -> None:
    assert registry_access("127.0.0.1:5075") == RegistryAccess(plain_http=True)
    assert registry_access("127.evil.example:5075") == RegistryAccess(plain_http=False)
