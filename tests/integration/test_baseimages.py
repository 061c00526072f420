"""Local stand-ins for the standard base images, against the real Docker engine.

The first test builds ``python:3.11-slim-bookworm`` for real when neither the image nor
its cached rootfs tarball exists (debootstrap: a minute or more). The image is left in
place for the other tests and the demo. Delete the cache (``Settings.base_images_dir``)
and the image to exercise the full build again.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from gantry.errors import BaseImageError, ToolNotFoundError
from gantry.localenv import baseimages
from gantry.localenv.apt import DebianMirrors
from gantry.localenv.baseimages import (
    LABEL_RECIPE,
    LABEL_STANDIN,
    BaseImageResult,
    Recipe,
    RootfsMeta,
    default_work_dir,
    ensure_base_image,
    ensure_base_images,
    recipe_digest,
    rootfs_digest,
)
from gantry.proc import run

pytestmark = pytest.mark.integration

REF = "python:3.11-slim-bookworm"
TEST_REPO = "gantry-test/baseimage"
log = logging.getLogger("test_baseimages")


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    c = docker.from_env(timeout=600)
    c.ping()
    yield c
    for image in c.images.list(name=TEST_REPO):
        for tag in image.tags:
            c.images.remove(tag, force=True)
    c.close()


@pytest.fixture(scope="module")
def work_dir() -> Path:
    # The shared cache, so a re-run (or the demo) imports instead of re-bootstrapping.
    return default_work_dir()


@pytest.fixture(scope="module")
def built(client: Any, work_dir: Path) -> BaseImageResult:
    result = ensure_base_image(REF, docker_client=client, work_dir=work_dir, log=log)
    log.warning("ensure %s: built=%s in %.1fs", REF, result.built, result.seconds)
    return result


def docker_cli() -> str:
    found = shutil.which("docker")
    assert found, "the docker CLI is needed by these tests"
    return found


def docker_run(*args: str, timeout_s: float = 180) -> str:
    return run([docker_cli(), "run", "--rm", *args], timeout_s=timeout_s).stdout


def tiny_tarball(path: Path) -> Path:
    """A one-file rootfs: enough for `docker import`, not for running anything."""
    data = b"stand-in test\n"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("etc/gantry-test")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


# --- the python stand-in -------------------------------------------------------------------


def test_ensure_builds_a_labelled_standin(built: BaseImageResult, client: Any) -> None:
    assert built.ref == REF
    assert built.image_id.startswith("sha256:")
    assert built.standin
    image = client.images.get(REF)
    assert image.id == built.image_id
    assert REF in image.tags


def test_second_call_is_cached_and_fast(
    built: BaseImageResult, client: Any, work_dir: Path
) -> None:
    t0 = time.monotonic()
    again = ensure_base_image(REF, docker_client=client, work_dir=work_dir, log=log)
    elapsed = time.monotonic() - t0
    assert not again.built
    assert again.image_id == built.image_id
    assert elapsed < 5 and again.seconds < 5


def test_labels_and_config(built: BaseImageResult, client: Any) -> None:
    config = client.images.get(REF).attrs["Config"]
    labels = config["Labels"]
    assert labels[LABEL_STANDIN] == "true"
    assert labels[LABEL_RECIPE] == recipe_digest(baseimages.RECIPES[REF])
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"] == "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["LANG"] == "C.UTF-8"
    assert env["PYTHON_VERSION"].startswith("3.11.")
    assert config["Cmd"] == ["python3"]


def test_python_runs_with_ssl_and_venv(built: BaseImageResult, client: Any) -> None:
    out = docker_run(REF, "python", "-c", "import sys,ssl,venv; print(sys.version)")
    assert out.startswith("3.11.")
    version = client.images.get(REF).attrs["Config"]["Env"]
    assert f"PYTHON_VERSION={out.split()[0]}" in version


@pytest.mark.parametrize("user", ["root", "10001"])
def test_venv_with_pip(built: BaseImageResult, user: str) -> None:
    out = docker_run(
        "--user", user, REF, "sh", "-c", "python -m venv /tmp/v && /tmp/v/bin/pip --version"
    )
    assert out.startswith("pip ") and "/tmp/v/" in out


def test_pip_installs_local_wheels_system_wide(built: BaseImageResult) -> None:
    # No index is reachable: build a wheel from a local project and install it with
    # --no-index, as the runtime Dockerfile does with the wheelhouse. The official image
    # has no EXTERNALLY-MANAGED marker, so system-wide pip must work without flags.
    script = (
        "set -e; mkdir -p /src/hello; echo 'X = 1' > /src/hello/__init__.py; "
        'printf \'[build-system]\\nrequires=["setuptools"]\\n'
        'build-backend="setuptools.build_meta"\\n'
        '[project]\\nname="hello"\\nversion="0.1"\\n\' > /src/pyproject.toml; '
        "pip wheel -q --no-index --no-build-isolation -w /wheels /src; "
        "pip install -q --no-index --find-links /wheels hello; "
        "cd / && python -c 'import hello; print(hello.X)'"
    )
    assert docker_run(REF, "sh", "-c", script).strip().endswith("1")


def test_reimports_from_the_cached_rootfs(
    built: BaseImageResult,
    client: Any,
    work_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As after an engine reset, but under a test tag: re-importing the real tag would give
    # it a new image id and void the build cache of every image built FROM it.
    copy = baseimages.RECIPES[REF].model_copy(update={"ref": f"{TEST_REPO}:reimport"})
    monkeypatch.setitem(baseimages.RECIPES, copy.ref, copy)
    # Where the engine already had the image (a fresh clone on a used machine) nothing was
    # bootstrapped into this work dir yet: make sure the cached rootfs exists first.
    work_dir.mkdir(parents=True, exist_ok=True)
    baseimages._ensure_rootfs(copy, work_dir, log)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=log.name):
        again = ensure_base_image(copy.ref, docker_client=client, work_dir=work_dir, log=log)
    assert again.built and again.standin
    assert again.seconds < 120
    assert "reusing cached rootfs" in caplog.text
    assert "debootstrap" not in caplog.text
    image = client.images.get(copy.ref)
    assert image.labels[LABEL_RECIPE] == recipe_digest(copy)
    assert image.attrs["Config"]["Env"] == client.images.get(REF).attrs["Config"]["Env"]


def test_unknown_ref_says_pull_or_add_a_recipe(client: Any, tmp_path: Path) -> None:
    with pytest.raises(BaseImageError) as info:
        ensure_base_image(
            "gantry-test/no-such-image:1", docker_client=client, work_dir=tmp_path, log=log
        )
    assert "docker pull gantry-test/no-such-image:1" in str(info.value)
    assert "RECIPES" in str(info.value)


# --- cache, rebuild and locking logic, on tiny images ------------------------------------


@pytest.fixture
def fake_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Recipe]:
    """A recipe under a test tag whose rootfs step is replaced by a one-file tarball."""
    recipe = Recipe(ref=f"{TEST_REPO}:{tmp_path.name[-20:].lower()}")
    monkeypatch.setitem(baseimages.RECIPES, recipe.ref, recipe)
    yield recipe


def fake_rootfs(calls: list[str], tmp_path: Path, delay_s: float = 0.0) -> Any:
    def _ensure_rootfs(recipe: Recipe, work_dir: Path, log: Any) -> tuple[Path, RootfsMeta]:
        calls.append(recipe.ref)
        time.sleep(delay_s)
        meta = RootfsMeta(
            rootfs_digest=rootfs_digest(recipe), python_version=None, sources_list="", packages={}
        )
        return tiny_tarball(tmp_path / "tiny.tar"), meta

    return _ensure_rootfs


def test_real_image_under_the_tag_is_left_alone(
    client: Any, fake_recipe: Recipe, tmp_path: Path
) -> None:
    repo, tag = fake_recipe.ref.split(":")
    client.api.import_image(src=str(tiny_tarball(tmp_path / "real.tar")), repository=repo, tag=tag)
    real = client.images.get(fake_recipe.ref)
    result = ensure_base_image(fake_recipe.ref, docker_client=client, work_dir=tmp_path, log=log)
    assert (result.built, result.standin, result.image_id) == (False, False, real.id)


def test_standin_of_an_older_recipe_is_rebuilt(
    client: Any, fake_recipe: Recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, tag = fake_recipe.ref.split(":")
    client.api.import_image(
        src=str(tiny_tarball(tmp_path / "old.tar")),
        repository=repo,
        tag=tag,
        changes=[f"LABEL {LABEL_STANDIN}=true", f"LABEL {LABEL_RECIPE}=0123abcd"],
    )
    old = client.images.get(fake_recipe.ref)
    calls: list[str] = []
    monkeypatch.setattr(baseimages, "_ensure_rootfs", fake_rootfs(calls, tmp_path))
    result = ensure_base_image(fake_recipe.ref, docker_client=client, work_dir=tmp_path, log=log)
    assert result.built and calls == [fake_recipe.ref]
    new = client.images.get(fake_recipe.ref)
    assert new.labels[LABEL_RECIPE] == recipe_digest(fake_recipe) != "0123abcd"
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(old.id)  # the superseded stand-in was removed


def test_concurrent_callers_build_once(
    client: Any, fake_recipe: Recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(baseimages, "_ensure_rootfs", fake_rootfs(calls, tmp_path, delay_s=1))
    results: list[BaseImageResult] = []

    def ensure() -> None:
        results.append(
            ensure_base_image(fake_recipe.ref, docker_client=client, work_dir=tmp_path, log=log)
        )

    threads = [threading.Thread(target=ensure) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert calls == [fake_recipe.ref]
    assert sorted(r.built for r in results) == [False, True]
    assert len({r.image_id for r in results}) == 1


def test_missing_debootstrap_names_the_install(
    client: Any, fake_recipe: Recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ToolNotFoundError) as info:
        ensure_base_image(fake_recipe.ref, docker_client=client, work_dir=tmp_path, log=log)
    assert "debootstrap" in str(info.value)
    assert "apt-get install -y debootstrap" in str(info.value)


def test_ensure_base_images_returns_one_result_per_ref(built: BaseImageResult, client: Any) -> None:
    results = ensure_base_images([REF, f"docker.io/library/{REF}"], docker_client=client, log=log)
    assert [r.ref for r in results] == [REF, REF]
    assert all(not r.built and r.image_id == built.image_id for r in results)


# --- the rootfs trimming, on a fake rootfs ------------------------------------------------


def test_finish_rootfs_trims_like_the_slim_images(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    files = {
        "usr/share/doc/bash/copyright": "c",
        "usr/share/doc/bash/README": "r",
        "usr/share/man/man1/bash.1.gz": "m",
        "usr/share/locale/de/LC_MESSAGES/bash.mo": "l",
        "usr/share/locale/locale.alias": "a",
        "var/lib/apt/lists/x_Packages": "p",
        "var/cache/apt/pkgcache.bin": "b",
        "var/log/dpkg.log": "d",
        "var/log/apt/history.log": "h",
        "var/log/wtmp": "w",
        "etc/hostname": "buildhost",
        "etc/resolv.conf": "nameserver 192.0.2.1",
        "tmp/leftover": "t",
        "dev/null": "",
        "usr/lib/python3.11/EXTERNALLY-MANAGED": "e",
        "var/lib/dpkg/status": "Package: python3.11\nStatus: install ok installed\n"
        "Version: 3.11.2-6+deb12u6\n\nPackage: gone\nStatus: deinstall ok config-files\n"
        "Version: 1\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    mirrors = DebianMirrors(
        suite="bookworm",
        archive="http://mirror.example/debian",
        security=None,
        updates=False,
        origin="test",
    )
    recipe = baseimages.RECIPES[REF]
    meta = baseimages._finish_rootfs(recipe, "digest", mirrors, root)

    assert meta.python_version == "3.11.2"
    assert meta.packages == {"python3.11": "3.11.2-6+deb12u6"}
    kept = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert "usr/share/doc/bash/copyright" in kept
    assert "usr/share/locale/locale.alias" in kept
    for gone in (
        "usr/share/doc/bash/README",
        "usr/share/man/man1/bash.1.gz",
        "usr/share/locale/de/LC_MESSAGES/bash.mo",
        "var/lib/apt/lists/x_Packages",
        "var/cache/apt/pkgcache.bin",
        "var/log/dpkg.log",
        "var/log/apt/history.log",
        "tmp/leftover",
        "dev/null",
        "usr/lib/python3.11/EXTERNALLY-MANAGED",
    ):
        assert gone not in kept, gone
    assert (root / "var/log/wtmp").read_text() == ""
    assert (root / "etc/hostname").read_text() == ""
    assert (root / "etc/resolv.conf").read_text() == ""
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (root / "etc/apt/sources.list").read_text() == mirrors.sources_list()
    assert "path-exclude /usr/share/doc/*" in (root / "etc/dpkg/dpkg.cfg.d/docker").read_text()
    assert os.readlink(root / "usr/local/bin/python") == "/usr/bin/python3.11"
    assert os.readlink(root / "usr/local/bin/pip") == "/usr/bin/pip3"
