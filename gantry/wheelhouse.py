"""A host-side wheelhouse for image builds.

Containers cannot reach a package index during ``docker build`` here (nor on air-gapped
hosts), so the wheels a runtime image needs are downloaded on the host, verified against
the hashes of its lock file, and copied into the build context.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

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
        reqs.append(Requirement(m[1].lower().replace("_", "-"), m[2], hashes))
    return reqs


class Wheelhouse:
    """Verified wheels under one directory, with an index of their sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
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
        self, lock: Path, *, python_version: str, arch: str, timeout_s: float = 900
    ) -> list[Path]:
        """Every wheel of ``lock`` for the image's platform, downloading only what is missing."""
        reqs = parse_lock(lock.read_text())
        self.root.mkdir(parents=True, exist_ok=True)
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
        return [found[r.name] for r in reqs]
