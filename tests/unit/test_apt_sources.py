"""Finding the Debian mirrors in apt's configuration (both file formats)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gantry.errors import ConfigError
from gantry.localenv.apt import (
    MIRROR_ENV,
    SECURITY_MIRROR_ENV,
    debian_mirror,
    find_mirrors,
    load_mirrors,
    parse_deb822,
    parse_one_line,
    parse_sources_file,
    security_mirror,
)

pytestmark = pytest.mark.unit

DEB822 = """\
Types: deb
# a snapshot URI, commented out
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

THIRD_PARTY_DEB822 = """\
Types: deb
URIs: https://vendor.example/node_20.x
Suites: nodistro
Components: main
"""

ONE_LINE = """\
# deb http://commented.example/debian bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib
deb-src http://src.example/debian bookworm main
deb http://mirror.example/debian bookworm-updates main  # trailing comment
deb [ arch=amd64 ] http://security.example/debian-security bookworm-security main
deb https://vendor.example/apt cloud-sdk-bookworm main
"""


def test_deb822_stanzas_fields_and_comments() -> None:
    sources = parse_deb822(DEB822, origin="debian.sources")
    assert [s.uris for s in sources] == [
        ("http://mirror.example/debian",),
        ("http://security.example/debian-security",),
    ]
    assert sources[0].suites == ("bookworm", "bookworm-updates")
    assert sources[0].components == ("main",)
    assert sources[0].origin == "debian.sources"


def test_deb822_skips_disabled_and_deb_src_stanzas() -> None:
    text = """\
Types: deb
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

types: deb deb-src
uris: http://mirror.example/debian
 http://second.example/debian
suites: bookworm
components: main
"""
    sources = parse_deb822(text)
    assert len(sources) == 1
    assert sources[0].uris == ("http://mirror.example/debian", "http://second.example/debian")


def test_one_line_options_comments_and_deb_src() -> None:
    sources = parse_one_line(ONE_LINE, origin="sources.list")
    assert [(s.uris[0], s.suites[0]) for s in sources] == [
        ("http://mirror.example/debian", "bookworm"),
        ("http://mirror.example/debian", "bookworm-updates"),
        ("http://security.example/debian-security", "bookworm-security"),
        ("https://vendor.example/apt", "cloud-sdk-bookworm"),
    ]
    assert sources[0].components == ("main", "contrib")


@pytest.mark.parametrize("text", [DEB822, ONE_LINE])
def test_archive_and_security_mirrors_both_formats(text: str) -> None:
    name = "x.sources" if text is DEB822 else "x.list"
    sources = parse_sources_file(name, text)
    main = debian_mirror(sources, "bookworm")
    security = security_mirror(sources, "bookworm")
    assert main is not None and main.uris == ("http://mirror.example/debian",)
    assert security is not None and security.uris == ("http://security.example/debian-security",)


def test_archive_prefers_a_debian_path_and_never_security() -> None:
    text = """\
deb http://proxy.example:3142/mirror bookworm main
deb http://security.example/debian-security bookworm main
deb http://mirror.example/debian/ bookworm main
"""
    main = debian_mirror(parse_one_line(text), "bookworm")
    assert main is not None and main.uris == ("http://mirror.example/debian/",)


def test_other_suites_and_fetchless_schemes_are_not_candidates() -> None:
    text = "deb http://mirror.example/debian trixie main\ndeb cdrom:[Debian]/ bookworm main\n"
    assert debian_mirror(parse_one_line(text), "bookworm") is None


def test_disabled_and_unknown_files_are_ignored() -> None:
    assert parse_sources_file("vendor.list.disabled-by-farm", ONE_LINE) == []
    assert parse_sources_file("debian.sources.disabled", DEB822) == []
    assert parse_sources_file("notes.txt", ONE_LINE) == []


def test_find_mirrors_skips_third_party_and_renders_sources_list() -> None:
    files = {"/a/vendor.sources": THIRD_PARTY_DEB822, "/a/debian.sources": DEB822}
    mirrors = find_mirrors(files, "bookworm", env={})
    assert mirrors.archive == "http://mirror.example/debian"
    assert mirrors.security == "http://security.example/debian-security"
    assert mirrors.updates is True
    assert mirrors.origin == "/a/debian.sources"
    assert mirrors.sources_list() == (
        "deb http://mirror.example/debian bookworm main\n"
        "deb http://mirror.example/debian bookworm-updates main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
    )


def test_sources_list_without_updates_or_security() -> None:
    files = {"sources.list": "deb http://mirror.example/debian bookworm main\n"}
    mirrors = find_mirrors(files, "bookworm", env={})
    assert (mirrors.updates, mirrors.security) == (False, None)
    assert mirrors.sources_list() == "deb http://mirror.example/debian bookworm main\n"


def test_env_overrides_the_files() -> None:
    env = {MIRROR_ENV: "http://override.example/debian"}
    mirrors = find_mirrors({"x.sources": DEB822}, "bookworm", env=env)
    assert mirrors.archive == "http://override.example/debian"
    assert mirrors.origin == MIRROR_ENV
    # The security mirror still comes from apt unless it is overridden as well.
    assert mirrors.security == "http://security.example/debian-security"
    env[SECURITY_MIRROR_ENV] = "http://sec-override.example/debian-security"
    assert find_mirrors({}, "bookworm", env=env).security == env[SECURITY_MIRROR_ENV]


def test_env_override_must_be_a_fetchable_uri() -> None:
    with pytest.raises(ConfigError, match=MIRROR_ENV):
        find_mirrors({}, "bookworm", env={MIRROR_ENV: "mirror.example/debian"})


def test_no_mirror_names_the_files_read_and_the_fix() -> None:
    files = {"/etc/apt/sources.list.d/vendor.sources": THIRD_PARTY_DEB822}
    with pytest.raises(ConfigError) as info:
        find_mirrors(files, "bookworm", env={})
    text = str(info.value)
    assert "/etc/apt/sources.list.d/vendor.sources" in text
    assert MIRROR_ENV in text


def test_loader_reads_what_apt_reads(tmp_path: Path) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (tmp_path / "sources.list").write_text("# nothing here\n")
    (parts / "debian.sources").write_text(DEB822)
    (parts / "old.list.disabled-by-farm").write_text(
        "deb http://disabled.example/debian bookworm main\n"
    )
    (parts / "vendor.sources.disabled").write_text(DEB822.replace("mirror.", "disabled."))
    mirrors = load_mirrors("bookworm", apt_dir=tmp_path, env={})
    assert mirrors.archive == "http://mirror.example/debian"
    assert mirrors.origin == str(parts / "debian.sources")


def test_loader_error_lists_files(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://mirror.example/debian trixie main\n")
    with pytest.raises(ConfigError, match=r"sources\.list"):
        load_mirrors("bookworm", apt_dir=tmp_path, env={})
    with pytest.raises(ConfigError, match="files read: none"):
        load_mirrors("bookworm", apt_dir=tmp_path / "missing", env={})
