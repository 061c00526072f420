"""``python -m gantry_runtime``: serve the model at MODEL_PATH on HOST:PORT."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from .app import Config, ConfigError, create_app

log = logging.getLogger("gantry_runtime")


class _QuietProbes(logging.Filter):
    """Drops access-log lines of successful /health and /metrics polls.

    Docker's HEALTHCHECK and Prometheus poll every few seconds; their lines would bury
    the traffic the log is for. Failing probes are still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            path, status = args[2], args[4]
            return not (path in ("/health", "/metrics") and status == 200)
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
    # log_config=None: uvicorn's loggers propagate to the stdout handler above instead of
    # writing errors to stderr in a format of their own.
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
