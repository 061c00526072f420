"""`gantry topology …`: several Gantry hosts as containers on this machine.

    gantry topology up --workers 2     control host + 2 worker hosts (image built once)
    gantry topology deliver SPEC.yaml  a signed webhook delivery: a `release` run
    gantry topology status [--json]    the hosts, their addresses, which workers poll
    gantry topology down [--purge]     remove the containers (state kept unless --purge)

``control`` and ``worker`` are what the hosts run inside their containers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gantry.errors import ConfigError, ServiceError
from gantry.settings import get_settings

if TYPE_CHECKING:
    from gantry.localenv.topology import Topology

log = logging.getLogger("gantry.topology")


def _saved(args: argparse.Namespace) -> Topology | None:
    """The topology `up` saved (under ``--root``, else the state dir's)."""
    from gantry.localenv.topology import load_topology, topology_root

    root = Path(args.root) if getattr(args, "root", None) else topology_root(get_settings())
    return load_topology(root)


def _topology(args: argparse.Namespace) -> Topology:
    if (t := _saved(args)) is None:
        raise ConfigError(
            "no topology has been started from this state dir",
            fix="start one with `gantry topology up --workers 2`",
        )
    return t


def _online(t: Topology) -> list[str]:
    """Workers polling the topology's pool, asked of its Prefect server from this host."""
    from gantry.adapters.prefect_api import online_workers_at
    from gantry.localenv.topology import WORK_POOL

    return online_workers_at(f"{t.prefect_url}/api", WORK_POOL)


def cmd_up(args: argparse.Namespace) -> int:
    from gantry.adapters.docker_engine import connect
    from gantry.cli import _ensure_images
    from gantry.localenv import topology as topo
    from gantry.stages.build import project_root

    settings = get_settings()
    old = _saved(args)
    project = Path(os.environ.get("GANTRY_PROJECT_DIR") or project_root()).resolve()
    t = topo.Topology(
        name=args.name or (old.name if old else "gantry-topology"),
        root=old.root if old else topo.topology_root(settings),
        project_dir=project,
        spec_dir=Path(args.spec_root).resolve()
        if args.spec_root
        else (old.spec_dir if old else None),
        workers=args.workers,
        ports=topo.TopologyPorts.from_base(args.port_base)
        if args.port_base
        else (old.ports if old else topo.TopologyPorts.from_base(5170)),
    )
    client = connect(timeout_s=600)
    if old is not None and old.workers > t.workers:
        topo.remove_hosts(client, old, old.worker_roles()[t.workers :])  # fewer than before
    _ensure_images(client, settings)  # the images releases build on: once, not per worker
    t = topo.up(client, settings, t, online=_online, timeout_s=args.timeout)
    client.close()
    summary = topo.status(connect(timeout_s=30), t, _online(t))
    _print_status(summary)
    print(f"\nexport PREFECT_API_URL={t.prefect_url}/api")
    print("deliver a release: gantry topology deliver examples/minilm-demo.yaml")
    return 0


def _print_status(s: dict[str, Any]) -> None:
    for k in ("name", "image", "prefect_ui", "webhook", "registry", "hub", "mlflow"):
        print(f"{k:<16} {s[k]}")
    for role, h in s["hosts"].items():
        extra = ""
        if "online" in h:
            extra = " online" if h["online"] else " not polling"
        print(f"host {role:<11} {h['state']:<8} {h.get('address') or '':<15}{extra}")


def cmd_status(args: argparse.Namespace) -> int:
    from gantry.adapters.docker_engine import connect
    from gantry.localenv import topology as topo

    t = _topology(args)
    s = topo.status(connect(timeout_s=30), t, _online(t))
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        _print_status(s)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from gantry.adapters.docker_engine import connect
    from gantry.localenv import topology as topo

    t = _saved(args)
    if t is None:
        log.info("no topology to stop")
        return 0
    for name in topo.down(connect(timeout_s=120), t, purge=args.purge):
        log.info("removed %s", name)
    if not args.purge:
        log.info("state kept under %s (`gantry topology up` resumes from it)", t.root)
    return 0


def cmd_deliver(args: argparse.Namespace) -> int:
    """One signed generic delivery to the topology's webhook receiver."""
    import httpx

    from gantry.webhook.signature import sign

    t = _topology(args)
    spec = Path(args.spec).resolve()
    try:
        rel = spec.relative_to(t.spec_root)
    except ValueError:
        raise ConfigError(
            f"{args.spec} is not under the spec root {t.spec_root}",
            fix="deliver a spec file of the checkout the topology runs",
        ) from None
    payload: dict[str, Any] = {"spec_path": str(rel)}
    body = json.dumps(payload).encode()
    secret = t.webhook_secret_file.read_bytes().strip()
    # The receiver needs an id per delivery (its idempotency key); a person at a shell
    # gets a fresh one, and the line to send the same delivery again.
    delivery = args.delivery or f"gantry-cli-{uuid.uuid4().hex}"
    if not args.delivery:
        log.info("delivery %s (`--delivery %s` sends it again, same run)", delivery, delivery)
    headers = {
        "Content-Type": "application/json",
        "X-Gantry-Signature": sign(body, secret),
        "X-Gantry-Delivery": delivery,
    }
    try:
        r = httpx.post(t.webhook_url, content=body, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        raise ServiceError(
            f"the topology's webhook at {t.webhook_url} did not answer: {exc}",
            fix="`gantry topology status`; `gantry topology up` starts what is down",
        ) from None
    print(r.text)
    return 0 if r.status_code < 300 else 1


# --- inside the containers -----------------------------------------------------------------


def cmd_control(args: argparse.Namespace) -> int:
    """The control host: registry, PostgreSQL + MLflow, Hub, Prefect (work pool, the
    deployments of prefect.yaml, crash detection), then the webhook receiver until it
    stops."""
    import anyio

    from gantry.cli import _use_prefect, serve_webhook
    from gantry.localenv import services as svc
    from gantry.localenv import topology as topo

    t = _topology(args)
    settings = get_settings()
    os.environ["GANTRY_WEBHOOK_SECRET"] = t.webhook_secret_file.read_text().strip()
    for service in [svc.registry_service(settings), *svc.tracking_services(settings)]:
        log.info("%s: %s", service.name, service.start().url)
    log.info("hub: %s", svc.hub_service(settings).start().url)
    _use_prefect(settings, start=True)
    anyio.run(_setup_prefect, t.project_dir)
    serve_webhook(t.webhook_config, "0.0.0.0", topo.CONTROL_PORTS["webhook"])  # noqa: S104
    return 0


async def _setup_prefect(project_dir: Path) -> None:
    from prefect.client.orchestration import get_client

    from gantry.adapters.prefect_api import ensure_crash_detection
    from gantry.cli import _register_deployments
    from gantry.localenv.topology import HEARTBEAT_S

    await _register_deployments(project_dir, ())
    async with get_client() as client:
        if await ensure_crash_detection(client, heartbeat_s=HEARTBEAT_S):
            log.info("crash detection: runs silent for %ds are crashed", 3 * HEARTBEAT_S)


def cmd_worker(args: argparse.Namespace) -> int:
    """A worker host: its loopback bridge, its metrics services, then a Prefect process
    worker in the foreground (the container's life)."""
    from gantry.cli import _use_prefect
    from gantry.localenv import services as svc
    from gantry.localenv import topology as topo
    from gantry.localenv.loopback import PortRange
    from gantry.proc import run

    settings = get_settings()
    for argv in topo.setup_redirects(
        [PortRange.parse(r) for r in args.redirect], topo.FORWARD_PORT
    ):
        run(argv, timeout_s=30, fix="the worker container needs NET_ADMIN (cap_add)")
    topo.start_forwarder(settings.services_dir, args.relay, Path(args.token_file))
    for service in svc.metrics_services(settings):
        log.info("%s: %s", service.name, service.start().url)
    _use_prefect(settings, start=False)
    worker = svc.worker_service(
        settings,
        pool=args.pool,
        limit=1,
        env={"GANTRY_PROJECT_DIR": os.environ["GANTRY_PROJECT_DIR"]},
    )
    env = {**os.environ, **worker.env}
    log.info("worker %s polls %s", svc.worker_name(), args.pool)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(worker.argv[0], worker.argv, env)  # noqa: S606  (argv list, our own worker)


def add_parser(sub: Any) -> None:
    tp = sub.add_parser(
        "topology",
        help="a control host and N worker hosts as containers on this machine",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    tsub = tp.add_subparsers(dest="action", required=True, metavar="ACTION")
    u = tsub.add_parser("up", help="start (or complete) the topology")
    u.add_argument("--workers", type=int, default=2, help="worker hosts (default 2)")
    u.add_argument("--name", default=None, help="container and network prefix")
    u.add_argument(
        "--port-base",
        type=int,
        default=None,
        help="first of its 6 ports on 127.0.0.1 (default 5170: Prefect 5170, registry 5171, "
        "hub 5172, MLflow 5173, webhook 5174, relay 5175 on the network's gateway)",
    )
    u.add_argument(
        "--spec-root",
        default=None,
        help="directory of the spec files deliveries name (default: the checkout)",
    )
    u.add_argument("--timeout", type=float, default=900, help="seconds to wait for the hosts")
    u.set_defaults(func=cmd_up)
    st = tsub.add_parser("status", help="the hosts, their addresses and which workers poll")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    d = tsub.add_parser("down", help="remove its containers and network")
    d.add_argument("--purge", action="store_true", help="also delete its state")
    d.set_defaults(func=cmd_down)
    dl = tsub.add_parser("deliver", help="a signed webhook delivery of a spec file")
    dl.add_argument("spec", help="spec file under the checkout, e.g. examples/minilm-demo.yaml")
    dl.add_argument(
        "--delivery",
        default=None,
        help="delivery id, the idempotency key (default: a new one each time)",
    )
    dl.set_defaults(func=cmd_deliver)
    for name, func, helptext in (
        ("control", cmd_control, "(inside the control container)"),
        ("worker", cmd_worker, "(inside a worker container)"),
    ):
        r = tsub.add_parser(name, help=helptext)
        r.add_argument("--root", required=name == "control", help=argparse.SUPPRESS)
        r.set_defaults(func=func)
    w = tsub.choices["worker"]
    w.add_argument("--relay", required=True)
    w.add_argument("--token-file", required=True)
    w.add_argument("--redirect", action="append", default=[])
    w.add_argument("--pool", required=True)
    for p in (st, d, dl):
        p.add_argument("--root", default=None, help=argparse.SUPPRESS)
