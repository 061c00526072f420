"""The one TLS context every HTTP client of the process shares."""

from __future__ import annotations

import ssl

import httpx
import pytest

from gantry.adapters.registry import RegistryClient
from gantry.tls import tls_context


def test_one_context_that_still_verifies() -> None:
    ctx = tls_context()
    assert ctx is tls_context()
    # Sharing must not cost verification: certificates and host names are still checked.
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] > 0


def test_clients_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []
    real = httpx.Client.__init__

    def spy(self: httpx.Client, *args: object, **kw: object) -> None:
        made.append(kw.get("verify"))
        real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx.Client, "__init__", spy)
    with RegistryClient("registry.example:5000"), RegistryClient("127.0.0.1:5000"):
        pass
    assert made == [tls_context(), tls_context()]
