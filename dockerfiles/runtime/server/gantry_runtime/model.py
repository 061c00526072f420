"""A sentence-transformers embedding model on ONNX Runtime and ``tokenizers``.

Reads a Hub-style model dir: ``onnx/model.onnx``, ``tokenizer.json`` and, when present,
``sentence_bert_config.json`` (max_seq_length), ``1_Pooling/config.json`` (pooling mode),
``modules.json`` (whether a Normalize module follows) and ``config.json``
(max_position_embeddings, pad_token_id). No torch, no transformers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, cast

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")
Pooling = Literal["mean", "cls", "max", "none"]

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DEFAULT_MAX_SEQ_LENGTH = 256
# Inputs are run in micro-batches of similar length: bounded memory for a 256-input
# request, and little compute wasted on padding.
MICRO_BATCH = 32
_MODEL_FILES = ("onnx/model.onnx", "model.onnx")
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_INT_TYPES: dict[str, type[np.signedinteger[Any]]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class ModelLoadError(RuntimeError):
    """The model dir, its config or the requested device cannot be served."""


@dataclass(frozen=True)
class Embeddings:
    """One vector per input, in input order, and the tokens the model saw."""

    vectors: npt.NDArray[np.float32]
    prompt_tokens: int


def select_providers(device: Device, available: Sequence[str]) -> list[str]:
    """The ONNX Runtime providers to ask for; ``cuda`` without CUDA is an error."""
    if device == "cpu":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        # CPU stays listed so ops without a CUDA kernel can still run.
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "cuda":
        raise ModelLoadError(
            f"GANTRY_DEVICE=cuda but onnxruntime has no {CUDA_PROVIDER} "
            f"(available: {', '.join(available) or 'none'}); install onnxruntime-gpu and "
            "run with a GPU, or set GANTRY_DEVICE=cpu"
        )
    return [CPU_PROVIDER]


def _read_json(path: Path, kind: type[dict[str, Any]] | type[list[Any]] = dict) -> Any:
    """The JSON file at ``path`` (``None`` if absent); malformed is a load error."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, kind):
        raise ModelLoadError(f"{path} is not a JSON {kind.__name__}")
    return data


def _read_obj(path: Path) -> dict[str, Any]:
    return cast(dict[str, Any], _read_json(path) or {})


def _pooling(model_dir: Path) -> Pooling:
    cfg = _read_obj(model_dir / "1_Pooling" / "config.json")
    if not cfg:
        return "mean"
    modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
    known: dict[str, Pooling] = {
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_cls_token": "cls",
        "pooling_mode_max_tokens": "max",
    }
    if len(modes) != 1 or modes[0] not in known:
        raise ModelLoadError(
            f"1_Pooling/config.json asks for {modes or 'no pooling'}; this runtime supports "
            "exactly one of mean, cls or max"
        )
    return known[modes[0]]


def _normalize(model_dir: Path) -> bool:
    modules = _read_json(model_dir / "modules.json", list)
    if modules is None:
        # No sentence-transformers pipeline to follow: unit vectors, as OpenAI returns.
        return True
    types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    unsupported = [
        t for t in types if t.rsplit(".", 1)[-1] not in {"Transformer", "Pooling", "Normalize"}
    ]
    if unsupported:
        raise ModelLoadError(f"modules.json has modules this runtime cannot run: {unsupported}")
    return any(t.endswith(".Normalize") for t in types)


def _max_seq_length(model_dir: Path) -> int:
    st = _read_obj(model_dir / "sentence_bert_config.json")
    value = st.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ModelLoadError(f"sentence_bert_config.json max_seq_length={value!r} is invalid")
    positions = _read_obj(model_dir / "config.json").get("max_position_embeddings")
    if isinstance(positions, int) and not isinstance(positions, bool) and positions > 1:
        value = min(value, positions)
    return value


def _pad_id(model_dir: Path, tokenizer: Tokenizer) -> int:
    padding = tokenizer.padding
    if padding and isinstance(padding.get("pad_id"), int):
        return int(padding["pad_id"])
    cfg_id = _read_obj(model_dir / "config.json").get("pad_token_id")
    if isinstance(cfg_id, int):
        return cfg_id
    token = _read_obj(model_dir / "special_tokens_map.json").get("pad_token", "[PAD]")
    if isinstance(token, dict):  # the {"content": ...} form of AddedToken
        token = token.get("content", "[PAD]")
    found = tokenizer.token_to_id(str(token))
    return int(found) if found is not None else 0


class EmbeddingModel:
    """A loaded model; :meth:`embed` is thread-safe (ONNX Runtime sessions are)."""

    def __init__(
        self,
        *,
        session: Any,
        tokenizer: Tokenizer,
        max_seq_length: int,
        pad_id: int,
        pooling: Pooling,
        normalize: bool,
        output_name: str,
    ) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self._pad_id = pad_id
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self._output_name = output_name
        self._inputs = {i.name: _INT_TYPES[i.type] for i in session.get_inputs()}
        self.providers: list[str] = list(session.get_providers())
        self.dimensions = 0
        self.load_seconds = 0.0

    @property
    def provider(self) -> str:
        """The provider the session actually runs on (not the one asked for)."""
        return self.providers[0]

    @property
    def device(self) -> Literal["cpu", "cuda"]:
        return "cuda" if self.provider == CUDA_PROVIDER else "cpu"

    @classmethod
    def load(cls, model_dir: Path, device: Device = "auto", intra_op_threads: int = 0) -> Self:
        """Load and warm up the model; raises :class:`ModelLoadError` with the reason."""
        started = time.monotonic()
        onnx_path = next((model_dir / f for f in _MODEL_FILES if (model_dir / f).is_file()), None)
        if onnx_path is None:
            raise ModelLoadError(f"no {' or '.join(_MODEL_FILES)} under {model_dir}")
        tokenizer_path = model_dir / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise ModelLoadError(f"no tokenizer.json under {model_dir}")
        # Cheap checks first: a bad config fails before the session is built.
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        max_seq_length = _max_seq_length(model_dir)
        pad_id = _pad_id(model_dir, tokenizer)
        normalize = _normalize(model_dir)
        # tokenizer.json often carries fixed padding/truncation from its export (128 for
        # all-MiniLM-L6-v2); padding is done per micro-batch here instead.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_seq_length)
        providers = select_providers(device, ort.get_available_providers())

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 0:
            # A container's CPU quota is invisible to ONNX Runtime, which sizes its pool to
            # the host's cores; this lets a deployment match the quota.
            options.intra_op_num_threads = intra_op_threads
        session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
        actual = session.get_providers()
        if device == "cuda" and actual[0] != CUDA_PROVIDER:
            # ONNX Runtime falls back to CPU when the CUDA libraries fail to load; a GPU
            # deployment silently running on CPU is the failure this guards against.
            raise ModelLoadError(
                f"GANTRY_DEVICE=cuda but the session runs on {actual[0]} (CUDA provider "
                "failed to initialise; see the onnxruntime log above)"
            )
        if CUDA_PROVIDER in providers and actual[0] != CUDA_PROVIDER:
            log.warning("CUDA was available but the session runs on %s", actual[0])

        declared = {i.name: i.type for i in session.get_inputs()}
        unknown = sorted(set(declared) - set(_TOKEN_INPUTS))
        if unknown or "input_ids" not in declared:
            raise ModelLoadError(
                f"graph inputs {sorted(declared)}: this runtime feeds only {list(_TOKEN_INPUTS)}"
            )
        bad_types = {n: t for n, t in declared.items() if t not in _INT_TYPES}
        if bad_types:
            raise ModelLoadError(f"graph inputs must be int64 or int32, got {bad_types}")

        outputs = {o.name: o for o in session.get_outputs()}
        pooling: Pooling
        pooled = outputs.get("sentence_embedding")
        if pooled is not None and len(pooled.shape) == 2:
            # Pooling is already in the graph (some exports include it).
            output_name, pooling = pooled.name, "none"
        else:
            by_name = [
                outputs[n] for n in ("last_hidden_state", "token_embeddings") if n in outputs
            ]
            rank3 = [o for o in outputs.values() if len(o.shape) == 3]
            chosen = (by_name or rank3 or [None])[0]
            if chosen is None:
                raise ModelLoadError(f"no token-embeddings output among {sorted(outputs)}")
            output_name, pooling = chosen.name, _pooling(model_dir)

        model = cls(
            session=session,
            tokenizer=tokenizer,
            max_seq_length=max_seq_length,
            pad_id=pad_id,
            pooling=pooling,
            normalize=normalize,
            output_name=output_name,
        )
        # The warm-up run proves the graph executes before /health says ok, and yields the
        # dimension when the graph leaves it symbolic.
        model.dimensions = int(model.embed(["warm up"]).vectors.shape[1])
        model.load_seconds = time.monotonic() - started
        return model

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Embed ``texts`` (truncated to ``max_seq_length`` tokens each)."""
        encodings = self._tokenizer.encode_batch(list(texts))
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids), reverse=True)
        out: npt.NDArray[np.float32] | None = None
        for start in range(0, len(order), MICRO_BATCH):
            chunk = order[start : start + MICRO_BATCH]
            vectors = self._run([encodings[i] for i in chunk])
            if out is None:
                out = np.empty((len(encodings), vectors.shape[1]), dtype=np.float32)
            out[chunk] = vectors
        if out is None:
            out = np.empty((0, self.dimensions), dtype=np.float32)
        return Embeddings(vectors=out, prompt_tokens=sum(len(e.ids) for e in encodings))

    def _run(self, encodings: Sequence[Any]) -> npt.NDArray[np.float32]:
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = 1
            types[row, :n] = e.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        # Feed only what the graph declares: many exports drop token_type_ids.
        feed = {
            name: arrays[name].astype(dtype, copy=False) for name, dtype in self._inputs.items()
        }
        (hidden,) = self._session.run([self._output_name], feed)
        hidden = np.asarray(hidden, dtype=np.float32)
        pooled = _pool(hidden, mask, self.pooling)
        if self.normalize:
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            pooled = pooled / np.maximum(norms, 1e-12)
        return pooled.astype(np.float32, copy=False)


def _pool(
    hidden: npt.NDArray[np.float32], mask: npt.NDArray[np.int64], pooling: Pooling
) -> npt.NDArray[np.float32]:
    pooled: npt.NDArray[np.float32]
    m = mask[:, :, None].astype(np.float32)
    if pooling == "none":
        pooled = hidden
    elif pooling == "cls":
        pooled = hidden[:, 0, :]
    elif pooling == "max":
        pooled = np.where(m > 0, hidden, np.float32(-1e9)).max(axis=1)
    else:
        # Mean over real tokens only: padding must not change a sentence's vector.
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled
