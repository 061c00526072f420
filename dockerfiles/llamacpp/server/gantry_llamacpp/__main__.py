"""``python -m gantry_llamacpp``: serve the GGUF under MODEL_PATH on HOST:PORT."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from .app import Config, ConfigError, create_app

log = logging.getLogger("gantry_llamacpp")


class _QuietProbes(logging.Filter):
    """Drops access-log lines of successful /health and /metrics polls (Docker's
    HEALTHCHECK and scrapers poll every few seconds); failing probes are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            return not (args[2] in ("/health", "/metrics") and args[4] == 200)
        return True


def main() -> int:
    """Configure logging to stdout, then run uvicorn until SIGTERM/SIGINT."""
    level = (os.environ.get("LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("uvicorn.access").addFilter(_QuietProbes())
    try:
        config = Config.from_env()
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        return 2
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_config=None,
        lifespan="on",
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
