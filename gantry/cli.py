"""The `gantry` command line.

    gantry release SPEC.yaml     run a release; the last line printed is the record's path
    gantry verify RECORD         re-verify the image and weights signatures of a release
    gantry rollback MODEL        abort a canary / give traffic back to the previous champion
    gantry reevaluate [MODEL...] re-score the live champions; exit 1 on a regression
    gantry keys generate         create signing key pairs
    gantry env up|down|status    the embedded services (registry, hub, Prefect, metrics)
    gantry hub token create      a token for the local hub (--write to publish models)
    gantry serve                 Prefect server, work pool, deployments and a worker
    gantry webhook serve         the CI webhook receiver that starts `release` runs
    gantry topology up|down|status|deliver   several hosts as containers on one machine
    gantry spec-schema           the JSON schema of a release spec

Exit codes: 0 success, 1 a stage or the environment failed, 2 invalid input.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gantry.atomicfile import private_dir
from gantry.errors import (
    ConfigError,
    GantryError,
    ReleaseInProgressError,
    ServiceError,
    SpecError,
)
from gantry.proc import redact_text
from gantry.settings import Settings, get_settings

log = logging.getLogger("gantry")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "docker", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _use_prefect(settings: Settings, *, start: bool) -> str:
    """Point this process at a Prefect API: $PREFECT_API_URL if set, else the embedded
    server (started when ``start``). Must run before Prefect reads its settings."""
    from gantry.localenv.services import prefect_env, prefect_service

    external = os.environ.get("PREFECT_API_URL")
    env = prefect_env(settings)
    if external:
        env["PREFECT_API_URL"] = external
    else:
        svc = prefect_service(settings)
        if start:
            log.info("starting the embedded Prefect server at %s", svc.url)
            svc.start()
    # A client of an external server keeps the user's PREFECT_HOME (profiles, auth).
    if external and "PREFECT_HOME" in os.environ:
        env.pop("PREFECT_HOME")
    os.environ.update(env)
    return env["PREFECT_API_URL"]


def cmd_release(args: argparse.Namespace) -> int:
    from gantry.localenv.services import registry_service
    from gantry.record import load_record, record_path, write_failed_record
    from gantry.spec import load_spec

    try:
        spec = load_spec(Path(args.spec))
    except SpecError as exc:
        print(f"gantry: {exc}", file=sys.stderr)
        return EXIT_USAGE
    settings = get_settings()
    try:
        from gantry.adapters.docker_engine import connect

        connect(timeout_s=30).close()
        if settings.registry_is_local:
            registry_service(settings).start()
        _use_prefect(settings, start=True)
    except GantryError as exc:
        print(f"gantry: {exc}", file=sys.stderr)
        print(write_failed_record(settings.releases_dir, spec, exc))
        return EXIT_FAILED

    from gantry.adapters.prefect_api import local_flow

    release = local_flow("release")
    path = record_path(settings.releases_dir, spec.release_id)
    try:
        release(spec)
    except ReleaseInProgressError as exc:
        # The record is the running one's: neither rewritten nor shown as this run's.
        print(f"gantry: {exc}", file=sys.stderr)
        print(path)
        return EXIT_FAILED
    except GantryError as exc:
        print(f"gantry: release {spec.release_id} failed: {exc}", file=sys.stderr)
    except Exception as exc:  # an orchestration failure: still leave a record
        print(
            f"gantry: release {spec.release_id} crashed: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        if not path.exists():
            write_failed_record(settings.releases_dir, spec, exc)
    if not path.exists():
        write_failed_record(settings.releases_dir, spec, RuntimeError("no record was written"))
    record = load_record(path)
    for name, st in record.stages.items():
        extra = " (cached)" if st.cached else ""
        dur = f"{st.duration_s:.1f}s" if st.duration_s is not None else "-"
        print(f"  {name:<9} {st.status.value:<10} {dur:>8}{extra}")
    print(path)
    return EXIT_OK if record.status.value == "succeeded" else EXIT_FAILED


def _env_summary(settings: Settings) -> dict[str, object]:
    from gantry.localenv.services import (
        exporter_service,
        hub_service,
        mlflow_server_service,
        postgres_service,
        prefect_service,
        prometheus_service,
        registry_service,
        worker_service,
    )

    services: dict[str, object] = {}
    factories = [registry_service, hub_service, prefect_service, worker_service, exporter_service]
    if settings.prometheus_is_local:
        factories.append(prometheus_service)
    if _tracking_is_embedded(settings):
        factories += [postgres_service, mlflow_server_service]
    for factory in factories:
        name = factory.__name__.removesuffix("_service").removesuffix("_server")
        try:
            services[name] = factory(settings).status().model_dump()
        except GantryError as exc:
            services[name] = {"error": redact_text(str(exc))}
    if not settings.prometheus_is_local:
        services["prometheus"] = _external_prometheus(settings)
    try:
        from gantry.adapters.docker_engine import connect

        c = connect(timeout_s=10)
        docker_info: object = {
            "reachable": True,
            "host": c.api.base_url,
            "version": c.version().get("Version"),
        }
        c.close()
    except GantryError as exc:
        docker_info = {"reachable": False, "error": str(exc)}
    return {
        "state_dir": str(settings.state_dir),
        "deployments_dir": str(settings.deployments_dir),
        "deployments_shared": settings.deployments_shared,
        "deployments": _deployments(settings),
        "prefect_api_url": os.environ.get("PREFECT_API_URL") or settings.prefect_api_url,
        "prefect_ui_url": (
            os.environ.get("PREFECT_API_URL") or settings.prefect_api_url
        ).removesuffix("/api"),
        "topology": settings.topology,
        "mlflow_tracking_uri": redact_text(
            os.environ.get("MLFLOW_TRACKING_URI") or settings.default_tracking_uri
        ),
        "mlflow_embedded_server": _tracking_is_embedded(settings),
        "registry": settings.registry,
        "registry_embedded": settings.registry_is_local,
        "hub_endpoint": settings.hub_url,
        "prometheus_url": redact_text(settings.prometheus_url),
        "prometheus_embedded": settings.prometheus_is_local,
        "docker": docker_info,
        "services": services,
    }


def _tracking_is_embedded(settings: Settings) -> bool:
    """Whether Gantry runs the tracking server (and its PostgreSQL) itself: the multi
    topology, unless MLFLOW_TRACKING_URI names a tracking store."""
    return settings.topology == "multi" and not os.environ.get("MLFLOW_TRACKING_URI")


def _external_prometheus(settings: Settings) -> dict[str, object]:
    """The Prometheus GANTRY_PROMETHEUS_URL names: not Gantry's to start or stop."""
    from gantry.adapters.prometheus import PrometheusClient
    from gantry.localenv.services import ServiceStatus

    with PrometheusClient(settings.prometheus_url, timeout_s=5) as prom:
        ready = prom.ready()
    return ServiceStatus(
        name="prometheus",
        url=redact_text(settings.prometheus_url),
        managed=False,
        running=ready,
        healthy=ready,
    ).model_dump()


def _deployments(settings: Settings) -> dict[str, object]:
    """Each deployed model's endpoint, champion and last canary (from its status file)."""
    from gantry.stages.canary.state import DeploymentStatus

    out: dict[str, object] = {}
    for path in sorted(settings.deployments_dir.glob("*/status.json")):
        try:
            st = DeploymentStatus.model_validate_json(path.read_bytes())
        except (OSError, ValueError) as exc:
            out[path.parent.name] = {"error": f"unreadable status {path}: {exc}"}
            continue
        out[st.model] = {
            "endpoint": f"http://127.0.0.1:{st.port}" if st.port else None,
            "champion": st.champion.version if st.champion else None,
            "canary": None
            if st.canary is None
            else {"version": st.canary.candidate_version, "phase": st.canary.phase.value},
        }
    return out


def cmd_env(args: argparse.Namespace) -> int:
    from gantry.localenv import services as svc

    settings = get_settings()
    if args.action == "url":
        urls = {
            "hub": settings.hub_url,
            "registry": settings.registry,
            "prefect": os.environ.get("PREFECT_API_URL") or settings.prefect_api_url,
            "prometheus": settings.prometheus_url,
            "state": str(settings.state_dir),
        }
        print(urls[args.name])
        return EXIT_OK
    if args.action == "up":
        from gantry.adapters.docker_engine import connect
        from gantry.localhub.demo import assemble_demo
        from gantry.localhub.store import HubStore

        client = connect(timeout_s=30)
        if settings.registry_is_local:
            log.info("registry: %s", svc.registry_service(settings).start().url)
        if _tracking_is_embedded(settings):
            for service in svc.tracking_services(settings):
                log.info("%s: %s", service.name, service.start().url)
        if not args.no_metrics:
            for service in svc.metrics_services(settings):
                log.info("%s: %s", service.name, service.start().url)
        if not args.no_hub:
            demo = assemble_demo(HubStore(settings.hub_dir / "store"), settings.demo_wheels_dir)
            log.info("demo repository %s ready", demo.repo_id)
            log.info("hub: %s", svc.hub_service(settings).start().url)
        if not args.no_prefect:
            log.info("prefect: %s", _use_prefect(settings, start=True))
        if not args.no_images:
            _ensure_images(client, settings)
        client.close()
    elif args.action == "down":
        # The worker first: it would otherwise lose its server mid-run.
        for factory in (
            svc.worker_service,
            svc.prefect_service,
            svc.hub_service,
            svc.exporter_service,
            svc.prometheus_service,
            # The tracking server before the database it writes to.
            svc.mlflow_server_service,
            svc.postgres_service,
            svc.registry_service,
        ):
            try:
                s = factory(settings)
            except GantryError:
                continue
            s.stop()
            log.info("stopped %s", s.name)
        if settings.deployments_shared:
            # Other hosts deploy through the same engine into that directory: what serves
            # there is not this host's to stop.
            log.info(
                "deployments under %s (GANTRY_DEPLOYMENTS_DIR) are shared and left running",
                settings.deployments_dir,
            )
        else:
            try:
                from gantry.adapters.docker_engine import connect
                from gantry.deploy.docker import remove_deployments

                client = connect(timeout_s=30)
                if n := remove_deployments(client, settings.deployments_dir):
                    log.info("stopped %d deployment container(s); releases start them again", n)
                client.close()
            except GantryError as exc:
                log.warning("deployments left running: %s", exc)
    summary = _env_summary(settings)
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    else:
        for k in (
            "state_dir",
            "topology",
            "prefect_api_url",
            "prefect_ui_url",
            "mlflow_tracking_uri",
            "registry",
            "hub_endpoint",
            "prometheus_url",
        ):
            print(f"{k:<20} {summary[k]}")
        for model, dep in dict(summary["deployments"]).items():  # type: ignore[call-overload]
            print(f"deployment {model:<9} {json.dumps(dep)}")
        for name, st in dict(summary["services"]).items():  # type: ignore[call-overload]
            state = (
                ("healthy" if st.get("healthy") else "down")
                if "error" not in st
                else ("unavailable")
            )
            print(f"service {name:<12} {state}")
        if args.action == "up":
            print(f"\nexport HF_ENDPOINT={settings.hub_url}")
            # The local hub speaks LFS, not Xet; `hf upload` needs this to publish to it.
            print("export HF_HUB_DISABLE_XET=1")
    return EXIT_OK


def cmd_hub(args: argparse.Namespace) -> int:
    from gantry.localhub.store import HubStore

    store = HubStore(get_settings().hub_dir / "store")
    if args.action == "create":
        # The token is printed once and only its sha256 is kept: lose it, create another.
        print(store.create_token(role="write" if args.write else "read", name=args.name))
    elif args.action == "list":
        for t in store.tokens():
            print(f"{t.name:<24} {t.role:<6} {t.created or '-'}")
    else:
        if not store.remove_tokens(args.name):
            print(f"gantry: no hub token is called {args.name!r}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


def _ensure_images(client: object, settings: Settings) -> None:
    from gantry.deploy.docker import ROUTER_IMAGE
    from gantry.localenv.baseimages import RECIPES, ensure_base_image
    from gantry.stages.build import base_images, project_root

    refs: list[str] = [ROUTER_IMAGE]  # the canary router
    for df in sorted((project_root() / "dockerfiles").glob("*/Dockerfile")):
        refs += [r for r in base_images(df.read_text()) if r not in refs]
    for ref in refs:
        if ref not in RECIPES:
            # e.g. vLLM's GPU image: pulled where a registry is reachable, never faked here.
            log.info("base image %s has no local recipe; a release that needs it pulls it", ref)
            continue
        ensure_base_image(ref, docker_client=client, work_dir=settings.base_images_dir, log=log)


def cmd_rollback(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        _use_prefect(settings, start=True)
        from gantry.adapters.prefect_api import local_flow

        rollback = local_flow("rollback")
        result = rollback(args.model, tracking_uri=args.tracking_uri)
    except GantryError as exc:
        print(f"gantry: rollback of {args.model} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(result.model_dump_json(indent=2))
    return EXIT_OK


def cmd_reevaluate(args: argparse.Namespace) -> int:
    """Run flow `reevaluate`; print its report (JSON). 0 only when no model regressed and
    every model could be judged."""
    from gantry.errors import ReevaluationError

    settings = get_settings()
    try:
        _use_prefect(settings, start=True)
        from gantry.adapters.prefect_api import local_flow

        reevaluate = local_flow("reevaluate")
        report = reevaluate(
            args.model or None,
            rollback_on_regression=args.rollback,
            max_scan_age_hours=args.max_scan_age_hours,
            tracking_uri=args.tracking_uri,
            endpoint_attempts=args.endpoint_attempts,
        )
    except ReevaluationError as exc:
        from gantry.stages.reevaluate import ReevaluationReport

        if isinstance(exc.report, ReevaluationReport):
            print(exc.report.model_dump_json(indent=2))
        print(f"gantry: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except GantryError as exc:
        print(f"gantry: re-evaluation failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(report.model_dump_json(indent=2))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from gantry.verify import verify_release

    path = Path(args.record)
    if not path.is_file():
        print(f"gantry: no release record at {path}", file=sys.stderr)
        return EXIT_USAGE
    verified = verify_release(path)
    print(
        f"image    {verified.image}: signature verifies ({verified.image_signer}, "
        f"{verified.image_public_key})"
    )
    print(
        f"weights  {verified.weights_path}: {verified.weights_files} files match manifest "
        f"sha256:{verified.manifest_digest} and signature {verified.weights_signature}"
    )
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from gantry.adapters.model_signing import generate_weights_key
    from gantry.keyring import keys_dir
    from gantry.signing.image import generate_keypair

    dest = Path(args.dir) if args.dir else keys_dir(get_settings())
    pw = os.environ.get(args.password_env, "")
    if not pw:
        log.warning("$%s is unset: the private keys are NOT password-protected", args.password_env)
    dest.mkdir(parents=True, exist_ok=True)
    image_key, image_pub = generate_keypair(dest, pw)
    weights_key, weights_pub = generate_weights_key(dest, pw or None)
    for p in (image_key, image_pub, weights_key, weights_pub):
        print(p)
    return EXIT_OK


def cmd_spec_schema(args: argparse.Namespace) -> int:
    from gantry.spec import ReleaseSpec

    print(json.dumps(ReleaseSpec.model_json_schema(), indent=2))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Prefect server (embedded unless $PREFECT_API_URL), work pool, the deployments of
    prefect.yaml, and a worker; prints the UI URL last."""
    import anyio

    from gantry.localenv.services import worker_name, worker_service

    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: the worker must run at least one flow run")
    settings = get_settings()
    project_dir = Path(os.environ.get("GANTRY_PROJECT_DIR") or Path(__file__).resolve().parents[1])
    # prefect.yaml's pull step changes into it; flow runs share this CLI's state dir.
    os.environ["GANTRY_PROJECT_DIR"] = str(project_dir)
    os.environ["GANTRY_STATE_DIR"] = str(settings.state_dir)
    _use_prefect(settings, start=True)
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    registered = anyio.run(_register_deployments, project_dir, tuple(args.deployment))
    pools = sorted({d.work_pool for d in registered})
    if len(pools) != 1:
        raise ConfigError(
            f"the deployments use {len(pools)} work pools ({', '.join(pools)}); "
            "`gantry serve` runs one local worker",
            fix="choose deployments of one pool with --deployment",
        )
    worker = worker_service(
        settings, pool=pools[0], limit=args.limit, env={"GANTRY_PROJECT_DIR": str(project_dir)}
    )
    worker.start()
    anyio.run(_wait_worker_online, pools[0], worker_name())
    ui_url = PREFECT_UI_URL.value() or str(PREFECT_API_URL.value()).removesuffix("/api")
    for d in registered:
        print(f"deployment {d.full_name:<24} {ui_url}/deployments/deployment/{d.id}")
    print(f"worker     {worker_name():<24} polls {pools[0]}; log {worker.logfile}")
    print(ui_url)
    return EXIT_OK


async def _register_deployments(project_dir: Path, names: tuple[str, ...]) -> list[Any]:
    from prefect.client.orchestration import get_client

    from gantry.adapters.prefect_api import ensure_work_pool, load_project, register_deployments

    project = load_project(project_dir / "prefect.yaml", os.environ)
    pools = {d.work_pool.name for d in project.deployments if not names or d.name in names}
    async with get_client() as client:
        for pool in sorted(pools):
            await ensure_work_pool(client, pool)
        return await register_deployments(client, project_dir, env=os.environ, names=names)


async def _wait_worker_online(pool: str, name: str, timeout_s: float = 60) -> None:
    """Health answers before the worker has reached the server; wait until it has."""
    import anyio
    from prefect.client.orchestration import get_client

    from gantry.adapters.prefect_api import online_workers

    async with get_client() as client:
        with anyio.move_on_after(timeout_s):
            while name not in await online_workers(client, pool):
                await anyio.sleep(0.5)
            return
    raise ServiceError(
        f"worker {name} did not come online in work pool {pool} within {timeout_s:.0f}s",
        fix="read .gantry/services/worker.log; `gantry env down` then `gantry serve` retries",
    )


def cmd_webhook(args: argparse.Namespace) -> int:
    """Serve the CI webhook receiver in the foreground."""
    config_file = args.config or os.environ.get("GANTRY_WEBHOOK_CONFIG")
    serve_webhook(Path(config_file) if config_file else None, args.host, args.port)
    return EXIT_OK


def serve_webhook(config_file: Path | None, host: str, port: int) -> None:
    """The webhook receiver on ``host:port`` until interrupted."""
    import uvicorn

    from gantry.adapters.prefect_api import prefect_starter
    from gantry.webhook.app import create_app
    from gantry.webhook.config import load_secret, load_webhook_config
    from gantry.webhook.store import DeliveryStore

    settings = get_settings()
    config = load_webhook_config(config_file)
    _use_prefect(settings, start=False)
    app = create_app(
        config,
        secret=load_secret(config),
        store=DeliveryStore(settings.webhook_dir / "deliveries.sqlite3"),
        starter=prefect_starter(config.deployment, config.prefect_timeout_s),
    )
    log.info(
        "webhook receiver on http://%s:%d/webhook starts %s (spec root %s, %d GitHub repos)",
        host,
        port,
        config.deployment,
        config.spec_root,
        len(config.github),
    )
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gantry",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("release", help="run a release of the model a spec describes")
    r.add_argument("spec", help="path of the release spec (YAML)")
    r.set_defaults(func=cmd_release)

    e = sub.add_parser("env", help="start, stop or show the embedded services")
    esub = e.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = esub.add_parser(
        "up", help="start registry, metrics, hub and Prefect server; prepare images"
    )
    up.add_argument("--no-hub", action="store_true", help="do not start the local Hub endpoint")
    up.add_argument("--no-prefect", action="store_true", help="do not start a Prefect server")
    up.add_argument(
        "--no-metrics", action="store_true", help="do not start the exporter and Prometheus"
    )
    up.add_argument("--no-images", action="store_true", help="do not prepare base images")
    up.add_argument("--json", action="store_true", help="print the status as JSON")
    down = esub.add_parser("down", help="stop the embedded services (state is kept)")
    down.add_argument("--json", action="store_true", help="print the status as JSON")
    st = esub.add_parser("status", help="show where each service lives and whether it answers")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    url = esub.add_parser("url", help="print one service's address")
    url.add_argument("name", choices=["hub", "registry", "prefect", "prometheus", "state"])
    e.set_defaults(func=cmd_env)

    h = sub.add_parser("hub", help="the local Hub endpoint's tokens")
    hsub = h.add_subparsers(dest="thing", required=True, metavar="THING")
    tok = hsub.add_parser("token", help="create, list or revoke tokens")
    tsub = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = tsub.add_parser("create", help="print a new token (shown once; stored as a hash)")
    create.add_argument("--write", action="store_true", help="may publish (default: read only)")
    create.add_argument("--name", default="cli", help="a label for `list` and `revoke`")
    tsub.add_parser("list", help="names, roles and creation times (never the tokens)")
    revoke = tsub.add_parser("revoke", help="stop accepting the tokens with this name")
    revoke.add_argument("name")
    h.set_defaults(func=cmd_hub)

    rb = sub.add_parser(
        "rollback",
        help="abort a model's canary, or give traffic back to the previous champion",
    )
    rb.add_argument("model", help="the MLflow registered model name (a spec's mlflow.model_name)")
    rb.add_argument("--tracking-uri", help="MLflow tracking URI (default: the champion's spec)")
    rb.set_defaults(func=cmd_rollback)
    rv = sub.add_parser(
        "reevaluate",
        help="re-score the live champions against their accepted scores; exit 1 on a regression",
    )
    rv.add_argument("model", nargs="*", help="MLflow registered model names (default: all)")
    rv.add_argument(
        "--rollback", action="store_true", help="roll a regressed model back to its previous one"
    )
    rv.add_argument(
        "--max-scan-age-hours",
        type=float,
        default=24,
        metavar="H",
        help="re-scan an image whose last scan is older (default 24; 0: always)",
    )
    rv.add_argument(
        "--endpoint-attempts",
        type=int,
        default=3,
        metavar="N",
        help="tries of the eval set while the endpoint is down (default 3), then no verdict",
    )
    rv.add_argument("--tracking-uri", help="MLflow tracking URI (default: the champion's spec)")
    rv.set_defaults(func=cmd_reevaluate)
    v = sub.add_parser("verify", help="re-verify a release's image and weights signatures")
    v.add_argument("record", help="path of the release record (JSON)")
    v.set_defaults(func=cmd_verify)

    k = sub.add_parser("keys", help="signing keys")
    ksub = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    gen = ksub.add_parser("generate", help="create image (cosign) and weights key pairs")
    gen.add_argument("--dir", help="where to write them (default: <state dir>/keys)")
    gen.add_argument(
        "--password-env",
        default="COSIGN_PASSWORD",
        help="variable holding the password for the private keys",
    )
    k.set_defaults(func=cmd_keys)

    s = sub.add_parser("spec-schema", help="print the JSON schema of a release spec")
    s.set_defaults(func=cmd_spec_schema)

    sv = sub.add_parser(
        "serve", help="Prefect server, work pool, prefect.yaml's deployments and a worker"
    )
    sv.add_argument(
        "--deployment",
        action="append",
        default=[],
        metavar="NAME",
        help="register only this deployment of prefect.yaml (repeatable; default: all)",
    )
    sv.add_argument(
        "--limit", type=int, default=1, help="flow runs the worker runs at once (default 1)"
    )
    sv.set_defaults(func=cmd_serve)

    wh = sub.add_parser("webhook", help="the CI webhook receiver")
    whsub = wh.add_subparsers(dest="action", required=True, metavar="ACTION")
    whs = whsub.add_parser(
        "serve",
        help="receive signed deliveries and start `release` runs",
        description="Secret: $GANTRY_WEBHOOK_SECRET, or the Prefect Secret block named by "
        "secret_block in the config. Config: --config or $GANTRY_WEBHOOK_CONFIG (YAML; see "
        "gantry/webhook/config.py). Deliveries are recorded in <state dir>/webhook.",
    )
    whs.add_argument("--config", help="webhook config YAML (default: $GANTRY_WEBHOOK_CONFIG)")
    whs.add_argument("--host", default="127.0.0.1", help="address to listen on")
    whs.add_argument("--port", type=int, default=4280, help="port to listen on (default 4280)")
    wh.set_defaults(func=cmd_webhook)

    from gantry.cli_topology import add_parser as add_topology

    add_topology(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        # Records, keys, tokens and the deployments' controls live under it: the owner's.
        private_dir(get_settings().state_dir, keep_search=True)
        code: int = args.func(args)
    except GantryError as exc:
        print(f"gantry: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, SpecError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("gantry: interrupted", file=sys.stderr)
        return 130
    finally:
        # Exempt what is loaded now (prefect, mlflow, sqlalchemy: millions of objects)
        # from the garbage collection at interpreter exit: it would take ~2 s and frees
        # nothing the process needs; refcounting still frees them.
        gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
