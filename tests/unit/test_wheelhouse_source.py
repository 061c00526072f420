"""Wheels compiled from source: the settings file, the cache's integrity, the context lock.

The compile itself (llama-cpp-python, minutes) runs in tests/integration/test_llamacpp_runtime.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gantry.errors import BuildError
from gantry.wheelhouse import (
    SOURCE_BUILDS_FILE,
    Requirement,
    SourceBuild,
    Wheelhouse,
    context_lock,
    load_source_builds,
    parse_lock,
)

pytestmark = pytest.mark.unit

LOCK = """\
# a header comment
numpy==2.4.6 \\
    --hash=sha256:{a}
    # via llama-cpp-python
llama-cpp-python==0.3.36 \\
    --hash=sha256:{b}
    # via -r requirements.in
""".format(a="a" * 64, b="b" * 64)


def test_source_builds_file(tmp_path: Path) -> None:
    assert load_source_builds(tmp_path) == {}
    (tmp_path / SOURCE_BUILDS_FILE).write_text(
        json.dumps(
            {
                "_comment": "why",
                "Llama_CPP_Python": {"env": {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}},
            }
        )
    )
    builds = load_source_builds(tmp_path)
    assert builds == {"llama-cpp-python": SourceBuild(env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF"})}
    (tmp_path / SOURCE_BUILDS_FILE).write_text('{"x": {"envv": {}}}')
    with pytest.raises(BuildError, match=f"{SOURCE_BUILDS_FILE} is invalid") as info:
        load_source_builds(tmp_path)
    assert "envv" in str(info.value)
    (tmp_path / SOURCE_BUILDS_FILE).write_text("[1, 2]")
    with pytest.raises(BuildError, match="top level must be an object"):
        load_source_builds(tmp_path)


def test_context_lock_pins_the_built_wheel_and_nothing_else(tmp_path: Path) -> None:
    wheel = tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"compiled here")
    text = context_lock(LOCK, {"llama-cpp-python": wheel})
    pins = {r.name: r for r in parse_lock(text)}
    assert pins["llama-cpp-python"].hashes == {hashlib.sha256(b"compiled here").hexdigest()}
    assert pins["numpy"].hashes == {"a" * 64}
    assert "compiled from its sdist" in text
    assert context_lock(LOCK, {}) == LOCK


def _cached(tmp_path: Path) -> tuple[Wheelhouse, Requirement, SourceBuild, Path]:
    wh = Wheelhouse(tmp_path / "wheelhouse", tmp_path / "built")
    req = next(r for r in parse_lock(LOCK) if r.name == "llama-cpp-python")
    build = SourceBuild(env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF"})
    key = wh._build_key(req, build, "3.11", "x86_64")
    wheel = tmp_path / "built" / key / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"compiled earlier")
    entry = {
        "wheel": f"{key}/{wheel.name}",
        "sha256": hashlib.sha256(b"compiled earlier").hexdigest(),
    }
    (tmp_path / "built" / "built.json").write_text(json.dumps({key: entry}))
    return wh, req, build, wheel


def test_a_cached_wheel_is_used_only_while_intact(tmp_path: Path) -> None:
    wh, req, build, wheel = _cached(tmp_path)
    assert wh.built_wheel(req, build, python_version="3.11", arch="x86_64") == wheel
    # Other settings or another platform: another wheel (none cached).
    other = SourceBuild(env={"CMAKE_ARGS": "-DGGML_NATIVE=ON"})
    assert wh.built_wheel(req, other, python_version="3.11", arch="x86_64") is None
    assert wh.built_wheel(req, build, python_version="3.11", arch="aarch64") is None
    wheel.write_bytes(b"changed on disk")
    assert wh.built_wheel(req, build, python_version="3.11", arch="x86_64") is None


def test_a_compile_for_another_platform_is_refused_before_any_work(tmp_path: Path) -> None:
    wh, req, build, _ = _cached(tmp_path)
    with pytest.raises(BuildError, match="must be compiled for Python 3.99 on x86_64") as info:
        wh.ensure_built(req, build, python_version="3.99", arch="x86_64")
    assert "build on a x86_64 host with Python 3.99" in str(info.value)
