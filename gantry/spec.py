"""The release spec: what to release and how.

``ReleaseSpec`` is at once the YAML schema of ``gantry release SPEC.yaml`` and the
parameter form of the ``release`` deployment in the Prefect UI, so every field carries a
title-worthy description and constraints.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gantry.errors import SpecError
from gantry.proc import SECRET_NAME, has_url_credentials

DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

#: What the demo model needs from its repository; the same patterns work on huggingface.co.
DEFAULT_ALLOW_PATTERNS = ("onnx/model.onnx", "*.json", "vocab.txt", "1_Pooling/*")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Protocol(StrEnum):
    """How the served model is spoken to."""

    OPENAI_EMBEDDINGS = "openai-embeddings"
    OPENAI_CHAT = "openai-chat"


class HubSource(_Frozen):
    """Where the weights come from."""

    repo_id: str = Field(
        title="Repository",
        description="Hub repository id, `owner/name` "
        "(e.g. `sentence-transformers/all-MiniLM-L6-v2`).",
        examples=["gantry-demo/all-MiniLM-L6-v2"],
    )
    revision: str = Field(
        default="main",
        title="Revision",
        description="Branch, tag or commit sha. It is resolved to a commit sha before "
        "anything is downloaded, and only the commit is used from then on.",
        min_length=1,
        max_length=255,
    )
    endpoint: str | None = Field(
        default=None,
        title="Hub endpoint",
        description="Base URL of the Hub API. Empty: $HF_ENDPOINT, else https://huggingface.co.",
    )

    @field_validator("endpoint")
    @classmethod
    def _no_endpoint_credentials(cls, v: str | None) -> str | None:
        return _no_url_credentials(v, "the token comes from source.token_env or token_secret")

    allow_patterns: tuple[str, ...] = Field(
        default=DEFAULT_ALLOW_PATTERNS,
        title="Files to download",
        description="Glob patterns of repository files to download (fnmatch, as in "
        "huggingface_hub's allow_patterns).",
        min_length=1,
    )
    token_env: str = Field(
        default="HF_TOKEN",
        title="Token variable",
        description="Name of the environment variable that holds the Hub token for gated or "
        "private repositories. The token itself never goes in a spec.",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )
    token_secret: str | None = Field(
        default=None,
        title="Token secret block",
        description="Name of a Prefect Secret block holding the Hub token, used when the "
        "token variable is unset (e.g. on workers that get secrets from Prefect).",
        pattern=r"^[a-z0-9-]+$",
    )
    timeout_s: float = Field(
        default=60,
        gt=0,
        le=3600,
        title="Request timeout (s)",
        description="Timeout of each Hub request, in seconds.",
    )

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        if not _REPO_ID.match(v) or ".." in v:
            raise ValueError("must look like `owner/name` (letters, digits, `.`, `_`, `-`)")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("must be an http(s) URL, e.g. https://huggingface.co")
        return v.rstrip("/")

    @field_validator("allow_patterns")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not p or p.startswith("/") or ".." in p.split("/"):
                raise ValueError(f"pattern {p!r} must be a relative path glob without `..`")
        return v

    def resolved_endpoint(self) -> str:
        """The endpoint to use: the spec's, else $HF_ENDPOINT, else huggingface.co."""
        return (self.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HUB_ENDPOINT).rstrip("/")


class Accelerator(StrEnum):
    """Where the model runs in smoke, evaluation and canary containers."""

    CPU = "cpu"
    GPU = "gpu"
    AUTO = "auto"


class RuntimeOptions(_Frozen):
    """The serving runtime the image is built from, and how it is run."""

    protocol: Protocol = Field(
        default=Protocol.OPENAI_EMBEDDINGS,
        title="Inference protocol",
        description="How clients speak to the model.",
    )
    dockerfile_dir: str = Field(
        default="dockerfiles/runtime",
        title="Runtime directory",
        description="Directory (relative to the project root, or absolute) with the runtime's "
        "Dockerfile, requirements.txt (hash-locked) and server/ code.",
    )
    port: int = Field(
        default=8080, ge=1, le=65535, title="Container port", description="Port it serves on."
    )
    health_path: str = Field(
        default="/health",
        title="Health path",
        description="200 only once the model is loaded.",
        pattern=r"^/",
    )
    model_mount: str = Field(
        default="/models",
        title="Weights mount point",
        description="Where the weights are mounted read-only in the container.",
        pattern=r"^/",
    )
    served_model_name: str | None = Field(
        default=None,
        title="Served model name",
        description="The `model` value clients send. Empty: the spec's name.",
    )
    args: tuple[str, ...] = Field(
        default=(),
        title="Runtime arguments",
        description="Extra command-line arguments for the runtime (e.g. vLLM's "
        "`--gpu-memory-utilization 0.90`: a CLI argument, not an env var).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        title="Runtime environment",
        description="Non-secret environment variables for the runtime container.",
    )

    @field_validator("args")
    @classmethod
    def _gpu_memory(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # Past 0.90, vLLM OOMs under load in ways that are hard to reproduce (seed checklist).
        for i, arg in enumerate(v):
            flag, eq, value = arg.partition("=")
            if flag == "--gpu-memory-utilization":
                raw = value if eq else (v[i + 1] if i + 1 < len(v) else "")
                try:
                    frac = float(raw)
                except ValueError:
                    raise ValueError(
                        f"--gpu-memory-utilization needs a number, got {raw!r}"
                    ) from None
                if not 0 < frac <= 0.90:
                    raise ValueError(
                        f"--gpu-memory-utilization {frac} is outside (0, 0.90]: leave headroom "
                        "for the CUDA context and fragmentation"
                    )
        return v

    @field_validator("env")
    @classmethod
    def _no_secret_env(cls, v: dict[str, str]) -> dict[str, str]:
        # A spec travels in clear: Prefect's run parameters, release records, MLflow params.
        secret = sorted(k for k in v if SECRET_NAME.search(k))
        if secret:
            raise ValueError(
                f"{', '.join(secret)} look(s) like a secret, and runtime.env is stored in clear "
                "(release records, MLflow, the Prefect run's parameters): keep secrets out of "
                "the spec; the runtime reads only non-secret settings from it"
            )
        return v

    @field_validator("env")
    @classmethod
    def _no_gpu_env(cls, v: dict[str, str]) -> dict[str, str]:
        if "GPU_MEMORY_UTILIZATION" in v:
            raise ValueError(
                "vLLM ignores GPU_MEMORY_UTILIZATION; pass `--gpu-memory-utilization` in "
                "runtime.args instead"
            )
        return v


class BuildOptions(_Frozen):
    """How the image is built and where it goes."""

    repository: str | None = Field(
        default=None,
        title="Image repository",
        description="Repository path in the registry. Empty: `gantry/<name>`.",
        pattern=r"^[a-z0-9]+([._/-][a-z0-9]+)*$",
    )
    target: str = Field(
        default="production", title="Build target", description="Dockerfile stage to build."
    )
    timeout_s: float = Field(
        default=1800,
        gt=0,
        le=7200,
        title="Build timeout (s)",
        description="Upper bound for one image build, in seconds.",
    )


class Severity(StrEnum):
    """Trivy's severities, lowest first."""

    UNKNOWN = "UNKNOWN"
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"

    @property
    def rank(self) -> int:
        return list(Severity).index(self)


class AllowlistEntry(_Frozen):
    """A finding accepted on purpose, for a reason, until a date."""

    id: str = Field(
        title="Finding id",
        description="Vulnerability or misconfiguration id (CVE-…, GHSA-…, AVD-…/DS…).",
        pattern=r"^[A-Za-z][A-Za-z0-9]*-[A-Za-z0-9][A-Za-z0-9._:-]*$",
        max_length=100,
    )
    reason: str = Field(
        title="Reason", description="Why it is acceptable (who decided, and why).", min_length=3
    )
    expires: date = Field(
        title="Expires",
        description="Last day the entry suppresses the finding; after it the finding counts again.",
    )
    package: str | None = Field(
        default=None,
        title="Package",
        description="Only suppress the finding in this package (empty: in any package).",
    )


class ScanOptions(_Frozen):
    """The vulnerability and misconfiguration gate."""

    severity: Severity = Field(
        default=Severity.CRITICAL,
        title="Fail at severity",
        description="Fail on findings at or above this severity (CRITICAL, or HIGH to be "
        "stricter).",
    )
    ignore_unfixed: bool = Field(
        default=False,
        title="Ignore unfixed",
        description="Do not count vulnerabilities that have no fixed version yet.",
    )
    allowlist: tuple[AllowlistEntry, ...] = Field(
        default=(),
        title="Allowlist",
        description="Accepted findings, each with a reason and an expiry date.",
    )
    allow_offline: bool = Field(
        default=False,
        title="Allow scanning without a vulnerability DB",
        description="When the vulnerability DB cannot be obtained, go on without checking "
        "vulnerabilities (the record and the run say so prominently) instead of failing.",
    )
    max_db_age_hours: float = Field(
        default=72,
        gt=0,
        le=24 * 365,
        title="Oldest vulnerability DB",
        description="A DB built longer ago than this does not count: it misses what was "
        "published since (the scan then fails closed, unless allow_offline). A re-used scan "
        "result expires with its DB, and when an allowlist entry it relied on expires.",
    )
    db_repository: str | None = Field(
        default=None,
        title="Vulnerability DB repository",
        description="OCI repository of the trivy DB (a mirror); empty: trivy's default.",
    )
    timeout_s: float = Field(
        default=900, gt=0, le=7200, title="Scan timeout (s)", description="Per trivy call."
    )


class SignOptions(_Frozen):
    """How the image and the weights are signed and verified."""

    method: Literal["key", "kms", "keyless"] = Field(
        default="key",
        title="Signing method",
        description="`key`: a cosign key pair on disk; `kms`: a KMS key URI; `keyless`: a "
        "Sigstore OIDC identity (needs network access to Fulcio/Rekor).",
    )
    key: str | None = Field(
        default=None,
        title="Private key",
        description="Path of the cosign private key (method `key`). Empty: "
        "<state dir>/keys/cosign.key, created by `gantry keys generate`.",
    )
    kms_uri: str | None = Field(
        default=None,
        title="KMS key URI",
        description="e.g. awskms:///alias/gantry, gcpkms://…, hashivault://… (method `kms`).",
    )
    password_env: str = Field(
        default="COSIGN_PASSWORD",
        title="Key password variable",
        description="Environment variable holding the private key's password.",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )
    tlog_upload: bool = Field(
        default=False,
        title="Upload to the transparency log",
        description="Record signatures in Rekor (needs network access to it).",
    )
    signer: Literal["auto", "cosign", "builtin"] = Field(
        default="auto",
        title="Signer",
        description="`cosign` binary, Gantry's `builtin` cosign-compatible signer, or `auto` "
        "(cosign when installed, else built-in).",
    )
    certificate_identity: str | None = Field(
        default=None,
        title="Signer identity (keyless)",
        description="Method `keyless`: the certificate identity signatures must carry (e.g. "
        "the CI workflow's URI); verification accepts no other.",
    )
    certificate_oidc_issuer: str | None = Field(
        default=None,
        title="OIDC issuer (keyless)",
        description="Method `keyless`: the OIDC issuer of that identity.",
    )

    @model_validator(mode="after")
    def _method(self) -> SignOptions:
        if self.method == "kms" and not self.kms_uri:
            raise ValueError("method kms needs kms_uri (e.g. awskms:///alias/gantry)")
        if self.method == "keyless" and not (
            self.certificate_identity and self.certificate_oidc_issuer
        ):
            raise ValueError(
                "method keyless needs certificate_identity and certificate_oidc_issuer: "
                "without them any Sigstore identity's signature would verify"
            )
        return self


class SmokeOptions(_Frozen):
    """The first real run of the signed image: hardened, health-checked, probed."""

    accelerator: Accelerator = Field(
        default=Accelerator.AUTO,
        title="Accelerator",
        description="`cpu`, `gpu` (fails at once if the engine has no GPU runtime), or `auto` "
        "(GPU when the engine offers one).",
    )
    gpus: int = Field(default=1, ge=1, le=16, title="GPUs", description="GPUs to reserve.")
    cpus: float = Field(default=2.0, gt=0, le=256, title="CPU limit", description="CPUs.")
    memory_mb: int = Field(
        default=2048, ge=128, le=1_048_576, title="Memory limit (MiB)", description="Memory."
    )
    deadline_s: float = Field(
        default=180,
        gt=0,
        le=3600,
        title="Health deadline (s)",
        description="Fail if the container is not healthy this long after it starts.",
    )
    start_attempts: int = Field(
        default=2,
        ge=1,
        le=5,
        title="Container starts",
        description="How often a container that exits before it is healthy is started; "
        "an exit on the first start may be a start race, the same exit every time is a crash.",
    )
    chat_prompt: str = Field(
        default="What is 2 + 2? Answer with the number only.",
        title="Chat probe prompt",
        description="For `openai-chat`: a prompt whose answer is known.",
    )
    chat_expect: str = Field(
        default="4",
        title="Chat probe answer",
        description="For `openai-chat`: a fragment the answer must contain.",
    )


class EvalOptions(_Frozen):
    """The quality and latency gate."""

    dataset: str | None = Field(
        default=None,
        title="Eval set",
        description="JSONL eval set (relative to the project root, or absolute). Empty: no "
        "evaluation gate (the stage is skipped with a warning).",
    )
    metric: Literal["top1", "mrr", "exact", "contains", "regex"] = Field(
        default="top1",
        title="Gate metric",
        description="Embeddings: `top1` (retrieval accuracy) or `mrr`; chat: `exact`, "
        "`contains` or `regex`.",
    )
    threshold: float = Field(
        default=0.8, ge=0, le=1, title="Minimum score", description="Absolute threshold."
    )
    tolerance: float = Field(
        default=0.02,
        ge=0,
        le=1,
        title="Allowed regression",
        description="How far below the current champion's score a candidate may be.",
    )
    concurrency: int = Field(
        default=4, ge=1, le=256, title="Concurrency", description="Requests in flight."
    )
    max_tokens: int = Field(
        default=96,
        ge=1,
        le=32_768,
        title="Answer length (tokens)",
        description="Chat: the most tokens one answer may take (evaluation and the canary's "
        "quality probes). Bounds a model that rambles: without it, one answer can run to "
        "the context length and time out.",
    )
    timeout_s: float = Field(
        default=30, gt=0, le=600, title="Request timeout (s)", description="Per request."
    )
    request_attempts: int = Field(
        default=4,
        ge=1,
        le=10,
        title="Tries per request",
        description="Tries of one eval request that failed to connect, timed out or was "
        "answered 429/5xx, before the endpoint counts as unavailable (no verdict).",
    )
    request_backoff_s: float = Field(
        default=0.5,
        ge=0,
        le=60,
        title="Request retry delay (s)",
        description="Delay before the second try of an eval request; doubles on each try.",
    )


class RegisterOptions(_Frozen):
    """Where the candidate is recorded."""

    tracking_uri: str | None = Field(
        default=None,
        title="MLflow tracking URI",
        description="Empty: $MLFLOW_TRACKING_URI, else SQLite under the state dir.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_tracking_credentials(cls, v: str | None) -> str | None:
        return _no_url_credentials(
            v, "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or _TOKEN) instead"
        )

    model_name: str | None = Field(
        default=None,
        title="Registered model",
        description="MLflow registered model name. Empty: the spec's name.",
    )
    experiment: str = Field(
        default="gantry-releases",
        title="Experiment",
        description="MLflow experiment for release runs.",
    )
    timeout_s: float = Field(
        default=60, gt=0, le=600, title="Timeout (s)", description="Per MLflow call."
    )


class DeployTarget(StrEnum):
    """Where the model serves live traffic."""

    DOCKER = "docker"


class CanaryMetrics(StrEnum):
    """Where the canary's analysis reads traffic from."""

    PROMETHEUS = "prometheus"
    ROUTER_LOG = "router-log"


class CanaryOptions(_Frozen):
    """How the candidate goes live: beside the champion, traffic shifted in steps, each
    step judged by an analysis window; any failed check rolls it back at once."""

    target: DeployTarget = Field(
        default=DeployTarget.DOCKER,
        title="Deploy target",
        description="`docker`: a weighted HAProxy router and the model containers on the "
        "local Docker engine.",
    )
    metrics: CanaryMetrics = Field(
        default=CanaryMetrics.PROMETHEUS,
        title="Metrics source",
        description="`prometheus`: every check is a named PromQL query (candidate vs "
        "champion) against the embedded Prometheus or GANTRY_PROMETHEUS_URL, shown with its "
        "value in the verdict; `router-log`: the router's access log, read directly, where "
        "no Prometheus is wanted.",
    )
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        title="Endpoint port",
        description="Port of the model's endpoint on 127.0.0.1. Empty: a free port is chosen "
        "when the model is first deployed, and kept.",
    )
    steps: tuple[int, ...] = Field(
        default=(10, 50, 100),
        min_length=1,
        max_length=20,
        title="Traffic steps (%)",
        description="The candidate's share of traffic at each step, increasing, ending at "
        "100 (promotion). Every step below 100 gets one analysis window.",
    )
    window_s: float = Field(
        default=30,
        ge=1,
        le=86_400,
        title="Analysis window (s)",
        description="How long each step is observed before it passes.",
    )
    interval_s: float = Field(
        default=1,
        ge=0.1,
        le=60,
        title="Check interval (s)",
        description="How often the checks run inside a window; a failing check rolls back "
        "at once, without waiting for the window to end.",
    )
    min_requests: int = Field(
        default=20,
        ge=1,
        le=1_000_000,
        title="Requests to judge",
        description="Requests the candidate must answer in a window to be judged; when live "
        "traffic brings fewer, synthetic probe requests make up the difference.",
    )
    probe_rps: float = Field(
        default=5,
        gt=0,
        le=1000,
        title="Probe rate (req/s)",
        description="Rate of synthetic probe requests (to candidate and champion alike).",
    )
    max_error_rate: float = Field(
        default=0.01,
        ge=0,
        le=1,
        title="Max error rate",
        description="Share of the candidate's requests that may fail (5xx or no answer).",
    )
    max_latency_ratio: float = Field(
        default=1.5,
        ge=1,
        le=100,
        title="Max latency ratio",
        description="The candidate's p95 and p99 latency may be at most this multiple of "
        "the champion's in the same window (plus the slack below).",
    )
    latency_slack_ms: float = Field(
        default=50,
        ge=0,
        le=600_000,
        title="Latency slack (ms)",
        description="Absolute allowance added to the latency limit, so that millisecond "
        "jitter on a fast model is not a regression.",
    )
    quality_probes: int = Field(
        default=20,
        ge=0,
        le=10_000,
        title="Quality probes",
        description="Eval-set items sent to candidate and champion at every step and "
        "scored with the evaluate metric (0: no quality probes).",
    )
    quality_tolerance: float = Field(
        default=0.05,
        ge=0,
        le=1,
        title="Quality tolerance",
        description="How far below the champion's probe score the candidate's may be.",
    )
    inconclusive_retries: int = Field(
        default=1,
        ge=0,
        le=5,
        title="Retries of an inconclusive window",
        description="A window that ends without the data a check needs (fewer than "
        "min_requests, the champion's quality probe failed, no champion latency samples) is "
        "run again this many times; "
        "still inconclusive, the candidate is rolled back. Missing data never passes.",
    )
    skip_analysis: bool = Field(
        default=False,
        title="Skip the analysis",
        description="Needed for steps: [100], which sends all traffic to the candidate with "
        "no analysis window; the release record says the analysis was skipped.",
    )
    manual_approval: bool = Field(
        default=False,
        title="Manual approval",
        description="Pause before 100 % until a person approves in the Prefect UI.",
    )
    approval_timeout_s: int = Field(
        default=3600,
        ge=10,
        le=7 * 86_400,
        title="Approval timeout (s)",
        description="No answer within this time rolls the candidate back.",
    )
    keep_warm_s: float = Field(
        default=60,
        ge=0,
        le=7 * 86_400,
        title="Keep previous warm (s)",
        description="After promotion the previous champion keeps running (without "
        "traffic) this long, so `gantry rollback` is instant; then it is removed.",
    )
    drain_s: float = Field(
        default=30,
        ge=0,
        le=3600,
        title="Drain deadline (s)",
        description="How long requests in flight may take to finish on a server leaving "
        "the rotation before its container is stopped.",
    )
    lock_wait_s: float = Field(
        default=600,
        ge=0,
        le=86_400,
        title="Wait for a running canary (s)",
        description="A release of a model whose canary is already running waits this long "
        "for it, then fails; two traffic shifts of one model never run at once.",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 0 < w <= 100 for w in v):
            raise ValueError(f"every step must be a share of traffic in 1-100 %, got {list(v)}")
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"steps must increase strictly, got {list(v)}")
        if v[-1] != 100:
            raise ValueError(f"the last step must be 100 (promotion), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _analysis(self) -> CanaryOptions:
        if self.steps == (100,) and not self.skip_analysis:
            raise ValueError(
                "steps: [100] sends all traffic to the candidate with no analysis window; "
                "say so with skip_analysis: true, or add a step below 100 (e.g. [10, 100])"
            )
        return self


class RetryPolicy(_Frozen):
    """Retries for transient failures only; policy failures never retry."""

    attempts: int = Field(
        default=3,
        ge=0,
        le=10,
        title="Retries",
        description="How many times a stage is retried after a transient failure.",
    )
    delay_s: float = Field(
        default=2,
        ge=0,
        le=600,
        title="First retry delay (s)",
        description="Delay before the first retry; doubles on each further retry.",
    )
    jitter: float = Field(
        default=0.5,
        ge=0,
        le=1,
        title="Jitter",
        description="Random factor applied to each delay (0 = none).",
    )
    max_delay_s: float = Field(
        default=300,
        gt=0,
        le=3600,
        title="Longest retry delay (s)",
        description="Upper bound of any one delay, however many retries came before.",
    )

    def delays(self) -> list[float]:
        """Exponential backoff delays, one per retry, each at most ``max_delay_s``."""
        return [min(self.delay_s * 2**i, self.max_delay_s) for i in range(self.attempts)]


class ReleaseSpec(_Frozen):
    """One release of one model: from a Hub revision to live traffic."""

    name: str = Field(
        title="Model name",
        description="Short name of the model in Gantry: lowercase letters, digits and `-`. "
        "It names the image repository and the MLflow registered model.",
        examples=["minilm"],
    )
    source: HubSource = Field(title="Weights source", description="The Hub repository.")
    runtime: RuntimeOptions = Field(
        default_factory=RuntimeOptions, title="Runtime", description="The serving runtime."
    )
    build: BuildOptions = Field(
        default_factory=BuildOptions, title="Build", description="Image build options."
    )
    scan: ScanOptions = Field(
        default_factory=ScanOptions, title="Scan", description="Vulnerability gate."
    )
    sign: SignOptions = Field(
        default_factory=SignOptions, title="Sign", description="Signing of image and weights."
    )
    smoke: SmokeOptions = Field(
        default_factory=SmokeOptions, title="Smoke", description="Smoke run of the image."
    )
    evaluate: EvalOptions = Field(
        default_factory=EvalOptions, title="Evaluate", description="Quality gate."
    )
    mlflow: RegisterOptions = Field(
        default_factory=RegisterOptions,
        title="MLflow",
        description="Where stage `register` records the candidate.",
    )
    canary: CanaryOptions = Field(
        default_factory=CanaryOptions,
        title="Canary",
        description="How the candidate goes live beside the champion.",
    )
    retries: RetryPolicy = Field(
        default_factory=RetryPolicy, title="Retries", description="Retry policy."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                "must be 1-63 lowercase letters, digits or `-`, starting and ending with a "
                "letter or digit"
            )
        return v

    @property
    def image_repository(self) -> str:
        return self.build.repository or f"gantry/{self.name}"

    def digest(self) -> str:
        """sha256 of the canonical JSON of the spec: a release's identity."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def release_id(self) -> str:
        """Stable id of this release: the same spec always has the same id, so a re-run
        resumes it instead of starting another."""
        return f"{self.name}-{self.digest()[:12]}"


def _no_url_credentials(v: str | None, fix: str) -> str | None:
    if v is not None and has_url_credentials(v):
        raise ValueError(
            f"holds credentials in the URL, which a spec would store in clear (release "
            f"records, MLflow, Prefect): remove them; {fix}"
        )
    return v


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and nesting)"
        lines.append(f"  {loc}: {msg}")
    return f"invalid release spec {origin}:\n" + "\n".join(lines)


def parse_spec(data: Any, *, origin: str = "") -> ReleaseSpec:
    """Validate ``data`` (already parsed YAML/JSON) into a spec, or raise SpecError."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid release spec {origin}: the top level must be a mapping")
    try:
        return ReleaseSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc, origin)) from None


#: A release spec is a few dozen lines. These bounds refuse input that is not one before
#: it can exhaust memory (a huge file) or the stack (deep nesting).
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 32


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, without aliases and with bounded nesting.

    An alias (``*name``) repeats a node without repeating its text, so a file of a few
    lines can expand into gigabytes; nesting deeper than Python's stack makes the composer
    raise RecursionError, a traceback instead of an answer.
    """

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in a release spec; write the value out",
                self.peek_event().start_mark,  # type: ignore[no-untyped-call]
            )
        self._depth += 1
        try:
            if self._depth > MAX_SPEC_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_SPEC_DEPTH} levels; a release spec is not",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_spec(path: Path) -> ReleaseSpec:
    """Read and validate a YAML spec file."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise SpecError(
            f"spec file {path} does not exist",
            fix="pass the path of a YAML spec, e.g. examples/minilm-demo.yaml",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec file {path}: {exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(
            f"spec file {path} is larger than {MAX_SPEC_BYTES >> 20} MiB; a release spec is a "
            "few KiB",
            fix="pass the release spec (YAML), not another file",
        )
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {path} is not valid YAML: {exc}") from None
    return parse_spec(data, origin=f"in {path}")
