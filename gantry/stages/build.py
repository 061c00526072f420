"""Stage `build`: the runtime image, built from an assembled context, pushed, by digest.

The stage's contract (:class:`BuildResult`, :class:`Layer`), its checks (no weights in the
context, the image policy) and :func:`run` live here; the Prefect task and its layers
artifact are :mod:`tasks.build`.

The context is assembled by this stage (Dockerfile, hash-locked requirements, a host-side
wheelhouse, server code) and refused if it would carry weights: they are mounted read-only
at run time, never baked in. The image is keyed by the context digest and its labels, so a
re-run with the same inputs finds the pushed image and builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

import gantry
from gantry.adapters import docker_engine
from gantry.adapters.registry import RegistryClient
from gantry.atomicfile import link_or_copy
from gantry.errors import BaseImageError, BuildError, ConfigError, WeightsInContextError
from gantry.manifest import WeightsManifest, sha256_file
from gantry.scratch import scratch_dir
from gantry.settings import Settings
from gantry.spec import ReleaseSpec
from gantry.stages.weights import WeightsResult
from gantry.wheelhouse import Wheelhouse, context_lock, load_source_builds, parse_lock

log = logging.getLogger("gantry.build")

#: File types that hold model weights; none may enter an image.
WEIGHT_SUFFIXES = frozenset(
    {
        ".onnx",
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".ggml",
        ".h5",
        ".msgpack",
        ".tflite",
        ".pb",
        ".npz",
        ".mlmodel",
        ".engine",
        ".plan",
    }
)
#: Anything this big that is not a wheel is suspicious in a runtime context.
MAX_CONTEXT_FILE_BYTES = 64 << 20
_FROM = re.compile(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", re.I | re.M)


class Layer(BaseModel):
    """One image layer, as `docker history` shows it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size_bytes: int
    created_by: str


class BuildResult(BaseModel):
    """The runtime image, pushed, and known by digest from here on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(description="<registry>/<repository>@sha256:…, the immutable reference.")
    digest: str
    repository: str = Field(description="<registry>/<repository>")
    tag: str
    image_id: str
    context_digest: str = Field(description="sha256 of the build context (files and modes).")
    dockerfile: str
    base_images: tuple[str, ...]
    size_bytes: int
    layers: tuple[Layer, ...]
    labels: dict[str, str]
    build_seconds: float
    cached: bool = Field(description="True when an image for this context was already pushed.")


def project_root() -> Path:
    return Path(gantry.__file__).resolve().parent.parent


def runtime_dir(spec: ReleaseSpec) -> Path:
    """The runtime directory named by the spec: absolute, else under CWD or the project."""
    p = Path(spec.runtime.dockerfile_dir)
    for cand in [p] if p.is_absolute() else [Path.cwd() / p, project_root() / p]:
        if (cand / "Dockerfile").is_file():
            return cand.resolve()
    raise ConfigError(
        f"no Dockerfile in runtime directory {spec.runtime.dockerfile_dir!r}",
        fix="set runtime.dockerfile_dir to a directory holding a Dockerfile, "
        "requirements.txt and server/",
    )


def base_images(dockerfile_text: str) -> list[str]:
    """External images the Dockerfile builds FROM (stage names excluded), in order."""
    stages: set[str] = set()
    out: list[str] = []
    for m in _FROM.finditer(dockerfile_text):
        ref, alias = m[1], m[2]
        if ref.lower() not in stages and ref != "scratch" and ref not in out:
            out.append(ref)
        if alias:
            stages.add(alias.lower())
    return out


def check_no_weights(context: Path, weights: WeightsManifest | None) -> None:
    """Refuse a context that would copy model weights into the image."""
    weight_shas = {e.sha256: e.path for e in weights.files} if weights else {}
    # Hash only files whose size matches a weight file: a renamed copy still has its size.
    weight_sizes = {e.size for e in weights.files if e.size > 0} if weights else set()
    for p in sorted(context.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(context)
        fix = (
            f"remove {rel} from the runtime directory (or exclude it in .dockerignore): "
            "weights are mounted read-only at run time, never baked into the image"
        )
        if p.suffix.lower() in WEIGHT_SUFFIXES:
            raise WeightsInContextError(f"the build context holds a weights file: {rel}", fix=fix)
        size = p.stat().st_size
        if size > MAX_CONTEXT_FILE_BYTES and p.suffix != ".whl":
            raise WeightsInContextError(
                f"the build context holds {rel} ({size / 2**20:.0f} MiB), too big for runtime "
                "code; it looks like weights",
                fix=fix,
            )
        if size in weight_sizes:
            digest = sha256_file(p)
            if digest in weight_shas:
                raise WeightsInContextError(
                    f"{rel} in the build context is the weights file {weight_shas[digest]}", fix=fix
                )


def context_digest(context: Path) -> str:
    """sha256 over every file's relative path, exec bit and content, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(context.rglob("*")):
        if p.is_file():
            mode = "x" if p.stat().st_mode & stat.S_IXUSR else "-"
            h.update(f"{p.relative_to(context).as_posix()}\0{mode}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def _dockerignored(rt: Path) -> list[str]:
    ignore = rt / ".dockerignore"
    if not ignore.is_file():
        return []
    return [
        ln.strip()
        for ln in ignore.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]


def assemble_context(
    rt: Path, wheels: Sequence[Path], dest: Path, *, lock_text: str | None = None
) -> None:
    """Lay out the build context: Dockerfile, lock, .dockerignore, server/, wheelhouse/.

    ``lock_text`` replaces the runtime's requirements.txt (pins of wheels compiled here).
    """
    dest.mkdir(parents=True)
    for name in ("Dockerfile", "requirements.txt", ".dockerignore"):
        if (rt / name).is_file():
            shutil.copy2(rt / name, dest / name)
    if lock_text is not None:
        (dest / "requirements.txt").write_text(lock_text)
    if (rt / "server").is_dir():
        shutil.copytree(
            rt / "server",
            dest / "server",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*cache"),
        )
    if wheels:
        wh = dest / "wheelhouse"
        wh.mkdir()
        for w in wheels:
            link_or_copy(w, wh / w.name)


def prepare_context(rt: Path, settings: Settings, arch: str, dest: Path) -> None:
    """The runtime's wheels (downloaded, or compiled once where it says so) and its build
    context at ``dest``."""
    lock = rt / "requirements.txt"
    # A runtime built on a prebuilt serving image (vLLM, TEI) has no Python lock of its own.
    if not lock.is_file():
        assemble_context(rt, [], dest)
        return
    source_builds = load_source_builds(rt)
    wheels = Wheelhouse(settings.wheelhouse_dir, settings.built_wheels_dir).ensure(
        lock, python_version="3.11", arch=arch, source_builds=source_builds
    )
    pins = parse_lock(lock.read_text())
    compiled = {r.name: w for r, w in zip(pins, wheels, strict=True) if r.name in source_builds}
    lock_text = context_lock(lock.read_text(), compiled) if compiled else None
    assemble_context(rt, wheels, dest, lock_text=lock_text)


def image_labels(spec: ReleaseSpec, weights: WeightsResult, ctx_digest: str) -> dict[str, str]:
    return {
        "org.opencontainers.image.title": f"gantry/{spec.name}",
        "org.opencontainers.image.description": f"{spec.runtime.protocol.value} runtime for "
        f"{weights.repo_id}; weights are mounted at /models, not included",
        "org.opencontainers.image.version": weights.commit[:12],
        "ai.gantry.weights.manifest-digest": f"sha256:{weights.manifest_digest}",
        "ai.gantry.weights.uri": weights.uri,
        "ai.gantry.runtime.protocol": spec.runtime.protocol.value,
        "ai.gantry.context-digest": f"sha256:{ctx_digest}",
        "ai.gantry.model": spec.name,
    }


def check_image_policy(config: dict[str, object], image: str) -> None:
    """The production stage must run as non-root and carry a healthcheck with a start period."""
    user = str(config.get("User") or "")
    if user.split(":")[0] in ("", "root", "0"):
        raise BuildError(
            f"{image} runs as root (USER is {user or 'unset'})",
            fix="add a non-root `USER <uid>:<gid>` to the Dockerfile's last stage",
        )
    hc = config.get("Healthcheck")
    if not isinstance(hc, dict) or not hc.get("Test") or hc["Test"][0] == "NONE":
        raise BuildError(
            f"{image} has no HEALTHCHECK",
            fix="add `HEALTHCHECK --start-period=... CMD ...` to the Dockerfile",
        )
    if not hc.get("StartPeriod"):
        raise BuildError(
            f"{image} has a HEALTHCHECK without a start period",
            fix="add --start-period (at least 2x the model's measured cold start)",
        )


def _ensure_base_images(
    client: docker_engine.DockerClient, refs: Iterable[str], settings: Settings
) -> None:
    from gantry.localenv import baseimages

    mode = os.environ.get("GANTRY_BASE_IMAGES", "auto")
    for ref in refs:
        if docker_engine.image_exists(client, ref):
            continue
        if mode in ("auto", "pull") and docker_engine.pull(client, ref, timeout_s=300):
            log.info("pulled base image %s", ref)
            continue
        if mode == "pull":
            raise BaseImageError(
                f"base image {ref} could not be pulled",
                fix="check registry access, or set GANTRY_BASE_IMAGES=auto to "
                "build a local stand-in from Debian packages",
            )
        log.info("base image %s cannot be pulled; building a local stand-in", ref)
        baseimages.ensure_base_image(
            ref, docker_client=client, work_dir=settings.base_images_dir, log=log
        )


def _append_labels(dockerfile: Path, labels: dict[str, str]) -> None:
    """Add the release's labels as ONE instruction at the end of the Dockerfile.

    docker-py's ``labels=`` becomes one LABEL step per label, each a layer commit (seconds
    apiece on slow storage drivers); one line costs one step and keeps every earlier layer
    cacheable across weights revisions.
    """
    text = dockerfile.read_text().rstrip("\n")
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    dockerfile.write_text(f"{text}\n# Added by gantry's build stage:\nLABEL {pairs}\n")


def _labels_key(ctx_digest: str, labels: dict[str, str], target: str) -> str:
    blob = json.dumps({"ctx": ctx_digest, "labels": labels, "target": target}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def run(
    spec: ReleaseSpec,
    weights: WeightsResult,
    settings: Settings,
    client: docker_engine.DockerClient | None = None,
) -> BuildResult:
    """Assemble the context, build (or find) the image, push it, return it by digest."""
    t0 = time.monotonic()
    rt = runtime_dir(spec)
    dockerfile_text = (rt / "Dockerfile").read_text()
    bases = base_images(dockerfile_text)
    manifest = WeightsManifest.model_validate_json(Path(weights.manifest_path).read_bytes())
    check_no_weights(rt, manifest)  # fail before spending minutes on wheels

    client = client or docker_engine.connect(settings.docker_timeout_s)
    arch = {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        str(client.info().get("Architecture")), "x86_64"
    )
    # A scratch dir, so a run killed mid-build leaves no context behind for good.
    with scratch_dir(settings.build_dir, "ctx-") as work:
        ctx = work / "context"
        prepare_context(rt, settings, arch, ctx)
        check_no_weights(ctx, manifest)
        digest_ctx = context_digest(ctx)
        labels = image_labels(spec, weights, digest_ctx)
        key = _labels_key(digest_ctx, labels, spec.build.target)
        repository = f"{settings.registry}/{spec.image_repository}"
        tag = f"build-{key}"
        registry = RegistryClient(settings.registry)
        try:
            pushed = registry.manifest_digest(spec.image_repository, tag)
        finally:
            registry.close()

        cached = pushed is not None
        if cached:
            log.info(
                "image for context %s already pushed as %s:%s", digest_ctx[:12], repository, tag
            )
            if not docker_engine.image_exists(client, f"{repository}:{tag}"):
                docker_engine.pull(client, f"{repository}:{tag}", timeout_s=spec.build.timeout_s)
            image_id = client.images.get(f"{repository}:{tag}").id
            digest = pushed
        else:
            _ensure_base_images(client, bases, settings)
            log.info("building %s:%s (context %s)", repository, tag, digest_ctx[:12])
            _append_labels(ctx / "Dockerfile", labels)
            image_id = docker_engine.build(
                client,
                ctx,
                tag=f"{repository}:{tag}",
                target=spec.build.target,
                labels={},
                timeout_s=spec.build.timeout_s,
                nocache=os.environ.get("GANTRY_BUILD_NO_CACHE") == "1",
            )
        config = client.api.inspect_image(image_id)["Config"]
        check_image_policy(config, f"{repository}:{tag}")
        if not cached:
            log.info("pushing %s:%s", repository, tag)
            digest = docker_engine.push(client, repository, tag, timeout_s=spec.build.timeout_s)

    result = BuildResult(
        image=f"{repository}@{digest}",
        digest=digest,
        repository=repository,
        tag=tag,
        image_id=image_id,
        context_digest=f"sha256:{digest_ctx}",
        dockerfile=str(rt / "Dockerfile"),
        base_images=tuple(bases),
        size_bytes=docker_engine.image_size(client, image_id),
        layers=tuple(docker_engine.layers(client, image_id)),
        labels=dict(config.get("Labels") or {}),
        build_seconds=round(time.monotonic() - t0, 2),
        cached=cached,
    )
    log.info("image %s (%.1f MiB)", result.image, result.size_bytes / 2**20)
    return result
