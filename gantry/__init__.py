"""Gantry: a release pipeline for ML models, built on Prefect."""

__version__ = "0.1.0"
