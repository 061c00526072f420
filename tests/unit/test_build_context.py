from __future__ import annotations

import os
from pathlib import Path

import pytest

from gantry.errors import BuildError, WeightsInContextError
from gantry.manifest import ManifestEntry, WeightsManifest, sha256_file
from gantry.stages.build import base_images, check_image_policy, check_no_weights, context_digest
from gantry.wheelhouse import parse_lock

pytestmark = pytest.mark.unit

DOCKERFILE = """\
# syntax is the classic one
FROM python:3.11-slim-bookworm AS builder
RUN true
FROM --platform=linux/amd64 python:3.11-slim-bookworm AS runtime
FROM runtime AS production
FROM debian:bookworm-slim
COPY --from=builder /x /x
"""


def test_base_images_skip_stage_names() -> None:
    assert base_images(DOCKERFILE) == ["python:3.11-slim-bookworm", "debian:bookworm-slim"]


def test_project_dockerfiles_have_resolvable_bases() -> None:
    root = Path(__file__).resolve().parents[2] / "dockerfiles"
    for df in root.glob("*/Dockerfile"):
        assert base_images(df.read_text()), df


def _manifest(*files: Path) -> WeightsManifest:
    return WeightsManifest.build(
        "o/r",
        "c" * 40,
        [ManifestEntry(path=f.name, size=f.stat().st_size, sha256=sha256_file(f)) for f in files],
    )


def test_context_with_weight_suffix_is_refused(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "app.py").write_text("print(1)\n")
    check_no_weights(tmp_path, None)
    (tmp_path / "server" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsInContextError, match="model.safetensors"):
        check_no_weights(tmp_path, None)


def test_renamed_weights_are_found_by_content(tmp_path: Path) -> None:
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "model.onnx").write_bytes(b"\x08\x07" * 5000)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "innocent.dat").write_bytes(b"\x08\x07" * 5000)
    with pytest.raises(WeightsInContextError, match="innocent.dat.*model.onnx") as e:
        check_no_weights(ctx, _manifest(weights / "model.onnx"))
    assert "mounted read-only" in str(e.value)


def test_context_digest_tracks_content_and_mode(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    d1 = context_digest(tmp_path)
    assert context_digest(tmp_path) == d1
    (tmp_path / "a").write_text("2")
    d2 = context_digest(tmp_path)
    assert d2 != d1
    os.chmod(tmp_path / "a", 0o755)
    assert context_digest(tmp_path) != d2


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"User": "", "Healthcheck": {"Test": ["CMD", "x"], "StartPeriod": 1}}, "root"),
        ({"User": "0:0", "Healthcheck": {"Test": ["CMD", "x"], "StartPeriod": 1}}, "root"),
        ({"User": "10001"}, "no HEALTHCHECK"),
        ({"User": "10001", "Healthcheck": {"Test": ["NONE"]}}, "no HEALTHCHECK"),
        ({"User": "10001", "Healthcheck": {"Test": ["CMD", "x"]}}, "start period"),
    ],
)
def test_image_policy(config: dict[str, object], match: str) -> None:
    with pytest.raises(BuildError, match=match):
        check_image_policy(config, "img")


def test_image_policy_accepts_hardened_image() -> None:
    check_image_policy(
        {
            "User": "10001:10001",
            "Healthcheck": {"Test": ["CMD", "python", "/h.py"], "StartPeriod": 3e10},
        },
        "img",
    )


def test_parse_lock() -> None:
    text = (
        "# comment\n"
        "numpy==2.1.0 \\\n    --hash=sha256:"
        + "a" * 64
        + " \\\n    --hash=sha256:"
        + "b" * 64
        + "\n    # via onnxruntime\n"
        "Prometheus_Client==0.21.0 --hash=sha256:" + "c" * 64 + "\n"
    )
    reqs = parse_lock(text)
    assert [(r.name, r.version) for r in reqs] == [
        ("numpy", "2.1.0"),
        ("prometheus-client", "0.21.0"),
    ]
    assert reqs[0].hashes == {"a" * 64, "b" * 64}
    with pytest.raises(BuildError, match="no --hash"):
        parse_lock("numpy==2.1.0\n")


def test_runtime_lock_parses() -> None:
    lock = Path(__file__).resolve().parents[2] / "dockerfiles" / "runtime" / "requirements.txt"
    names = {r.name for r in parse_lock(lock.read_text())}
    assert {"onnxruntime", "tokenizers", "numpy"} <= names
