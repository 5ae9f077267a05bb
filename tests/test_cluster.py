"""The study as chained cluster jobs (src/tomdistill/cluster.py).

- Every stage's sbatch script, as submitit writes it for `+experiment=paper pipeline.launcher=slurm`, with
  stand-ins for sbatch/squeue/srun (tests/fake_slurm: they keep the scripts, nothing runs): resources,
  afterok chains, requeue and signal flags; a rerun does not resubmit queued jobs nor finished stages.
- The chain run for real by submitit's local executor (`pipeline.launcher=submitit_local`) on the tiny
  Llama standing in for teacher and student; a rerun skips every finished stage.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_SLURM = ROOT / "tests" / "fake_slurm"


def run_pipeline(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                   "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tomdistill.pipeline", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def sbatch_flags(script: str) -> dict[str, str | bool]:
    flags = {}
    for match in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M):
        flags[match.group(1)] = match.group(2) if match.group(2) is not None else True
    return flags


def submitted(slurm_dir: Path) -> dict[str, tuple[str, dict, str]]:
    """{job name: (job id, sbatch flags, script)} of every script the fake sbatch received."""
    out = {}
    for path in sorted(slurm_dir.glob("*.sbatch")):
        script = path.read_text()
        flags = sbatch_flags(script)
        out[flags["job-name"].removeprefix("tomdistill-")] = (path.stem, flags, script)
    return out


def slurm_env(slurm_dir: Path) -> dict:
    return {"PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(slurm_dir)}


def test_paper_study_on_slurm_renders_every_stage_as_a_chained_job(tmp_path):
    study, slurm = tmp_path / "study", tmp_path / "slurm"
    first = ok(run_pipeline("+experiment=paper", "pipeline.launcher=slurm", f"output={study}",
                            "pipeline.cluster.partition=gpu", env=slurm_env(slurm), timeout=300))
    jobs = submitted(slurm)
    assert set(jobs) == {"teacher", "teacher_scores", "base", "train_sft", "tuned_sft", "evaluate_sft",
                         "train_soft", "tuned_soft", "evaluate_soft", "study"}
    ids = {name: job_id for name, (job_id, _, _) in jobs.items()}
    for name, (job_id, flags, script) in jobs.items():
        assert flags["requeue"] is True and flags["signal"] == "USR2@120", name  # pre-emption: warn, then requeue
        assert flags["kill-on-invalid-dep"] == "yes" and flags["partition"] == "gpu", name
        assert "export SLURM_KILL_BAD_EXIT=1" in script and "-m submitit.core._submit" in script, name
        assert f"submitted job {job_id}" in first.stdout or name == "study"
    # the 70b teacher: one task on one node's 8 GPUs (device_map=auto); nothing to wait for
    for name in ("teacher", "teacher_scores"):
        flags = jobs[name][1]
        assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("1", "1", "8"), name
        assert "dependency" not in flags
    assert "dependency" not in jobs["base"][1] and jobs["base"][1]["gpus-per-node"] == "1"
    for variant in ("sft", "soft"):
        train = jobs[f"train_{variant}"][1]
        assert (train["nodes"], train["ntasks-per-node"], train["gpus-per-node"]) == ("2", "8", "8")
        assert train["dependency"] == f"afterok:{ids['teacher']}:{ids['teacher_scores']}"
        assert "--kill-on-bad-exit=1" in jobs[f"train_{variant}"][2]  # a dead rank takes the others with it
        assert jobs[f"tuned_{variant}"][1]["dependency"] == f"afterok:{ids[f'train_{variant}']}"
        evaluate = jobs[f"evaluate_{variant}"][1]
        assert "gpus-per-node" not in evaluate  # a CPU job
        # the paper compares with the teacher's sampled answers
        assert evaluate["dependency"] == f"afterok:{ids['teacher']}:{ids['base']}:{ids[f'tuned_{variant}']}"
    study_dependency = jobs["study"][1]["dependency"].removeprefix("afterok:").split(":")
    assert sorted(study_dependency) == sorted(i for n, i in ids.items() if n != "study")

    # what each job runs: the stage's own command, training told the allocation's layout
    from submitit.core.utils import DelayedSubmission

    pickled = DelayedSubmission.load(study / ".submitit" / ids["train_sft"] / f"{ids['train_sft']}_submitted.pkl")
    job = pickled.function
    assert job.stage.output == study / "train_sft" and job.common == ["+experiment=paper"]
    assert job.extra == ["trainer.num_nodes=2", "trainer.devices=8", "max_requeues=3"]  # train.py's cap: the same
    recorded = json.loads((study / ".submitit" / "jobs.json").read_text())
    assert recorded["train [sft]"] == ids["train_sft"]

    # rerun while every job is still queued: nothing is submitted twice
    (slurm / "queued").write_text("\n".join(ids.values()) + "\n")
    again = ok(run_pipeline("+experiment=paper", "pipeline.launcher=slurm", f"output={study}",
                            env=slurm_env(slurm), timeout=300))
    assert again.stdout.count("still queued or running, not resubmitted") == 9
    assert "study table: job" in again.stdout and len(list(slurm.glob("*.sbatch"))) == 10
    (slurm / "queued").unlink()

    # the teacher finished, every other job failed and left the queue: only the rest is resubmitted,
    # and training waits for the teacher's scores alone
    (study / "teacher").mkdir(parents=True, exist_ok=True)
    (study / "teacher" / "manifest.json").write_text(json.dumps({"complete": True}))
    for path in slurm.glob("*.sbatch"):
        path.rename(path.with_suffix(".old"))
    third = ok(run_pipeline("+experiment=paper", "pipeline.launcher=slurm", f"output={study}",
                            env=slurm_env(slurm), timeout=300))
    assert "[1/9] teacher samples: complete, skipped" in third.stdout
    jobs = submitted(slurm)
    assert "teacher" not in jobs and jobs["train_sft"][1]["dependency"] == f"afterok:{jobs['teacher_scores'][0]}"
    assert jobs["evaluate_sft"][1]["dependency"] == f"afterok:{jobs['base'][0]}:{jobs['tuned_sft'][0]}"


def test_slurm_launcher_without_sbatch_names_what_is_missing(tmp_path):
    result = run_pipeline("+experiment=paper", "pipeline.launcher=slurm", f"output={tmp_path}",
                          env={"PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "pipeline.launcher=slurm: sbatch, srun, squeue not found on PATH" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("pipeline.cluster.train.gpus_per_node=4",
     "pipeline.cluster.train: gpus_per_node (4) must equal tasks_per_node (8)"),
    ("pipeline.cluster.teacher.tasks_per_node=2",
     "pipeline.cluster.teacher for 'teacher samples': sampler.device_map=auto spreads one model"),
    ("pipeline.cluster.evaluate.timeout_min=0", "pipeline.cluster.evaluate.timeout_min: must be a whole number ≥ 1"),
    ("+pipeline.cluster.student.gpus=1", "pipeline.cluster.student: unknown key(s) ['gpus']"),
    ("pipeline.launcher=pbs", "pipeline.launcher='pbs': expected one of local|slurm|submitit_local"),
    ("max_requeues=-1", "max_requeues (pipeline.cluster.max_requeues): must be a whole number ≥ 0"),
])
def test_a_layout_that_cannot_run_is_refused_before_anything_is_submitted(tmp_path, override, message):
    slurm = tmp_path / "slurm"
    result = run_pipeline("+experiment=paper", "pipeline.launcher=slurm", f"output={tmp_path / 'study'}", override,
                          env=slurm_env(slurm), timeout=300)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not list(slurm.glob("*.sbatch"))


def test_vllm_tensor_parallel_must_fill_the_teachers_gpus(tmp_path):
    slurm = tmp_path / "slurm"
    teacher = "pipeline.teacher=['model=llama2_70b','role=teacher','sampler=vllm','sampler.tensor_parallel_size=4']"
    result = run_pipeline("+experiment=paper", "pipeline.launcher=slurm", f"output={tmp_path / 'study'}", teacher,
                          env=slurm_env(slurm), timeout=300)
    assert result.returncode != 0
    assert ("sampler.tensor_parallel_size (4) × tasks_per_node (1) must equal gpus_per_node (8)"
            in result.stderr), result.stderr[-2000:]
    fixed = ok(run_pipeline("+experiment=paper", "pipeline.launcher=slurm", f"output={tmp_path / 'study'}",
                            teacher.replace("=4", "=8"), env=slurm_env(slurm), timeout=300))
    assert "teacher samples: submitted job" in fixed.stdout


def test_sampler_python_must_be_an_interpreter(tmp_path):
    result = run_pipeline("+experiment=demo", f"output={tmp_path}",
                          "pipeline.teacher=['sampler=oracle','role=teacher','sampler.python=.venv-none/bin/python']")
    assert result.returncode != 0
    assert f"sampler.python (teacher samples): {ROOT / '.venv-none/bin/python'} is not an executable" in result.stderr
    assert not (tmp_path / "teacher").exists()


def test_sampling_stages_run_with_their_own_interpreter(tmp_path):
    """`sampler.python` of a stage (here a wrapper that records it ran) is the interpreter of its sample.py."""
    from hydra import compose, initialize_config_dir  # noqa: F401 - compose API for resolve_interpreters

    from tomdistill.pipeline import plan, resolve_interpreters, stage_command

    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pipeline", overrides=["+experiment=demo", f"pipeline.teacher=['sampler=oracle','role=teacher',"
                                             f"'sampler.python={wrapper}']"])
        stages = plan(cfg, tmp_path / "study")
        resolve_interpreters(stages, ["+experiment=demo"])
    by_name = {s.name: s for s in stages}
    assert stage_command(by_name["teacher samples"], [])[0] == str(wrapper)
    assert stage_command(by_name["base student"], [])[0] == sys.executable
    assert stage_command(by_name["train [soft]"], [])[0] == sys.executable


TINY_PAPER = [
    # the paper's study with the tiny Llama as teacher and student, on the CPU. Its SFT variant needs parsed
    # teacher answers, which a random tiny model does not give, so the soft variant (the teacher's exact
    # choice probabilities) is the one trained, and the students are scored exactly.
    "+experiment=paper", "model=tiny_llama", "trainer=cpu", "logger=csv", "trainer.max_steps=2",
    "sampler.n=2", "sampler.max_new_tokens=8", "metrics.n_bootstrap=1000",
    "pipeline.teacher=['role=teacher']", "pipeline.teacher_scores=['role=teacher','sampler.mode=score']",
    "pipeline.student=['role=student','sampler.mode=score']", "pipeline.evaluate_against=teacher_scores",
    "~pipeline.variants.sft",
    "scenarios.splits=[in_sample,oos_context,oos_payoffs,oos_game]",
    "scenarios.games=[prisoners_dilemma,stag_hunt,prisoners_dilemma_x2,stag_hunt_x2,public_goods]",
    "pipeline.cluster.teacher.gpus_per_node=0", "pipeline.cluster.student.gpus_per_node=0",
    "pipeline.cluster.train={nodes:1,tasks_per_node:1,gpus_per_node:0,cpus_per_task:2,mem_gb:8,timeout_min:30}",
]


@pytest.mark.slow
def test_the_paper_study_runs_as_chained_local_jobs_and_a_rerun_skips_finished_stages(tmp_path):
    study = tmp_path / "study"
    first = ok(run_pipeline(*TINY_PAPER, "pipeline.launcher=submitit_local", f"output={study}", timeout=600))
    assert first.stdout.count("submitted job") == 6
    for stage in ("teacher", "teacher_scores", "base", "tuned_soft"):
        assert json.loads((study / stage / "manifest.json").read_text())["complete"]
    assert (study / "train_soft" / "adapter" / "adapter_model.safetensors").exists()
    # each stage ran as its own job: submitit's logs hold the stage's own command
    logs = "".join(p.read_text() for p in (study / ".submitit").glob("*/*_0_log.out"))
    for script in ("sample.py", "train.py", "evaluate.py"):
        assert f"{ROOT / script}" in logs
    table = json.loads((study / "study.json").read_text())
    assert "soft" in table["variants"] and "alignment" in table["variants"]["soft"]

    again = ok(run_pipeline(*TINY_PAPER, "pipeline.launcher=submitit_local", f"output={study}", timeout=300))
    assert again.stdout.count("complete, skipped") == 6 and "submitted job" not in again.stdout
    assert json.loads((study / "study.json").read_text()) == table

    # an evaluation lost: only that stage runs again, after nothing else
    summary = study / "evaluate_soft" / "summary.json"
    summary.unlink()
    third = ok(run_pipeline(*TINY_PAPER, "pipeline.launcher=submitit_local", f"output={study}", timeout=300))
    assert third.stdout.count("complete, skipped") == 5 and third.stdout.count("submitted job") == 1
    assert "[6/6] evaluate [soft]: submitted job" in third.stdout and summary.exists()


CHILD = """#!/usr/bin/env bash
# stands in for a stage's command: says which signal reached it
trap 'echo TERM >> "$LOG"; exit 143' TERM
trap 'echo USR2 >> "$LOG"; exit 0' USR2
echo started >> "$LOG"
sleep 60 & wait
"""


@pytest.mark.parametrize("script, restarts, reaches_child, outcome, requeue_call", [
    ("evaluate.py", "0", "TERM", "requeued SLURM job 77", "requeue 77"),
    ("sample.py", "3", "TERM", "not requeued: restarted 3 times already (max_requeues=3)", None),
    ("train.py", "0", "USR2", "train.py saved last.ckpt and requeued the job", None),  # train.py requeues itself
])
def test_a_preempted_job_stops_its_stage_and_requeues(tmp_path, monkeypatch, script, restarts, reaches_child,
                                                      outcome, requeue_call):
    import signal
    import threading

    from tomdistill.cluster import StageFailed, StageJob
    from tomdistill.pipeline import Stage

    child, log = tmp_path / "child.sh", tmp_path / "child.log"
    child.write_text(CHILD)
    child.chmod(0o755)
    for name, value in {"LOG": str(log), "SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": restarts,
                        "FAKE_SLURM_DIR": str(tmp_path),
                        "PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}"}.items():
        monkeypatch.setenv(name, value)
    stage = Stage("a stage", script, tmp_path / "out", kind="evaluate", python=str(child))

    test_over = threading.Event()

    def warn_when_started():  # SLURM's pre-emption warning, once the stage runs; never after this test
        while not test_over.wait(0.05):
            if log.exists() and "started" in log.read_text():
                os.kill(os.getpid(), signal.SIGUSR2)
                return

    warning = threading.Thread(target=warn_when_started, daemon=True)
    warning.start()
    handler = signal.getsignal(signal.SIGUSR2)
    try:
        with pytest.raises(StageFailed, match=re.escape(f"a stage: pre-empted; {outcome}")):
            StageJob(stage, [], [], max_requeues=3)()
    finally:
        test_over.set()
        warning.join()
    assert log.read_text().split() == ["started", reaches_child]
    calls = (tmp_path / "scontrol.log").read_text().split("\n")[0] if (tmp_path / "scontrol.log").exists() else None
    assert calls == requeue_call
    assert signal.getsignal(signal.SIGUSR2) is handler  # the job's own handlers are put back


def test_a_preemption_warning_while_the_stage_starts_is_not_lost(tmp_path, monkeypatch):
    """The warning can come while the job is still starting its stage's process: the job's handlers are in place
    before that process exists (SIGUSR2's default action would end the job with no requeue) and the stage is
    stopped once it runs."""
    import signal

    from tomdistill.cluster import StageFailed, StageJob
    from tomdistill.pipeline import Stage

    child, log = tmp_path / "child.sh", tmp_path / "child.log"
    child.write_text("#!/usr/bin/env bash\necho started >> \"$LOG\"\n")  # a stage that would finish at once
    child.chmod(0o755)
    for name, value in {"LOG": str(log), "SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "0",
                        "FAKE_SLURM_DIR": str(tmp_path),
                        "PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}"}.items():
        monkeypatch.setenv(name, value)
    reached_the_test: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, _frame: reached_the_test.append(signum))
    real_popen, warned = subprocess.Popen, []

    def popen_after_the_warning(*args, **kwargs):
        if not warned:  # once: the requeue's own commands start processes too
            warned.append(True)
            signal.raise_signal(signal.SIGUSR2)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen_after_the_warning)
    try:
        with pytest.raises(StageFailed, match=re.escape("a stage: pre-empted; requeued SLURM job 77")):
            StageJob(Stage("a stage", "evaluate.py", tmp_path / "out", kind="evaluate", python=str(child)), [], [])()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert warned and not reached_the_test
    assert (tmp_path / "scontrol.log").read_text().split("\n")[0] == "requeue 77"


def compose_conf(config: str, overrides: list[str], hydra_config: bool = False):
    from hydra import compose, initialize_config_dir

    from tomdistill.paths import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config, overrides=overrides, return_hydra_config=hydra_config)


def test_every_route_reads_one_requeue_cap(tmp_path, monkeypatch):
    """`max_requeues` (conf/base.yaml) caps the requeues of all three routes to a cluster (docs/cluster.md):
    train.py's own requeue (StepAgreement, which `slurm/train_multinode.sbatch` and the training job of either
    launcher run), submitit's time-out count under `hydra/launcher=slurm`, and every `pipeline.launcher=slurm` job."""
    from hydra.utils import instantiate

    from tomdistill.cluster import Resources, make_executor, requeue_cap

    sweep = compose_conf("train", ["hydra/launcher=slurm", "max_requeues=5", "output=/tmp/x",
                                   f"hydra.sweep.dir={tmp_path / 'sweep'}"], hydra_config=True)
    assert instantiate(sweep.callbacks.step_agreement).max_requeues == 5
    assert sweep.hydra.launcher.max_num_timeout == 5
    # what hydra-submitit-launcher 1.2.0 gives submitit as slurm_max_num_timeout (submitit_launcher.py, launch())
    assert instantiate(sweep.hydra.launcher).params["max_num_timeout"] == 5

    study = compose_conf("pipeline", ["max_requeues=5"])
    assert requeue_cap(study.pipeline.cluster) == 5
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")  # submitit looks for srun
    executor = make_executor("slurm", tmp_path, study.pipeline.cluster, Resources(1, 1, 0, 2, 8, 30), "x", None, [])
    assert executor._executor.max_num_timeout == 5  # submitit's own handler, before the job's, counts the same

    # the default, and the pipeline's old key, which still sets the cap of its jobs (train.py's too: cluster.py
    # passes it on as max_requeues)
    assert compose_conf("train", ["output=/tmp/x"]).callbacks.step_agreement.max_requeues == 3
    assert requeue_cap(compose_conf("pipeline", ["pipeline.cluster.max_requeues=4"]).pipeline.cluster) == 4


def test_the_requeue_cap_is_not_part_of_what_a_training_stage_made(tmp_path):
    """Changing `max_requeues` does not make a study's training stage stale, nor does a record written before the
    cap was shared (it held callbacks.step_agreement.max_requeues: 3)."""
    from tomdistill.study import plan, stale_reason, write_record

    common = ["model=tiny_llama", "logger=csv"]
    study = compose_conf("pipeline", common)
    train = next(s for s in plan(study, tmp_path / "study") if s.script == "train.py")
    (train.output / "checkpoints").mkdir(parents=True)
    (train.output / "checkpoints" / "last.ckpt").write_bytes(b"")  # an interrupted run: it would resume

    def config(extra):
        return compose_conf("train", [*common, *train.overrides, *extra, f"output={train.output}"])

    write_record(train, config([]), common)
    record = json.loads((train.output / "stage.json").read_text())
    assert "max_requeues" not in record["config"]
    assert stale_reason(train, config(["max_requeues=7"]), [*common, "max_requeues=7"]) is None
    record["config"]["callbacks.step_agreement.max_requeues"] = 3  # as the version before wrote it
    (train.output / "stage.json").write_text(json.dumps(record))
    assert stale_reason(train, config([]), common) is None
    assert "loss" in stale_reason(train, config(["loss=sft"]), common)  # what it made still counts


def test_a_key_added_since_a_record_was_written_is_no_change_at_the_value_that_keeps_the_old_behaviour(tmp_path):
    """A study trained before `data.balance_games` existed resumes after the upgrade; asking it on does not."""
    from tomdistill.study import ADDED_KEYS, plan, stale_reason, write_record

    common = ["model=tiny_llama", "logger=csv"]
    study = compose_conf("pipeline", common)
    train = next(s for s in plan(study, tmp_path / "study") if s.script == "train.py")
    (train.output / "checkpoints").mkdir(parents=True)
    (train.output / "checkpoints" / "last.ckpt").write_bytes(b"")

    def config(extra):
        return compose_conf("train", [*common, *train.overrides, *extra, f"output={train.output}"])

    write_record(train, config([]), common)
    record = json.loads((train.output / "stage.json").read_text())
    for key in ADDED_KEYS:
        assert record["config"][key] == ADDED_KEYS[key]  # the default keeps the old behaviour
        del record["config"][key]  # as a version before the key wrote it
    (train.output / "stage.json").write_text(json.dumps(record))
    assert stale_reason(train, config([]), common) is None
    assert "data.balance_games" in stale_reason(train, config(["data.balance_games=true"]), common)
    games = "scenarios.augment.games=[volunteers_dilemma_2]"
    assert "scenarios.augment.games" in stale_reason(train, config([games]), common)
    # a sampling stage reads the scenarios' added keys (not data.*): its old record matches too
    teacher = next(s for s in plan(study, tmp_path / "study") if s.script == "sample.py")
    teacher.output.mkdir(parents=True)
    (teacher.output / "manifest.json").write_text("{}")
    sample_config = compose_conf("sample", [*common, *teacher.overrides, f"output={teacher.output}"])
    write_record(teacher, sample_config, common)
    record = json.loads((teacher.output / "stage.json").read_text())
    added = [key for key in ADDED_KEYS if key in record["config"]]
    assert added and "data.balance_games" not in added
    for key in added:
        del record["config"][key]
    (teacher.output / "stage.json").write_text(json.dumps(record))
    assert stale_reason(teacher, sample_config, common) is None
