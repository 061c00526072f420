"""Shared release records (part of bench/run.py): what keeping every record write in the
tracking server costs (GANTRY_TOPOLOGY=multi), against writing the local file alone.

One release run's worth of writes (the eight stages, each started and finished, then the
end of the run) through :class:`gantry.record.Recorder`, with no-op stages so the
writes are all that is timed; alternated, with and without the share, against a real
MLflow server on PostgreSQL started for the measure.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Row, free_port, median


def measure(ctx: Any) -> tuple[dict[str, Any], list[Row]]:
    from pydantic import BaseModel

    from gantry.adapters.mlflow_registry import MlflowRegistry
    from gantry.localenv.services import mlflow_server_service, postgres_service
    from gantry.record import STAGES, Recorder
    from gantry.settings import Settings
    from gantry.shared_records import SharedRecords
    from gantry.spec import parse_spec

    class Out(BaseModel):
        value: str

    spec = parse_spec({"name": "bench-records", "source": {"repo_id": "a/b", "revision": "v1"}})

    def one_run(share: SharedRecords | None) -> tuple[float, int]:
        with tempfile.TemporaryDirectory(prefix="gantry-bench-records-") as d:
            t0 = time.perf_counter()
            rec = Recorder(Path(d), spec, flow_run_id=None, shared=share)
            for stage in STAGES:
                rec.run_stage(stage, lambda: Out(value="x"), reuse=(Out, "k"))
            rec.succeed()
            # One write to create the record, two per stage, one at the end.
            return time.perf_counter() - t0, 2 + 2 * len(STAGES)

    # PostgreSQL (as `postgres` when root) must enter every directory above its cluster.
    control = Path(tempfile.mkdtemp(prefix="gantry-bench-tracking-"))
    control.chmod(0o755)
    settings = Settings.from_env(
        {
            "GANTRY_STATE_DIR": str(control),
            "GANTRY_TOPOLOGY": "multi",
            "GANTRY_POSTGRES_ADDR": f"127.0.0.1:{free_port()}",
            "GANTRY_MLFLOW_ADDR": f"127.0.0.1:{free_port()}",
        }
    )
    pg, server = postgres_service(settings), mlflow_server_service(settings)
    try:
        pg.start()
        server.start()
        share = SharedRecords(MlflowRegistry(settings.mlflow_server_url, timeout_s=30))
        one_run(share)  # the experiment created, connections opened
        local, shared, writes = [], [], 0
        for _ in range(max(ctx.repeat, 3)):
            s, writes = one_run(None)
            local.append(s)
            shared.append(one_run(share)[0])
    finally:
        server.stop()
        pg.stop()
        shutil.rmtree(control, ignore_errors=True)
    lo, sh = median(local), median(shared)
    per_write_ms = (sh - lo) / writes * 1000
    data = {
        "writes": writes,
        "local_s": round(lo, 4),
        "shared_s": round(sh, 4),
        "per_write_ms": round(per_write_ms, 1),
    }
    rows = [
        Row(
            f"records: one run's {writes} writes, shared vs local (s)",
            round(sh, 3),
            round(lo, 3),
            round(sh / lo, 1),
            "≤ 100 ms more per write",
            per_write_ms <= 100,
        )
    ]
    return data, rows
