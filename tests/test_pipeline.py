"""The one-command study on the tiny Llama with the oracle teacher: every artefact, well-formed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_STUDY = [
    "+experiment=demo", "model=tiny_llama", "model.lora.top_layers=null", "trainer.max_steps=2",
    "trainer.val_check_interval=1", "scenarios.splits=[in_sample,oos_context,oos_payoffs,oos_game]",
    "scenarios.games=[prisoners_dilemma,stag_hunt,prisoners_dilemma_x2,stag_hunt_x2,public_goods]",
    "~pipeline.variants.sft_soft", "pipeline.teacher=['sampler=oracle','role=teacher','sampler.n=4']",
    "metrics.n_bootstrap=1000", "pipeline.variants.soft=['loss=soft']",
]


def run_pipeline(study_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tomdistill.pipeline", *TINY_STUDY, f"output={study_dir}", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_study_runs_end_to_end_and_resumes(tmp_path):
    study = tmp_path / "study"
    first = run_pipeline(study)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("teacher", "teacher_scores", "base", "tuned_sft", "tuned_soft"):
        manifest = json.loads((study / stage / "manifest.json").read_text())
        assert manifest["complete"] and manifest["records"] > 0
    for variant in ("sft", "soft"):
        adapter = study / f"train_{variant}" / "adapter"
        assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
        report = study / f"evaluate_{variant}"
        summary = json.loads((report / "summary.json").read_text())
        for metric in ("improvement", "alignment"):
            for split in ("in_sample", "oos_context", "oos_payoffs", "oos_game", "overall"):
                cell = summary[metric][split]
                assert set(cell) >= {"value", "ci_low", "ci_high", "n_scenarios"} and cell["n_scenarios"] > 0
        for figure in ("cooperation", "improvement_by_game", "improvement_by_context", "public_goods", "heatmap"):
            png = report / f"{figure}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (report / "report.md").read_text().strip()
    table = json.loads((study / "study.json").read_text())
    assert {"sft", "soft"} <= set(table) and any(k.startswith("paper") for k in table)
    assert "alignment toward the teacher" in first.stdout

    again = run_pipeline(study)  # every stage complete: all skipped, same table
    assert again.returncode == 0
    assert again.stdout.count("complete, skipped") == 9
    assert json.loads((study / "study.json").read_text()) == table
