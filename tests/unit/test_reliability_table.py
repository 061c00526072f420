"""scripts/reliability_table.py: the README table, spliced between its markers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import REPO_ROOT

pytestmark = pytest.mark.unit


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "reliability_table", REPO_ROOT / "scripts" / "reliability_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RT = _script()
SCENARIOS = [
    {
        "id": "t::a",
        "group": "transient: hub",
        "title": "hub answers 500 | twice",
        "outcome": "succeeded after 2 retries",
        "data_lost": [],
        "result": "passed",
        "at": "2026-11-22T10:00:00+00:00",
    },
    {
        "id": "t::b",
        "group": "crash",
        "title": "killed mid-build",
        "outcome": "",
        "data_lost": ["2 MLflow versions"],
        "result": "failed",
        "at": "2026-11-23T10:00:00+00:00",
    },
]


def test_render_says_what_failed_and_what_was_lost() -> None:
    table = RT.render(SCENARIOS)
    first = table.splitlines()[0]
    assert (
        first == "2 scenarios, 1 passed, 1 failed; data lost: in 1 scenarios (last run 2026-11-23)."
    )
    assert (
        "| transient: hub | hub answers 500 \\| twice | succeeded after 2 retries | none | passed |"
        in table
    )
    assert (
        "| crash | killed mid-build | (no outcome recorded) | 2 MLflow versions | failed |" in table
    )
    with pytest.raises(ValueError, match="no scenarios"):
        RT.render([])


def test_readme_is_rewritten_between_the_markers_only(tmp_path: Path) -> None:
    results, readme = tmp_path / "results.json", tmp_path / "README.md"
    results.write_text(json.dumps({"scenarios": SCENARIOS[:1]}))
    readme.write_text(f"# X\n\nbefore\n{RT.BEGIN}\nold table\n{RT.END}\nafter\n")
    args = ["--results", str(results), "--readme", str(readme)]
    assert RT.main([*args, "--check"]) == 1  # stale
    assert RT.main(args) == 0
    text = readme.read_text()
    assert (
        "old table" not in text and text.startswith("# X\n\nbefore\n") and text.endswith("after\n")
    )
    assert "1 scenarios, 1 passed; data lost: none" in text
    assert RT.main([*args, "--check"]) == 0
    results.write_text(json.dumps({"scenarios": SCENARIOS}))
    assert RT.main(args) == 1  # written, but a failed scenario is not a clean result


def test_missing_markers_or_results_are_errors(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"scenarios": SCENARIOS[:1]}))
    assert RT.main(["--results", str(results), "--readme", str(readme)]) == 2
    assert RT.main(["--results", str(tmp_path / "none.json"), "--readme", str(readme)]) == 2
