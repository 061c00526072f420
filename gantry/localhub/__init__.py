"""A local stand-in for the Hugging Face Hub: a repository store, an HTTP endpoint the
real ``huggingface_hub`` client talks to, and the demo model repository.

Run it with ``python -m gantry.localhub serve``; build the demo with
``python -m gantry.localhub assemble-demo``.
"""
