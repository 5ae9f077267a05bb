"""Every training config composes (and prints with --cfg job); experiments compose for sample.py too."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import ROOT, run_train
from tomdistill.paths import register_resolvers

CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TRAIN_EXPERIMENTS = [e for e in EXPERIMENTS if e != "paper_published"]  # that one configures evaluate.py only
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml") if p.stem != "default")


def compose_train(overrides):
    register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("experiment", TRAIN_EXPERIMENTS)
def test_every_experiment_composes_for_train_and_sample(experiment):
    cfg = compose_train([f"+experiment={experiment}", "output=/tmp/x"])
    OmegaConf.to_container(cfg.model, resolve=True)
    assert cfg.loss.name in ("sft", "soft", "sft_soft") and cfg.model.lora.r > 0 and cfg.optim.lr > 0
    with initialize_config_dir(str(CONF), version_base="1.3"):
        compose("sample", overrides=[f"+experiment={experiment}"])


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def test_demo_long_is_the_demos_study_with_8_payoff_variants_and_16_training_contexts_for_160_steps_and_nothing_else():
    """docs/findings.md, "The longer study", compares it with the demo on that difference alone."""
    def resolved(experiment):
        cfg = compose_train([f"+experiment={experiment}", "output=/tmp/x", f"paths.root_dir={ROOT}"])
        return _leaves(OmegaConf.to_container(cfg, resolve=False))

    demo, long = resolved("demo"), resolved("demo_long")
    changed = {k: (demo.get(k), long.get(k)) for k in demo.keys() | long.keys() if demo.get(k) != long.get(k)}
    assert changed == {"scenarios.augment.variants": (2, 8), "trainer.max_steps": (75, 160),
                       "scenarios.augment.contexts": ([], ["${scenarios.training_contexts}",
                                                           "${scenarios.paired_training_contexts}"]),
                       "pipeline.name": ("demo", "demo_long")}
    with initialize_config_dir(str(CONF), version_base="1.3"):
        pipeline = compose("pipeline", overrides=["+experiment=demo_long"]).pipeline
        demo_pipeline = compose("pipeline", overrides=["+experiment=demo"]).pipeline
    assert pipeline.name == "demo_long" and pipeline.variants == demo_pipeline.variants


def test_paper_experiment_has_the_papers_settings():
    cfg = compose_train(["+experiment=paper"])
    assert cfg.model.name == "llama2_7b"
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (8, 16, 0.0)
    assert list(cfg.model.lora.target_modules) == ["q_proj", "v_proj"]
    assert (cfg.optim.lr, cfg.optim.scheduler, cfg.trainer.max_epochs) == (5e-5, "cosine", 3)
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (4, 4)
    assert "deepspeed" in cfg.trainer.strategy._target_ and cfg.trainer.precision == "bf16-mixed"
    assert (cfg.sampler.temperature, cfg.sampler.max_new_tokens, cfg.sampler.repetition_penalty, cfg.sampler.n) == (
        0.8, 600, 1.1, 300)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_composes_and_names_an_existing_deepspeed_config(trainer):
    cfg = compose_train([f"trainer={trainer}", f"paths.root_dir={ROOT}"])
    strategy = cfg.trainer.strategy
    if not isinstance(strategy, str):
        assert strategy._target_  # built by Hydra's instantiate (training.build_strategy)
        if "deepspeed" in strategy._target_:
            assert Path(strategy.config).exists()


def test_cfg_job_prints_the_resolved_training_config():
    result = run_train(["+experiment=demo", "--cfg", "job", "--resolve"], timeout=120)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.loss.name == "soft" and printed.model.name == "smollm2_135m" and "lora" in printed.model
    assert printed.paths.root_dir == str(ROOT) and printed.trainer.max_steps == yaml.safe_load(
        (ROOT / "conf/experiment/demo.yaml").read_text())["trainer"]["max_steps"]


def _declared(experiment: str) -> dict:
    """What an experiment file says: its `override /group: option` defaults and its data.target."""
    text = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text()) or {}
    declared = {}
    for entry in text.get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.startswith("override /"):
                    declared[key.removeprefix("override /")] = value
    if "target" in (text.get("data") or {}):
        declared["target"] = text["data"]["target"]
    return declared


def test_the_module_is_built_from_its_target_with_the_models_lora_and_optim_overrides():
    """conf/module/lora_distill.yaml reads model/, model.lora and optim, so a sweep's overrides reach the module."""
    from hydra.utils import get_class

    from tomdistill.model.lora_module import LoRADistillModule

    cfg = compose_train(["+experiment=demo", "model=tiny_llama", "model.lora.r=8", "optim.lr=1e-3", "output=/tmp/x",
                         f"paths.root_dir={ROOT}"])
    assert get_class(cfg.module._target_) is LoRADistillModule
    assert cfg.module.model_cfg.name == "tiny_llama" and cfg.module.lora.r == 8 and cfg.module.optim.lr == 1e-3
    assert cfg.module.gradient_checkpointing == "auto" and cfg.module.cache_dir == cfg.paths.cache_dir


@pytest.mark.parametrize("experiment", TRAIN_EXPERIMENTS)
def test_every_experiment_composes_the_loss_model_trainer_and_target_its_file_names(experiment):
    # train.yaml's own `override loss: soft` used to beat an experiment's `override /loss: sft`
    declared = _declared(experiment)
    parents = [e for e in ((yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text()) or {})
                           .get("defaults") or []) if isinstance(e, str) and e != "_self_"]
    for parent in parents:  # e.g. demo_seeds builds on demo
        declared = {**_declared(parent), **declared}
    cfg = compose_train([f"+experiment={experiment}", "output=/tmp/x", f"paths.root_dir={ROOT}"])
    assert cfg.loss.name == declared.get("loss", "soft")
    assert cfg.model.name == declared.get("model", "smollm2_135m")
    trainer = declared.get("trainer", "cpu")
    expected = yaml.safe_load((CONF / "trainer" / f"{trainer}.yaml").read_text())
    strategy = expected.get("strategy")
    if isinstance(strategy, dict):
        assert cfg.trainer.strategy._target_ == strategy["_target_"]
        if "config" in strategy:
            assert cfg.trainer.strategy.config.endswith(Path(strategy["config"]).name)
    if "target" in declared:
        assert cfg.data.target == declared["target"]


def test_paper_training_is_sft_as_cfg_job_prints_it():
    result = run_train(["+experiment=paper", "--cfg", "job"], timeout=120)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.loss.name == "sft" and printed.model.name == "llama2_7b"


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"),
    ("model.lora.r=0", "model.lora.r"),
    ("model.lora.dropout=1.5", "model.lora.dropout"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.scenario_batch_size=-2", "data.scenario_batch_size"),
    ("optim.scheduler=step", "optim.scheduler"),
    ("optim.decay_ratio=0", "optim.decay_ratio"),
    ("scenarios.augment.per_step=-1", "scenarios.augment.per_step"),
    ("scenarios.augment.from_step=2.5", "scenarios.augment.from_step"),
    ("loss.temperature=0", "loss.temperature"),
    ("model.lora.top_layers=0", "model.lora.top_layers"),
    ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ("max_requeues=-1", "max_requeues"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("+optim.lr_plus_ratio=2", "optim.lr_plus_ratio"),  # a typo: refused, not ignored (config_schema.py)
    ("+data.oracle.sampler.temprature=1", "data.oracle.sampler.temprature"),
])
def test_a_value_that_cannot_train_is_refused_by_key_before_anything_loads(override, key):
    from tomdistill.training import TrainingConfigError, check_training_config

    cfg = compose_train([override, "output=/tmp/x"])
    with pytest.raises(TrainingConfigError, match=key.replace(".", r"\.")):
        check_training_config(cfg)
    check_training_config(compose_train(["output=/tmp/x"]))  # the defaults pass


def test_train_py_names_a_bad_key_in_one_line_and_an_unknown_lora_module_before_training(tmp_path, teacher):
    result = run_train([*["model=tiny_llama", "logger=csv"], "optim.lr=-1", f"output={tmp_path}/a",
                        f"data.teacher={teacher}"], timeout=120)
    # the schema checks the value typed as the key's type (optim.lr: float, config_schema.py)
    assert result.returncode == 2 and "optim.lr=-1.0: expected a number > 0" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_train(["model=tiny_llama", "logger=csv", "model.lora.target_modules=[q_proj,qkv]",
                        f"output={tmp_path}/b", f"data.teacher={teacher}"], timeout=180)
    assert result.returncode == 2 and "model.lora.target_modules: ['qkv'] name no linear module" in result.stderr
    assert "'lm_head'" in result.stderr  # the output layer can be named explicitly


def test_sample_py_refuses_an_unknown_key_in_one_line_before_sampling(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "sample.py", "sampler=oracle", "+sampler.temprature=0.5",
                             f"output={tmp_path}/samples"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "sample.py: error: sampler.temprature: unknown key (did you mean sampler.temperature?); sampler has "
        + result.stderr.split(" has ", 1)[1].rstrip("\n")]
    assert not list((tmp_path / "samples").glob("*.parquet"))


def test_the_pipeline_refuses_a_bad_key_of_a_stage_before_its_first_stage_runs(tmp_path):
    """pipeline.run_study checks every sample and train stage's config (pipeline.check_stage_configs): a typo in a
    variant's overrides fails the study at once, not after the teacher was sampled."""
    import os
    import subprocess
    import sys

    study = tmp_path / "study"
    result = subprocess.run(
        [sys.executable, "-m", "tomdistill.pipeline", "+experiment=demo", "model=tiny_llama",
         "pipeline.variants.soft=['loss=soft','+optim.lr_plus_ratio=2']", f"output={study}"],
        cwd=ROOT, env={**os.environ, "PROJECT_ROOT": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pipeline: error: train [soft]: optim.lr_plus_ratio: unknown key (did you mean optim.lora_plus_ratio?)" \
        in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (study / "teacher").exists()  # no stage ran


def test_logger_none_trains(tmp_path, teacher):
    # LearningRateMonitor refuses to run without a logger: it is only added when there is one
    result = run_train(["model=tiny_llama", "logger=none", "trainer.max_steps=1", "trainer.val_check_interval=1",
                        f"output={tmp_path}/run", f"data.teacher={teacher}"], timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_split_alignment_refuses_an_unknown_split_or_objective_when_built():
    from tomdistill.callbacks import SplitAlignment, TransferSplitsError

    with pytest.raises(TransferSplitsError, match=r"callbacks\.split_alignment\.splits: unknown \['oos'\]"):
        SplitAlignment(["in_sample", "oos"])
    with pytest.raises(TransferSplitsError, match=r"objective \['oos_game'\] must be among its splits"):
        SplitAlignment(["in_sample"], objective=["oos_game"])
    assert compose_train(["output=/tmp/x"]).callbacks.split_alignment.splits == []  # off unless a search asks
    search = compose_train(["+experiment=demo", "hparams_search=soft_recipe_optuna", "output=/tmp/x"])
    assert search.optimized_metric == "transfer/objective"
    assert search.callbacks.split_alignment.min_action_mass == 0.95
    with pytest.raises(TransferSplitsError, match=r"min_action_mass=1\.5: expected a probability"):
        SplitAlignment(["in_sample"], min_action_mass=1.5)
    assert list(search.callbacks.split_alignment.objective) == ["heldout_context", "oos_context", "oos_payoffs"]
    assert search.callbacks.adapter_export.monitor == "val/alignment"  # checkpoints stay chosen by validation


def test_an_app_freezes_its_objects_at_exit_after_the_handlers_it_registered():
    """errors.run_app: the interpreter's last collection at exit is skipped (2-3 s a process), after the atexit
    handlers registered during the run (W&B, writers) have run with the collector untouched."""
    import os
    import subprocess
    import sys

    script = """
import atexit, gc
from tomdistill.errors import run_app
atexit.register(lambda: print("after", gc.get_freeze_count() > 0))  # registered first: runs last
def job():
    atexit.register(lambda: print("during", gc.get_freeze_count()))  # the app's own handler
    return 1
assert run_app("t", job) == 1 and gc.get_freeze_count() == 0
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["during 0", "after True"], result.stdout
