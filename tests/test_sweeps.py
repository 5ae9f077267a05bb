"""Sweeps and clusters: a local multirun (with W&B offline runs), an Optuna sweep, the SLURM launcher."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from helpers import check, run_train, summary

SHORT = ["model=tiny_llama", "loss=sft_soft", "data.batch_size=4", "trainer.max_steps=2",
         "trainer.val_check_interval=2"]


def test_multirun_of_two_jobs_each_with_its_own_offline_wandb_run(tmp_path, teacher):
    sweep = tmp_path / "sweep"
    check(run_train(["-m", *SHORT, "logger=wandb", f"data.teacher={teacher}", "optim.lr=1e-3,3e-3",
                     f"hydra.sweep.dir={sweep}"]))
    runs = []
    for job in ("0", "1"):
        assert summary(sweep / job)["global_step"] == 2
        assert (sweep / job / "adapter/adapter_model.safetensors").exists()
        files = list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, files  # wandb.finish() between jobs: one run per job
        data = files[0].read_bytes()
        for key in (b"val/alignment", b"train/loss", b"val/action_mass", b"optim"):  # metrics and the config
            assert key in data, key
        runs.append(files[0].parent.name)
    assert runs[0] != runs[1]
    lrs = [yaml.safe_load((sweep / job / "config.yaml").read_text())["optim"]["lr"] for job in ("0", "1")]
    assert lrs == [1e-3, 3e-3]


def test_optuna_recipe_search_maximises_the_held_out_transfer_and_a_rerun_resumes_it(tmp_path):
    """The recipe search: each trial's objective is its final student's mean alignment on the held-out splits
    (callbacks.split_alignment) less every split's shortfall of mass on the actions below 0.95 (the tiny Llama
    barely answers in the format, so the penalty is exercised), and the trial table has every split. Stopped
    after one trial and with a second killed mid-run (left RUNNING in the stored study), the same command runs
    only the missing trial, numbered after both, and the study and the table hold the two finished trials. The
    study records its objective: a rerun with another is refused."""
    import optuna
    from optuna.trial import TrialState

    sweep = tmp_path / "optuna"
    command = ["-m", "+experiment=demo", "hparams_search=soft_recipe_optuna", "model=tiny_llama", "logger=csv",
               "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.precision=32",
               f"hydra.sweep.dir={sweep}"]
    check(run_train([*command, "hydra.sweeper.n_trials=1"]))  # a search stopped after one trial
    import csv

    table = sweep / "trials.csv"
    (first,) = list(csv.DictReader(table.open()))
    masses = {s: float(first[f"transfer/action_mass/{s}"]) for s in ("in_sample", "oos_payoffs", "oos_game")}
    assert all(0.0 <= m <= 1.0 + 1e-6 for m in masses.values()), masses
    # a table begun by an older version, without the mass columns: a resumed search keeps its header
    old_columns = [c for c in first if not c.startswith("transfer/action_mass/")]
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerow(first)
    command.append("hydra.sweeper.n_trials=2")
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    study = optuna.load_study(study_name="soft_recipe", storage=storage)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
    study.ask()  # trial 1 started, its process killed: the study never hears of its end
    rerun = run_train(command)
    check(rerun)
    assert "2 trials stored, 1 of n_trials=2 still to run, from trial 2" in rerun.stdout + rerun.stderr
    assert "was begun with other columns" in rerun.stdout + rerun.stderr
    assert table.read_text().splitlines()[0] == ",".join(old_columns)
    states = [t.state for t in optuna.load_study(study_name="soft_recipe", storage=storage).get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert not (sweep / "1").exists()
    jobs = ("0", "2")
    params = [yaml.safe_load((sweep / job / "config.yaml").read_text())["optim"]["lr"] for job in jobs]
    assert params[0] != params[1]  # the rerun's sampler is seeded past the stored trials: no repeated draw

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [summary(sweep / job)["value"] for job in jobs]
    assert result["best_value"] == pytest.approx(max(values))
    assert {"optim.lr", "model.lora.r", "model.lora.target_modules"} <= set(result["best_params"])
    held_out = ("heldout_context", "oos_context", "oos_payoffs")
    for job, value in zip(jobs, values):
        measured = yaml.safe_load((sweep / job / "split_alignment.json").read_text())["splits"]
        shortfall = sum(max(0.0, 0.95 - measured[s]["action_mass"]) for s in measured)
        assert shortfall > 0  # the tiny Llama's mass on the actions is far below 0.95
        assert value == pytest.approx(sum(measured[s]["alignment"] for s in held_out) / 3 - shortfall)
        assert summary(sweep / job)["objective"] == "transfer/objective"
    trials = list(csv.DictReader((sweep / "trials.csv").open()))  # the trial table: one row per finished trial
    assert [row["trial"] for row in trials] == list(jobs)
    assert [float(row["value"]) for row in trials] == pytest.approx(values)
    for row in trials:
        assert "optim.lr=" in row["overrides"] and row["objective"] == "transfer/objective"
        assert all(row[f"transfer/alignment/{s}"] for s in ("in_sample", *held_out, "oos_game"))

    again = run_train(command)  # both trials finished: nothing to run
    check(again)
    assert "0 of n_trials=2 still to run" in again.stdout + again.stderr
    assert len(list(csv.DictReader((sweep / "trials.csv").open()))) == 2
    other = run_train([*command, "hydra.sweeper.n_trials=3", "optimized_metric=transfer/alignment"])
    assert other.returncode != 0
    assert "was scored by optimized_metric=transfer/objective" in other.stdout + other.stderr
    assert len(optuna.load_study(study_name="soft_recipe", storage=storage).get_trials()) == 3


@pytest.mark.parametrize("overrides, directory", [
    ([], "runs/train_multirun/"),
    (["+experiment=demo", "hparams_search=soft_recipe_optuna"], "runs/recipe_search/soft_recipe"),
    (["hparams_search=lora_optuna"], "runs/lora_search/lora_distill"),
], ids=["grid", "recipe_search", "lora_optuna"])
def test_the_default_sweep_directory_resolves_before_any_job_runs(overrides, directory):
    """A sweeper resolves hydra.sweep.dir before a job has set HydraConfig: a default that needs ${hydra:...}
    (paths.root_dir's fallback did, inside oc.env, which resolves its default eagerly) failed every
    `train.py -m` that did not pass hydra.sweep.dir. A search's directory is named after its study (no time), so
    the same command again finds its optuna.db and resumes."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().cfg = None  # as when `train.py -m` builds and sets up its sweeper
    assert str(cfg.hydra.sweep.dir).startswith(os.environ["PROJECT_ROOT"] + "/" + directory)
    if "hparams_search" in " ".join(overrides):
        assert str(cfg.hydra.sweep.dir) == os.environ["PROJECT_ROOT"] + "/" + directory


def test_slurm_launcher_renders_an_sbatch_script_with_the_configured_resources(tmp_path):
    bin_dir, captured = tmp_path / "bin", tmp_path / "job.sbatch"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"  # a stand-in: keeps the script submitit renders, then refuses (no cluster)
    sbatch.write_text(f'#!/bin/sh\ncp "$1" "{captured}"\necho "sbatch: no cluster here" >&2\nexit 1\n')
    srun = bin_dir / "srun"  # submitit only checks that srun exists
    srun.write_text("#!/bin/sh\nexit 1\n")
    for tool in (sbatch, srun):
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    result = run_train(["-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                        "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90", "optim.lr=1e-3,2e-3",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, timeout=180)
    assert result.returncode != 0 and captured.exists(), result.stderr[-3000:]
    script = captured.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --time=90", "#SBATCH --array=0-1"):
        assert line in script, (line, script)
    assert "srun" in script and "submitit" in script
    # one task dying without a Python exception (OOM kill) takes the others along, not the NCCL timeout later
    assert script.index("export SLURM_KILL_BAD_EXIT=1") < script.index("srun")
    # srun of Slurm 22.05 (up to 23.02) does not take --cpus-per-task from sbatch, and this launcher has no srun
    # arguments: the rendered script exports SRUN_CPUS_PER_TASK for it. Run it with an srun that records that.
    assert "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH --requeue" in script  # submitit requeues with scontrol on its pre-emption signal
    recording, seen = tmp_path / "recording", tmp_path / "srun.env"
    recording.mkdir()
    (recording / "srun").write_text(f'#!/bin/sh\necho "SRUN_CPUS_PER_TASK=${{SRUN_CPUS_PER_TASK:-unset}}" > "{seen}"\n')
    (recording / "srun").chmod(0o755)
    import subprocess

    for cpus, expected in (("8", "8"), (None, "unset")):  # a job without --cpus-per-task: srun's default
        env = {"PATH": f"{recording}{os.pathsep}/usr/bin{os.pathsep}/bin", **({"SLURM_CPUS_PER_TASK": cpus} if cpus else {})}
        subprocess.run(["bash", str(captured)], env=env, check=True, timeout=60, capture_output=True)
        assert seen.read_text().strip() == f"SRUN_CPUS_PER_TASK={expected}"


def test_a_stored_search_records_its_objective_and_refuses_another(tmp_path):
    """A search records the metric its trials are scored by; a run with another is refused, and so is a study
    with trials but no record (stored before it was recorded) until the user records it with the line the
    message gives."""
    import subprocess
    import sys

    import optuna

    from tomdistill.sweeps import StudyObjectiveError, check_study_objective

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    check_study_objective(storage, "new", "val/alignment", ["maximize"])  # a new study: recorded
    assert optuna.load_study(study_name="new", storage=storage).user_attrs == {"optimized_metric": "val/alignment"}
    check_study_objective(storage, "new", "val/alignment", ["maximize"])  # the same: goes on
    with pytest.raises(StudyObjectiveError, match="new .* was scored by optimized_metric=val/alignment, this "
                                                  "run's is transfer/objective"):
        check_study_objective(storage, "new", "transfer/objective", ["maximize"])

    old = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    old.add_trial(optuna.trial.create_trial(value=0.5))
    with pytest.raises(StudyObjectiveError, match="has 1 trials but does not record") as refused:
        check_study_objective(storage, "old", "transfer/objective", ["maximize"])
    record = str(refused.value).split("python -c ", 1)[1].split("; else")[0].strip('"')
    subprocess.run([sys.executable, "-c", record], check=True, timeout=120)  # the line the message gives
    check_study_objective(storage, "old", "transfer/objective", ["maximize"])
    assert optuna.load_study(study_name="old", storage=storage).user_attrs["optimized_metric"] == "transfer/objective"
