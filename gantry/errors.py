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
    """Base of errors from the model hub; never raised itself (each cause has a class)."""


class HubUnavailableError(HubError, TransientError):
    """The hub endpoint did not answer, or answered 5xx."""


class DownloadIncompleteError(HubError, TransientError):
    """A download ended short of the size the hub announced: a cut transfer, retried."""


class HubResponseError(HubError, PermanentError):
    """The hub answered, but with something Gantry cannot use (an unexpected 4xx, no
    commit id, no file matching the selection, a file it listed but did not deliver)."""


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


class CommitConflictError(HubError, PermanentError):
    """A commit was built on a parent that is no longer its branch's head."""


class EntryNotFoundError(HubError, PermanentError):
    """A file or folder a commit deletes is not in the repository."""


class BlobMissingError(HubError, PermanentError):
    """A commit names file content (an LFS object) the hub never received."""


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


# --- weights signing (OpenSSF model-signing) -----------------------------------------------


class WeightsKeyError(PermanentError):
    """A weights signing key or identity is missing, unreadable, or locked by a password."""


class WeightsSignatureError(PermanentError):
    """The weights do not match their signature, or the signature cannot be checked.

    ``reason`` says which: ``missing`` (no signature file), ``wrong_key`` (signed by
    another key), ``invalid`` (the signature does not verify: edited, or another key),
    ``content`` (files changed, added or removed; listed in ``changed``/``added``/
    ``removed``), ``malformed`` (not a signature this verifier reads), ``unsupported``
    (the snapshot holds something that cannot be signed, e.g. a symlink).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        fix: str,
        changed: Sequence[str] = (),
        added: Sequence[str] = (),
        removed: Sequence[str] = (),
    ) -> None:
        self.reason = reason
        self.changed = tuple(changed)
        self.added = tuple(added)
        self.removed = tuple(removed)
        super().__init__(message, fix=fix)


class SigstoreUnavailableError(TransientError):
    """Keyless signing could not reach Sigstore (TUF, OIDC issuer, Fulcio, Rekor) in time."""


# --- scan (trivy) and the vulnerability gate -------------------------------------------------


class ScannerError(PermanentError):
    """trivy failed (crashed, refused its arguments) or wrote output Gantry cannot read."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr_tail: str = "",
        fix: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        super().__init__(message, fix=fix)


class VulnDBUnavailableError(PermanentError):
    """The vulnerability DB cannot be obtained, so the scan fails closed."""

    fix = (
        "set scan.db_repository to a reachable mirror of the trivy DB, pre-seed the cache dir "
        "with `trivy image --download-db-only --cache-dir <dir>` where network access exists, "
        "or set scan.allow_offline: true to proceed without vulnerability checks"
    )


class ScanPolicyError(PermanentError):
    """Findings at or above scan.severity that no current allowlist entry suppresses.

    ``blocking`` holds them (``gantry.adapters.trivy.Finding``), worst first.
    """

    fix = (
        "upgrade the affected package or the base image and rebuild, or add an allowlist "
        "entry (id, package, reason, expires) under scan.allowlist, or raise scan.severity"
    )

    def __init__(self, message: str, *, blocking: Sequence[object], fix: str | None = None) -> None:
        self.blocking = tuple(blocking)
        super().__init__(message, fix=fix)


# --- signing (image signatures and attestations) -----------------------------------------
# Raised by gantry.signing and gantry.adapters.cosign.


class SigningKeyError(PermanentError):
    """A signing key is missing, locked by another password, corrupt or of an unsupported kind."""


class SignatureVerificationError(PermanentError):
    """No signature (or attestation) on the image verifies: the message says which check failed."""

    def __init__(self, image: str, reason: str | None = None, *, fix: str | None = None) -> None:
        """``(image, reason)`` reads "verification of IMAGE failed: REASON"; a lone first
        argument is the whole message."""
        self.image = image if reason is not None else None
        self.reason = reason if reason is not None else image
        message = f"verification of {image} failed: {reason}" if reason is not None else image
        super().__init__(message, fix=fix)


class SigningConfigError(PermanentError):
    """The sign options ask for something the chosen signer cannot do."""


class ImageReferenceError(PermanentError):
    """A string is not an image reference (`registry/repo:tag` or `registry/repo@sha256:…`)."""


class CosignError(GantryError):
    """`cosign` exited non-zero; never raised itself: :class:`CosignFailedError` (permanent)
    or :class:`CosignNetworkError` (transient)."""

    def __init__(
        self, argv: Sequence[str], returncode: int, stderr_tail: str, *, fix: str | None = None
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        super().__init__(
            f"`{' '.join(self.argv)}` exited with {returncode}: {stderr_tail.strip()[-800:]}",
            fix=fix,
        )


class CosignFailedError(CosignError, PermanentError):
    """`cosign` refused the request for a reason retrying cannot fix."""


class CosignNetworkError(CosignError, TransientError):
    """`cosign` could not reach a registry (or Rekor/Fulcio), or it answered 5xx."""


# --- smoke (the first hardened run of the signed image) ----------------------------------
# Raised by gantry.adapters.containers and tasks.smoke. All permanent except where a retry
# can plausibly help: the stage itself retries a container that exits on its first start
# once (a start race), so a second early exit is a real crash and retrying cannot fix it.


class ContainerStartError(PermanentError):
    """The container exited (or could not be started) before it became healthy."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        logs_tail: str = "",
        fix: str | None = None,
    ) -> None:
        self.exit_code = exit_code
        self.logs_tail = logs_tail
        shown = (
            f"{message}\n--- last container log lines ---\n{logs_tail}" if logs_tail else message
        )
        super().__init__(shown, fix=fix)


class ContainerEngineError(TransientError):
    """The Docker engine failed a container call with a server error (5xx); retried."""


class HealthTimeoutError(PermanentError):
    """The container ran but its health endpoint did not answer 200 by the deadline."""

    def __init__(self, message: str, *, logs_tail: str = "", fix: str | None = None) -> None:
        self.logs_tail = logs_tail
        shown = (
            f"{message}\n--- last container log lines ---\n{logs_tail}" if logs_tail else message
        )
        super().__init__(shown, fix=fix)


class ProbeError(PermanentError):
    """The model answered, but wrongly (shape, values, similarity order, expected text)."""


class AcceleratorError(PermanentError):
    """A GPU was asked for but the engine has none, or the runtime silently runs on CPU."""


class StartPeriodTooShortError(PermanentError):
    """The image's HEALTHCHECK start period is shorter than the measured cold start."""


# --- register (MLflow tracking and model registry) -----------------------------------------
# Raised by gantry.adapters.mlflow_registry and tasks.register.


class MLflowUnavailableError(TransientError):
    """The MLflow tracking server did not answer in time, refused the connection, or 5xx."""

    fix = (
        "start the MLflow tracking server, or point MLFLOW_TRACKING_URI (or mlflow.tracking_uri "
        "in the spec) at a reachable one; raise mlflow.timeout_s if it is merely slow"
    )


class RegistrationError(PermanentError):
    """MLflow refused a tracking or registry request for a reason retrying cannot fix."""


# --- evaluate (quality and latency gate) -------------------------------------------------
# Raised by gantry.scoring and gantry.stages.evaluate.


class EvalSetError(PermanentError):
    """The eval set is missing, empty, or has a malformed line (named by its number)."""


class QualityGateError(PermanentError):
    """The candidate scored under the threshold, or regressed beyond tolerance from the
    champion; the message gives both scores."""

    def __init__(
        self,
        message: str,
        *,
        score: float,
        threshold: float,
        champion_score: float | None,
        fix: str | None = None,
    ) -> None:
        self.score = score
        self.threshold = threshold
        self.champion_score = champion_score
        super().__init__(message, fix=fix)


class EndpointUnavailableError(TransientError):
    """The served endpoint did not answer (or answered 5xx/429) after retries; no quality
    verdict was reached."""


class EndpointResponseError(PermanentError):
    """The served endpoint refused a request (4xx) or answered outside the protocol."""


# --- metrics (Prometheus) -------------------------------------------------------------------
# Raised by gantry.adapters.prometheus.


class PrometheusError(GantryError):
    """Base of errors from Prometheus; never raised itself (each cause has a class)."""


class PrometheusUnavailableError(PrometheusError, TransientError):
    """Prometheus did not answer in time, refused the connection, is not ready yet (503) or
    answered 5xx."""

    fix = (
        "start the embedded Prometheus with `gantry env up` (its log is "
        ".gantry/services/prometheus.log), or point GANTRY_PROMETHEUS_URL at a reachable one"
    )


class PrometheusQueryError(PrometheusError, PermanentError):
    """Prometheus refused a query (400 bad_data: invalid PromQL or parameters; 422: the
    query cannot be executed); the message holds the query and Prometheus's own reason."""

    def __init__(self, message: str, *, query: str, reason: str, fix: str | None = None) -> None:
        self.query = query
        self.reason = reason
        super().__init__(message, fix=fix)


class PrometheusResponseError(PrometheusError, PermanentError):
    """Prometheus answered, but with something Gantry cannot use: a refusal (401/403), no
    such API (404: not a Prometheus), a body that is not its JSON, or a failed reload."""


# --- triggers (deployments, worker, CI webhook) -------------------------------------------
# Raised by gantry.adapters.prefect_api and gantry.webhook.


class DeploymentConfigError(PermanentError):
    """prefect.yaml (or a flow it names) cannot be registered as a deployment."""


class WebhookError(PermanentError):
    """A webhook delivery was refused; ``status`` is the HTTP status it is answered with."""

    status: int = 400


class WebhookSignatureError(WebhookError):
    """The delivery carries no signature, or one that does not match the body."""

    status = 401
    fix = (
        "sign the raw body with HMAC-SHA256 and the shared secret and send it as "
        "`X-Hub-Signature-256: sha256=<hex>` (or `X-Gantry-Signature`)"
    )


class WebhookBodyTooLargeError(WebhookError):
    """The body is larger than the receiver accepts."""

    status = 413


class WebhookTimeoutError(WebhookError):
    """The body did not arrive within the receiver's read deadline."""

    status = 408
    fix = "send the whole body at once; a client this slow is cut off so it cannot hold a slot"


class WebhookContentTypeError(WebhookError):
    """The body is not declared as JSON."""

    status = 415
    fix = "send `Content-Type: application/json` (GitHub: webhook content type application/json)"


class WebhookParameterError(WebhookError):
    """The payload is valid JSON but does not map to a valid release spec.

    ``errors`` holds ``(loc, message)`` pairs; ``loc`` is the dotted field path.
    """

    status = 422

    def __init__(
        self, message: str, *, errors: Sequence[tuple[str, str]], fix: str | None = None
    ) -> None:
        self.errors = tuple(errors)
        super().__init__(message, fix=fix)


class WebhookForbiddenError(WebhookError):
    """The delivery asks for something the webhook config does not let a delivery do: an
    inline spec, an override of an unlisted field, a change that weakens a gate or names a
    host path. The sender holds a shared secret, not the keys to the platform."""

    status = 403

    def __init__(self, message: str, *, fields: Sequence[str], fix: str | None = None) -> None:
        self.fields = tuple(fields)
        super().__init__(message, fix=fix)


class WebhookConflictError(WebhookError):
    """A delivery id was seen before with a different body."""

    status = 409


class TriggerUnavailableError(TransientError):
    """Prefect did not answer in time, or the deployment a trigger starts does not exist."""


# --- stage canary and rollback -------------------------------------------------------------


class RouterError(PermanentError):
    """The router refused a command or answered something Gantry does not understand."""


class RouterUnavailableError(TransientError):
    """The router (its container or its runtime API) does not answer."""


class LockServiceUnavailableError(TransientError):
    """The Prefect API that holds the cross-host locks (GANTRY_TOPOLOGY=multi) did not
    answer."""

    fix = (
        "start the control host's Prefect server (`gantry env up`) or point PREFECT_API_URL at "
        "the Prefect API every worker host shares; the run is retried"
    )


class MetricsUnavailableError(TransientError):
    """Gantry's metrics exporter does not answer or refused what the canary sent it."""


class DeploymentStatusUnreadableError(ConfigError):
    """A deployment's status file is damaged; `gantry rollback` rebuilds it from what runs."""


class DeploymentNotFoundError(PermanentError):
    """There is no deployment of the model on this target (nothing to roll back)."""


class ChampionUnavailableError(PermanentError):
    """The live champion is not serving (its container died or was removed), so a canary
    has nothing to be compared against."""

    fix = "run `gantry rollback MODEL` (it restarts the champion at 100 %), then release again"


class ReleaseInProgressError(PermanentError):
    """Another run of the same release (the same spec) is running right now."""


class CanaryLockedError(PermanentError):
    """Another canary of the same model holds the deployment's lock."""


class InvalidTransitionError(PermanentError):
    """An event that does not apply in the deployment's current phase (a bug, or a status
    file edited by hand): nothing was changed."""


class CanaryFailedError(PermanentError):
    """The candidate failed an analysis check: it was rolled back, the champion serves all
    traffic, and the MLflow `champion` alias did not move."""

    def __init__(self, message: str, *, failed_checks: Sequence[str], fix: str | None = None):
        self.failed_checks = tuple(failed_checks)
        super().__init__(message, fix=fix)


class ApprovalRejectedError(PermanentError):
    """Promotion to 100 % needed a manual approval that was refused or never came."""


# --- re-evaluation of live champions -------------------------------------------------------
# Raised by tasks.reevaluate and flows.reevaluate.


class ChampionImageMissingError(PermanentError):
    """The champion's image is gone from the registry (by digest): it can neither be
    verified nor started again if its container dies."""

    fix = (
        "push it again by re-running the champion's release (`gantry release SPEC`), or "
        "restore the registry's storage; until then `gantry rollback MODEL` cannot restart it"
    )


class ReevaluationError(PermanentError):
    """A re-evaluation found a regression, or could not judge a model; ``report`` holds
    every model's outcome (the flow checks all models before it fails)."""

    def __init__(self, message: str, *, report: object, fix: str | None = None) -> None:
        self.report = report
        super().__init__(message, fix=fix)


# --- resource usage (container stats and the limits they call for) --------------------------
# Raised by gantry.adapters.docker_stats and gantry.usage.


class StatsUnavailableError(PermanentError):
    """A container has no stats to read: it is not running (created, exited, being
    removed), or the engine refused the request. Readers skip the sample."""


class ResourceLimitError(PermanentError):
    """The configured memory limit is below what the model was observed to use under load
    (or it was OOM-killed at it): it would be killed in production. Carries both figures."""

    def __init__(
        self,
        message: str,
        *,
        configured_mb: int,
        observed_p99_mb: float | None,
        recommended_mb: int | None,
        fix: str | None = None,
    ) -> None:
        self.configured_mb = configured_mb
        self.observed_p99_mb = observed_p99_mb
        self.recommended_mb = recommended_mb
        super().__init__(message, fix=fix)
