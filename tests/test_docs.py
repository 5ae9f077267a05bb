"""The docs stay short, current and linked: docs/results.md is what scripts/render_results.py renders from results/,
the README is a front page (no dated history), its links resolve, and its test command is the one CI runs."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DATE = re.compile(r"\b20\d\d-[01]\d(?:-[0-3]\d)?\b")  # a dated stamp such as 2026-12-01 or 2026-12


def test_docs_results_md_is_what_the_renderer_makes():
    result = subprocess.run([sys.executable, "scripts/render_results.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr or result.stdout


def test_the_renderer_refuses_a_column_the_schema_does_not_describe(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import render_results
    finally:
        sys.path.pop(0)
    (tmp_path / "public_goods_analogy.csv").write_text("game,context,mystery\npublic_goods,party,1\n")
    with pytest.raises(render_results.ResultsError, match="mystery"):
        render_results.assign(render_results.read_schemas(), tmp_path)


def test_a_typed_row_is_checked_within_the_precision_it_was_typed_with(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import render_results
    finally:
        sys.path.pop(0)
    table = tmp_path / "probes.csv"
    table.write_text("probe,alignment_in_sample,alignment_oos_context,tuned_mass_public_goods\nx,0.89,0.511,0.93\n")
    run = {"alignment_in_sample": 0.8934, "alignment_oos_context": 0.5113, "tuned_mass_public_goods": 0.9349}
    assert render_results.check_row(1, run, table) == []
    problems = render_results.check_row(1, {**run, "alignment_oos_context": 0.5131}, table)
    assert problems == ["alignment_oos_context: the row says 0.511, the run 0.5131"]


def test_a_studys_rows_are_written_from_its_own_study_json_and_shown_in_the_readme(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import render_results
    finally:
        sys.path.pop(0)
    import json

    study = tmp_path / "runs" / "demo_70b"
    (study / ".hydra").mkdir(parents=True)
    (study / ".hydra" / "overrides.yaml").write_text("- +experiment=demo_70b\n- pipeline.seeds=[0,1]\n- output=/x\n")
    (study / ".hydra" / "config.yaml").write_text("pipeline:\n  name: demo_70b\n")
    cell = {"value": 0.875, "sd": 0.0125, "values": [0.8625, 0.8875], "seeds": [0, 1], "n_scenarios": 20}
    off_format = {"value": None, "off_format": True, "n_scenarios": 1}
    paper = {"value": 0.33, "ci_low": 0.28, "ci_high": 0.36, "n_scenarios": 20}
    (study / "study.json").write_text(json.dumps({
        "variants": {"soft": {"alignment": {"in_sample": cell, "oos_game": off_format},
                              "action_mass": {"tuned": {"mean": 0.99}}},
                     "paper (70b → 7b, published counts)": {"alignment": {"in_sample": paper}}},
        "stages": {"base student": {"seconds": 60.0, "peak_rss_gb": 1.4},
                   "train [soft_s0]": {"seconds": 500.0, "peak_rss_gb": 3.2},
                   "train [soft_s1]": {"seconds": 520.0, "peak_rss_gb": 3.1}}}))
    rows = render_results.study_rows(study, "2-core test CPU", "abc1234", "2026-01-01")
    soft, paper_row = rows
    assert soft["command"] == "python -m tomdistill.pipeline +experiment=demo_70b pipeline.seeds=[0,1]"
    assert (soft["study"], soft["seeds"], soft["alignment_in_sample"], soft["sd_in_sample"]) == (
        "demo_70b", "0 1", "0.875", "0.013")
    assert soft["alignment_oos_game"] == "" and soft["alignment_heldout_context"] == ""  # off format, none held out
    assert (soft["train_seconds"], soft["study_seconds"], soft["peak_rss_gb"]) == ("510", "1080", "3.20")
    assert paper_row["alignment_in_sample"] == "0.330" and paper_row["study_seconds"] == ""

    table = tmp_path / "studies.csv"
    render_results.write_study_rows(rows, table)
    render_results.write_study_rows([{**soft, "alignment_in_sample": "0.900"}], table)  # same commit: replaced
    assert [r["alignment_in_sample"] for r in render_results.read_table(table)[1]] == ["0.330", "0.900"]
    readme = render_results.render_readme(f"intro\n{render_results.README_BEGIN}\nold\n{render_results.README_END}\n"
                                          "after\n", table)
    assert "old" not in readme and readme.startswith("intro\n") and readme.endswith("after\n")
    assert "| `demo_70b` | soft | 0 1 | 0.90 ± 0.01 | — |" in readme
    assert "1080 s, 3.20 GB, 2-core test CPU, abc1234" in readme

    # one seed of newer code (the config's seed, no pipeline.seeds): its own row, the seeds' row still shown
    (study / ".hydra" / "overrides.yaml").write_text("- +experiment=demo_70b\n")
    (study / ".hydra" / "config.yaml").write_text("seed: 0\npipeline:\n  name: demo_70b\n")
    one = {k: v for k, v in cell.items() if k not in ("sd", "values", "seeds")}
    (study / "study.json").write_text(json.dumps({"variants": {"soft": {"alignment": {"in_sample": one},
                                                                        "action_mass": {"tuned": {"mean": 0.99}}}},
                                                  "stages": {"train [soft]": {"seconds": 500.0, "peak_rss_gb": 3.2}}}))
    (newer,) = render_results.study_rows(study, "2-core test CPU", "def5678", "2026-01-02")
    assert (newer["seeds"], newer["sd_in_sample"], newer["command"]) == (
        "0", "", "python -m tomdistill.pipeline +experiment=demo_70b")
    render_results.write_study_rows([newer], table)
    readme = render_results.render_readme(f"{render_results.README_BEGIN}\n{render_results.README_END}\n", table)
    assert "| `demo_70b` | soft | 0 1 | 0.90 ± 0.01 |" in readme and "| `demo_70b` | soft | 0 | 0.88 | — |" in readme

    # the seeds finished later: their row takes the place of every earlier row whose seeds it covers
    three = {**cell, "values": [0.91, 0.89, 0.90], "seeds": [0, 1, 2]}
    (study / ".hydra" / "overrides.yaml").write_text("- +experiment=demo_70b\n- pipeline.seeds=[0,1,2]\n")
    three_seeds = {"alignment": {"in_sample": three}, "action_mass": {"tuned": {"mean": 0.99}}}
    stages = {"train [soft_s0]": {"seconds": 500.0, "peak_rss_gb": 3.2}}
    (study / "study.json").write_text(json.dumps({"variants": {"soft": three_seeds}, "stages": stages}))
    later = render_results.study_rows(study, "2-core test CPU", "fed9876", "2026-01-03")
    render_results.write_study_rows(later, table)
    readme = render_results.render_readme(f"{render_results.README_BEGIN}\n{render_results.README_END}\n", table)
    soft_rows = [line for line in readme.splitlines() if line.startswith("| `demo_70b` | soft |")]
    assert len(soft_rows) == 1 and soft_rows[0].startswith("| `demo_70b` | soft | 0 1 2 |"), soft_rows


def test_the_readme_is_short_and_holds_no_dated_history():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    dated = [f"{number}: {line.strip()[:80]}" for number, line in enumerate(lines, 1) if DATE.search(line)]
    assert not dated, "dated stamps in README.md (history goes to docs/findings.md):\n" + "\n".join(dated)


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def ci_test_command() -> str:
    """The pytest command .ci/run runs (the line that runs pytest, up to its `||`)."""
    lines = [line for line in (ROOT / ".ci/run").read_text().splitlines()
             if "-m pytest" in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, f".ci/run: expected one pytest line, found {lines}"
    return lines[0].split("||", 1)[0].strip()


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci/run").read_text()
    assert re.search(r"^bash scripts/setup\.sh$", ci, re.M), ".ci/run no longer sets up with bash scripts/setup.sh"
    command = ci_test_command()
    readme_commands = [line.split("#", 1)[0].strip() for line in README.read_text().splitlines()
                       if "-m pytest" in line and "scripts/setup.sh" in line]
    assert readme_commands == [f"bash scripts/setup.sh && {command}"], (
        f"README's test command {readme_commands} is not .ci/run's set-up and {command!r}")


def test_a_worker_that_crashes_under_the_ci_command_ends_the_run_naming_its_test(tmp_path):
    """A test that kills its xdist worker under CI's `-n auto --dist loadfile` fails the run at once, naming the
    test, instead of leaving pytest-xdist 3.8 waiting on the replacement worker until CI's limit (tests/conftest.py)."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_a.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    (tmp_path / "test_b.py").write_text(
        "import os\n\ndef test_crash():\n    os._exit(1)\n\ndef test_after():\n    pass\n")
    (tmp_path / "test_c.py").write_text("def test_three():\n    pass\n")
    command = ci_test_command().replace(".venv/bin/python", sys.executable).split()
    options = ["-n", "1", "-p", "no:cacheprovider", "-c", "/dev/null", "--rootdir", str(tmp_path)]
    result = subprocess.run([*command, *options], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "worker 'gw0' crashed while running 'test_b.py::test_crash'" in result.stdout, result.stdout
