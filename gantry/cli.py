"""The `gantry` command line.

    gantry release SPEC.yaml     run a release; the last line printed is the record's path
    gantry verify RECORD         re-verify the image and weights signatures of a release
    gantry keys generate         create signing key pairs
    gantry env up|down|status    the embedded services (registry, hub, Prefect server)
    gantry spec-schema           the JSON schema of a release spec

Exit codes: 0 success, 1 a stage or the environment failed, 2 invalid input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gantry.errors import GantryError, SpecError
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
    for noisy in ("httpx", "httpcore", "urllib3", "docker", "filelock"):
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

    from flows.release import release

    path = record_path(settings.releases_dir, spec.release_id)
    try:
        release(spec)
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
        hub_service,
        prefect_service,
        registry_service,
    )

    services: dict[str, object] = {}
    for factory in (registry_service, hub_service, prefect_service):
        try:
            services[factory.__name__.removesuffix("_service")] = (
                factory(settings).status().model_dump()
            )
        except GantryError as exc:
            services[factory.__name__.removesuffix("_service")] = {"error": str(exc)}
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
        "prefect_api_url": os.environ.get("PREFECT_API_URL") or settings.prefect_api_url,
        "prefect_ui_url": (
            os.environ.get("PREFECT_API_URL") or settings.prefect_api_url
        ).removesuffix("/api"),
        "mlflow_tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{settings.state_dir / 'mlflow' / 'mlflow.db'}",
        "registry": settings.registry,
        "registry_embedded": settings.registry_is_local,
        "hub_endpoint": settings.hub_url,
        "docker": docker_info,
        "services": services,
    }


def cmd_env(args: argparse.Namespace) -> int:
    from gantry.localenv import services as svc

    settings = get_settings()
    if args.action == "url":
        urls = {
            "hub": settings.hub_url,
            "registry": settings.registry,
            "prefect": os.environ.get("PREFECT_API_URL") or settings.prefect_api_url,
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
        for factory in (svc.prefect_service, svc.hub_service, svc.registry_service):
            try:
                s = factory(settings)
            except GantryError:
                continue
            s.stop()
            log.info("stopped %s", s.name)
    summary = _env_summary(settings)
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    else:
        for k in (
            "state_dir",
            "prefect_api_url",
            "prefect_ui_url",
            "mlflow_tracking_uri",
            "registry",
            "hub_endpoint",
        ):
            print(f"{k:<20} {summary[k]}")
        for name, st in dict(summary["services"]).items():  # type: ignore[call-overload]
            state = (
                ("healthy" if st.get("healthy") else "down")
                if "error" not in st
                else ("unavailable")
            )
            print(f"service {name:<12} {state}")
        if args.action == "up":
            print(f"\nexport HF_ENDPOINT={settings.hub_url}")
    return EXIT_OK


def _ensure_images(client: object, settings: Settings) -> None:
    from gantry.localenv.baseimages import RECIPES, ensure_base_image
    from tasks.build import base_images, project_root

    refs: list[str] = []
    for df in sorted((project_root() / "dockerfiles").glob("*/Dockerfile")):
        refs += [r for r in base_images(df.read_text()) if r not in refs]
    for ref in refs:
        if ref not in RECIPES:
            # e.g. vLLM's GPU image: pulled where a registry is reachable, never faked here.
            log.info("base image %s has no local recipe; a release that needs it pulls it", ref)
            continue
        ensure_base_image(ref, docker_client=client, work_dir=settings.base_images_dir, log=log)


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
    up = esub.add_parser("up", help="start registry, hub and Prefect server; prepare images")
    up.add_argument("--no-hub", action="store_true", help="do not start the local Hub endpoint")
    up.add_argument("--no-prefect", action="store_true", help="do not start a Prefect server")
    up.add_argument("--no-images", action="store_true", help="do not prepare base images")
    up.add_argument("--json", action="store_true", help="print the status as JSON")
    down = esub.add_parser("down", help="stop the embedded services (state is kept)")
    down.add_argument("--json", action="store_true", help="print the status as JSON")
    st = esub.add_parser("status", help="show where each service lives and whether it answers")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    url = esub.add_parser("url", help="print one service's address")
    url.add_argument("name", choices=["hub", "registry", "prefect", "state"])
    e.set_defaults(func=cmd_env)

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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        code: int = args.func(args)
    except GantryError as exc:
        print(f"gantry: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, SpecError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("gantry: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
