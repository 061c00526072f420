"""Write the README's Reliability table from what the reliability suite last observed.

The suite (``pytest -m reliability``, also part of ``make test``) records every scenario it
tried in ``.gantry/reliability/results.json``: what was done, what happened, what was lost
and pytest's verdict. This script renders them as a markdown table and puts it between
``<!-- reliability:begin -->`` and ``<!-- reliability:end -->`` in README.md.

    python scripts/reliability_table.py            # rewrite README.md
    python scripts/reliability_table.py --check    # exit 1 if README.md is not up to date
    python scripts/reliability_table.py --print    # just print the table

Exit status 1 also when a scenario failed or lost data: the table says so, in the open.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def render(scenarios: list[dict[str, Any]]) -> str:
    """The markdown table (and a one-line summary) for ``scenarios``."""
    if not scenarios:
        raise ValueError("no scenarios: run `pytest -m reliability` first")
    results = Counter(str(s.get("result")) for s in scenarios)
    lost = [s for s in scenarios if s.get("data_lost")]
    newest = max(str(s.get("at", "")) for s in scenarios)
    summary = (
        f"{len(scenarios)} scenarios, {results['passed']} passed"
        + "".join(f", {n} {r}" for r, n in sorted(results.items()) if r != "passed")
        + f"; data lost: {'none' if not lost else f'in {len(lost)} scenarios'}"
        + f" (last run {newest[:10]})."
    )
    lines = [
        summary,
        "",
        "| kind | scenario | outcome | data lost | result |",
        "|---|---|---|---|---|",
    ]
    for s in scenarios:
        lines.append(
            "| "
            + " | ".join(
                _cell(v)
                for v in (
                    s.get("group", ""),
                    s.get("title", "") or s.get("id", ""),
                    s.get("outcome", "") or "(no outcome recorded)",
                    "; ".join(s.get("data_lost") or []) or "none",
                    s.get("result", ""),
                )
            )
            + " |"
        )
    return "\n".join(lines)


def splice(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {BEGIN} … {END} markers (in this order)")
    return readme[: start + len(BEGIN)] + "\n" + table + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results", type=Path, default=ROOT / ".gantry" / "reliability" / "results.json"
    )
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if the README is stale")
    mode.add_argument("--print", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    try:
        scenarios = json.loads(args.results.read_text())["scenarios"]
        table = render(scenarios)
    except (OSError, ValueError, KeyError) as exc:
        print(f"reliability_table: {args.results}: {exc}", file=sys.stderr)
        return 2
    bad = [s for s in scenarios if s.get("result") != "passed" or s.get("data_lost")]
    if args.print:
        print(table)
    else:
        readme = args.readme.read_text()
        try:
            updated = splice(readme, table)
        except ValueError as exc:
            print(f"reliability_table: {args.readme}: {exc}", file=sys.stderr)
            return 2
        if args.check:
            if updated != readme:
                print(f"{args.readme} is stale: run scripts/reliability_table.py", file=sys.stderr)
                return 1
        elif updated != readme:
            args.readme.write_text(updated)
            print(f"wrote {len(scenarios)} scenarios to {args.readme}")
    for s in bad:
        print(f"not clean: {s.get('id')}: {s.get('result')}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
