"""A host-side wheelhouse for image builds.

Containers cannot reach a package index during ``docker build`` here (nor on air-gapped
hosts), so the wheels a runtime image needs are downloaded on the host, verified against
the hashes of its lock file, and copied into the build context.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gantry.atomicfile import write_atomic
from gantry.errors import BuildError
from gantry.manifest import sha256_file
from gantry.proc import run

log = logging.getLogger("gantry.build")

_REQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")

# glibc of Debian bookworm is 2.36: any manylinux tag up to it runs in the image.
_MANYLINUX = [f"manylinux_2_{n}_{{arch}}" for n in range(36, 16, -1)] + [
    "manylinux2014_{arch}",
    "manylinux2010_{arch}",
    "manylinux1_{arch}",
]


@dataclass(frozen=True)
class Requirement:
    name: str
    version: str
    hashes: frozenset[str]


def parse_lock(text: str) -> list[Requirement]:
    """Parse a ``pip-compile --generate-hashes`` style lock; every pin must carry hashes."""
    reqs: list[Requirement] = []
    joined = re.sub(r"\\\n", " ", text)
    for lineno, line in enumerate(joined.splitlines(), 1):
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("--hash") else line
        if not line:
            continue
        m = _REQ.match(line)
        if not m:
            raise BuildError(
                f"lock file line {lineno} is not `name==version --hash=...`: {line}",
                fix="regenerate the lock file with --generate-hashes",
            )
        hashes = frozenset(_HASH.findall(line))
        if not hashes:
            raise BuildError(
                f"lock file pin {m[1]}=={m[2]} has no --hash",
                fix="regenerate the lock file with --generate-hashes",
            )
        reqs.append(Requirement(_norm(m[1]), m[2], hashes))
    return reqs


class SourceBuild(BaseModel):
    """How to compile a pinned sdist into a wheel on the host (a project with no wheel on
    PyPI, e.g. llama-cpp-python). The wheel is cached by sdist hash, settings and platform."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    env: dict[str, str] = Field(
        default_factory=dict, description="Build environment, e.g. CMAKE_ARGS for portability."
    )
    timeout_s: float = Field(default=3600, gt=0, le=6 * 3600)
    expected_minutes: float = Field(
        default=5, gt=0, description="Shown in the log, so a long build is not taken for a hang."
    )


#: Next to a runtime's requirements.txt: which of its pins are compiled from source.
SOURCE_BUILDS_FILE = "wheels-from-source.json"


def load_source_builds(runtime_dir: Path) -> dict[str, SourceBuild]:
    """The runtime's source builds by normalised project name ({} when it has none)."""
    path = runtime_dir / SOURCE_BUILDS_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("the top level must be an object: project name -> settings")
        return {
            _norm(name): SourceBuild.model_validate(value)
            for name, value in raw.items()
            if not name.startswith("_")  # "_comment" keys document the file
        }
    except (ValueError, ValidationError) as exc:
        raise BuildError(
            f"{path} is invalid: {exc}",
            fix='write {"<project>": {"env": {"NAME": "value"}, "timeout_s": 3600}}',
        ) from None


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


class Wheelhouse:
    """Verified wheels under one directory, with an index of their sha256.

    Wheels compiled from source go to ``built_root`` (default: ``root``), which may be a
    longer-lived cache than ``root``: a compile takes minutes, a download seconds.
    """

    def __init__(self, root: Path, built_root: Path | None = None) -> None:
        self.root = root
        self.built_root = built_root or root
        self._index_path = root / "index.json"

    def _index(self) -> dict[str, str]:
        try:
            data = json.loads(self._index_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {k: v for k, v in data.items() if (self.root / k).is_file()}

    def _save(self, index: dict[str, str]) -> None:
        write_atomic(self._index_path, json.dumps(index, indent=1, sort_keys=True))

    def find(self, reqs: list[Requirement]) -> tuple[dict[str, Path], list[Requirement]]:
        """Wheels already here for ``reqs`` (by hash), and the requirements still missing."""
        by_hash = {sha: self.root / name for name, sha in self._index().items()}
        found: dict[str, Path] = {}
        missing: list[Requirement] = []
        for r in reqs:
            hit = next((by_hash[h] for h in r.hashes if h in by_hash), None)
            if hit is None:
                missing.append(r)
            else:
                found[r.name] = hit
        return found, missing

    def ensure(
        self,
        lock: Path,
        *,
        python_version: str,
        arch: str,
        timeout_s: float = 900,
        source_builds: Mapping[str, SourceBuild] | None = None,
    ) -> list[Path]:
        """Every wheel of ``lock`` for the image's platform, downloading only what is missing;
        the pins named in ``source_builds`` are compiled here once and cached."""
        all_reqs = parse_lock(lock.read_text())
        builds = source_builds or {}
        self.root.mkdir(parents=True, exist_ok=True)
        built = {
            r.name: self.ensure_built(r, builds[r.name], python_version=python_version, arch=arch)
            for r in all_reqs
            if r.name in builds
        }
        reqs = [r for r in all_reqs if r.name not in builds]
        found, missing = self.find(reqs)
        if missing:
            log.info(
                "downloading %d wheels for the image (%s)",
                len(missing),
                ", ".join(f"{r.name}=={r.version}" for r in missing[:8]),
            )
            sub = self.root / f".partial-{hashlib.sha256(lock.read_bytes()).hexdigest()[:8]}"
            sub.mkdir(exist_ok=True)
            req_file = sub / "requirements.txt"
            req_file.write_text(
                "".join(
                    f"{r.name}=={r.version} "
                    + " ".join(f"--hash=sha256:{h}" for h in sorted(r.hashes))
                    + "\n"
                    for r in missing
                )
            )
            platforms = [a for t in _MANYLINUX for a in ("--platform", t.format(arch=arch))]
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--require-hashes",
                    "--python-version",
                    python_version,
                    "--implementation",
                    "cp",
                    *platforms,
                    "-d",
                    str(sub),
                    "-r",
                    str(req_file),
                    "--progress-bar",
                    "off",
                ],
                timeout_s=timeout_s,
                fix="check that PyPI (or PIP_INDEX_URL) is reachable from this host",
            )
            index = self._index()
            for whl in sub.glob("*.whl"):
                digest = sha256_file(whl)
                os.replace(whl, self.root / whl.name)
                index[whl.name] = digest
            self._save(index)
            req_file.unlink(missing_ok=True)
            sub.rmdir()
            found, missing = self.find(reqs)
            if missing:
                raise BuildError(
                    "wheels still missing after download: "
                    + ", ".join(f"{r.name}=={r.version}" for r in missing),
                    fix="the lock file pins versions without a wheel for the image platform; "
                    "regenerate it for the image's Python and platform",
                )
        found |= built
        return [found[r.name] for r in all_reqs]

    # --- wheels compiled from source --------------------------------------------------

    def _build_key(
        self, req: Requirement, build: SourceBuild, python_version: str, arch: str
    ) -> str:
        blob = json.dumps(
            {
                "name": req.name,
                "version": req.version,
                "sdist": sorted(req.hashes),
                "env": build.env,
                "python": python_version,
                "arch": arch,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _built(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads((self.built_root / "built.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)}

    def built_wheel(
        self, req: Requirement, build: SourceBuild, *, python_version: str, arch: str
    ) -> Path | None:
        """The cached wheel compiled from ``req``'s sdist with ``build``, if it is intact."""
        entry = self._built().get(self._build_key(req, build, python_version, arch))
        if entry is None:
            return None
        path = self.built_root / entry.get("wheel", "")
        if path.is_file() and sha256_file(path) == entry.get("sha256"):
            return path
        log.warning("cached wheel %s is missing or changed; compiling it again", path)
        return None

    def ensure_built(
        self, req: Requirement, build: SourceBuild, *, python_version: str, arch: str
    ) -> Path:
        """Compile ``req`` from its hash-pinned sdist, unless a cached wheel is intact.

        Builds run on the host, whose Python and CPU architecture must be the image's: the
        wheel carries compiled code for them. One build at a time per project (a file lock),
        so two releases starting together compile once.
        """
        cached = self.built_wheel(req, build, python_version=python_version, arch=arch)
        if cached is not None:
            return cached
        host_python = f"{sys.version_info.major}.{sys.version_info.minor}"
        host_arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(
            platform.machine().lower(), platform.machine().lower()
        )
        if (host_python, host_arch) != (python_version, arch):
            raise BuildError(
                f"{req.name}=={req.version} has no wheel and must be compiled for Python "
                f"{python_version} on {arch}, but this host runs Python {host_python} on "
                f"{host_arch}",
                fix=f"build on a {arch} host with Python {python_version}",
            )
        self.built_root.mkdir(parents=True, exist_ok=True)
        with (self.built_root / f".build-{req.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cached = self.built_wheel(req, build, python_version=python_version, arch=arch)
            if cached is not None:
                return cached
            return self._compile(req, build, python_version=python_version, arch=arch)

    def _compile(
        self, req: Requirement, build: SourceBuild, *, python_version: str, arch: str
    ) -> Path:
        key = self._build_key(req, build, python_version, arch)
        work = self.built_root / f".build-{key}"
        shutil.rmtree(work, ignore_errors=True)  # a killed earlier build's leftovers
        (work / "sdist").mkdir(parents=True)
        try:
            req_file = work / "requirements.txt"
            req_file.write_text(
                f"{req.name}=={req.version} "
                + " ".join(f"--hash=sha256:{h}" for h in sorted(req.hashes))
                + "\n"
            )
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    req.name,
                    "--require-hashes",
                    "-r",
                    str(req_file),
                    "-d",
                    str(work / "sdist"),
                    "--progress-bar",
                    "off",
                ],
                timeout_s=900,
                fix="check that PyPI (or PIP_INDEX_URL) is reachable from this host",
            )
            sdists = list((work / "sdist").iterdir())
            if len(sdists) != 1:
                raise BuildError(f"expected one sdist of {req.name}, pip gave {len(sdists)}")
            log.info(
                "compiling %s==%s from source (about %.0f minutes on 2 cores; the wheel is "
                "cached in %s, so this happens once)",
                req.name,
                req.version,
                build.expected_minutes,
                self.built_root,
            )
            t0 = time.monotonic()
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--no-deps",
                    "--progress-bar",
                    "off",
                    "-w",
                    str(work / "out"),
                    str(sdists[0]),
                ],
                timeout_s=build.timeout_s,
                env=build.env,
                fix=f"the compiler's error is above; check gcc/g++ are installed "
                f"(`make system-deps`) and the settings in {SOURCE_BUILDS_FILE}",
            )
            wheels = list((work / "out").glob("*.whl"))
            if len(wheels) != 1:
                raise BuildError(f"compiling {req.name} gave {len(wheels)} wheels, not one")
            wheel = wheels[0]
            digest = sha256_file(wheel)
            # Named by build key: two settings of one version must not overwrite each other.
            dest = self.built_root / key / wheel.name
            dest.parent.mkdir(exist_ok=True)
            os.replace(wheel, dest)
            built = self._built()
            built[key] = {"wheel": f"{key}/{wheel.name}", "sha256": digest}
            write_atomic(
                self.built_root / "built.json", json.dumps(built, indent=1, sort_keys=True)
            )
            log.info(
                "compiled %s in %.0f s: %s (sha256 %s)",
                req.name,
                time.monotonic() - t0,
                wheel.name,
                digest[:12],
            )
            return dest
        finally:
            shutil.rmtree(work, ignore_errors=True)


def context_lock(lock_text: str, built: Mapping[str, Path]) -> str:
    """``lock_text`` with each compiled pin's sdist hashes replaced by its wheel's sha256.

    The image installs with ``--require-hashes`` from the context's lock: a wheel compiled
    here cannot match the sdist's hash, so the lock shipped with the context pins the wheel
    that was built (from an sdist whose hash the original lock pinned).
    """
    if not built:
        return lock_text
    joined = re.sub(r"\\\n", " ", lock_text)
    out: list[str] = []
    for line in joined.splitlines():
        m = _REQ.match(line.strip())
        wheel = built.get(_norm(m[1])) if m else None
        if m and wheel is not None:
            out.append(f"# {m[1]}=={m[2]}: compiled from its sdist (hashes in the original lock)")
            out.append(f"{m[1]}=={m[2]} --hash=sha256:{sha256_file(wheel)}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"
