"""The quick-start demo runs end to end on a tiny budget; README examples run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from pipeprop.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end_on_tiny_budget(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        main,
        ["demo", "--out", str(out), "--methods", "sgd,pb,pb+sc+lwp", "--depth", "4", "--epochs", "0.1",
         "--eval-every", "50", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert "test acc" in result.output and "pb+sc+lwp" in result.output
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in rows] == ["sgd", "pb", "pb+sc+lwp"]
    n_train = 1348  # digits train split
    assert all(r["samples"] == round(0.1 * n_train) and r["micro_batch"] == 1 for r in rows)
    assert all(r["status"] == "completed" and 0.0 <= r["final_test_acc"] <= 1.0 for r in rows)
    assert [r["max_delay"] for r in rows] == [0, 6, 6]  # sgd runs without delay; 4 stages -> 2(S-1)
    assert (out / "comparison.png").stat().st_size > 10_000
    assert (out / "table.txt").read_text().startswith("method")


def test_demo_rejects_unknown_method(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--methods", "pb+bogus", "--no-progress"])
    assert result.exit_code != 0
    assert "unknown method 'pb+bogus'" in str(result.exception) + result.output


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    assert len(namespace["losses"]) == 512
