"""Gantry's reference runtime for sentence-embedding models.

Serves an ONNX export of a sentence-transformers model behind an OpenAI-compatible
``/v1/embeddings`` endpoint. Run with ``python -m gantry_runtime``; see :mod:`.app` for
the endpoints and :meth:`.app.Config.from_env` for the environment it reads.
"""

import os

# ONNX Runtime >= 1.29 uploads usage telemetry from its Linux builds and persists a device
# id under ~/.cache; a server with no egress and a read-only root must do neither. Read
# once, when onnxruntime initialises, so it is set here, before any submodule imports it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
