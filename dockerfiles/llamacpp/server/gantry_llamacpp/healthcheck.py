"""Docker HEALTHCHECK: exit 0 iff GET /health on this container's port answers 200 in 3 s.

Run as a script (standard library only), so a probe costs one interpreter start and does
not import llama-cpp-python.
"""

from __future__ import annotations

import http.client
import os
import sys


def main() -> int:
    """Probe /health once; print why it failed (Docker keeps the last lines)."""
    port = int(os.environ.get("PORT") or 8080)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = response.read(2000).decode("utf-8", errors="replace")
    except OSError as exc:
        print(f"unhealthy: 127.0.0.1:{port}/health: {exc}")
        return 1
    finally:
        conn.close()
    if response.status != 200:
        print(f"unhealthy: /health answered {response.status}: {body}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
