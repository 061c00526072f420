"""Stage `smoke`: the first real run of the signed image, hardened, health-checked, probed.

Nothing runs unverified: the image signature (by digest) and the weights (manifest and
signature) are verified first. The container then runs hardened (see
:mod:`gantry.adapters.containers`); the stage measures the cold start (container start to
health 200), asks the model one question per protocol, catches a runtime that silently
fell back to CPU, and checks the image's HEALTHCHECK start period covers the cold start.

Here live the stage's contract (:class:`SmokeResult`, :class:`ProbeResult`), its pure
checks, the probes and its entry point :func:`run`; ``tasks/smoke.py`` is its Prefect face
(the task and its artifacts).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import httpx2
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import openai

from gantry.adapters import containers, docker_engine
from gantry.errors import (
    AcceleratorError,
    ConfigError,
    ContainerStartError,
    ProbeError,
    SignatureVerificationError,
    StartPeriodTooShortError,
)
from gantry.settings import Settings
from gantry.spec import Accelerator, Protocol, ReleaseSpec, SmokeOptions
from gantry.stages.build import BuildResult
from gantry.stages.sign import SignResult
from gantry.stages.weights import WeightsResult
from gantry.verify import Verified, verify_artifacts

log = logging.getLogger("gantry.smoke")

STAGE = "smoke"
PROBE_TIMEOUT_S = 60.0
#: A sentence, a paraphrase of it, and an unrelated one: any working sentence-embedding
#: model puts the paraphrase closer.
SIMILAR = ("A man is playing a guitar on stage.", "Someone performs music with a guitar.")
DISSIMILAR = "The central bank raised interest rates again this quarter."
_GPU_PROVIDERS = ("cuda", "tensorrt", "rocm", "migraphx", "dml")


class ProbeResult(BaseModel):
    """What the probe asked and what it found."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Protocol
    seconds: float
    dimensions: int | None = None
    cosine_similar: float | None = None
    cosine_dissimilar: float | None = None
    answer: str | None = None
    ttft_s: float | None = Field(default=None, description="Time to the first streamed token.")


class SmokeResult(BaseModel):
    """The smoke run's measurements, for the record and the later stages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str
    container_id: str
    accelerator_requested: Accelerator
    gpus_requested: int | None = Field(description="GPUs reserved; None: ran on CPU.")
    accelerator_used: Literal["cpu", "gpu", "unknown"] = Field(
        description="What the runtime reports it runs on (its /health)."
    )
    provider: str | None = Field(description="Execution provider the runtime reports.")
    cold_start_s: float = Field(description="Container start to the first health 200.")
    start_period_s: float | None = Field(
        description="HEALTHCHECK --start-period configured in the image (None: no healthcheck)."
    )
    recommended_start_period_s: int = Field(description=">= 2x the cold start, rounded up.")
    probe: ProbeResult
    attempts: int = Field(description="Container starts (over 1 after an early exit).")
    verify_seconds: float
    logs_path: str = Field(description="The container's log, saved before it was removed.")
    smoke_seconds: float


# --- pure helpers (unit-tested) ------------------------------------------------------------


def recommended_start_period(cold_start_s: float, step_s: int = 5) -> int:
    """At least twice the cold start, rounded up to whole ``step_s`` seconds (min one step)."""
    return max(step_s, math.ceil(2 * cold_start_s / step_s) * step_s)


def check_start_period(start_period_s: float | None, cold_start_s: float, image: str) -> None:
    """Fail when the image's HEALTHCHECK would call a normal cold start unhealthy."""
    if start_period_s is not None and start_period_s >= cold_start_s:
        return
    configured = "none" if start_period_s is None else f"{start_period_s:g}s"
    rec = recommended_start_period(cold_start_s)
    raise StartPeriodTooShortError(
        f"{image}: HEALTHCHECK start period is {configured} but the measured cold start is "
        f"{cold_start_s:.1f}s, so orchestrators would mark every fresh container unhealthy",
        fix=f"set `HEALTHCHECK --start-period={rec}s` in the runtime Dockerfile "
        "(at least 2x the cold start) and rebuild",
    )


def start_period_seconds(config: dict[str, Any]) -> float | None:
    """The image's HEALTHCHECK StartPeriod (nanoseconds in `docker inspect`), in seconds."""
    hc = config.get("Healthcheck")
    if not isinstance(hc, dict) or not hc.get("Test") or hc["Test"][0] == "NONE":
        return None
    return float(hc.get("StartPeriod") or 0) / 1e9


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        raise ProbeError("the model returned an all-zero embedding")
    return dot / (na * nb)


def score_embeddings(vectors: list[list[float]]) -> tuple[int, float, float]:
    """(dimensions, cos(similar pair), cos(dissimilar pair)) for [a, paraphrase, other]."""
    if len(vectors) != 3:
        raise ProbeError(f"3 inputs were sent but {len(vectors)} embeddings came back")
    dims = {len(v) for v in vectors}
    if len(dims) != 1 or 0 in dims:
        raise ProbeError(f"embeddings have inconsistent or zero dimensions: {sorted(dims)}")
    if not all(math.isfinite(x) for v in vectors for x in v):
        raise ProbeError("an embedding holds NaN or infinite values")
    sim, dis = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    if not sim > dis:
        raise ProbeError(
            f"the model ranks an unrelated sentence closer than a paraphrase "
            f"(cosine similar {sim:.3f} <= dissimilar {dis:.3f}): the weights or the "
            "tokenizer/pooling config are broken",
            fix="check the weights revision and that the runtime matches the model",
        )
    return dims.pop(), sim, dis


def check_chat_answer(answer: str, expect: str) -> None:
    if expect.casefold() not in answer.casefold():
        raise ProbeError(
            f"the chat answer {answer[:200]!r} does not contain {expect!r}",
            fix="check the weights and chat template; or correct smoke.chat_prompt/chat_expect",
        )


def reported_accelerator(health: dict[str, Any]) -> tuple[Literal["cpu", "gpu", "unknown"], str]:
    """What the runtime's /health says it runs on, and its provider (may be empty)."""
    provider = str(health.get("provider") or "")
    device = str(health.get("device") or "").lower()
    if device in ("cuda", "gpu", "rocm") or any(p in provider.lower() for p in _GPU_PROVIDERS):
        return "gpu", provider
    if device == "cpu" or provider:
        return "cpu", provider
    return "unknown", provider


def check_accelerator(
    gpus: int | None, used: Literal["cpu", "gpu", "unknown"], provider: str
) -> None:
    """A GPU was reserved but the runtime runs on CPU: the silent-fallback trap."""
    if gpus and used == "cpu":
        raise AcceleratorError(
            f"{gpus} GPU(s) were reserved but the runtime reports it runs on CPU "
            f"(provider {provider or 'unknown'}): it fell back silently",
            fix="install the CUDA build of the runtime's inference library (e.g. "
            "onnxruntime-gpu) and matching CUDA libraries in the image, or set "
            "smoke.accelerator: cpu",
        )


def runtime_env(spec: ReleaseSpec) -> dict[str, str]:
    """Where the reference runtime finds weights, port and name; the spec's env wins."""
    rt = spec.runtime
    return {
        "MODEL_PATH": rt.model_mount,
        "PORT": str(rt.port),
        "MODEL_NAME": rt.served_model_name or spec.name,
        **rt.env,
    }


# --- probes, one per protocol ----------------------------------------------------------------


def _openai(base_url: str, timeout_s: float) -> openai.OpenAI:
    # Imported here: a second of start-up that only a probe needs (a resumed release whose
    # smoke is re-used never does).
    import openai

    # trust_env=False: an HTTP(S)_PROXY must not capture loopback; no retries, so a
    # failing probe fails once with its real error.
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key="gantry-smoke",
        timeout=timeout_s,
        max_retries=0,
        http_client=httpx2.Client(trust_env=False, timeout=timeout_s),
    )


class EmbeddingsProbe:
    """`openai-embeddings`: a paraphrase must be closer than an unrelated sentence."""

    protocol: ClassVar[Protocol] = Protocol.OPENAI_EMBEDDINGS

    def __init__(self, model: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.model, self.timeout_s = model, timeout_s

    def probe(self, base_url: str, options: SmokeOptions) -> ProbeResult:
        t0 = time.monotonic()
        import openai

        client = _openai(base_url, self.timeout_s)
        try:
            resp = client.embeddings.create(model=self.model, input=[*SIMILAR, DISSIMILAR])
        except openai.APIError as exc:
            raise ProbeError(f"POST {base_url}/v1/embeddings failed: {exc}") from None
        finally:
            client.close()
        vectors = [list(d.embedding) for d in sorted(resp.data, key=lambda d: d.index)]
        dims, sim, dis = score_embeddings(vectors)
        return ProbeResult(
            protocol=self.protocol,
            seconds=round(time.monotonic() - t0, 3),
            dimensions=dims,
            cosine_similar=round(sim, 4),
            cosine_dissimilar=round(dis, 4),
        )


class ChatProbe:
    """`openai-chat`: a streamed answer must contain the expected fragment; TTFT measured."""

    protocol: ClassVar[Protocol] = Protocol.OPENAI_CHAT

    def __init__(self, model: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.model, self.timeout_s = model, timeout_s

    def probe(self, base_url: str, options: SmokeOptions) -> ProbeResult:
        t0 = time.monotonic()
        ttft: float | None = None
        parts: list[str] = []
        import openai

        client = _openai(base_url, self.timeout_s)
        try:
            stream = client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": options.chat_prompt}],
                stream=True,
                temperature=0,
                max_tokens=64,
            )
            for chunk in stream:
                text = chunk.choices[0].delta.content if chunk.choices else None
                if text:
                    ttft = ttft if ttft is not None else time.monotonic() - t0
                    parts.append(text)
        except openai.APIError as exc:
            raise ProbeError(f"POST {base_url}/v1/chat/completions failed: {exc}") from None
        finally:
            client.close()
        answer = "".join(parts)
        check_chat_answer(answer, options.chat_expect)
        return ProbeResult(
            protocol=self.protocol,
            seconds=round(time.monotonic() - t0, 3),
            answer=answer[:500],
            ttft_s=None if ttft is None else round(ttft, 3),
        )


PROBES: dict[Protocol, type[EmbeddingsProbe] | type[ChatProbe]] = {
    Protocol.OPENAI_EMBEDDINGS: EmbeddingsProbe,
    Protocol.OPENAI_CHAT: ChatProbe,
}


# --- the stage -------------------------------------------------------------------------------


def check_world_readable(weights_dir: Path) -> None:
    """The container runs as a non-root uid that owns nothing on the host: the mounted
    snapshot must be readable by others, or the runtime fails with a confusing error."""
    for p in [weights_dir, *weights_dir.rglob("*")]:
        need = 0o005 if p.is_dir() else 0o004
        if p.stat().st_mode & need != need:
            raise ConfigError(
                f"{p} is not readable by the container's non-root user",
                fix=f"run `chmod -R o+rX {weights_dir}` (or set a umask of 022 for Gantry)",
            )


def smoke_logs_path(settings: Settings, release_id: str) -> Path:
    return settings.releases_dir / release_id / STAGE / "container.log"


def verify_inputs(build: BuildResult, weights: WeightsResult, sign: SignResult) -> Verified:
    """Verification before use of what a serving stage is about to run and mount."""
    return verify_artifacts(
        image=build.image,
        image_public_key=Path(sign.public_key) if sign.method == "key" else None,
        weights_path=Path(weights.path),
        manifest_path=Path(weights.manifest_path),
        weights_signature=Path(sign.weights_signature),
        weights_public_key=Path(sign.weights_public_key),
        image_options=sign.verification(),
    )


def start_runtime(
    client: docker_engine.DockerClient,
    spec: ReleaseSpec,
    build: BuildResult,
    weights: WeightsResult,
    gpus: int | None,
    stage: str,
) -> containers.RunningContainer:
    """The signed image run hardened as the spec says, labelled for ``stage``."""
    return containers.run_hardened(
        client,
        build.image,
        weights_dir=Path(weights.path),
        mount_point=spec.runtime.model_mount,
        port=spec.runtime.port,
        env=runtime_env(spec),
        args=spec.runtime.args,
        cpus=spec.smoke.cpus,
        memory_mb=spec.smoke.memory_mb,
        gpus=gpus,
        labels={containers.RELEASE_LABEL: spec.release_id, containers.STAGE_LABEL: stage},
    )


def _save_logs(path: Path, running: containers.RunningContainer) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(running.logs(tail=2000), encoding="utf-8")
    except OSError as exc:  # must not mask the error that made us save them
        log.warning("could not save the container log to %s: %s", path, exc)


def run(
    spec: ReleaseSpec,
    build: BuildResult,
    weights: WeightsResult,
    sign: SignResult,
    settings: Settings,
    client: docker_engine.DockerClient | None = None,
) -> SmokeResult:
    """Verify, run hardened, wait for health, probe, check accelerator and start period.
    An OOM kill while the model loads fails with ResourceLimitError and both figures."""
    from gantry.adapters.docker_stats import UsageSampler
    from gantry.stages.evaluate import USAGE_INTERVAL_S
    from gantry.usage import check_limits

    t0 = time.monotonic()
    opts = spec.smoke
    if sign.image != build.image:
        raise SignatureVerificationError(
            build.image, f"the sign stage signed {sign.image}, not this image"
        )
    verified = verify_inputs(build, weights, sign)
    log.info("verified %s and %s in %.2fs", build.image, weights.uri, verified.seconds)

    check_world_readable(Path(weights.path))
    client = client or docker_engine.connect(settings.docker_timeout_s)
    release_id = spec.release_id
    if removed := containers.remove_leftovers(client, release_id, STAGE):
        log.warning("removed %d container(s) left by an earlier smoke run", removed)
    gpus = containers.resolve_gpus(client.info(), opts.accelerator, opts.gpus)
    start_period = start_period_seconds(containers.image_config(client, build.image))
    logs_path = smoke_logs_path(settings, release_id)
    logs_path.unlink(missing_ok=True)  # an earlier run's log must not pass for this one's
    probe = PROBES[spec.runtime.protocol](spec.runtime.served_model_name or spec.name)

    for attempt in range(1, opts.start_attempts + 1):
        try:
            running = start_runtime(client, spec, build, weights, gpus, STAGE)
        except ContainerStartError as exc:
            # It may exit before its port is even published: the same early exit.
            if _may_restart(exc, attempt, opts.start_attempts):
                continue
            raise
        with running:
            try:
                log.info("container %s started (attempt %d)", running.id[:12], attempt)
                try:
                    # Sampled while it loads: a memory limit under the load's peak kills
                    # every start, and the error must say by how much (evaluate samples
                    # the eval set's load the same way).
                    with UsageSampler(client, running.id, USAGE_INTERVAL_S) as sampler:
                        cold, health = containers.wait_healthy(
                            running, spec.runtime.health_path, opts.deadline_s
                        )
                except ContainerStartError as exc:
                    usage = sampler.summary()
                    if usage.oom_killed:
                        check_limits(usage, opts.cpus, opts.memory_mb)
                    if _may_restart(exc, attempt, opts.start_attempts):
                        continue
                    raise
                used, provider = reported_accelerator(health)
                log.info("healthy after %.2fs on %s (%s)", cold, used, provider or "?")
                check_accelerator(gpus, used, provider)
                result = probe.probe(running.base_url, opts)
                check_start_period(start_period, cold, build.image)
            finally:
                _save_logs(logs_path, running)
        return SmokeResult(
            image=build.image,
            container_id=running.id,
            accelerator_requested=opts.accelerator,
            gpus_requested=gpus,
            accelerator_used=used,
            provider=provider or None,
            cold_start_s=round(cold, 3),
            start_period_s=start_period,
            recommended_start_period_s=recommended_start_period(cold),
            probe=result,
            attempts=attempt,
            verify_seconds=verified.seconds,
            logs_path=str(logs_path),
            smoke_seconds=round(time.monotonic() - t0, 3),
        )
    raise AssertionError("unreachable: the last attempt returns or raises")


def _may_restart(exc: ContainerStartError, attempt: int, attempts: int) -> bool:
    """Whether an early exit is worth another start (smoke.start_attempts): only a
    container that really ran and exited (a start race) gets one, never a refused create."""
    if exc.exit_code is None or attempt >= attempts:
        return False
    log.warning(
        "container exited with code %s on start %d of %d; starting it again: %s",
        exc.exit_code,
        attempt,
        attempts,
        exc.message.splitlines()[0],
    )
    return True
