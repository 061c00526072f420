"""Find the host's Debian mirrors in its apt configuration.

The local base-image builder downloads from the same mirror the host's apt uses, so no
mirror host is ever written into the repository: it is read here, at run time, from the
deb822 ``*.sources`` files and the one-line ``sources.list``/``*.list`` files, or taken
from ``GANTRY_DEBIAN_MIRROR``. The parsers are pure functions over file texts; the
loader reads the files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from gantry.errors import ConfigError

MIRROR_ENV = "GANTRY_DEBIAN_MIRROR"
SECURITY_MIRROR_ENV = "GANTRY_DEBIAN_SECURITY_MIRROR"
APT_DIR = Path("/etc/apt")

# Schemes debootstrap itself can fetch from; apt-only transports (cdrom:, mirror+, tor+)
# are useless to it.
_FETCHABLE_SCHEMES = ("http", "https", "file")


class AptSource(BaseModel):
    """One enabled source entry (a deb822 stanza or a one-line ``deb`` line)."""

    model_config = ConfigDict(frozen=True)

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str = ""


class DebianMirrors(BaseModel):
    """The mirrors for one Debian suite and where they were found."""

    model_config = ConfigDict(frozen=True)

    suite: str
    archive: str
    security: str | None
    #: Whether the host also uses ``<suite>-updates`` from the archive mirror.
    updates: bool
    origin: str

    def sources_list(self) -> str:
        """A one-line ``/etc/apt/sources.list`` for an image of this suite."""
        lines = [f"deb {self.archive} {self.suite} main"]
        if self.updates:
            lines.append(f"deb {self.archive} {self.suite}-updates main")
        if self.security:
            lines.append(f"deb {self.security} {self.suite}-security main")
        return "\n".join(lines) + "\n"


def parse_deb822(text: str, origin: str = "") -> list[AptSource]:
    """The enabled ``deb`` stanzas of a deb822 ``.sources`` file."""
    out: list[AptSource] = []
    for stanza in _deb822_stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() in ("no", "false", "0"):
            continue
        source = AptSource(
            types=tuple(stanza.get("types", "").split()),
            uris=tuple(stanza.get("uris", "").split()),
            suites=tuple(stanza.get("suites", "").split()),
            components=tuple(stanza.get("components", "").split()),
            origin=origin,
        )
        if "deb" in source.types and source.uris and source.suites:
            out.append(source)
    return out


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    last: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.lstrip().startswith("#"):
            # Comment lines may sit between fields (and between a field's continuation
            # lines) without ending the stanza.
            continue
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, last = {}, None
            continue
        if line[0] in " \t":
            if last is not None:
                fields[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue
        last = name.strip().lower()
        fields[last] = value.strip()
    if fields:
        stanzas.append(fields)
    return stanzas


def parse_one_line(text: str, origin: str = "") -> list[AptSource]:
    """The ``deb`` lines of a one-line ``sources.list`` file (``deb-src`` is skipped)."""
    out: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind != "deb":
            continue
        rest = rest.strip()
        if rest.startswith("["):
            # `[arch=amd64 signed-by=...]` options; they may contain spaces.
            _, closed, rest = rest.partition("]")
            if not closed:
                continue
        words = rest.split()
        if len(words) < 2:
            continue
        out.append(
            AptSource(
                types=("deb",),
                uris=(words[0],),
                suites=(words[1],),
                components=tuple(words[2:]),
                origin=origin,
            )
        )
    return out


def parse_sources_file(name: str, text: str) -> list[AptSource]:
    """Parse ``text`` in the format apt infers from the file ``name``; [] for others."""
    base = PurePosixPath(name).name
    if ".disabled" in base:
        return []
    if base.endswith(".sources"):
        return parse_deb822(text, origin=name)
    if base.endswith(".list"):
        return parse_one_line(text, origin=name)
    return []


def _last_segment(uri: str) -> str:
    return urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1]


def _fetchable(uri: str) -> bool:
    return urlsplit(uri).scheme in _FETCHABLE_SCHEMES


def _candidates(sources: Iterable[AptSource], suite: str) -> list[tuple[str, AptSource]]:
    return [
        (uri, s)
        for s in sources
        if suite in s.suites and (not s.components or "main" in s.components)
        for uri in s.uris
        if _fetchable(uri)
    ]


def debian_mirror(sources: Sequence[AptSource], suite: str) -> AptSource | None:
    """The entry of the main Debian archive for ``suite`` (not security, not third-party).

    Third-party repositories name their own suites (``nodistro``, ``cloud-sdk-bookworm``),
    so an exact suite match already excludes them; a URI ending in ``/debian`` wins over
    other paths, which still count because caching proxies rewrite them.
    """
    found = [
        (uri, s) for uri, s in _candidates(sources, suite) if "security" not in _last_segment(uri)
    ]
    found.sort(key=lambda c: _last_segment(c[0]) != "debian")
    if not found:
        return None
    uri, source = found[0]
    return source.model_copy(update={"uris": (uri,)})


def security_mirror(sources: Sequence[AptSource], suite: str) -> AptSource | None:
    """The entry of the Debian security archive for ``suite``, if the host uses one."""
    for name in (f"{suite}-security", f"{suite}/updates"):
        found = _candidates(sources, name)
        if found:
            uri, source = found[0]
            return source.model_copy(update={"uris": (uri,)})
    return None


def find_mirrors(
    files: Mapping[str, str], suite: str, env: Mapping[str, str] | None = None
) -> DebianMirrors:
    """The mirrors for ``suite`` from apt files (name → text) and the environment.

    ``GANTRY_DEBIAN_MIRROR`` overrides the archive mirror (``GANTRY_DEBIAN_SECURITY_MIRROR``
    the security one). Raises :class:`ConfigError` naming the files read when no archive
    mirror is found.
    """
    e = dict(os.environ if env is None else env)
    sources = [src for name, text in files.items() for src in parse_sources_file(name, text)]
    security = e.get(SECURITY_MIRROR_ENV) or None
    if security is None and (sec := security_mirror(sources, suite)) is not None:
        security = sec.uris[0]
    if override := e.get(MIRROR_ENV):
        if not _fetchable(override):
            raise ConfigError(
                f"{MIRROR_ENV}={override!r} is not an http(s):// or file: URI",
                fix=f"set {MIRROR_ENV} to a Debian archive URI, e.g. http://HOST/debian",
            )
        return DebianMirrors(
            suite=suite, archive=override, security=security, updates=True, origin=MIRROR_ENV
        )
    main = debian_mirror(sources, suite)
    if main is None:
        read = ", ".join(sorted(files)) or "none"
        raise ConfigError(
            f"no Debian archive mirror for suite {suite!r} in the apt sources (files read: {read})",
            fix=f"set {MIRROR_ENV} to a Debian archive URI, e.g. http://HOST/debian, or add "
            f"a `deb <uri> {suite} main` source to apt",
        )
    updates = any(f"{suite}-updates" in s.suites and main.uris[0] in s.uris for s in sources)
    return DebianMirrors(
        suite=suite, archive=main.uris[0], security=security, updates=updates, origin=main.origin
    )


def read_apt_files(apt_dir: Path = APT_DIR) -> dict[str, str]:
    """Texts of the apt source files apt itself would read under ``apt_dir``."""
    paths = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        paths += sorted(
            p
            for p in parts.iterdir()
            if p.name.endswith((".list", ".sources")) and ".disabled" not in p.name
        )
    files: dict[str, str] = {}
    for path in paths:
        try:
            files[str(path)] = path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError):
            continue
        except PermissionError as exc:
            raise ConfigError(
                f"cannot read apt source file {path}: {exc}",
                fix=f"make it readable or set {MIRROR_ENV}",
            ) from exc
    return files


def load_mirrors(
    suite: str = "bookworm",
    *,
    apt_dir: Path = APT_DIR,
    env: Mapping[str, str] | None = None,
) -> DebianMirrors:
    """The host's mirrors for ``suite``: ``GANTRY_DEBIAN_MIRROR``, else apt's config."""
    e = dict(os.environ if env is None else env)
    files = {} if e.get(MIRROR_ENV) and e.get(SECURITY_MIRROR_ENV) else read_apt_files(apt_dir)
    return find_mirrors(files, suite, e)
