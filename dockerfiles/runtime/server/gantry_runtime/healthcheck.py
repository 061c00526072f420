"""Docker HEALTHCHECK probe: exit 0 iff GET http://127.0.0.1:$PORT/health is 200 within 3 s.

Standard library only and run as a script, so a probe costs one interpreter start and
no import of the runtime's dependencies.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def main() -> int:
    """Probe /health once; print why it failed."""
    url = f"http://127.0.0.1:{os.environ.get('PORT') or '8080'}/health"
    # No ProxyHandler settings: an HTTP(S)_PROXY in the container must not capture loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as response:
            status = int(response.status)
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        print(f"unhealthy: {url}: {e}")
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
