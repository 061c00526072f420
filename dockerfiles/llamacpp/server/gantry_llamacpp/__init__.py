"""Gantry's llama.cpp runtime: llama-cpp-python's OpenAI-compatible server for GGUF models,
with a readiness gate that names a bad file, and Prometheus metrics with TTFT."""
