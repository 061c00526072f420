"""The measures of bench/run.py (all but the canary's, in bench/canary.py). Each takes the
shared :class:`Context` and returns (its JSON results, its table rows)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import ROOT, Bench, Row, median, timed

Measured = tuple[dict[str, Any], list[Row]]
log = logging.getLogger("bench")


@dataclass
class Context:
    """What the measures share: the environment, and the records of releases already run
    (the cold release every later measure reuses, the orchestration runs smoke reads)."""

    bench: Bench
    repeat: int
    #: Pairs of the orchestration measure: its difference is a few percent of a release,
    #: so it takes more runs than the others to stand out of the machine's noise.
    orchestration_repeat: int = 5
    releases: list[dict[str, Any]] = field(default_factory=list)
    _cold: tuple[dict[str, Any], float] | None = None

    def cold(self) -> tuple[dict[str, Any], float]:
        """The cold release: an empty state dir, Docker's layer cache off. Run once, first."""
        if self._cold is None:
            spec = self.bench.spec("bench-cold")
            self._cold = self.bench.release(spec, env={"GANTRY_BUILD_NO_CACHE": "1"})
            record = self._cold[0]
            assert record["stages"]["weights"]["result"]["downloaded_files"] > 0, "not cold"
            assert not record["stages"]["build"]["cached"], "not cold"
        return self._cold


def _stage_s(record: dict[str, Any], *names: str) -> float:
    return float(sum(record["stages"][n]["duration_s"] or 0 for n in names))


# --- resume -------------------------------------------------------------------------------


def resume(ctx: Context) -> Measured:
    """Cold release vs a cached re-run; a re-run after a failure in evaluate vs the time of
    the stages it still had to run."""
    b = ctx.bench
    cold_record, cold_s = ctx.cold()
    spec = b.spec("bench-cold")
    reruns = []
    for _ in range(ctx.repeat):
        record, seconds = b.release(spec)
        redone = [n for n, st in record["stages"].items() if not st["cached"]]
        assert not redone, f"a re-run of a finished release redid {redone}"
        reruns.append(seconds)
    rerun_s = median(reruns)

    # A failure in evaluate: its eval set is missing (a file not committed, say). Once it
    # is there, the same release is run again and resumes at evaluate.
    late = b.state / "late-eval.jsonl"
    late.unlink(missing_ok=True)
    failing = b.spec("bench-evalfail", evaluate={"dataset": str(late)})
    failed, _ = b.release(failing, expect_rc=1)
    assert failed["stages"]["evaluate"]["status"] == "failed", failed["stages"]["evaluate"]
    shutil.copy(ROOT / "examples" / "eval" / "minilm-retrieval.jsonl", late)
    resumed, resumed_s = b.release(failing)
    cached = [n for n, st in resumed["stages"].items() if st["cached"]]
    assert cached[:5] == ["weights", "build", "scan", "sign", "smoke"], cached
    after = _stage_s(resumed, "evaluate", "register", "canary")
    b.clear_deployments()
    ratio, after_ratio = round(rerun_s / cold_s, 3), round(resumed_s / after, 3)
    data = {
        "cold_s": round(cold_s, 2),
        "cold_stages_s": {n: st["duration_s"] for n, st in cold_record["stages"].items()},
        "rerun_s": round(rerun_s, 2),
        "rerun_runs_s": [round(x, 2) for x in reruns],
        "ratio": ratio,
        "after_failure_s": round(resumed_s, 2),
        "after_failure_stages_s": round(after, 2),
        "after_failure_ratio": after_ratio,
    }
    return data, [
        Row(
            "re-run of a finished release / cold release (s)",
            rerun_s,
            cold_s,
            ratio,
            "<= 0.05",
            ratio <= 0.05,
        ),
        Row(
            "re-run after a failed evaluate / its evaluate+register+canary (s)",
            resumed_s,
            after,
            after_ratio,
            "-",
        ),
    ]


# --- orchestration and smoke ---------------------------------------------------------------


def orchestration(ctx: Context) -> Measured:
    """`gantry release` vs the stage functions called directly, alternated, each run a new
    model (so every stage does its work; weights and layers come from the caches)."""
    b = ctx.bench
    ctx.cold()  # the caches every run below shares, filled once
    runs: dict[str, list[float]] = {"prefect": [], "direct": []}
    # Where the difference lies: a run's time outside its stages (imports, and for Prefect
    # the flow run's creation and end) and inside them (the stages' work, task runs around it).
    inside: dict[str, list[float]] = {"prefect": [], "direct": []}
    for i in range(ctx.orchestration_repeat):
        modes = ("prefect", "direct") if i % 2 == 0 else ("direct", "prefect")
        for mode in modes:
            spec = b.spec(f"bench-o{i}{mode[0]}")
            record, seconds = b.release(spec, direct=mode == "direct")
            done = [n for n, st in record["stages"].items() if st["status"] == "succeeded"]
            assert len(done) == 8, record["stages"]
            runs[mode].append(seconds)
            inside[mode].append(_stage_s(record, *record["stages"]))
            ctx.releases.append(record)
            b.clear_deployments()
    prefect, direct = median(runs["prefect"]), median(runs["direct"])
    # Each pair ran back to back, so a slow spell of this shared machine (runs here vary by
    # ±10 %, more than the effect measured) weighs on both of its runs: the ratio is the
    # median of the pairs' own ratios. The ratio of the two medians is kept beside it.
    paired = [p / d for p, d in zip(runs["prefect"], runs["direct"], strict=True)]
    ratio = round(median(paired), 3)
    outside = {k: median([t - s for t, s in zip(runs[k], inside[k], strict=True)]) for k in runs}
    fixed = outside["prefect"] - outside["direct"]
    data = {
        "prefect_s": round(prefect, 2),
        "direct_s": round(direct, 2),
        "runs_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "pair_ratios": [round(r, 3) for r in paired],
        "ratio": ratio,
        "ratio_of_medians": round(prefect / direct, 3),
        "inside_stages_s": {k: round(median(v), 2) for k, v in inside.items()},
        "outside_stages_s": {k: round(v, 2) for k, v in outside.items()},
        "prefect_outside_stages_s": round(fixed, 2),
    }
    return data, [
        Row(
            "release through Prefect / stage functions called directly (s; median of "
            f"{len(paired)} paired ratios, {min(paired):.3f}-{max(paired):.3f})",
            prefect,
            direct,
            ratio,
            "<= 1.05",
            ratio <= 1.05,
        ),
        Row(
            "  of it, Prefect's time outside the stages (flow run start and end) / direct (s)",
            fixed,
            direct,
            round(fixed / direct, 3),
            "-",
        ),
    ]


def smoke(ctx: Context) -> Measured:
    """The smoke stage's time vs the cold start it measured, over the releases run so far
    (runs `repeat` releases when there are none)."""
    b = ctx.bench
    if not ctx.releases:
        ctx.cold()
        for i in range(ctx.repeat):
            ctx.releases.append(b.release(b.spec(f"bench-s{i}"))[0])
            b.clear_deployments()
    stages = [r["stages"]["smoke"] for r in ctx.releases if not r["stages"]["smoke"]["cached"]]
    total = median([float(s["duration_s"]) for s in stages])
    cold_start = median([float(s["result"]["cold_start_s"]) for s in stages])
    verify = median([float(s["result"]["verify_seconds"]) for s in stages])
    over = round(total - cold_start, 3)
    data = {
        "smoke_s": round(total, 3),
        "cold_start_s": round(cold_start, 3),
        "verify_s": round(verify, 3),
        "overhead_s": over,
        "runs": len(stages),
    }
    return data, [
        Row(
            "smoke stage / its measured cold start (s)",
            total,
            cold_start,
            round(total / cold_start, 3),
            "<= cold start + 2 s",
            over <= 2.0,
        )
    ]


# --- build --------------------------------------------------------------------------------


def build(ctx: Context) -> Measured:
    """A code-only rebuild vs the cold build of the cold release; the image's size vs the
    same runtime built the naive way (bench/naive/Dockerfile)."""
    from gantry.adapters.docker_engine import connect
    from gantry.spec import load_spec
    from gantry.stages import build as build_stage
    from gantry.stages.weights import WeightsResult

    b = ctx.bench
    cold_record, _ = ctx.cold()
    cold_build = cold_record["stages"]["build"]["result"]
    weights = WeightsResult.model_validate(cold_record["stages"]["weights"]["result"])
    client = connect(600)
    rt = b.state / "runtime-copy"
    shutil.rmtree(rt, ignore_errors=True)
    shutil.copytree(
        ROOT / "dockerfiles" / "runtime", rt, ignore=shutil.ignore_patterns("__pycache__")
    )
    spec = load_spec(b.spec("bench-cold", runtime={"dockerfile_dir": str(rt)}))
    app = rt / "server" / "gantry_runtime" / "app.py"
    rebuilds = []
    try:
        for i in range(ctx.repeat):
            app.write_text(app.read_text() + f"\n# a code-only change ({i})\n")
            r = build_stage.run(spec, weights, b.settings, client)
            assert not r.cached
            rebuilds.append(r.build_seconds)
        naive = _naive_sizes(client, b)
    finally:
        client.close()
    rebuild = median(rebuilds)
    cold_s = float(cold_build["build_seconds"])
    ours = int(cold_build["size_bytes"])
    mib = 2**20
    ratio = round(rebuild / cold_s, 3)
    full, slim = naive["python:3.11-bookworm"], naive["python:3.11-slim-bookworm"]
    size_ratio, same_base = round(ours / full, 3), round(ours / slim, 3)
    data = {
        "cold_build_s": cold_s,
        "code_change_s": round(rebuild, 2),
        "runs_s": rebuilds,
        "ratio": ratio,
        "image_bytes": ours,
        "naive_bytes": naive,
        "size_ratio": size_ratio,
        "size_ratio_same_base": same_base,
    }
    return data, [
        Row("code-only rebuild / cold build (s)", rebuild, cold_s, ratio, "<= 0.15", ratio <= 0.15),
        Row(
            "image size / naive single-stage build on python:3.11-bookworm (MiB)",
            round(ours / mib, 1),
            round(full / mib, 1),
            size_ratio,
            "<= 0.5",
            size_ratio <= 0.5,
        ),
        Row(
            "image size / the same single stage on its slim base (MiB)",
            round(ours / mib, 1),
            round(slim / mib, 1),
            same_base,
            "-",
        ),
    ]


def _naive_sizes(client: Any, b: Bench) -> dict[str, int]:
    """Sizes of bench/naive/Dockerfile built from the runtime's own context, on the full
    python image it needs and (for comparison) on the slim base Gantry's image uses."""
    from gantry.adapters import docker_engine
    from gantry.localenv.baseimages import ensure_base_image
    from gantry.stages.build import assemble_context
    from gantry.wheelhouse import Wheelhouse

    rt = ROOT / "dockerfiles" / "runtime"
    wheels = Wheelhouse(b.settings.wheelhouse_dir).ensure(
        rt / "requirements.txt", python_version="3.11", arch="x86_64"
    )
    naive = (ROOT / "bench" / "naive" / "Dockerfile").read_text()
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="naive-", dir=b.state) as tmp:
        ctx = Path(tmp) / "context"
        assemble_context(rt, wheels, ctx)
        (ctx / ".dockerignore").unlink(missing_ok=True)
        for base in ("python:3.11-bookworm", "python:3.11-slim-bookworm"):
            ensure_base_image(
                base, docker_client=client, work_dir=b.settings.base_images_dir, log=log
            )
            (ctx / "Dockerfile").write_text(
                naive.replace("FROM python:3.11-bookworm", f"FROM {base}")
            )
            tag = f"gantry-bench/naive:{base.split(':')[1]}"
            image_id = docker_engine.build(
                client, ctx, tag=tag, target=None, labels={}, timeout_s=1200
            )
            sizes[base] = docker_engine.image_size(client, image_id)
    return sizes


# --- hashing ------------------------------------------------------------------------------


def hashing(ctx: Context) -> Measured:
    """The weights stage's verification (verify_snapshot: parallel sha256 of every file)
    vs `sha256sum` on the same files, both from the page cache; per core used."""
    from gantry.manifest import ManifestEntry, WeightsManifest, sha256_file
    from gantry.stages.weights import verify_snapshot

    files, size_each = 4, 64 * 2**20
    with tempfile.TemporaryDirectory(prefix="hash-", dir=ctx.bench.state) as tmp:
        snap = Path(tmp)
        paths = []
        for i in range(files):
            p = snap / f"model-{i:05d}-of-{files:05d}.safetensors"
            with p.open("wb") as f:
                for _ in range(size_each // 2**20):
                    f.write(os.urandom(2**20))
            paths.append(p)
        entries = [
            ManifestEntry(path=p.name, size=p.stat().st_size, sha256=sha256_file(p)) for p in paths
        ]  # also warms the page cache for both sides
        manifest = WeightsManifest.build("bench/weights", "0" * 40, entries)
        ours = [timed(lambda: verify_snapshot(snap, manifest)) for _ in range(ctx.repeat)]
        ref = [
            timed(
                lambda: subprocess.run(
                    ["sha256sum", *map(str, paths)], capture_output=True, check=True, timeout=600
                )
            )
            for _ in range(ctx.repeat)
        ]
    total = files * size_each / 2**20
    cores = min(files, os.cpu_count() or 1)
    ours_mib, ref_mib = total / median(ours), total / median(ref)
    per_core = round(ours_mib / cores / ref_mib, 3)
    data = {
        "mib": total,
        "files": files,
        "cores": cores,
        "gantry_mib_s": round(ours_mib, 1),
        "sha256sum_mib_s": round(ref_mib, 1),
        "per_core_ratio": per_core,
    }
    return data, [
        Row(
            f"weights sha256 per core ({cores} used) / sha256sum (MiB/s)",
            round(ours_mib / cores, 1),
            round(ref_mib, 1),
            per_core,
            ">= 0.9",
            per_core >= 0.9,
        )
    ]


# --- hub upload ---------------------------------------------------------------------------


def hub_upload(ctx: Context) -> Measured:
    """Publishing a 1 GiB file to the local hub (HfApi.upload_file: the client's sha256,
    preupload, LFS batch, the PUT the hub hashes and stores durably, the commit) vs `cp` of
    the same file to a new directory on the same filesystem; alternated, page cache warm.
    For context, also the client's own sha256 pass (done before its first byte is sent) and
    `cp` followed by `sync` of the copy (durable, as the hub's copy is)."""
    from huggingface_hub.utils.tqdm import disable_progress_bars

    from gantry.localhub.demo import uploading
    from gantry.localhub.store import HubStore
    from gantry.manifest import sha256_file

    disable_progress_bars()
    size = 2**30
    cp_s: list[float] = []
    cp_sync_s: list[float] = []
    hash_s: list[float] = []
    up_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="hub-upload-", dir=ctx.bench.state) as tmp:
        base = Path(tmp)
        src = base / "model.safetensors"
        digest = hashlib.sha256()
        with src.open("wb") as f:
            for _ in range(size // (64 * 2**20)):
                chunk = os.urandom(64 * 2**20)
                digest.update(chunk)
                f.write(chunk)
        for i in range(ctx.repeat):
            dest = base / f"cp-{i}"
            dest.mkdir()
            argv = ["cp", str(src), str(dest)]
            cp_s.append(timed(partial(subprocess.run, argv, check=True, timeout=600)))
            shutil.rmtree(dest)
            dest.mkdir()
            durable = ["sh", "-c", 'cp "$0" "$1" && sync "$1"/*', str(src), str(dest)]
            cp_sync_s.append(timed(partial(subprocess.run, durable, check=True, timeout=600)))
            shutil.rmtree(dest)
            hash_s.append(timed(partial(sha256_file, src)))
            store = HubStore(base / f"store-{i}")  # fresh: the blob is not known yet
            with uploading(store) as api:
                api.create_repo("bench/upload")
                upload = partial(
                    api.upload_file,
                    path_or_fileobj=src,
                    path_in_repo="model.safetensors",
                    repo_id="bench/upload",
                )
                up_s.append(timed(upload))
            assert store.has_blob(digest.hexdigest(), size)
            shutil.rmtree(store.root)
    cp, up = median(cp_s), median(up_s)
    ratio = round(cp / up, 3)
    print(
        f"cp {cp:.2f} s (with sync {median(cp_sync_s):.2f} s), hub upload {up:.2f} s "
        f"({size / 2**20 / up:.0f} MiB/s; the client's sha256 pass alone "
        f"{median(hash_s):.2f} s): {ratio}"
    )
    data = {
        "bytes": size,
        "cp_s": [round(x, 3) for x in cp_s],
        "cp_sync_s": [round(x, 3) for x in cp_sync_s],
        "client_sha256_s": [round(x, 3) for x in hash_s],
        "upload_s": [round(x, 3) for x in up_s],
        "cp_median_s": round(cp, 3),
        "cp_sync_median_s": round(median(cp_sync_s), 3),
        "client_sha256_median_s": round(median(hash_s), 3),
        "upload_median_s": round(up, 3),
        "upload_mib_s": round(size / 2**20 / up, 1),
        "ratio": ratio,
    }
    return data, [
        Row(
            "1 GiB: `cp` / hub upload (HfApi.upload_file) (s)",
            round(cp, 2),
            round(up, 2),
            ratio,
            ">= 0.5",
            ratio >= 0.5,
        )
    ]


# --- evaluate -----------------------------------------------------------------------------

_WRK_LUA = """
local bodies, i = {}, 0
function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
end
function request()
  i = i % #bodies + 1
  return wrk.format("POST", "/v1/embeddings", {["Content-Type"] = "application/json"}, bodies[i])
end
function done(summary, latency, requests)
  io.write(string.format("GANTRY %d %d %d %.3f %.3f %.3f\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout, summary.duration, latency:percentile(50) / 1000,
    latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
"""


def evaluate(ctx: Context) -> Measured:
    """`evaluate`'s runner vs wrk, same endpoint (the signed image, served hardened as in
    the stage), same requests (the eval set's batches), same concurrency; alternated."""
    from gantry import scoring as ev
    from gantry.adapters import containers
    from gantry.adapters.docker_engine import connect
    from gantry.spec import load_spec
    from gantry.stages.build import BuildResult
    from gantry.stages.evaluate import resolve_dataset
    from gantry.stages.smoke import start_runtime
    from gantry.stages.weights import WeightsResult

    b = ctx.bench
    cold_record, _ = ctx.cold()
    spec = load_spec(b.spec("bench-cold"))
    build_r = BuildResult.model_validate(cold_record["stages"]["build"]["result"])
    weights = WeightsResult.model_validate(cold_record["stages"]["weights"]["result"])
    assert spec.evaluate.dataset is not None
    items = ev.load_retrieval_set(resolve_dataset(spec.evaluate.dataset))
    model = spec.runtime.served_model_name or spec.name
    _, batches = ev.embedding_batches(items)
    bodies = b.state / "wrk-bodies.jsonl"
    bodies.write_text("".join(json.dumps(ev.embeddings_request(model, c)) + "\n" for c in batches))
    lua = b.state / "bodies.lua"
    lua.write_text(_WRK_LUA)
    conc = spec.evaluate.concurrency
    cfg = ev.RunnerConfig(model=model, concurrency=conc, timeout_s=spec.evaluate.timeout_s)
    client = connect(600)
    ours: list[ev.RunOutcome] = []
    theirs: list[tuple[float, list[float], int]] = []
    try:
        with start_runtime(client, spec, build_r, weights, None, "bench") as running:
            containers.wait_healthy(running, spec.runtime.health_path, 120)
            url = running.base_url
            ev.run_sync(ev.run_embeddings(url, items[:32], cfg))  # warm-up, as wrk gets below
            for _ in range(ctx.repeat):
                out = ev.run_sync(ev.run_embeddings(url, items, cfg))
                ours.append(out)
                theirs.append(_wrk(url, lua, bodies, conc, max(5.0, out.wall_s)))
                # wrk stops at its deadline with requests still in flight, and the server
                # finishes them: let it, so the next run of ours starts on an idle server.
                time.sleep(2 * theirs[-1][1][2] / 1000 + 0.5)
    finally:
        client.close()
    rps_ours = median([o.throughput_rps for o in ours])
    rps_wrk = median([t[0] for t in theirs])
    p_ours = [median([ev.percentiles(o.latencies_ms)[i] for o in ours]) for i in range(3)]
    p_wrk = [median([t[1][i] for t in theirs]) for i in range(3)]
    ratio = round(rps_ours / rps_wrk, 3)
    data = {
        "concurrency": conc,
        "requests_per_run": len(batches),
        "gantry_rps": round(rps_ours, 2),
        "wrk_rps": round(rps_wrk, 2),
        "ratio": ratio,
        "gantry_p50_p95_p99_ms": [round(x, 1) for x in p_ours],
        "wrk_p50_p95_p99_ms": [round(x, 1) for x in p_wrk],
        "wrk_errors": sum(t[2] for t in theirs),
    }
    return data, [
        Row(
            f"evaluate / wrk, requests/s ({len(batches)} batches of 32, concurrency {conc})",
            round(rps_ours, 2),
            round(rps_wrk, 2),
            ratio,
            ">= 0.9",
            ratio >= 0.9,
        ),
        Row(
            "evaluate / wrk, p50 latency (ms)",
            round(p_ours[0], 1),
            round(p_wrk[0], 1),
            round(p_ours[0] / p_wrk[0], 3),
            "agree",
        ),
        Row(
            "evaluate / wrk, p95 latency (ms)",
            round(p_ours[1], 1),
            round(p_wrk[1], 1),
            round(p_ours[1] / p_wrk[1], 3),
            "agree",
        ),
    ]


def _wrk(
    url: str, lua: Path, bodies: Path, conc: int, seconds: float
) -> tuple[float, list[float], int]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: run `make system-deps`")
    done = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{conc}",
            f"-d{seconds:.0f}s",
            "--timeout",
            "60s",
            "-s",
            str(lua),
            url,
            "--",
            str(bodies),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    m = re.search(r"^GANTRY (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+)$", done.stdout, re.M)
    if m is None:
        raise SystemExit(f"unexpected wrk output:\n{done.stdout}\n{done.stderr}")
    requests, errors, micros = int(m[1]), int(m[2]), int(m[3])
    with contextlib.suppress(ZeroDivisionError):
        return requests / (micros / 1e6), [float(m[4]), float(m[5]), float(m[6])], errors
    return 0.0, [0.0, 0.0, 0.0], errors
