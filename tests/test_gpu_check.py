"""The GPU check, checked without a GPU: its scripts parse, its tests collect and skip, the carried bundle's
pinned list fits the device tool's 64 MiB, its overrides compose, its summary and failure paths work.
(The check itself, scripts/gpu_check.sh, only runs on a CUDA machine.)"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ROOT / "tests" / "gpu"
if str(GPU_TESTS) not in sys.path:
    sys.path.insert(0, str(GPU_TESTS))

import gpu_runs  # noqa: E402
import gpucheck  # noqa: E402

SCRIPTS = ["scripts/gpu_check.sh", "scripts/gpu_wheels.sh"]
# what the GPU tests need that the device image lacks (/work/.library/device/KINDS.md lists what it has)
NEEDED = {"hydra-core", "omegaconf", "antlr4-python3-runtime", "deepspeed", "pydantic", "pydantic-core",
          "datasets", "dill", "multiprocess"}
GPU_TEST_COUNT = 9  # cuda probe, 3 fits, zero3 resume, zero3 vs zero2, generate, score, score with adapter


def cpu_env(**extra) -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PROJECT_ROOT": str(ROOT), **extra}


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_with_bash_n(script):
    result = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_gpu_tests_collect_under_the_gpu_marker_and_skip_without_cuda():
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", str(GPU_TESTS)]
    collected = subprocess.run([*command, "--collect-only", "-q"], cwd=ROOT, env=cpu_env(), capture_output=True,
                               text=True, timeout=180)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert len(ids) == GPU_TEST_COUNT, ids
    assert any("deepspeed_zero3" in i for i in ids) and any("resume" in i for i in ids)
    ran = subprocess.run([*command, "-q", "-rs"], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                         timeout=180)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert re.search(rf"\b{GPU_TEST_COUNT} skipped\b", ran.stdout) and " passed" not in ran.stdout, ran.stdout[-2000:]
    assert "no CUDA device" in ran.stdout


# ------------------------------------------------------------------------------------------ the bundle
def test_wheel_list_is_pinned_for_the_device_and_fits_64_mib():
    rows = gpucheck.read_table()
    assert gpucheck.check_table(rows) == []
    assert NEEDED <= {r["name"] for r in rows}
    assert all(r["bytes"] > 0 for r in rows)
    total = sum(r["bytes"] for r in rows)
    room = gpucheck.budget(gpucheck.worktree_bytes(ROOT))
    assert total <= room, (f"the carried bundle ({total / 2**20:.1f} MiB) does not fit the {room / 2**20:.1f} MiB "
                           "left under the device tool's 64 MiB beside the working tree")


def test_pins_satisfy_requirements_txt():
    from packaging.requirements import Requirement
    from packaging.version import Version

    wanted = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            wanted[gpucheck.normalize(requirement.name)] = requirement.specifier
    for row in gpucheck.read_table():
        if row["name"] in wanted:
            assert wanted[row["name"]].contains(Version(row["version"])), (row["requirement"], wanted[row["name"]])


def test_snapshot_entry_is_the_tiny_llama_that_conf_model_tiny_llama_names():
    """model=tiny_llama loads TOMDISTILL_CACHE/models/<this name> (model/loading.py: _tiny_snapshot)."""
    tiny = dict(yaml.safe_load((ROOT / "conf/model/tiny_llama.yaml").read_text())["tiny"])
    seed = int(tiny.pop("seed", 0))
    name = "tiny-llama-" + "-".join(f"{k}{v}" for k, v in sorted(tiny.items())) + f"-s{seed}"
    snapshots = [r for r in gpucheck.read_table() if r["kind"] == "snapshot"]
    assert [r["file"] for r in snapshots] == [f"cache/models/{name}"]


@pytest.mark.skipif(not gpucheck.BUNDLE.is_dir(), reason="no .gpu_bundle/ here (scripts/gpu_wheels.sh builds it)")
def test_built_bundle_matches_the_recorded_sizes(capsys):
    assert gpucheck.main(["sizes"]) == 0, capsys.readouterr().out


def test_budget_keeps_room_for_the_working_tree():
    assert gpucheck.budget(None) == gpucheck.CARRY_LIMIT - gpucheck.WORKTREE_RESERVE
    assert gpucheck.budget(10 * 2**20) == gpucheck.CARRY_LIMIT - 10 * 2**20


def test_table_problems_are_named(tmp_path):
    table = tmp_path / "wheels.txt"
    table.write_text("datasets==5.2.0 wheel 10 datasets-5.2.0-py3-none-any.whl\n"
                     "datasets==5.1.0 wheel 10 datasets-5.1.0-py3-none-any.whl\n"
                     "numpy==2.0 wheel 10 numpy-2.0-cp311-cp311-macosx_11_0_arm64.whl\n")
    problems = gpucheck.check_table(gpucheck.read_table(table))
    assert any("more than once" in p for p in problems)
    assert any("macosx" in p for p in problems) and any("cp311" in p for p in problems)
    table.write_text("datasets wheel 10 datasets-5.2.0-py3-none-any.whl\n")
    with pytest.raises(ValueError, match="not pinned"):
        gpucheck.read_table(table)


# ------------------------------------------------------------------------------ what the GPU tests run
@pytest.mark.parametrize("strategy", gpu_runs.STRATEGIES)
def test_gpu_train_overrides_compose(strategy, tmp_path):
    from hydra import compose, initialize_config_dir

    from tomdistill.paths import register_resolvers

    register_resolvers()
    extra = ("ckpt_path=last",) if strategy == "deepspeed_zero3" else ()
    overrides = gpu_runs.train_overrides(strategy, tmp_path / "out", tmp_path / "teacher", extra=extra)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.root_dir={ROOT}"])
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("gpu", 1, "bf16-mixed")
    assert cfg.model.name == "tiny_llama" and "csv" in cfg.logger and cfg.trainer.max_steps == gpu_runs.STEPS
    if strategy == "ddp":
        assert cfg.trainer.strategy._target_.endswith("DDPStrategy")
    else:
        stage = strategy.rsplit("_", 1)[1]
        assert "deepspeed" in cfg.trainer.strategy._target_ and Path(cfg.trainer.strategy.config).name == f"{stage}.json"


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_gpu_sample_overrides_compose(mode, tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=gpu_runs.sample_overrides(mode, tmp_path, adapter=tmp_path / "a"))
    assert (cfg.sampler.backend, cfg.sampler.device, cfg.sampler.mode) == ("hf", "cuda", mode)
    assert cfg.model.name == "tiny_llama" and cfg.adapter == str(tmp_path / "a")


def test_peak_mem_wrapper_runs_a_hydra_script_and_reports_no_cuda(tmp_path):
    args = ["sampler=oracle", "sampler.n=2", "sampler.progress=false", "scenarios.games=[prisoners_dilemma]",
            "scenarios.contexts=[team]", "scenarios.splits=[in_sample]", f"output={tmp_path / 'out'}"]
    result = subprocess.run([sys.executable, str(gpu_runs.PEAK_MEM), str(ROOT / "sample.py"), *args], cwd=tmp_path,
                            env=cpu_env(PYTHONPATH=str(ROOT / "src")), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == "GPU_PEAK_MEM_GB=none"
    assert gpu_runs.peak_memory(result) is None
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"] is True
    result.stderr += "\nGPU_PEAK_MEM_GB=0.125000\n"
    assert gpu_runs.peak_memory(result) == 0.125


def test_throughput_reads_metrics_csv(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text(
        "epoch,step,train/loss,train/tokens_per_s,train/gpu_mem_gb\n"
        "0,0,2.0,100,0.5\n0,1,1.9,1000,0.75\n0,2,1.8,3000,0.70\n0,2,,,\n")
    assert gpu_runs.throughput(tmp_path) == {"tokens_per_s": 2000.0, "gpu_mem_gb": 0.75}
    assert gpu_runs.logged_train_steps(tmp_path) == [0, 1, 2]


# ------------------------------------------------------------------------------------- summary, failure
def test_summary_table_passes_only_when_every_check_passed(tmp_path):
    results = tmp_path / "results.jsonl"
    assert gpucheck.main(["summary", str(results)]) == 1  # nothing recorded is a failure
    gpucheck.append_result(results, {"name": "pytest test_bf16_fit[ddp]", "status": "passed", "seconds": 31.5,
                                     "tokens_per_s": 12345.6, "gpu_mem_gb": 0.42, "note": ""})
    text, ok = gpucheck.format_summary(gpucheck.read_results(results))
    assert ok and "12,346" in text and "0.420" in text and "PASS: 1/1" in text
    gpucheck.main(["record", "--name", "pytest test_hf_score_on_cuda", "--status", "skipped", "--seconds", "0",
                   "--note", "no CUDA device", str(results)])
    text, ok = gpucheck.format_summary(gpucheck.read_results(results))
    assert not ok and "FAIL: 1/2" in text and "no CUDA device" in text  # a skip proves nothing on the device


def test_gpu_check_without_a_gpu_fails_at_preflight_with_a_summary(tmp_path):
    """On a machine with no GPU (here, CI) the check stops after its preflight, says why, and exits 1."""
    out = tmp_path / "out"
    env = cpu_env(GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_WORKDIR=str(tmp_path / "work"), OUT=str(out),
                  PATH=f"{tmp_path / 'bin'}:{os.environ.get('PATH', '')}")
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "nvidia-smi"  # whatever this machine has: a GPU-less one
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices were found' >&2\nexit 9\n")
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "gpu_check.log").read_text()
    assert "PREFLIGHT FAILED" in log and "GPU CHECK SUMMARY" in log and "FAIL: 0/1" in log
    assert "torch sees no CUDA GPU" in log and "nvidia-smi failed" in log
    rows = gpucheck.read_results(out / "results.jsonl")
    assert [(r["name"], r["status"]) for r in rows] == [("preflight (GPU, torch CUDA, bundle)", "failed")]
