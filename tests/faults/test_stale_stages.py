"""Nothing stale: a study never skips or resumes a stage whose outputs another configuration made (its
`stage.json`, src/tomdistill/study.py), every study experiment has its own study directory, and an
evaluation-only experiment is refused by the apps that would train or sample.

The studies here are fakes (every stage complete on disk, the sample datasets the oracle's) so the pipeline's checks
run in seconds; only the overwrite case runs a stage for real (evaluate.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import write_teacher

from .common import ROOT, TWO_BY_TWO, describe, entry, files_under, ok

TINY = ["model=tiny_llama", "logger=csv", *TWO_BY_TWO, "sampler.n=2", "sampler.progress=false",
        "trainer.max_steps=2", "trainer.enable_progress_bar=false", "data.batch_size=4", "data.num_val_contexts=0",
        "metrics.n_bootstrap=1000"]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))


def pipeline(study: Path, *args: str):
    return entry("-m tomdistill.pipeline", [*TINY, *args, f"output={study}"], timeout=300)


@pytest.fixture(scope="module")
def samples(tmp_path_factory, catalogue):
    """One oracle score dataset that stands in for every sampling stage's output (evaluate.py reads it)."""
    return write_teacher(tmp_path_factory.mktemp("samples"), catalogue, n=2, modes=("score",))


def composed(common: list[str], study: Path):
    """The study's stages and the config each stage's command composes, as the pipeline does with these overrides."""
    from hydra import compose, initialize_config_dir

    from tomdistill.paths import register_resolvers
    from tomdistill.pipeline import stage_config
    from tomdistill.study import plan

    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        stages = plan(compose("pipeline", overrides=common), study)
        return stages, {s.name: stage_config(s, common) for s in stages}


def made_study(study: Path, samples: Path, common: list[str], record: bool = True):
    """Every stage of the tiny study complete on disk, as a pipeline run with `common` leaves it (with its
    stage.json; `record=False`: as a version that kept none did)."""
    from tomdistill.study import write_record

    stages, configs = composed(common, study)
    for stage in stages:
        if stage.script == "sample.py":
            shutil.copytree(samples, stage.output)
            (stage.output / "manifest.json").write_text(json.dumps({"complete": True}))
        elif stage.script == "train.py":
            (stage.output / "adapter").mkdir(parents=True)
            (stage.output / "adapter" / "adapter_model.safetensors").write_bytes(b"")
            (stage.output / "adapter" / "tomdistill_adapter.json").write_text("{}")
        else:
            stage.output.mkdir(parents=True)
            (stage.output / "summary.json").write_text("{}")
        if record:
            write_record(stage, configs[stage.name], common)
    return stages


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


def test_a_stage_made_by_another_configuration_is_refused_naming_the_keys(tmp_path, samples):
    study = tmp_path.resolve() / "study"
    made_study(study, samples, [*TINY, "loss=sft"])
    before = files_under(study)
    result = pipeline(study, "loss=soft")
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr and len(error_lines(result)) == 1, describe(result)
    line = error_lines(result)[0]
    # training is the stage a loss changes: the samples it read are still this study's
    assert line.startswith(f"pipeline: error: train [default]: {study / 'train_default'} was made with "), line
    assert "loss.name=sft" in line and "this study asks" in line and "loss.name=soft" in line, line
    assert "pipeline.overwrite=true" in line and "pipeline.name" in line, line
    assert "teacher samples" not in line and "running" not in result.stdout, describe(result)
    # nothing run, nothing replaced: only the pipeline's own log, its lock and Hydra's record of the run are new
    new = {"pipeline.log", ".pipeline.lock"}
    assert {f for f in files_under(study) if not f.startswith(".hydra/") and f not in new} == before


def test_outputs_with_no_record_are_refused(tmp_path, samples):
    """Outputs an older version made (no stage.json) may be another configuration's: refused too."""
    study = tmp_path.resolve() / "study"
    made_study(study, samples, TINY, record=False)
    result = pipeline(study)
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr and len(error_lines(result)) == 1, describe(result)
    line = error_lines(result)[0]
    assert line.startswith(f"pipeline: error: teacher samples: {study / 'teacher'} holds outputs with no record"), line
    assert "pipeline.overwrite=true" in line and "running" not in result.stdout, describe(result)


def test_a_stage_made_by_another_configuration_is_rerun_with_pipeline_overwrite(tmp_path, samples):
    study = tmp_path.resolve() / "study"
    made_study(study, samples, [*TINY, "metrics.confidence=0.9"])  # an evaluation setting: only evaluate is stale
    result = ok(pipeline(study, "pipeline.overwrite=true"))
    for index, name in enumerate(["teacher samples", "teacher choice probabilities", "base student", "train [default]",
                                  "tuned student [default]"], 1):
        assert f"[{index}/6] {name}: complete, skipped" in result.stdout, describe(result)
    assert "[6/6] evaluate [default]: running" in result.stdout, describe(result)
    assert f"evaluate [default]: pipeline.overwrite=true: removing {study / 'evaluate_default'}" in result.stdout
    summary = json.loads((study / "evaluate_default" / "summary.json").read_text())
    assert summary["alignment"]["in_sample"]["n_scenarios"] > 0  # evaluate.py's, not the fake
    record = json.loads((study / "evaluate_default" / "stage.json").read_text())
    assert record["config"]["metrics.confidence"] == 0.95 and "metrics.confidence=0.9" not in record["overrides"]
    assert (study / "study.json").exists()
    assert "complete, skipped" in ok(pipeline(study)).stdout  # and now it is this study's: no overwrite needed


def test_overwrite_clears_a_stale_stage_and_every_stage_that_reads_it(tmp_path, samples):
    from tomdistill.study import StaleStageError, check_stages

    study = tmp_path.resolve() / "study"
    stages = made_study(study, samples, [*TINY, "loss=sft"])
    _, asked = composed([*TINY, "loss=soft"], study)
    with pytest.raises(StaleStageError, match=r"^train \[default\]: .*loss\.name=sft"):
        check_stages(stages, asked, [*TINY, "loss=soft"])
    assert all(s.complete() for s in stages)  # refused: nothing removed
    removed = check_stages(stages, asked, [*TINY, "loss=soft"], overwrite=True)
    assert [s.name for s in removed] == ["train [default]", "tuned student [default]", "evaluate [default]"]
    assert [s.output.name for s in stages if s.output.exists()] == ["teacher", "teacher_scores", "base"]


def test_an_interrupted_stage_resumes_only_with_the_configuration_that_started_it(tmp_path, samples):
    from tomdistill.study import StaleStageError, check_stages, stage_command

    study = tmp_path.resolve() / "study"
    stages = made_study(study, samples, TINY)
    train = next(s for s in stages if s.script == "train.py")
    shutil.rmtree(train.output / "adapter")  # killed after a checkpoint, before the adapter; later stages not begun
    for later in ("tuned_default", "evaluate_default"):
        shutil.rmtree(study / later)
    (train.output / "checkpoints").mkdir()
    (train.output / "checkpoints" / "last.ckpt").write_bytes(b"")
    _, same = composed(TINY, study)
    assert check_stages(stages, same, TINY) == [] and "ckpt_path=last" in stage_command(train, TINY)
    _, other = composed([*TINY, "trainer.max_steps=3"], study)
    with pytest.raises(StaleStageError, match=r"trainer\.max_steps=2, this study asks trainer\.max_steps=3"):
        check_stages(stages, other, [*TINY, "trainer.max_steps=3"])
    # a stage that wrote nothing but its record (it failed as it started) just starts again, whatever made it
    shutil.rmtree(train.output / "checkpoints")
    assert check_stages(stages, other, [*TINY, "trainer.max_steps=3"]) == []
    # a runtime setting (how fast, where) changes no output: a resumed sampler may take a smaller batch
    _, smaller = composed([*TINY, "sampler.batch_size=2"], study)
    assert check_stages(stages, smaller, [*TINY, "sampler.batch_size=2"]) == []


def test_a_stage_whose_inputs_will_be_made_again_is_stale_too(tmp_path, samples):
    """The adapter a tuned student was sampled with is gone: training runs again, so the samples must too."""
    from tomdistill.study import StaleStageError, check_stages

    study = tmp_path.resolve() / "study"
    stages = made_study(study, samples, TINY)
    shutil.rmtree(study / "train_default")
    _, same = composed(TINY, study)
    with pytest.raises(StaleStageError, match=r"^tuned student \[default\]: .* train \[default\] made, which will be"):
        check_stages(stages, same, TINY)
    removed = check_stages(stages, same, TINY, overwrite=True)
    assert [s.name for s in removed] == ["tuned student [default]", "evaluate [default]"]


def test_every_study_experiment_names_its_own_study_directory():
    from hydra import compose, initialize_config_dir

    names = {}
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for experiment in EXPERIMENTS:
            cfg = compose("pipeline", overrides=[f"+experiment={experiment}", f"paths.root_dir={ROOT}"])
            if cfg.get("evaluate_only"):  # refused by the pipeline (the next test)
                continue
            names[experiment] = str(cfg.pipeline.study_dir)
    assert {"demo", "demo_long", "demo_seeds", "paper", "answer_only"} <= set(names)
    assert len(set(names.values())) == len(names), names
    assert str(ROOT / "runs" / "study") not in names.values(), names


def test_an_evaluation_only_experiment_is_refused_by_train_and_the_pipeline(tmp_path):
    published = [p.stem for p in (ROOT / "conf/experiment").glob("*.yaml")
                 if yaml.safe_load(p.read_text()).get("evaluate_only")]
    assert published == ["paper_published"]
    expected = "+experiment=paper_published only evaluates (evaluate_only: true)"
    run = tmp_path / "run"
    for script, app in (("train.py", "train.py"), ("sample.py", "sample.py")):
        result = entry(script, ["+experiment=paper_published", *TINY, f"output={run}"], timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, describe(result)
        assert f"{app}: error: {expected}" in result.stderr and "python evaluate.py" in result.stderr, describe(result)
        assert not any(f.startswith(("checkpoints", "adapter", "train/")) for f in files_under(run)), describe(result)
    study = tmp_path / "study"
    result = entry("-m tomdistill.pipeline", ["+experiment=paper_published", *TINY, f"output={study}"], timeout=120)
    assert result.returncode == 2 and f"pipeline: error: {expected}" in result.stderr, describe(result)
    assert not [p for p in study.iterdir() if p.is_dir() and not p.name.startswith(".")], describe(result)


def test_a_second_pipeline_on_a_study_being_run_is_refused_before_it_touches_a_stage(tmp_path, samples):
    """Two pipelines on one study (a second terminal, a rerun while the first still trains) would train the same
    stages into the same directories: the second stops with one line naming the first."""
    import fcntl
    import os

    study = tmp_path.resolve() / "study"
    made_study(study, samples, TINY)
    with open(study / ".pipeline.lock", "w") as held:
        before = files_under(study)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"pid {os.getpid()} on here, since now")
        held.flush()
        result = pipeline(study)
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr and len(error_lines(result)) == 1, describe(result)
    line = error_lines(result)[0]
    assert line.startswith(f"pipeline: error: study {study} is being run by another process (pid {os.getpid()} "), line
    assert "complete, skipped" not in result.stdout + result.stderr, describe(result)
    assert {f for f in files_under(study) if not f.startswith(".hydra/") and f != "pipeline.log"} == before
