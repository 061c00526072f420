"""Check a GGUF file before llama.cpp loads it, so a bad file fails with its reason.

llama.cpp answers a truncated or foreign file with "failed to load model" and prints the
cause only to its own stderr. Reading the header here (standard library only) names the
cause in ``/health`` instead: not GGUF, an unsupported version, or tensor data that
ends past the end of the file (an interrupted download).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

#: ggml type id -> (elements per block, bytes per block). A type missing here (a newer
#: quantization) skips the size check of its tensors, not the rest.
_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    30: (1, 2),  # BF16
}

# GGUF metadata value types: fixed-size scalars by id, then string (8) and array (9).
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
#: Caps on counts read from the header, so a corrupt one fails here, not in a huge loop.
_MAX_COUNT = 1 << 24
_MAX_STRING = 1 << 26


class GGUFError(ValueError):
    """The file is not a GGUF llama.cpp can load; the message says why."""


@dataclass(frozen=True)
class GGUFInfo:
    """What the header says: enough to name the model and check the file is whole."""

    version: int
    tensor_count: int
    metadata: dict[str, object]
    data_offset: int
    data_end: int
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str | None:
        name = self.metadata.get("general.name")
        return str(name) if name is not None else None


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError(
                f"{self.path.name} ends inside its GGUF header (at byte {self.f.tell()}): the "
                "file is truncated; download it again"
            )
        return data

    def unpack(self, fmt: str) -> object:
        value: object = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def count(self, what: str) -> int:
        n = self.u64()
        if n > _MAX_COUNT:
            raise GGUFError(f"{self.path.name}: {what} count {n} is implausible: a corrupt header")
        return n

    def string(self) -> str:
        n = self.u64()
        if n > _MAX_STRING:
            raise GGUFError(f"{self.path.name}: a {n}-byte string: a corrupt header")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.u32()
            n = self.count("array")
            if item_type in _SCALARS:
                # Token tables are large arrays: skip their bytes rather than decode them.
                self.take(n * struct.calcsize(_SCALARS[item_type]))
                return f"<array of {n}>"
            if n > 64:
                return self._skip(item_type, n)
            return [self.value(item_type) for _ in range(n)]
        raise GGUFError(f"{self.path.name}: unknown metadata value type {vtype}")

    def _skip(self, item_type: int, n: int) -> str:
        for _ in range(n):
            self.value(item_type)
        return f"<array of {n}>"


def inspect(path: Path) -> GGUFInfo:
    """Parse ``path``'s header and tensor table; :class:`GGUFError` says what is wrong."""
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        r = _Reader(f, path)
        magic = f.read(4)
        if magic != MAGIC:
            raise GGUFError(
                f"{path.name} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r}); "
                "llama.cpp serves GGUF only: convert the model with llama.cpp's "
                "convert_hf_to_gguf.py"
            )
        version = r.u32()
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(f"{path.name} is GGUF version {version}; supported: 2 and 3")
        tensor_count = r.count("tensor")
        kv_count = r.count("metadata")
        metadata: dict[str, object] = {}
        for _ in range(kv_count):
            key = r.string()
            metadata[key] = r.value(r.u32())
        end = 0
        for _ in range(tensor_count):
            name = r.string()
            n_dims = r.u32()
            if n_dims > 8:
                raise GGUFError(f"{path.name}: tensor {name!r} has {n_dims} dimensions")
            elements = 1
            for _ in range(n_dims):
                elements *= r.u64()
            ggml_type = r.u32()
            offset = r.u64()
            block, block_bytes = _TYPE_SIZES.get(ggml_type, (1, 0))
            end = max(end, offset + -(-elements // block) * block_bytes)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        align = alignment if isinstance(alignment, int) and alignment > 0 else DEFAULT_ALIGNMENT
        data_offset = -(-f.tell() // align) * align
    info = GGUFInfo(version, tensor_count, metadata, data_offset, data_offset + end, size)
    if info.data_end > size:
        raise GGUFError(
            f"{path.name} is truncated: its tensors end at byte {info.data_end} but the file "
            f"has {size} bytes ({info.data_end - size} missing); download it again"
        )
    return info


def find_model(model_path: Path, model_file: str | None = None) -> Path:
    """The GGUF to serve: ``model_path`` itself, ``MODEL_FILE`` in it, or its only ``*.gguf``."""
    if model_path.is_file():
        return model_path
    if not model_path.is_dir():
        raise GGUFError(f"MODEL_PATH {model_path} does not exist (is the model mounted?)")
    if not os.access(model_path, os.R_OK | os.X_OK):
        # Else the search below finds nothing and blames the files, not the permissions.
        raise GGUFError(
            f"MODEL_PATH {model_path} cannot be listed by uid {os.getuid()}: make the "
            "mounted directory readable by the container's user (mode 0755)"
        )
    if model_file:
        chosen = model_path / model_file
        if not chosen.is_file():
            raise GGUFError(f"MODEL_FILE {model_file!r} is not a file in {model_path}")
        return chosen
    found = sorted(p for p in model_path.rglob("*.gguf") if p.is_file())
    if not found:
        raise GGUFError(
            f"no *.gguf file in {model_path}; include the GGUF in source.allow_patterns"
        )
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(model_path)) for p in found)
        raise GGUFError(f"several GGUF files in {model_path} ({names}); set MODEL_FILE to one")
    return found[0]
