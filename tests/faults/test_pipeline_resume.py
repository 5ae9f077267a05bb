"""Pipeline resume: the one-command study, killed (with its children) inside a stage, resumes at that
stage; completed stages print "complete, skipped"."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from .common import describe, entry, finish, ok, start, wait_for

pytestmark = pytest.mark.slow  # a tiny study is ~1 min on 2 cores; each case reruns part of it

TINY_STUDY = ["model=tiny_llama", "logger=csv", "scenarios.games=[prisoners_dilemma,stag_hunt]",
              "scenarios.contexts=[team,business]", "sampler.n=2", "sampler.progress=false", "trainer.max_steps=2",
              "trainer.enable_progress_bar=false", "data.batch_size=4", "data.num_val_contexts=0"]
STAGES = ["teacher samples", "teacher choice probabilities", "base student", "train [default]",
          "tuned student [default]", "evaluate [default]"]
DIRS = ["teacher", "teacher_scores", "base", "train_default", "tuned_default", "evaluate_default"]


def pipeline(study: Path):
    return entry("-m tomdistill.pipeline", [*TINY_STUDY, f"output={study}"], timeout=600)


def assert_resumed_at(stdout: str, stage: int) -> None:
    """Stages before `stage` (0-based) skipped, `stage` and after run, the study completes."""
    total = len(STAGES)
    for i, name in enumerate(STAGES):
        line = f"[{i + 1}/{total}] {name}: "
        expected = "complete, skipped" if i < stage else "running"
        assert f"{line}{expected}" in stdout, f"expected '{line}{expected}'\n{stdout[-3000:]}"
    assert "Study complete" in stdout


@pytest.fixture(scope="module")
def complete_study(tmp_path_factory):
    """The tiny study killed, with the train.py it runs, inside the training stage, then resumed by a rerun: the kill
    test's subject and, complete, the study each interrupted-stage case copies (one study for both: ~80 s)."""
    root = tmp_path_factory.mktemp("complete")
    study, log = root / "study", root / "first.log"
    process = start("-m tomdistill.pipeline", [*TINY_STUDY, f"output={study}"], log, new_session=True)
    try:
        wait_for(lambda: "[4/6] train [default]: running" in log.read_text(), process, timeout=400,
                 what="the training stage")
        wait_for(lambda: (study / "train_default" / "config.yaml").exists(), process, timeout=200,
                 what="train.py to start writing")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the pipeline and the train.py it runs
        finish(process)
    left_by_the_kill = {"adapter": (study / "train_default" / "adapter").exists(),
                        "study.json": (study / "study.json").exists()}
    return SimpleNamespace(path=study, left_by_the_kill=left_by_the_kill, resumed=pipeline(study))


def test_killed_in_training_the_study_resumes_at_training(complete_study):
    assert complete_study.left_by_the_kill == {"adapter": False, "study.json": False}
    assert_resumed_at(ok(complete_study.resumed).stdout, 3)
    again = ok(pipeline(complete_study.path))
    assert all(f"{name}: complete, skipped" in again.stdout for name in STAGES), again.stdout
    assert (complete_study.path / "study.json").exists()


def interrupt_inside(study: Path, stage: int) -> None:
    """The state a kill inside `stage` leaves: earlier stages complete, this one partial, later ones absent."""
    for later in DIRS[stage + 1:]:
        shutil.rmtree(study / later)
    (study / "study.json").unlink()
    partial = study / DIRS[stage]
    if DIRS[stage] in ("teacher", "teacher_scores", "base", "tuned_default"):  # sampling: no manifest, some shards
        (partial / "manifest.json").unlink()
        shards = sorted((partial / "train").glob("shard-*.parquet"))
        for shard in shards[len(shards) // 2:]:
            shard.unlink()
        (partial / "train" / f".{shards[-1].name}.999.part").write_bytes(b"PAR1 half")  # a write cut short
    elif DIRS[stage] == "train_default":  # training: checkpoint written, adapter not exported yet
        shutil.rmtree(partial / "adapter")
        (partial / "train_summary.json").unlink(missing_ok=True)
    else:  # evaluation: the report not finished
        (partial / "summary.json").unlink()


# Opt-in (-m extended), to keep CI within 30 minutes: teacher, teacher_scores and base are interrupted like
# tuned_default, a sampling stage (teacher reruns the whole study: 90 s on 2 cores).
REPEATS = ("teacher", "teacher_scores", "base")


@pytest.mark.parametrize("stage", [pytest.param(i, id=d, marks=[pytest.mark.extended] if d in REPEATS else [])
                                   for i, d in enumerate(DIRS)])
def test_a_study_interrupted_inside_each_stage_resumes_at_that_stage(tmp_path, complete_study, stage):
    ok(complete_study.resumed)
    study = Path(shutil.copytree(complete_study.path, tmp_path / "study"))
    # plan.json pins the adapter by absolute path: point the copy's at the copy's own adapter, as it would be
    # for a study resumed where it was interrupted (a moved study is refused there: tests/faults/README.md)
    for plan in study.glob("*/plan.json"):
        plan.write_text(plan.read_text().replace(str(complete_study.path), str(study)))
    interrupt_inside(study, stage)
    result = pipeline(study)
    assert result.returncode == 0, describe(result)
    assert_resumed_at(result.stdout, stage)
    assert (study / "study.json").exists()
    if DIRS[stage] in ("teacher", "teacher_scores", "base", "tuned_default"):
        leftovers = [p.name for p in (study / DIRS[stage] / "train").iterdir() if not p.name.startswith("shard-")]
        assert leftovers == []
