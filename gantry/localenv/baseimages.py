"""Local stand-ins for standard base images, built from Debian packages.

No registry with the official images can be reached here, so ``FROM python:3.11-slim-bookworm``
would fail. :func:`ensure_base_image` makes the tag exist: a real (pulled) image is used as
it is; otherwise the recipe's rootfs is made with ``debootstrap`` from the host's Debian
mirror, trimmed like the official slim images, and ``docker import``-ed under the official
tag with labels that mark it as a stand-in and name the recipe's hash.

The trimmed rootfs tarball is cached under ``work_dir`` by recipe hash, so a fresh Docker
engine re-imports it in seconds without downloading anything.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from pydantic import BaseModel, ConfigDict

from gantry.errors import (
    BaseImageError,
    CommandError,
    DockerUnavailableError,
    GantryError,
    PermanentError,
)
from gantry.localenv.apt import MIRROR_ENV, DebianMirrors, load_mirrors
from gantry.proc import redact_text, run, which

Log = logging.Logger | logging.LoggerAdapter[Any]

LABEL_RECIPE = "org.gantry.base-image.recipe"
LABEL_STANDIN = "org.gantry.base-image.standin"

DEBOOTSTRAP_TIMEOUT_S = 1200.0
_TAR_TIMEOUT_S = 600.0
_SHORT_TIMEOUT_S = 60.0
_DEBOOTSTRAP_HINT = "apt-get install -y debootstrap (or `make system-deps`)"

# Bump when the build steps in this module change in a way the constants hashed into
# recipe_digest() do not capture; that rebuilds every stand-in.
_BUILD_REVISION = 1

# What the official slim images leave out (debuerreotype's slimify lists): removed from
# the rootfs now and written as dpkg path filters so later `apt-get install`s stay slim.
_SLIM_EXCLUDE = (
    "/usr/share/doc/*",
    "/usr/share/groff/*",
    "/usr/share/info/*",
    "/usr/share/linda/*",
    "/usr/share/lintian/overrides/*",
    "/usr/share/locale/*",
    "/usr/share/man/*",
)
_SLIM_INCLUDE = (
    "/usr/share/doc/*/copyright",
    "/usr/share/locale/all_languages",
    "/usr/share/locale/currency/*",
    "/usr/share/locale/l10n/*",
    "/usr/share/locale/languages",
    "/usr/share/locale/locale.alias",
)

# Container-friendly apt/dpkg settings of the official Debian images.
_CONFIG_FILES: dict[str, str] = {
    # Services cannot start during `docker build`; refuse instead of failing oddly.
    "usr/sbin/policy-rc.d": "#!/bin/sh\n# Do not start services inside image builds.\nexit 101\n",
    # A build layer does not survive power loss anyway; skip dpkg's fsyncs.
    "etc/dpkg/dpkg.cfg.d/docker-apt-speedup": "force-unsafe-io\n",
    "etc/dpkg/dpkg.cfg.d/docker": "".join(f"path-exclude {p}\n" for p in _SLIM_EXCLUDE)
    + "".join(f"path-include {p}\n" for p in _SLIM_INCLUDE),
    # Keep package caches out of image layers.
    "etc/apt/apt.conf.d/docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    ),
    "etc/apt/apt.conf.d/docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "etc/apt/apt.conf.d/docker-no-languages": 'Acquire::Languages "none";\n',
    "etc/apt/apt.conf.d/docker-autoremove-suggests": (
        'Apt::AutoRemove::SuggestsImportant "false";\n'
    ),
}

# Deleted (contents only) before the rootfs is packed: downloads, indexes, host and
# build-time state that the official images do not carry.
_EMPTY_DIRS = ("var/lib/apt/lists", "var/cache/apt", "dev", "proc", "sys", "tmp")
_OLD_STATE_GLOBS = ("var/cache/debconf/*-old", "var/lib/dpkg/*-old")
# Copied from the host by debootstrap; Docker bind-mounts its own at run time.
_HOST_FILES = ("etc/hostname", "etc/resolv.conf")

_IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


#: Base of the topology's host image; internal, never pulled (no registry has it).
TOPOLOGY_HOST_BASE = "gantry/topology-host-base:bookworm"


class Recipe(BaseModel):
    """How one stand-in image is made."""

    model_config = ConfigDict(frozen=True)

    ref: str
    suite: str = "bookworm"
    #: Packages added to debootstrap's minbase (it resolves their Depends, not Recommends).
    include: tuple[str, ...] = ()
    #: ``3.11`` gives the official python image's layout: /usr/local/bin links, pip usable.
    python: str | None = None
    cmd: tuple[str, ...] = ("bash",)


RECIPES: dict[str, Recipe] = {
    r.ref: r
    for r in (
        Recipe(ref="debian:bookworm-slim"),
        Recipe(
            ref="python:3.11-slim-bookworm",
            # ca-certificates, netbase and tzdata are in the official image too (TLS,
            # /etc/services, zoneinfo); python3-venv brings ensurepip's bundled wheels.
            include=(
                "python3.11",
                "python3-venv",
                "python3-pip",
                "ca-certificates",
                "netbase",
                "tzdata",
            ),
            python="3.11",
            cmd=("python3",),
        ),
        # The full python image (compilers and headers, what a single-stage Dockerfile needs
        # to build wheels from sdists); only bench/run.py's image-size baseline uses it.
        Recipe(
            ref="python:3.11-bookworm",
            include=(
                "python3.11",
                "python3.11-dev",
                "python3-venv",
                "python3-pip",
                "build-essential",
                "pkg-config",
                "libssl-dev",
                "libffi-dev",
                "zlib1g-dev",
                "git",
                "curl",
                "ca-certificates",
                "netbase",
                "tzdata",
            ),
            python="3.11",
            cmd=("python3",),
        ),
        # The hosts of `gantry topology up`: the control host's services (PostgreSQL, the
        # registry) and a worker's (Prometheus; iptables sends its loopback traffic for the
        # engine's published ports to the engine's host). Gantry itself is installed on it
        # from the project's wheelhouse (dockerfiles/topology).
        Recipe(
            ref=TOPOLOGY_HOST_BASE,
            include=(
                "python3.11",
                "python3-venv",
                "ca-certificates",
                "netbase",
                "tzdata",
                "iptables",
                "postgresql",
                "docker-registry",
                "prometheus",
            ),
            python="3.11",
            cmd=("python3",),
        ),
        # The canary router. The official image keeps its config at this path and runs as
        # user `haproxy`, which Debian's package creates too.
        Recipe(
            ref="haproxy:2.6-bookworm",
            include=("haproxy",),
            cmd=("haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"),
        ),
    )
}


class BaseImageResult(BaseModel):
    """The outcome of :func:`ensure_base_image` for one ref."""

    model_config = ConfigDict(frozen=True)

    ref: str
    image_id: str
    #: False when the image was already there (cached or a real pulled image).
    built: bool
    seconds: float
    #: Whether the image is a local stand-in (False: a real image under the tag).
    standin: bool


class RootfsMeta(BaseModel):
    """What is recorded beside a cached rootfs tarball."""

    rootfs_digest: str
    python_version: str | None
    sources_list: str
    packages: dict[str, str]


def _sha256_json(definition: object) -> str:
    blob = json.dumps(definition, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def rootfs_digest(recipe: Recipe) -> str:
    """sha256 of what defines the recipe's rootfs: the key of the cached tarball.

    The tag and the image config are left out, so a recipe that differs only in those
    (or a test's copy under another tag) reuses the same tarball.
    """
    return _sha256_json(
        {
            "revision": _BUILD_REVISION,
            "recipe": recipe.model_dump(mode="json", exclude={"ref", "cmd"}),
            "config_files": _CONFIG_FILES,
            "empty_dirs": _EMPTY_DIRS,
            "host_files": _HOST_FILES,
        }
    )


def recipe_digest(recipe: Recipe) -> str:
    """sha256 of the whole recipe definition: the image's ``org.gantry.base-image.recipe``."""
    return _sha256_json(
        {
            "rootfs": rootfs_digest(recipe),
            "recipe": recipe.model_dump(mode="json"),
            "changes": import_changes(recipe, "", None),
        }
    )


def normalize_ref(ref: str) -> str:
    """``ref`` without Docker Hub's implicit prefixes (``docker.io/library/python:…``)."""
    for prefix in ("docker.io/library/", "index.docker.io/library/", "library/"):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return ref


def split_ref(ref: str) -> tuple[str, str]:
    """``repo:tag`` → (repo, tag); the tag defaults to ``latest``."""
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


def installed_packages(dpkg_status: str) -> dict[str, str]:
    """Package → version of the installed packages in a dpkg ``status`` file."""
    out: dict[str, str] = {}
    for stanza in dpkg_status.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            name, sep, value = line.partition(":")
            if sep and not line.startswith((" ", "\t")):
                fields[name] = value.strip()
        if fields.get("Status") == "install ok installed" and "Package" in fields:
            out[fields["Package"]] = fields.get("Version", "")
    return out


def upstream_version(debian_version: str) -> str:
    """``3.11.2-6+deb12u6`` → ``3.11.2`` (epoch and Debian revision dropped)."""
    version = debian_version.split(":", 1)[-1]
    match = re.match(r"\d+(\.\d+)*", version)
    return match.group(0) if match else version


def import_changes(recipe: Recipe, digest: str, python_version: str | None) -> list[str]:
    """The ``docker import --change`` lines that give the image its official config."""
    changes = [f"ENV PATH={_IMAGE_PATH}", "ENV LANG=C.UTF-8"]
    if python_version:
        changes.append(f"ENV PYTHON_VERSION={python_version}")
    changes += [
        f"CMD {json.dumps(list(recipe.cmd))}",
        f"LABEL {LABEL_RECIPE}={digest}",
        f"LABEL {LABEL_STANDIN}=true",
    ]
    return changes


# --- public API ---------------------------------------------------------------------------


def default_work_dir() -> Path:
    """Where rootfs tarballs are cached by default: the settings' ``base_images_dir``.

    Everything that builds stand-ins must share it: its lock is what keeps two processes
    from building the same image at once.
    """
    from gantry.settings import get_settings

    return get_settings().base_images_dir


def ensure_base_image(
    ref: str, *, docker_client: docker.DockerClient, work_dir: Path, log: Log
) -> BaseImageResult:
    """Make sure the image ``ref`` exists in the engine, building a stand-in when missing.

    A real image under the tag is left alone; a stand-in of an older recipe is rebuilt.
    Raises :class:`BaseImageError` for a ref without a recipe or a failed build,
    ToolNotFoundError when debootstrap is missing.
    """
    started = time.monotonic()
    ref = normalize_ref(ref)
    recipe = RECIPES.get(ref)
    digest = recipe_digest(recipe) if recipe else None

    def current(*, announce: bool) -> BaseImageResult | None:
        image = _get_image(docker_client, ref)
        if image is None:
            return None
        labels: dict[str, str] = image.labels or {}
        standin = labels.get(LABEL_STANDIN) == "true"
        if standin and digest is not None and labels.get(LABEL_RECIPE) != digest:
            if announce:
                log.info("base image %s: stand-in of an older recipe, rebuilding", ref)
            return None
        return BaseImageResult(
            ref=ref,
            image_id=image.id,
            built=False,
            seconds=round(time.monotonic() - started, 3),
            standin=standin,
        )

    if (found := current(announce=False)) is not None:
        log.debug("base image %s: present (%s)", ref, found.image_id[:19])
        return found
    if recipe is None or digest is None:
        known = ", ".join(sorted(RECIPES))
        raise BaseImageError(
            f"base image {ref!r} is not in the local Docker engine and Gantry has no recipe "
            f"to build a stand-in for it (recipes: {known})",
            fix=f"`docker pull {ref}` (or `docker load` it) where a registry is reachable, "
            "or add a Recipe to gantry.localenv.baseimages.RECIPES",
        )

    work_dir = work_dir.expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    with _locked(work_dir / ".lock", log):
        # Another process may have built it while this one waited for the lock.
        if (found := current(announce=True)) is not None:
            return found
        _sweep_stale_tmp(work_dir, log)
        tarball, meta = _ensure_rootfs(recipe, work_dir, log)
        image_id = _import(docker_client, recipe, digest, tarball, meta, log)
    seconds = round(time.monotonic() - started, 3)
    log.info("base image %s: ready as %s in %.1fs", ref, image_id[:19], seconds)
    return BaseImageResult(ref=ref, image_id=image_id, built=True, seconds=seconds, standin=True)


def ensure_base_images(
    refs: Sequence[str],
    *,
    docker_client: docker.DockerClient,
    work_dir: Path | None = None,
    log: Log | None = None,
) -> list[BaseImageResult]:
    """:func:`ensure_base_image` for each of ``refs``, in order (the default: all recipes)."""
    logger = log or logging.getLogger(__name__)
    where = work_dir or default_work_dir()
    return [
        ensure_base_image(ref, docker_client=docker_client, work_dir=where, log=logger)
        for ref in (refs or sorted(RECIPES))
    ]


# --- docker ------------------------------------------------------------------------------


def _get_image(client: docker.DockerClient, ref: str) -> Any:
    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise DockerUnavailableError(
            f"cannot inspect image {ref}: {redact_text(str(exc))[:300]}"
        ) from None


def _import(
    client: docker.DockerClient,
    recipe: Recipe,
    digest: str,
    tarball: Path,
    meta: RootfsMeta,
    log: Log,
) -> str:
    old = _get_image(client, recipe.ref)
    repo, tag = split_ref(recipe.ref)
    t0 = time.monotonic()
    try:
        client.api.import_image(
            src=str(tarball),
            repository=repo,
            tag=tag,
            changes=import_changes(recipe, digest, meta.python_version),
        )
        image = client.images.get(recipe.ref)
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise BaseImageError(
            f"docker import of {tarball} as {recipe.ref} failed: {redact_text(str(exc))[:500]}",
            fix="check the engine's storage has space (`docker system df`); delete the "
            "tarball to rebuild it",
        ) from None
    log.info("base image %s: imported in %.1fs", recipe.ref, time.monotonic() - t0)
    if old is not None and old.id != image.id:
        # The superseded stand-in is now untagged; drop it unless a container uses it.
        try:
            client.images.remove(old.id)
        except docker.errors.APIError as exc:
            log.info("base image %s: kept old image %s (%s)", recipe.ref, old.id[:19], exc)
    return str(image.id)


# --- rootfs ------------------------------------------------------------------------------


def _ensure_rootfs(recipe: Recipe, work_dir: Path, log: Log) -> tuple[Path, RootfsMeta]:
    digest = rootfs_digest(recipe)
    cache = work_dir / f"rootfs-{digest[:16]}"
    tarball, meta_file = cache / "rootfs.tar", cache / "meta.json"
    mirrors: DebianMirrors | None = None
    if tarball.is_file() and meta_file.is_file():
        try:
            cached: RootfsMeta | None = RootfsMeta.model_validate_json(meta_file.read_text())
        except ValueError:
            cached = None
        if cached is not None and cached.rootfs_digest == digest:
            try:
                mirrors = load_mirrors(recipe.suite)
            except GantryError:
                # No mirror configured now: the cached rootfs is still good to import.
                return tarball, cached
            if mirrors.sources_list() == cached.sources_list:
                log.info("base image %s: reusing cached rootfs %s", recipe.ref, tarball)
                return tarball, cached
            log.info("base image %s: the host's Debian mirror changed, rebuilding", recipe.ref)

    debootstrap = which("debootstrap", env_var=None, install_hint=_DEBOOTSTRAP_HINT)
    if mirrors is None:
        mirrors = load_mirrors(recipe.suite)
    if os.geteuid() != 0:
        raise BaseImageError(
            f"building the stand-in for {recipe.ref} needs root (debootstrap creates device "
            "nodes and chroots)",
            fix=f"run as root (e.g. `sudo make base-images`), or `docker pull {recipe.ref}` / "
            "`docker load` it",
        )
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=work_dir))
    try:
        rootfs = tmp / "rootfs"
        _debootstrap(debootstrap, recipe, mirrors, rootfs, work_dir, log)
        meta = _finish_rootfs(recipe, digest, mirrors, rootfs)
        t0 = time.monotonic()
        packed = tmp / "rootfs.tar"
        tar = which("tar", env_var=None, install_hint="apt-get install -y tar")
        run([tar, "--numeric-owner", "-C", rootfs, "-cf", packed, "."], timeout_s=_TAR_TIMEOUT_S)
        (tmp / "meta.json").write_text(meta.model_dump_json(indent=2) + "\n")
        log.info("base image %s: packed rootfs in %.1fs", recipe.ref, time.monotonic() - t0)
        cache.mkdir(exist_ok=True)
        # Same filesystem, so each rename is atomic; meta.json last marks the pair complete.
        meta_file.unlink(missing_ok=True)
        (tmp / "rootfs.tar").replace(tarball)
        (tmp / "meta.json").replace(meta_file)
    finally:
        _remove_tree(tmp, log)
    return tarball, meta


def _debootstrap(
    debootstrap: Path,
    recipe: Recipe,
    mirrors: DebianMirrors,
    rootfs: Path,
    work_dir: Path,
    log: Log,
) -> None:
    debs = work_dir / "debs"
    debs.mkdir(exist_ok=True)
    argv: list[str | os.PathLike[str]] = [
        debootstrap,
        "--variant=minbase",
        # Downloaded .debs are kept, so a recipe change re-downloads only what changed.
        f"--cache-dir={debs}",
    ]
    if recipe.include:
        argv.append(f"--include={','.join(recipe.include)}")
    argv += [recipe.suite, rootfs, mirrors.archive]
    log.info(
        "base image %s: debootstrap %s (%d extra packages) from %s; this takes minutes",
        recipe.ref,
        recipe.suite,
        len(recipe.include),
        redact_text(mirrors.archive),
    )
    t0 = time.monotonic()
    try:
        run(argv, timeout_s=DEBOOTSTRAP_TIMEOUT_S, env={"DEBIAN_FRONTEND": "noninteractive"})
    except CommandError as exc:
        saved = work_dir / f"{_slug(recipe.ref)}.debootstrap.log"
        detail = rootfs / "debootstrap" / "debootstrap.log"
        if detail.is_file():
            saved.write_bytes(detail.read_bytes())
        raise BaseImageError(
            f"debootstrap for {recipe.ref} failed: {exc.stderr_tail.strip()[-600:]}",
            fix=f"read {saved}; check the mirror is reachable or set {MIRROR_ENV} to "
            f"another; or `docker pull {recipe.ref}` where a registry is reachable",
        ) from None
    log.info("base image %s: debootstrap done in %.0fs", recipe.ref, time.monotonic() - t0)


def _finish_rootfs(recipe: Recipe, digest: str, mirrors: DebianMirrors, rootfs: Path) -> RootfsMeta:
    """Trim the rootfs like the slim images and give it the official layout."""
    if mounted := _mounts_under(rootfs):
        # debootstrap unmounts on exit; if it could not, packing /proc would be wrong.
        raise BaseImageError(
            f"filesystems are still mounted in the new rootfs: {', '.join(mounted)}",
            fix="unmount them (`umount -R <dir>`) and re-run",
        )
    for rel, text in _CONFIG_FILES.items():
        path = rootfs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if rel.startswith("usr/sbin/") else 0o644)
    sources = mirrors.sources_list()
    (rootfs / "etc/apt/sources.list").write_text(sources)
    _slim(rootfs)
    for rel in _EMPTY_DIRS:
        _empty_dir(rootfs / rel)
    (rootfs / "tmp").chmod(0o1777)
    for pattern in _OLD_STATE_GLOBS:
        for path in rootfs.glob(pattern):
            path.unlink()
    for rel in _HOST_FILES:
        (rootfs / rel).write_text("")
    _clear_logs(rootfs / "var/log")

    packages = installed_packages((rootfs / "var/lib/dpkg/status").read_text())
    python_version: str | None = None
    if recipe.python:
        python_version = _python_layout(rootfs, recipe.python, packages)
    return RootfsMeta(
        rootfs_digest=digest,
        python_version=python_version,
        sources_list=sources,
        packages=packages,
    )


def _python_layout(rootfs: Path, minor: str, packages: dict[str, str]) -> str:
    """The official python image's entry points, and pip allowed to install system-wide."""
    pkg = f"python{minor}"
    if pkg not in packages:
        raise BaseImageError(
            f"{pkg} is not installed in the rootfs",
            fix=f"add {pkg} to the recipe's include list",
        )
    # PEP 668 marker: the official image (its own CPython in /usr/local) has none, and
    # Dockerfiles written for it run `pip install` without --break-system-packages.
    (rootfs / f"usr/lib/python{minor}/EXTERNALLY-MANAGED").unlink(missing_ok=True)
    links = {
        f"python{minor}": f"/usr/bin/python{minor}",
        "python3": f"/usr/bin/python{minor}",
        "python": f"/usr/bin/python{minor}",
        f"pip{minor}": "/usr/bin/pip3",
        "pip3": "/usr/bin/pip3",
        "pip": "/usr/bin/pip3",
    }
    bindir = rootfs / "usr/local/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        link = bindir / name
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return upstream_version(packages[pkg])


def _slim(rootfs: Path) -> None:
    includes = [p.lstrip("/") for p in _SLIM_INCLUDE]
    for pattern in _SLIM_EXCLUDE:
        top = rootfs / pattern.lstrip("/").removesuffix("/*")
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(top, topdown=False):
            here = Path(dirpath)
            for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
                path = here / name
                rel = path.relative_to(rootfs).as_posix()
                if not any(fnmatch.fnmatchcase(rel, inc) for inc in includes):
                    path.unlink()
            if here != top and not any(here.iterdir()):
                here.rmdir()


def _empty_dir(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            _empty_dir(child)
            child.rmdir()
        else:
            child.unlink()


def _clear_logs(logdir: Path) -> None:
    # Logs of the build itself go; the login-accounting files (wtmp, lastlog…) the official
    # images ship stay, emptied.
    if not logdir.is_dir():
        return
    for path in sorted(logdir.rglob("*"), reverse=True):
        if path.is_symlink() or not path.is_file():
            continue
        if path.suffix == ".log" or path.parent != logdir:
            path.unlink()
        else:
            path.write_bytes(b"")


def _slug(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", ref)


# --- locking and cleanup -----------------------------------------------------------------


@contextmanager
def _locked(path: Path, log: Log) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("base images: another process is building in %s; waiting", path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    prefix = str(root.resolve())
    found: list[str] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        # mountinfo escapes space, tab, newline and backslash as octal.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path, log: Log) -> None:
    """Delete a build directory, unmounting what debootstrap may have left mounted first.

    A killed debootstrap leaves /proc (and possibly device binds) mounted in the target;
    deleting through them would delete host files, so nothing is deleted while any
    mount remains.
    """
    if not path.exists():
        return
    umount = which("umount", env_var=None, install_hint="apt-get install -y mount")
    for point in _mounts_under(path):
        if run([umount, point], timeout_s=_SHORT_TIMEOUT_S, check=False).returncode != 0:
            run([umount, "-l", point], timeout_s=_SHORT_TIMEOUT_S, check=False)
    if left := _mounts_under(path):
        log.error("base images: not deleting %s, still mounted: %s", path, ", ".join(left))
        return
    rm = which("rm", env_var=None, install_hint="apt-get install -y coreutils")
    # --one-file-system as a second guard against crossing into a mount.
    run([rm, "-rf", "--one-file-system", path], timeout_s=_TAR_TIMEOUT_S, check=False)


def _sweep_stale_tmp(work_dir: Path, log: Log) -> None:
    # Only called under the lock: any .tmp-* left is from a process that died mid-build.
    for stale in work_dir.glob(".tmp-*"):
        log.info("base images: removing %s left by an interrupted build", stale)
        _remove_tree(stale, log)


# --- command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gantry.localenv.baseimages [REF...]``: ensure the refs (default: all)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("refs", nargs="*", help=f"images to ensure (default: {sorted(RECIPES)})")
    parser.add_argument("--work-dir", type=Path, default=None, help="rootfs cache directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        try:
            client = docker.from_env()
            client.ping()
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise DockerUnavailableError(
                f"cannot reach the Docker engine: {redact_text(str(exc))[:300]}"
            ) from None
        results = ensure_base_images(args.refs, docker_client=client, work_dir=args.work_dir)
    except PermanentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for r in results:
        state = "built" if r.built else "present"
        kind = "stand-in" if r.standin else "real image"
        print(f"{r.ref}\t{r.image_id}\t{state}\t{kind}\t{r.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
