"""The GPU check, checked without a GPU: its scripts parse, its tests collect and skip, the carried bundle's
pinned list fits the device tool's 64 MiB and its wheels' requirements are carried or in the image's list, its
command lines force neither accelerator nor precision and compose, its probe reports ZeRO-3 partitioning on CPU,
its summary and failure paths work. (The check itself, scripts/gpu_check.sh, only runs on a CUDA machine.)"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

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
# cuda probe, 4 fits, zero3 partitioning, checkpointing + accumulation, zero3 resume, zero3 vs zero2, the two logits
# paths, generate, score, score with adapter
GPU_TEST_COUNT = 13


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
def carried_requires() -> dict[str, list[str]]:
    """Each carried wheel's requirements: from the built wheels where .gpu_bundle/ is here, else as recorded."""
    rows = gpucheck.read_table()
    if gpucheck.BUNDLE.is_dir() and all(gpucheck.wheel_path(gpucheck.BUNDLE, r).is_file()
                                        for r in rows if r["kind"] != "snapshot"):
        return gpucheck.bundle_requires(gpucheck.BUNDLE, rows)
    return gpucheck.read_requires()


def test_image_list_covers_every_requirement_of_every_carried_wheel():
    rows = gpucheck.read_table()
    requires = carried_requires()
    assert set(requires) == {r["requirement"] for r in rows if r["kind"] != "snapshot"}
    assert gpucheck.coverage(rows, requires, gpucheck.read_image()) == []
    needed = {gpucheck.normalize(Requirement(t).name) for texts in requires.values() for t in texts}
    # what DeepSpeed and datasets import at once and the device image has (so they are listed, not carried)
    assert {"einops", "msgpack", "xxhash"} <= needed & set(gpucheck.read_image())


def test_recorded_requirements_are_the_wheels_or_the_venvs():
    """scripts/gpu_wheels_requires.txt is what the wheels say: read from .gpu_bundle/ where it was built, else from
    this venv's metadata for every carried package installed here at the pinned version."""
    import importlib.metadata as md

    rows = [r for r in gpucheck.read_table() if r["kind"] != "snapshot"]
    recorded = gpucheck.read_requires()
    if gpucheck.BUNDLE.is_dir() and all(gpucheck.wheel_path(gpucheck.BUNDLE, r).is_file() for r in rows):
        assert recorded == gpucheck.bundle_requires(gpucheck.BUNDLE, rows)
        return
    compared = []
    for row in rows:
        try:
            installed = md.version(row["name"])
        except md.PackageNotFoundError:
            continue
        if installed == row["version"]:
            assert recorded[row["requirement"]] == gpucheck.device_requires(md.requires(row["name"]) or []), row
            compared.append(row["name"])
    assert {"deepspeed", "datasets", "pydantic", "hydra-core"} <= set(compared), compared


def test_a_newer_transformers_is_carried_for_the_boolean_logits_to_keep_path(monkeypatch):
    """The image's transformers takes kept_logits' fallback, the overlay the boolean logits_to_keep path
    (src/tomdistill/model/lora_module.py, _native_mask_slicing)."""
    import transformers

    from tomdistill.model import lora_module

    overlays = [r for r in gpucheck.read_table() if r["kind"] == "overlay"]
    assert [r["name"] for r in overlays] == ["transformers"]
    image = gpucheck.read_image()["transformers"]
    for version, native in ((overlays[0]["version"], True), (image, False)):
        monkeypatch.setattr(transformers, "__version__", version)
        assert lora_module._native_mask_slicing() is native, version
    assert gpu_runs.OVERLAY_FITS and set(gpu_runs.OVERLAY_FITS) <= set(gpu_runs.FITS)


def test_image_check_fails_on_a_missing_or_other_package(tmp_path, capsys):
    """`gpucheck.py image` on the device: pip list against scripts/gpu_image_packages.txt and the carried wheels'
    requirements; the versions not read here are taken from this venv (they meet the requirements)."""
    import importlib.metadata as md

    def run(installed: dict) -> tuple[int, str]:
        listing = tmp_path / "pip_list.json"
        listing.write_text(json.dumps([{"name": n, "version": v} for n, v in installed.items()]))
        code = gpucheck.main(["image", "--bundle", str(tmp_path / "no-bundle"), "--pip-list", str(listing)])
        return code, capsys.readouterr().out

    installed = {name: version or md.version(name) for name, version in gpucheck.read_image().items()}
    code, out = run(installed)
    assert code == 0, out
    code, out = run({**installed, "numpy": "2.0.0"})
    assert code == 1 and "numpy: 2.0.0 installed, " in out
    code, out = run({n: v for n, v in installed.items() if n != "einops"})
    assert code == 1 and "einops: listed in gpu_image_packages.txt, not installed" in out
    assert "deepspeed==0.19.8 needs einops; the image has einops absent" in out
    code, out = run({**installed, "pyarrow": "15.0.0"})
    assert code == 1 and "datasets==5.2.0 needs pyarrow>=24.0.0; the image has pyarrow 15.0.0" in out


def test_coverage_names_what_nothing_meets():
    rows = gpucheck.read_table()
    requires = {**gpucheck.read_requires(), "deepspeed==0.19.8": ["einops", "not-a-package>=1"]}
    problems = gpucheck.coverage(rows, requires, gpucheck.read_image())
    assert problems == ["deepspeed==0.19.8 needs not-a-package>=1: not-a-package is neither carried nor in "
                        "gpu_image_packages.txt"]
    requires = {**gpucheck.read_requires(), "transformers==5.21.0": ["tokenizers<0.20"]}
    assert gpucheck.coverage(rows, requires, gpucheck.read_image()) == [
        "transformers==5.21.0 needs tokenizers<0.20; the image has tokenizers 0.23.2"]


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
def compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from tomdistill.paths import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.root_dir={ROOT}"])


def check_command_lines(tmp_path) -> list[list[str]]:
    """Every train.py / sample.py command line the GPU tests run."""
    lines = [gpu_runs.train_overrides(fit, tmp_path / fit, tmp_path / "teacher") for fit in gpu_runs.FITS]
    lines.append(gpu_runs.train_overrides("deepspeed_zero3", tmp_path / "resumed", tmp_path / "teacher",
                                          max_steps=gpu_runs.RESUME_STEPS, extra=("ckpt_path=last",)))
    lines += [gpu_runs.sample_overrides(mode, tmp_path / mode, adapter) for mode in ("generate", "score")
              for adapter in (None, tmp_path / "adapter")]
    return lines


def test_the_check_forces_neither_accelerator_nor_precision(tmp_path, monkeypatch):
    """The commands a user types: DeepSpeed's accelerator is not named in the environment, trainer.accelerator and
    trainer.precision are the trainer configs' own (auto), in the command lines and in the scripts."""
    forced = ("trainer.accelerator=", "trainer.precision=")
    for line in check_command_lines(tmp_path):
        assert not [a for a in line if a.startswith(forced)], line
    texts = {path: path.read_text() for path in [ROOT / "scripts/gpu_check.sh", *sorted(GPU_TESTS.glob("*.py"))]}
    for path, text in texts.items():
        assert "DS_ACCELERATOR" not in text and not any(f in text for f in forced), path
    # what tests/conftest.py set for the CPU suite stays out of the runs' environment; what the caller set stays in
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TOMDISTILL_TEST_DEFAULTS", "CUDA_VISIBLE_DEVICES,DS_ACCELERATOR")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    env = gpu_runs.environment()
    assert "DS_ACCELERATOR" not in env and "CUDA_VISIBLE_DEVICES" not in env and "TOMDISTILL_TEST_DEFAULTS" not in env
    monkeypatch.setenv("TOMDISTILL_TEST_DEFAULTS", "")
    assert gpu_runs.environment()["DS_ACCELERATOR"] == "cpu"  # a user's own setting is theirs
    overlay = gpu_runs.environment(tmp_path / "overlay")["PYTHONPATH"].split(os.pathsep)
    assert overlay[:2] == [str(tmp_path / "overlay"), str(ROOT / "src")]


def test_tests_conftest_names_the_variables_it_set():
    """tests/conftest.py sets DS_ACCELERATOR=cpu (and more) for the CPU suite and names what it set, not what the
    caller had (here CUDA_VISIBLE_DEVICES, as scripts/gpu_check.sh sets it): gpu_runs.environment leaves those out."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "TOMDISTILL_TEST_DEFAULTS")}
    code = ("import os, runpy; runpy.run_path('tests/conftest.py'); "
            "print(os.environ['TOMDISTILL_TEST_DEFAULTS'], os.environ['DS_ACCELERATOR'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": "0"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    named, accelerator = result.stdout.split()
    assert "DS_ACCELERATOR" in named.split(",") and "CUDA_VISIBLE_DEVICES" not in named.split(",")
    assert accelerator == "cpu"


@pytest.mark.parametrize("fit", list(gpu_runs.FITS))
def test_gpu_fits_compose_as_a_user_types_them(fit, tmp_path):
    cfg = compose_train(gpu_runs.train_overrides(fit, tmp_path / "out", tmp_path / "teacher"))
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.trainer.devices) == ("auto", "auto", 1)
    assert cfg.model.name == "tiny_llama" and "csv" in cfg.logger and cfg.trainer.max_steps == gpu_runs.STEPS
    if fit.startswith("ddp"):
        assert cfg.trainer.strategy._target_.endswith("DDPStrategy")
        return
    assert "deepspeed" in cfg.trainer.strategy._target_
    # activation checkpointing and accumulation (the ZeRO fits): the module gets the flag, Lightning the count
    assert cfg.model.gradient_checkpointing is True and cfg.module.gradient_checkpointing is True
    assert cfg.trainer.accumulate_grad_batches == gpu_runs.ACCUMULATE > 1
    assert cfg.trainer.val_check_interval % gpu_runs.ACCUMULATE == 0  # validation on step boundaries
    config = json.loads(Path(cfg.trainer.strategy.config).read_text())
    shipped = json.loads((ROOT / "conf/deepspeed" / f"zero{fit[-1]}.json").read_text())
    if fit == "deepspeed_zero2":
        assert config == shipped
        return
    # ZeRO-3: the shipped config, every parameter partitioned (no persistence threshold)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    shipped["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    assert config == shipped


def test_zero3_resume_overrides_compose(tmp_path):
    cfg = compose_train(gpu_runs.train_overrides("deepspeed_zero3", tmp_path / "out", tmp_path / "teacher",
                                                 max_steps=gpu_runs.RESUME_STEPS, extra=("ckpt_path=last",)))
    assert cfg.ckpt_path == "last" and cfg.trainer.max_steps == gpu_runs.RESUME_STEPS
    assert Path(cfg.trainer.strategy.config).name == "zero3_partition_all.json"


def test_train_probe_sees_zero3_partitioning_checkpointing_and_accumulation_on_cpu(tmp_path, teacher):
    """The GPU check's ZeRO-3 fit, 2 steps on the CPU (CPUDeepSpeedStrategy), through train_probe.py: what the
    GPU tests assert from its report is there (tests/gpu/test_gpu_train.py)."""
    output = tmp_path / "zero3"
    args = gpu_runs.train_overrides("deepspeed_zero3", output, teacher, max_steps=2)
    env = cpu_env(PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run([sys.executable, str(gpu_runs.TRAIN_PROBE), str(ROOT / "train.py"), *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    probe = gpu_runs.probe_report(result)
    assert probe["accelerator"] == "CPUAccelerator" and probe["zero_stage"] == 3, probe
    assert probe["persistence_threshold"] == 0 and probe["accumulate_grad_batches"] == gpu_runs.ACCUMULATE
    assert probe["optimizer_steps"] == 2 and probe["train_batches"] == 2 * gpu_runs.ACCUMULATE, probe
    trainable = probe["trainable_params"]
    state = probe["zero3_after_first_batch"]
    assert state["all"]["partitioned"] == state["all"]["zero3_params"] > trainable > 0, state
    assert state["trainable"]["partitioned"] == trainable and state["all"]["persistent"] == 0, state
    assert probe["trainable_gathered_in_forward"] == trainable, probe
    assert probe["checkpointed_modules"] > 0 and probe["checkpoint_calls"] >= probe["train_batches"], probe
    assert probe["kept_logits_calls"] > 0
    assert (probe["bool_mask_forwards"] > 0) == probe["native_mask_slicing"], probe
    assert gpu_runs.summary(output)["global_step"] == 2


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
