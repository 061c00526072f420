"""Frozen results handed from one stage to the next (and written to the release record)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WeightsResult(_Result):
    """The weights, pinned to a commit and verified, in the local content-addressed cache."""

    repo_id: str
    revision: str = Field(description="The revision the spec asked for.")
    commit: str = Field(description="The commit sha it resolved to; used from then on.")
    endpoint: str
    uri: str = Field(description="hf://<repo>@<commit>, the weights' immutable address.")
    manifest_digest: str
    manifest_path: str
    path: str = Field(description="Snapshot directory, mounted read-only into containers.")
    file_count: int
    total_bytes: int
    downloaded_files: int = Field(description="Files fetched from the hub by this run.")
    downloaded_bytes: int
    verify_seconds: float = Field(description="Time spent hashing the files.")
    cached: bool = Field(description="True when no file had to be downloaded.")


class Layer(_Result):
    """One image layer, as `docker history` shows it."""

    size_bytes: int
    created_by: str


class BuildResult(_Result):
    """The runtime image, pushed, and known by digest from here on."""

    image: str = Field(description="<registry>/<repository>@sha256:…, the immutable reference.")
    digest: str
    repository: str = Field(description="<registry>/<repository>")
    tag: str
    image_id: str
    context_digest: str = Field(description="sha256 of the build context (files and modes).")
    dockerfile: str
    base_images: tuple[str, ...]
    size_bytes: int
    layers: tuple[Layer, ...]
    labels: dict[str, str]
    build_seconds: float
    cached: bool = Field(description="True when an image for this context was already pushed.")
