"""Gantry's error hierarchy.

Every error a stage raises is a :class:`GantryError`. Two branches decide what happens
next: :class:`TransientError` is retried with backoff (network, registry 5xx, container
start races); :class:`PermanentError` fails at once (bad input, policy, integrity). Each
message names the cause and the fix: the flag, env var, spec field or command.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class GantryError(Exception):
    """Base of every error Gantry raises on purpose."""

    #: What the user should do about it; appended to the message.
    fix: str = ""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        if fix is not None:
            self.fix = fix
        self.message = message
        super().__init__(f"{message}\n  fix: {self.fix}" if self.fix else message)


class TransientError(GantryError):
    """A failure that may go away by itself; retried with bounded backoff."""


class PermanentError(GantryError):
    """A failure that retrying cannot fix; the run fails at once."""


# --- configuration and input -------------------------------------------------------------


class SpecError(PermanentError):
    """The release spec is malformed or names unknown fields (CLI exit code 2)."""

    fix = "correct the field named above in the spec file; `gantry spec-schema` prints every field"


class ConfigError(PermanentError):
    """A Gantry setting (environment variable or state dir) is unusable."""


# --- tools and engines -------------------------------------------------------------------


class ToolNotFoundError(PermanentError):
    """A binary Gantry needs is not installed."""

    def __init__(self, tool: str, *, env_var: str | None, install_hint: str) -> None:
        self.tool = tool
        where = f" or point {env_var} at it" if env_var else ""
        super().__init__(f"`{tool}` was not found on PATH", fix=f"{install_hint}{where}")


class CommandError(PermanentError):
    """A subprocess exited non-zero."""

    def __init__(
        self, argv: Sequence[str], returncode: int, stderr_tail: str, *, fix: str = ""
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        shown = " ".join(self.argv)
        if len(shown) > 240:
            shown = shown[:200] + " … " + shown[-30:]
        super().__init__(
            f"`{shown}` exited with {returncode}: {stderr_tail.strip()[-800:]}", fix=fix
        )


class CommandTimeoutError(TransientError):
    """A subprocess outran its timeout and was killed."""

    def __init__(self, argv: Sequence[str], timeout_s: float) -> None:
        self.argv = list(argv)
        self.timeout_s = timeout_s
        super().__init__(
            f"`{' '.join(self.argv)}` did not finish within {timeout_s:.0f}s and was killed",
            fix="check the tool is not stuck on the network; raise the timeout if the work "
            "is legitimately slow",
        )


class DockerUnavailableError(PermanentError):
    """The Docker engine cannot be reached."""

    fix = (
        "start the Docker engine (`systemctl start docker` or `dockerd &`) and make sure this "
        "user can reach it; set DOCKER_HOST if the engine is not on the default socket"
    )


class BaseImageError(PermanentError):
    """A base image the Dockerfile needs is missing and cannot be built or pulled."""


class ServiceError(PermanentError):
    """An embedded service (registry, hub, Prefect server) failed to start or answer."""


# --- hub and weights ---------------------------------------------------------------------


class HubError(GantryError):
    """Base of errors from the model hub."""


class HubUnavailableError(HubError, TransientError):
    """The hub endpoint did not answer, or answered 5xx."""


class RepoNotFoundError(HubError, PermanentError):
    """The repository does not exist (or is private and no token was given)."""


class RevisionNotFoundError(HubError, PermanentError):
    """The repository exists but the revision (branch, tag or commit) does not."""


class GatedRepoError(HubError, PermanentError):
    """The repository is gated and the request carried no token with access."""


class HubAuthError(HubError, PermanentError):
    """The hub refused the token."""


class UnsafePathError(HubError, PermanentError):
    """A file name from the hub would escape the download directory."""


class ChecksumMismatchError(PermanentError):
    """A file's digest differs from the one it must have."""

    def __init__(self, path: str, expected: str, actual: str, *, source: str, fix: str) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"checksum mismatch for {path}: expected {source} {expected}, got {actual}", fix=fix
        )


class DiskFullError(PermanentError):
    """The disk filled up while writing; nothing partial was kept."""

    def __init__(self, where: Path) -> None:
        super().__init__(
            f"no space left on device while writing under {where}; the partial download "
            "was removed",
            fix="free disk space or point GANTRY_STATE_DIR at a larger volume, then re-run",
        )


# --- build and registry ------------------------------------------------------------------


class BuildError(PermanentError):
    """`docker build` failed on the Dockerfile's own terms."""


class WeightsInContextError(PermanentError):
    """The build context would copy model weights into the image."""


class RegistryUnavailableError(TransientError):
    """The OCI registry did not answer or answered 5xx."""


class RegistryError(PermanentError):
    """The registry refused a request for a reason retrying cannot fix."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying. Used as the tasks' retry condition."""
    return isinstance(exc, TransientError)
