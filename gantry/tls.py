"""The process's one TLS context for HTTP clients. Prefect-free."""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's own default verifying context (certifi's CAs; $SSL_CERT_FILE and
    $SSL_CERT_DIR honoured), built once. Every ``httpx.Client`` otherwise builds its own,
    loading the CA bundle each time (~30 ms here), and a release makes a dozen clients,
    most of them to plain-HTTP local services. A context is safe to share between clients
    and threads."""
    return httpx.create_ssl_context()
