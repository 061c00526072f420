"""Gantry's benchmark suite: each measure a ratio of two things measured side by side in
this one run (medians of several runs), printed as a table, written as JSON to
bench/results/latest.json and, with --readme, into the README's Performance section.

    .venv/bin/python bench/run.py [--repeat 3] [--only resume,build,...] [--readme]

Everything runs against real services started for the benchmark (isolated state dir, free
ports; wheels and base images from the shared cache, as in any second run):

  resume         cold release (empty state, no layer cache) vs a re-run of it (all cached);
                 a re-run after a failure in `evaluate` vs the stages it still had to run
  orchestration  a full demo release through Prefect (`gantry release`) vs the same stage
                 functions called in order in one process (bench/direct.py); alternated
  smoke          the smoke stage vs the cold start it measured (from the releases above)
  build          code-only rebuild vs cold build; image size vs a naive single-stage build
  hashing        sha256 of the weights stage vs `sha256sum` on the same files, per core
  hub_upload     a 1 GiB upload to the local hub (HfApi.upload_file) vs `cp` of the file
  evaluate       requests/s of `evaluate` vs `wrk` on the same endpoint and requests
  canary         failing check -> weight 0; a good canary vs the sum of its windows
  chat           chat TTFT (SmolLM2 on llama.cpp) through the router vs to its server
  records        a release run's record writes kept in the tracking server (several hosts)
                 vs the local file alone
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import canary, chat, measures, records  # noqa: E402 - after the path is set
from bench.common import Row, bench_env, report, splice_readme  # noqa: E402

ORDER = (
    "resume",
    "orchestration",
    "smoke",
    "build",
    "hashing",
    "hub_upload",
    "evaluate",
    "canary",
    "chat",
    "records",
)
#: Measures that live in modules of their own.
MODULES = {"canary": canary.measure, "chat": chat.measure, "records": records.measure}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each repeated measurement")
    ap.add_argument(
        "--orchestration-repeat", type=int, default=5, help="pairs of the orchestration measure"
    )
    ap.add_argument("--only", default=",".join(ORDER), help=f"comma-separated, of {ORDER}")
    ap.add_argument("--readme", action="store_true", help="update README's Performance table")
    args = ap.parse_args()
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(only) - set(ORDER))
    if unknown:
        raise SystemExit(f"unknown measures {unknown}; choose from {ORDER}")

    results: dict[str, Any] = {"repeat": args.repeat}
    rows: list[Row] = []
    with bench_env("gantry-bench-") as b:
        ctx = measures.Context(b, args.repeat, args.orchestration_repeat)
        for name in ORDER:
            if name not in only:
                continue
            print(f"--- {name}", flush=True)
            fn = MODULES.get(name) or getattr(measures, name)
            data, new_rows = fn(ctx)
            results[name] = data
            rows += new_rows
    note = (
        f"medians of {args.repeat} runs ({args.orchestration_repeat} pairs for orchestration); "
        f"`make bench` ({', '.join(only)})"
    )
    table = report(results, rows, "latest", note)
    if args.readme:
        splice_readme(table)
        print("README.md: Performance table updated")


if __name__ == "__main__":
    main()
