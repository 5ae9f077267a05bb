"""The sbatch scripts in slurm/, run by bash outside SLURM: a stand-in `srun` records the command line it is
given and the environment it was started from (fake .venv / .venv-vllm whose `activate` only names itself),
so nothing is sampled or trained. Also the pipeline's submitit jobs (src/tomdistill/cluster.py): what srun
line submitit renders for them."""
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))
FAKE_SLURM = ROOT / "tests" / "fake_slurm"

SRUN = """#!/usr/bin/env bash
# records what the job script ran: its environment, then one argument a line
{ echo "VIRTUAL_ENV=${VIRTUAL_ENV:-none}"; for arg in "$@"; do echo "ARG=$arg"; done; } > "$SRUN_LOG"
"""


def job_dir(tmp_path: Path, *venvs: str) -> Path:
    """A submit directory with fake environments and a recording srun in bin/."""
    submit = tmp_path / "submit"
    (submit / "bin").mkdir(parents=True)
    (submit / "bin" / "srun").write_text(SRUN)
    (submit / "bin" / "srun").chmod(0o755)
    for venv in venvs:
        (submit / venv / "bin").mkdir(parents=True)
        (submit / venv / "bin" / "activate").write_text(f'export VIRTUAL_ENV="$PWD/{venv}"\n')
    return submit


def run_script(name: str, submit: Path, *args: str, env: dict | None = None):
    """`bash slurm/NAME ARGS` as SLURM runs it in a job of 2 nodes x 8 tasks x 16 CPUs: (result, srun's record)."""
    log = submit / "srun.log"
    environment = {"PATH": f"{submit / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", "SLURM_SUBMIT_DIR": str(submit),
                   "SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8",
                   "SLURM_CPUS_PER_TASK": "16", "SRUN_LOG": str(log), **(env or {})}
    result = subprocess.run(["bash", str(ROOT / "slurm" / name), *args], cwd=submit, env=environment,
                            capture_output=True, text=True, timeout=60)
    lines = log.read_text().splitlines() if log.exists() else []
    venv = next((line.removeprefix("VIRTUAL_ENV=") for line in lines if line.startswith("VIRTUAL_ENV=")), None)
    argv = [line.removeprefix("ARG=") for line in lines if line.startswith("ARG=")]
    return result, venv, argv


def test_sample_teacher_with_hf_spreads_the_model_over_the_node_in_the_training_environment(tmp_path):
    submit = job_dir(tmp_path, ".venv", ".venv-vllm")
    result, venv, argv = run_script("sample_teacher.sbatch", submit, "model=llama2_70b", "role=teacher")
    assert result.returncode == 0, result.stderr
    assert venv == str(submit / ".venv")
    assert argv == ["--cpus-per-task=16", "python", "sample.py", "output=samples/paper_teacher",
                    "sampler.device_map=auto", "model=llama2_70b", "role=teacher"]


def test_sample_teacher_with_vllm_runs_the_vllm_environment_without_device_map(tmp_path):
    submit = job_dir(tmp_path, ".venv", ".venv-vllm")
    result, venv, argv = run_script("sample_teacher.sbatch", submit, "model=llama2_70b", "sampler=vllm",
                                    "sampler.tensor_parallel_size=8")
    assert result.returncode == 0, result.stderr
    assert venv == str(submit / ".venv-vllm")  # vLLM is not in .venv (requirements-vllm.txt)
    assert not any("device_map" in arg for arg in argv)  # vLLM refuses it (src/tomdistill/sampling/settings.py)
    assert argv[:3] == ["--cpus-per-task=16", "python", "sample.py"]
    assert argv[-2:] == ["sampler=vllm", "sampler.tensor_parallel_size=8"]


def test_sample_teacher_takes_the_users_environment_and_device_map(tmp_path):
    submit = job_dir(tmp_path, "envs/mine")
    result, venv, argv = run_script("sample_teacher.sbatch", submit, "sampler.device_map=balanced",
                                    env={"VENV": "envs/mine"})
    assert result.returncode == 0, result.stderr
    assert venv == str(submit / "envs/mine")
    assert [arg for arg in argv if "device_map" in arg] == ["sampler.device_map=balanced"]


def test_sample_teacher_without_the_vllm_environment_says_how_to_make_it(tmp_path):
    submit = job_dir(tmp_path, ".venv")
    result, venv, argv = run_script("sample_teacher.sbatch", submit, "sampler=vllm")
    assert result.returncode == 2 and venv is None
    assert "no environment at .venv-vllm (sampler backend vllm)" in result.stderr
    assert "bash scripts/setup_vllm.sh" in result.stderr


@pytest.mark.parametrize("checkpoint", [False, True])
def test_train_multinode_resumes_only_from_a_checkpoint_and_gives_srun_the_cpus(tmp_path, checkpoint):
    submit = job_dir(tmp_path, ".venv")
    if checkpoint:
        (submit / "runs/train/slurm-42/checkpoints").mkdir(parents=True)
        (submit / "runs/train/slurm-42/checkpoints/last.ckpt").write_text("")
    result, venv, argv = run_script("train_multinode.sbatch", submit, "+experiment=paper")
    assert result.returncode == 0, result.stderr
    assert venv == str(submit / ".venv")
    assert argv == ["--kill-on-bad-exit=1", "--cpus-per-task=16", "python", "train.py", "trainer.num_nodes=2",
                    "trainer.devices=8", "output=runs/train/slurm-42",
                    *(["ckpt_path=last"] if checkpoint else []), "+experiment=paper"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_slurm_scripts_are_requeueable_and_pass_cpus_to_srun(script):
    text = script.read_text()
    # train.py's `scontrol requeue` and SLURM's own requeue need it where the cluster's JobRequeue is 0
    assert re.search(r"^#SBATCH --requeue$", text, re.M)
    srun_lines = [line for line in text.splitlines() if line.startswith("srun ")]
    assert srun_lines and all('--cpus-per-task="$SLURM_CPUS_PER_TASK"' in line for line in srun_lines)


def test_train_multinode_requeues_under_the_shared_cap(tmp_path):
    """The script passes its arguments on and sets no cap of its own: train.py's requeue reads `max_requeues`, the
    cap of every route to a cluster (docs/cluster.md)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tomdistill.paths import register_resolvers

    submit = job_dir(tmp_path, ".venv")
    register_resolvers()
    for args, cap in (([], 3), (["max_requeues=5"], 5)):
        result, _, argv = run_script("train_multinode.sbatch", submit, *args)
        assert result.returncode == 0, result.stderr
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=argv[argv.index("train.py") + 1:])
        assert instantiate(cfg.callbacks.step_agreement).max_requeues == cap


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_slurm_scripts_set_no_requeue_cap_of_their_own(script):
    """No count of restarts in a script: the cap is `max_requeues` alone (train.py reads it; sample_teacher
    never requeues itself)."""
    code = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    for word in ("max_requeues", "max_num_timeout", "SLURM_RESTART_COUNT", "scontrol"):
        assert not [line for line in code if word in line], (script.name, word)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_array_expansions_survive_set_u_on_bash_before_4_4(script):
    """bash < 4.4 calls an empty array unbound under `set -u` ("${A[@]}"); bash 5 does not, so the form is
    checked: every "${A[@]}" must be guarded as ${A[@]+"${A[@]}"}."""
    text = script.read_text()
    for match in re.finditer(r'"\$\{(\w+)\[@\]\}"', text):
        guard = "${" + match.group(1) + "[@]+"
        assert text[:match.start()].endswith(guard), f"{script.name}: unguarded {match.group(0)}"


def test_pipeline_jobs_give_srun_the_cpus_per_task(tmp_path, monkeypatch):
    """submitit's srun line carries only --output/--error and slurm_srun_args (submitit 1.5.4,
    slurm.py _make_sbatch_string): cluster.py must pass --cpus-per-task itself."""
    from omegaconf import OmegaConf

    from tomdistill.cluster import Resources, make_executor

    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")  # submitit looks for srun
    cluster = OmegaConf.create({"setup": ["export SLURM_KILL_BAD_EXIT=1"], "signal_delay_s": 120})
    for res, extra in ((Resources(2, 8, 8, 12, 256, 60), ["--kill-on-bad-exit=1"]), (Resources(1, 1, 0, 4, 16, 30), [])):
        executor = make_executor("slurm", tmp_path, cluster, res, "tomdistill-x", None, extra)
        script = executor._executor._make_submission_file_text("python -m submitit.core._submit X", "uid")
        srun = [line for line in script.splitlines() if line.startswith("srun ")]
        assert len(srun) == 1 and f"--cpus-per-task={res.cpus_per_task}" in srun[0].split(), script
        assert all(arg in srun[0].split() for arg in extra)
        assert f"#SBATCH --cpus-per-task={res.cpus_per_task}" in script
    local = make_executor("submitit_local", tmp_path, cluster, Resources(1, 1, 0, 2, 8, 30), "x", None, [])
    assert "srun_args" not in local._executor.parameters  # the local executor runs no srun
