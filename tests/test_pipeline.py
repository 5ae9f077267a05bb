"""The one-command study on the tiny Llama with the oracle teacher: every artefact, well-formed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_STUDY = [
    "+experiment=demo", "model=tiny_llama", "trainer.max_steps=2",
    "pipeline.variants.sft=['loss=sft','data.splits=[in_sample]','scenarios.augment.per_step=0']",
    "trainer.val_check_interval=1", "scenarios.splits=[in_sample,oos_context,oos_payoffs,oos_game]",
    "scenarios.games=[prisoners_dilemma,stag_hunt,prisoners_dilemma_x2,stag_hunt_x2,public_goods]",
    # the demo's teacher also labels the payoff variants the soft variant trains on (conf/experiment/demo.yaml)
    "pipeline.teacher=['sampler=oracle','role=teacher','sampler.n=4',"
    "'scenarios.splits=[in_sample,oos_context,oos_payoffs,oos_game,augment]']",
    "metrics.n_bootstrap=1000", "pipeline.variants.soft=['loss=soft']",
]
EVALUATED = ["in_sample", "heldout_context", "oos_context", "oos_payoffs", "oos_game"]
# training also measures its final student on every split (callbacks.split_alignment, the recipe search's objective)
MEASURED_IN_TRAINING = f"pipeline.train=['logger=csv','callbacks.split_alignment.splits=[{','.join(EVALUATED)}]']"


def run_pipeline(study_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tomdistill.pipeline", *TINY_STUDY, f"output={study_dir}", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_study_runs_end_to_end_and_resumes(tmp_path):
    study = tmp_path / "study"
    first = run_pipeline(study, MEASURED_IN_TRAINING)
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
        # ... and finds what sample.py + evaluate.py find for the same adapter
        measured = json.loads((study / f"train_{variant}" / "split_alignment.json").read_text())["splits"]
        for split in EVALUATED:
            assert measured[split]["scenarios"] == summary["alignment"][split]["n_scenarios"], split
            cell = summary["alignment"][split]
            if cell.get("off_format"):  # the tiny Llama hardly answers public goods with an amount: withheld
                assert cell["value"] is None and min(cell["action_mass"].values()) < 0.5, split
                assert cell["action_mass"]["tuned"] == pytest.approx(measured[split]["action_mass"], abs=1e-5), split
                continue
            assert measured[split]["alignment"] == pytest.approx(cell["value"], abs=1e-5), split
    table = json.loads((study / "study.json").read_text())
    assert {"sft", "soft"} <= set(table["variants"]) and any(k.startswith("paper") for k in table["variants"])
    # each stage's time and peak resident memory, measured by the pipeline, beside the table and in its log
    assert len(table["stages"]) == 9
    for usage in table["stages"].values():
        assert usage["seconds"] > 0 and 0.05 < usage["peak_rss_gb"] < 64, usage
    assert "alignment toward the teacher" in first.stdout
    assert (study / ".hydra" / "config.yaml").exists()
    log = (study / "pipeline.log").read_text()  # the progress goes with the study, not only to the console
    assert log.count(": done in ") == 9 and log.count(" GB resident") == 9 and "Study complete in" in log, log

    again = run_pipeline(study, MEASURED_IN_TRAINING)  # every stage complete: all skipped, same table
    assert again.returncode == 0
    assert again.stdout.count("complete, skipped") == 9
    assert (study / "pipeline.log").read_text().count("complete, skipped") == 9  # a rerun appends to the study's log
    assert json.loads((study / "study.json").read_text()) == table


def _compose_pipeline(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("pipeline", overrides=["paths.root_dir=" + str(ROOT), *overrides])


def test_seeds_train_each_variant_once_per_seed_and_the_tuned_student_loads_the_chosen_adapter(tmp_path):
    from tomdistill.pipeline import plan

    cfg = _compose_pipeline("+experiment=demo", "pipeline.seeds=[0,1,2]", "pipeline.adapter=adapter_best",
                            "~pipeline.variants.sft")
    stages = plan(cfg, tmp_path)
    trains = [s for s in stages if s.script == "train.py"]
    assert [s.output.name for s in trains] == ["train_soft_s0", "train_soft_s1", "train_soft_s2"]
    assert [s.overrides[-1] for s in trains] == ["seed=0", "seed=1", "seed=2"]
    tuned = [s for s in stages if s.name.startswith("tuned")]
    assert tuned[1].overrides[-1] == f"adapter={tmp_path / 'train_soft_s1' / 'adapter_best'}"
    assert [s.output.name for s in stages if s.script == "evaluate.py"] == [f"evaluate_soft_s{i}" for i in range(3)]


def test_study_table_reports_mean_and_sd_over_seeds(tmp_path):
    from tomdistill.pipeline import study_table

    for seed, value in zip((0, 1, 2), (0.5, 0.7, 0.9)):
        cell = {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "n_scenarios": 20}
        summary = {"alignment": {"in_sample": cell}, "improvement": {"in_sample": cell},
                   "action_mass": {"base": {"mean": 0.8}, "tuned": {"mean": 0.9 + seed / 100}}}
        (tmp_path / f"evaluate_soft_s{seed}").mkdir()
        (tmp_path / f"evaluate_soft_s{seed}" / "summary.json").write_text(json.dumps(summary))
    table = study_table(tmp_path, ["soft"], [0, 1, 2])
    cell = table["soft"]["alignment"]["in_sample"]
    assert cell["value"] == pytest.approx(0.7) and cell["sd"] == pytest.approx(0.2)
    assert cell["values"] == [0.5, 0.7, 0.9] and cell["seeds"] == [0, 1, 2]
    assert table["soft"]["action_mass"]["tuned"]["mean"] == pytest.approx(0.91)
    single = study_table(tmp_path, ["soft"], [1])  # one seed: the evaluation's own cell, CI and all
    assert "sd" not in single["soft"]["alignment"]["in_sample"]


def _stage_config(stage, common):
    """The config a stage's command composes (`python <script> <common> <stage overrides> output=...`)."""
    from hydra import compose, initialize_config_dir

    from tomdistill.paths import register_resolvers

    register_resolvers()
    config = {"sample.py": "sample", "train.py": "train", "evaluate.py": "evaluate"}[stage.script]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config, overrides=["paths.root_dir=" + str(ROOT), *common, *stage.overrides,
                                          f"output={stage.output}"])


def test_a_stage_records_its_time_and_its_own_peak_resident_memory(tmp_path, monkeypatch):
    from tomdistill import pipeline
    from tomdistill.study import Stage, study_usage

    # a stage whose process holds 400 MB at its peak, then ends with its outputs written
    program = ("import sys, pathlib; held = bytearray(400 * 10**6); held[::4096] = b'x' * len(held[::4096]); "
               "pathlib.Path(sys.argv[1], 'summary.json').write_text('{}')")
    stage = Stage("evaluate [x]", "evaluate.py", tmp_path / "evaluate_x")
    stage.output.mkdir()
    monkeypatch.setattr(pipeline, "stage_command", lambda st, common: [sys.executable, "-c", program, str(st.output)])
    usage = pipeline.run_stage(stage, [], 1, 1)
    # the kernel starts a child's high-water mark at its parent's (fork/exec): the floor is this process's own peak
    import resource
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    assert 0.4 <= usage["peak_rss_gb"] < max(1.0, floor + 0.05) and usage["seconds"] > 0
    assert study_usage([stage]) == {"evaluate [x]": {"seconds": usage["seconds"], "peak_rss_gb": usage["peak_rss_gb"]}}


def test_the_paper_pipeline_is_the_papers_study(tmp_path):
    """Every stage of `python -m tomdistill.pipeline +experiment=paper`, composed as its command would be."""
    from tomdistill.pipeline import plan

    common = ["+experiment=paper"]
    stages = {s.name: s for s in plan(_compose_pipeline(*common), tmp_path)}
    teacher = _stage_config(stages["teacher samples"], common)
    assert (teacher.model.name, teacher.role, teacher.sampler.mode, teacher.sampler.n) == (
        "llama2_70b", "teacher", "generate", 300)
    assert (teacher.sampler.temperature, teacher.sampler.max_new_tokens, teacher.sampler.repetition_penalty) == (
        0.8, 600, 1.1)
    scores = _stage_config(stages["teacher choice probabilities"], common)
    assert (scores.model.name, scores.role, scores.sampler.mode) == ("llama2_70b", "teacher", "score")
    for name in ("base student", "tuned student [sft]"):
        student = _stage_config(stages[name], common)
        assert (student.model.name, student.role, student.sampler.mode, student.sampler.n) == (
            "llama2_7b", "student", "generate", 300)
        assert student.sampler.temperature == 0.8 and student.sampler.answer_prefill is False
    assert str(_stage_config(stages["tuned student [sft]"], common).adapter).endswith("train_sft/adapter")
    sft = _stage_config(stages["train [sft]"], common)
    assert (sft.loss.name, sft.model.name, sft.model.lora.r, sft.data.target) == ("sft", "llama2_7b", 8,
                                                                                  "answer_motivation")
    assert sft.data.teacher == str(tmp_path / "teacher")
    assert _stage_config(stages["train [soft]"], common).loss.name == "soft"
    evaluation = _stage_config(stages["evaluate [sft]"], common)
    assert evaluation.teacher == str(tmp_path / "teacher") and evaluation.compare == "paper_published"


def test_the_demo_pipeline_evaluates_against_the_teachers_exact_scores(tmp_path):
    from tomdistill.pipeline import plan

    stages = plan(_compose_pipeline("+experiment=demo"), tmp_path)
    evaluation = next(s for s in stages if s.script == "evaluate.py")
    assert f"teacher={tmp_path / 'teacher_scores'}" in evaluation.overrides
