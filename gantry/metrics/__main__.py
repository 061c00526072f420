"""``python -m gantry.metrics serve``: run the metrics exporter (see gantry.metrics)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gantry.metrics.exporter import main


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gantry.metrics")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the exporter until SIGTERM")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=5078)
    s.add_argument(
        "--targets-dir", type=Path, required=True, help="where to write the scrape targets"
    )
    s.add_argument(
        "--deployments-dir",
        type=Path,
        default=None,
        help="export only the deployments recorded there (default: all on the engine)",
    )
    s.add_argument("--interval", type=float, default=1.0, help="seconds between passes")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = _args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    main(args.host, args.port, args.targets_dir, args.interval, args.deployments_dir)
