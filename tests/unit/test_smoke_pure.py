"""Pure parts of stage `smoke`: hardening kwargs, GPU requests, scoring, start periods."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from docker.types import DeviceRequest

from gantry.adapters import containers
from gantry.errors import (
    AcceleratorError,
    ImageReferenceError,
    ProbeError,
    StartPeriodTooShortError,
    is_transient,
)
from gantry.spec import Accelerator, parse_spec
from gantry.stages import smoke

pytestmark = pytest.mark.unit

IMAGE = "127.0.0.1:5075/gantry/minilm@sha256:" + "ab" * 32
LABELS = {"ai.gantry.release": "minilm-0123456789ab", "ai.gantry.stage": "smoke"}
NO_GPU_INFO: dict[str, Any] = {"Runtimes": {"runc": {}, "io.containerd.runc.v2": {}}}
GPU_INFO: dict[str, Any] = {
    "Runtimes": {"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}}
}


def _kwargs(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "weights_dir": Path("/state/weights/snap"),
        "mount_point": "/models",
        "port": 8080,
        "env": {"MODEL_PATH": "/models"},
        "args": (),
        "cpus": 1.5,
        "memory_mb": 2048,
        "gpus": None,
        "labels": LABELS,
        "user": "10001:10001",
        **over,
    }
    return containers.run_kwargs(IMAGE, **args)


def test_hardening_kwargs_are_exact() -> None:
    assert _kwargs() == {
        "image": IMAGE,
        "command": None,
        "detach": True,
        "user": "10001:10001",
        "read_only": True,
        "tmpfs": {"/tmp": "rw,noexec,nosuid,size=64m"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "nano_cpus": 1_500_000_000,
        "mem_limit": "2048m",
        "memswap_limit": "2048m",
        "pids_limit": 512,
        "volumes": {"/state/weights/snap": {"bind": "/models", "mode": "ro"}},
        "ports": {"8080/tcp": ("127.0.0.1", None)},
        "network": "bridge",
        "environment": {"MODEL_PATH": "/models"},
        "labels": LABELS,
    }


def test_args_become_the_command() -> None:
    assert _kwargs(args=("--max-model-len", "4096"))["command"] == ["--max-model-len", "4096"]


def test_gpu_device_request() -> None:
    kw = _kwargs(gpus=2)
    assert kw["device_requests"] == [DeviceRequest(count=2, capabilities=[["gpu"]])]
    assert "device_requests" not in _kwargs(gpus=None)


@pytest.mark.parametrize(
    "image",
    [
        "127.0.0.1:5075/gantry/minilm:latest",
        "127.0.0.1:5075/gantry/minilm",
        "127.0.0.1:5075/gantry/minilm@sha256:abc",
        "gantry/minilm:v1@sha256:" + "ab" * 32 + " ",
    ],
)
def test_tags_are_refused(image: str) -> None:
    with pytest.raises(ImageReferenceError, match="by digest only"):
        containers.check_digest_ref(image)


def test_labels_must_name_the_release() -> None:
    with pytest.raises(ValueError, match="ai.gantry.release"):
        _kwargs(labels={"ai.gantry.stage": "smoke"})


@pytest.mark.parametrize(
    ("image_user", "expected"),
    [
        (None, "10001:10001"),
        ("", "10001:10001"),
        ("root", "10001:10001"),
        ("0:0", "10001:10001"),
        ("2000:2000", "2000:2000"),
        ("app", "app"),
    ],
)
def test_never_root(image_user: str | None, expected: str) -> None:
    assert containers.container_user(image_user) == expected


def test_resolve_gpus() -> None:
    assert containers.resolve_gpus(GPU_INFO, Accelerator.CPU, 1) is None
    assert containers.resolve_gpus(GPU_INFO, Accelerator.GPU, 2) == 2
    assert containers.resolve_gpus(GPU_INFO, Accelerator.AUTO, 1) == 1
    assert containers.resolve_gpus(NO_GPU_INFO, Accelerator.AUTO, 1) is None
    cdi = {
        "Runtimes": {"runc": {}},
        "DiscoveredDevices": [{"Source": "cdi", "ID": "nvidia.com/gpu=0"}],
    }
    assert containers.resolve_gpus(cdi, Accelerator.GPU, 1) == 1


def test_gpu_without_runtime_fails_with_the_fix() -> None:
    with pytest.raises(AcceleratorError, match="nvidia-ctk runtime configure") as info:
        containers.resolve_gpus(NO_GPU_INFO, Accelerator.GPU, 1)
    assert not is_transient(info.value)


def test_recommended_start_period() -> None:
    assert smoke.recommended_start_period(0.4) == 5
    assert smoke.recommended_start_period(2.5) == 5
    assert smoke.recommended_start_period(2.6) == 10
    assert smoke.recommended_start_period(14.0) == 30
    for cold in (0.1, 3.3, 7.77, 61.0):
        assert smoke.recommended_start_period(cold) >= 2 * cold


def test_start_period_check() -> None:
    smoke.check_start_period(30, 4.2, IMAGE)
    with pytest.raises(StartPeriodTooShortError, match="--start-period=10s") as info:
        smoke.check_start_period(3, 4.2, IMAGE)
    assert not is_transient(info.value)
    with pytest.raises(StartPeriodTooShortError, match="start period is none"):
        smoke.check_start_period(None, 4.2, IMAGE)


def test_start_period_from_inspect() -> None:
    hc = {"Test": ["CMD", "python", "hc.py"], "StartPeriod": 30_000_000_000}
    assert smoke.start_period_seconds({"Healthcheck": hc}) == 30.0
    assert smoke.start_period_seconds({"Healthcheck": {"Test": ["CMD", "x"]}}) == 0.0
    assert smoke.start_period_seconds({"Healthcheck": {"Test": ["NONE"]}}) is None
    assert smoke.start_period_seconds({}) is None


def test_embedding_scoring() -> None:
    dims, sim, dis = smoke.score_embeddings([[1.0, 0.1], [0.9, 0.2], [0.0, 1.0]])
    assert dims == 2 and sim > dis
    assert math.isclose(smoke.cosine([1.0, 0.0], [0.0, 2.0]), 0.0)


@pytest.mark.parametrize(
    ("vectors", "match"),
    [
        ([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]], "unrelated sentence closer"),
        ([[1.0, 0.0], [1.0], [1.0, 0.0]], "inconsistent"),
        ([[], [], []], "inconsistent or zero"),
        ([[1.0, math.nan], [1.0, 0.0], [0.0, 1.0]], "NaN"),
        ([[1.0, math.inf], [1.0, 0.0], [0.0, 1.0]], "infinite"),
        ([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "all-zero"),
        ([[1.0, 0.0], [1.0, 0.0]], "3 inputs"),
    ],
)
def test_bad_embeddings_are_probe_errors(vectors: list[list[float]], match: str) -> None:
    with pytest.raises(ProbeError, match=match) as info:
        smoke.score_embeddings(vectors)
    assert not is_transient(info.value)


def test_chat_answer() -> None:
    smoke.check_chat_answer("The answer is 4.", "4")
    with pytest.raises(ProbeError, match="does not contain"):
        smoke.check_chat_answer("five", "4")


def test_silent_cpu_fallback_is_caught() -> None:
    used, provider = smoke.reported_accelerator(
        {"provider": "CPUExecutionProvider", "device": "cpu"}
    )
    assert used == "cpu"
    with pytest.raises(AcceleratorError, match="fell back silently"):
        smoke.check_accelerator(1, used, provider)
    smoke.check_accelerator(None, used, provider)
    assert smoke.reported_accelerator({"provider": "CUDAExecutionProvider"})[0] == "gpu"
    assert smoke.reported_accelerator({"device": "cuda"})[0] == "gpu"
    assert smoke.reported_accelerator({})[0] == "unknown"
    smoke.check_accelerator(1, "unknown", "")  # nothing to check against: not a failure


def test_runtime_env_lets_the_spec_win() -> None:
    spec = parse_spec(
        {
            "name": "minilm",
            "source": {"repo_id": "o/m"},
            "runtime": {"port": 9000, "env": {"MODEL_PATH": "/elsewhere", "X": "1"}},
        }
    )
    assert smoke.runtime_env(spec) == {
        "MODEL_PATH": "/elsewhere",
        "PORT": "9000",
        "MODEL_NAME": "minilm",
        "X": "1",
    }


def test_probe_per_protocol() -> None:
    from gantry.spec import Protocol

    assert set(smoke.PROBES) == set(Protocol)
    for protocol, cls in smoke.PROBES.items():
        assert cls.protocol is protocol


def test_world_readable_check(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "model.onnx").chmod(0o644)
    tmp_path.chmod(0o755)
    smoke.check_world_readable(tmp_path)
    (tmp_path / "model.onnx").chmod(0o600)
    with pytest.raises(Exception, match="chmod -R o\\+rX"):
        smoke.check_world_readable(tmp_path)
