"""One schema (src/tomdistill/config_schema.py): every composed config validates, a typo or a wrong type is one line
naming the key, the schemas and the YAML defaults cannot drift apart, and docs/config.md is current."""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from tomdistill.config_schema import (
    APP_GROUPS, CONFIG_DOCS, SCHEMA_GROUP, TARGET, ConfigSchemaError, check_config, compose, experiment_names,
    option_files, render_config_docs, schema_groups,
)
from tomdistill.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = experiment_names()
# what an option needs before it can run at all (conf/sampler/recorded.yaml: the recording to serve)
OPTION_NEEDS = {("sampler", "recorded"): ["sampler.source=reference:paper_published/teacher"]}


def group_options() -> list[tuple[str, str, str]]:
    """(app, group key, option) for every option file of a group that has them (conf/loss, sampler, trainer)."""
    return [(group.app, group.key, option) for group in schema_groups().values() if group.options
            for option in option_files(group.options)]


def check(app: str, *overrides: str, where: str | None = None, keys=None) -> dict:
    return check_config(compose(app, list(overrides)), keys or APP_GROUPS[app], where=where)


def group_of(key: str) -> str:
    """The registered group a full key belongs to (the longest that prefixes it)."""
    return max((g for g in schema_groups() if key.startswith(g + ".")), key=len)


def refusal(app: str, *overrides: str, key: str | None = None) -> str:
    """The one-line refusal of a config; with `key`, of that key's group alone (so one group's fault is not
    reported as another's)."""
    with pytest.raises(UserError) as caught:
        check(app, *overrides, keys=[group_of(key)] if key else None)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------ every config file validates
@pytest.mark.parametrize("app", sorted(APP_GROUPS))
def test_the_default_configs_validate(app):
    checked = check(app)
    assert set(checked) == set(APP_GROUPS[app])


@pytest.mark.parametrize("app, key, option", group_options())
def test_every_group_option_validates(app, key, option):
    directory = schema_groups()[key].options
    checked = check(app, f"{directory}={option}", *OPTION_NEEDS.get((key, option), []))
    assert key in checked


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("app", sorted(APP_GROUPS))
def test_every_experiment_validates(app, experiment):
    check(app, f"+experiment={experiment}")


def test_evaluation_only_experiments_are_left_out():
    evaluate_only = [p.stem for p in (CONF / "experiment").glob("*.yaml")
                     if (yaml.safe_load(p.read_text()) or {}).get("evaluate_only")]
    assert evaluate_only and not set(evaluate_only) & set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS
                                        if "pipeline" in (yaml.safe_load((CONF / "experiment" / f"{e}.yaml")
                                                                         .read_text()) or {})])
def test_every_pipeline_stage_of_an_experiment_validates(experiment, tmp_path):
    """The stage lists (pipeline.teacher, pipeline.variants.<name>, ...) override keys too: each stage's config is
    checked with its script's groups, as the pipeline composes it (study.plan)."""
    from tomdistill.study import plan

    stages = plan(compose("pipeline", [f"+experiment={experiment}"]), tmp_path)
    scripts = {"sample.py": "sample", "train.py": "train"}
    checked = 0
    for stage in stages:
        if stage.script in scripts:
            check(scripts[stage.script], f"+experiment={experiment}", *stage.overrides, f"output={stage.output}",
                  where=stage.name)
            checked += 1
    assert checked >= 4  # teacher samples, teacher scores, base student, one training run and its tuned student


# ------------------------------------------------------------------------------ refusals: one line, naming the key
@pytest.mark.parametrize("app, override, key, known", [
    ("train", "+optim.lr_plus_ratio=2", "optim.lr_plus_ratio", "optim.lora_plus_ratio"),
    ("train", "+model.lora.rank=8", "model.lora.rank", "model.lora.r"),
    ("train", "+data.augment_per_step=16", "data.augment_per_step", "data.batch_size"),  # moved to scenarios.augment
    ("train", "+data.oracle.seeds=1", "data.oracle.seeds", "data.oracle.seed"),
    ("train", "+data.oracle.sampler.temprature=1", "data.oracle.sampler.temprature", "data.oracle.sampler.temperature"),
    ("train", "+loss.tempreature=2", "loss.tempreature", "loss.temperature"),
    ("train", "+trainer.max_step=5", "trainer.max_step", "trainer.max_steps"),
    ("train", "+scenarios.augment.perstep=3", "scenarios.augment.perstep", "scenarios.augment.per_step"),
    ("sample", "+sampler.temprature=0.5", "sampler.temprature", "sampler.temperature"),
])
def test_an_unknown_key_is_refused_in_one_line_naming_it_and_the_known_ones(app, override, key, known):
    message = refusal(app, override, key=key)
    assert message.startswith(f"{key}: unknown key"), message
    group, field_name = known.rsplit(".", 1)
    assert f"{group} has " in message and field_name in message.split(" has ", 1)[1], message


@pytest.mark.parametrize("app, override, expected", [
    ("train", "optim.lr=fast", "optim.lr='fast': expected float"),
    ("train", "model.lora.r=2.5", "model.lora.r=2.5: expected int"),
    ("train", "data.batch_size=[1]", "data.batch_size=[1]: expected int"),
    ("train", "data.batch_size=null", "data.batch_size=None: expected int"),
    ("train", "data.oracle.seed=abc", "data.oracle.seed='abc': expected int"),
    ("train", "data.oracle=3", "data.oracle=3: expected mapping"),
    ("train", "data.splits=in_sample", "data.splits='in_sample': expected list[str]"),
    ("train", "trainer.max_steps=many", "trainer.max_steps='many': expected int"),
    ("train", "loss.temperature=hot", "loss.temperature='hot': expected float"),
    ("train", "scenarios.augment.variants=x", "scenarios.augment.variants='x': expected int"),
    ("train", "scenarios.augment.per_step=x", "scenarios.augment.per_step='x': expected int"),
    ("sample", "sampler.top_p=high", "sampler.top_p='high': expected float"),
])
def test_a_wrong_type_is_refused_in_one_line_naming_the_key_the_type_and_the_value(app, override, expected):
    assert refusal(app, override, key=expected.split("=", 1)[0]) == expected


@pytest.mark.parametrize("app, override, key", [
    ("train", "optim.lr=0", "optim.lr"),
    ("train", "optim.scheduler=step", "optim.scheduler"),
    ("train", "optim.betas=[0.9]", "optim.betas"),
    ("train", "model.lora.dropout=1.0", "model.lora.dropout"),
    ("train", "model.lora.init=gauss", "model.lora.init"),
    ("train", "model.lora.target_modules=[]", "model.lora.target_modules"),
    ("train", "model.lora.top_layers=0", "model.lora.top_layers"),
    ("train", "data.max_length=4", "data.max_length"),
    ("train", "data.target=reasoning", "data.target"),
    ("train", "data.splits=[in_sample,in_sample]", "data.splits"),
    ("train", "data.splits=[in_sample,heldout]", "data.splits"),
    ("train", "data.oracle.sampler.n=0", "data.oracle.sampler.n"),
    ("train", "loss.temperature=0", "loss.temperature"),
    ("train", "loss=sft_soft loss.soft_weight=-1", "loss.soft_weight"),
    ("train", "trainer.devices=0", "trainer.devices"),
    ("train", "trainer.max_steps=0", "trainer.max_steps"),
    ("train", "trainer.precision=bf17", "trainer.precision"),
    ("train", "trainer.strategy={find_unused_parameters:false}", "trainer.strategy"),
    ("train", "trainer.val_check_interval=1.5", "trainer.val_check_interval"),
    ("train", "scenarios.augment.per_step=-1", "scenarios.augment.per_step"),
    ("train", "scenarios.augment.from_step=5", "scenarios.augment.from_step"),  # without per_step
    ("sample", "sampler.top_p=0", "sampler.top_p"),
    ("sample", "sampler.mode=exact", "sampler.mode"),
])
def test_each_schemas_own_rules_are_checked_naming_the_key(app, override, key):
    message = refusal(app, *override.split(" "), key=key)
    assert message.startswith(key), message


def test_a_key_missing_from_the_config_is_named():
    message = refusal("train", "~optim.lr", key="optim.lr")
    assert message.startswith("optim.lr: missing; expected float"), message


def test_a_pipeline_stage_is_named_before_the_key():
    with pytest.raises(ConfigSchemaError, match=r"^train \[sft\]: optim\.lr=0\.0: expected a number > 0$"):
        check("train", "optim.lr=0", where="train [sft]", keys=["optim"])


def test_interpolations_are_resolved_before_checking():
    assert check("train", "seed=3", keys=["data"])["data"].seed == 3  # data.seed: ${seed}
    assert refusal("train", "data.seed=${optim.lr}", key="data.seed") == "data.seed=0.002: expected int"
    message = refusal("train", "data.cache_dir=${nowhere}", key="data.cache_dir")
    assert message.startswith("data.cache_dir: cannot resolve its interpolation"), message


def test_a_loss_is_checked_against_the_dataclass_its_target_names():
    checked = check("train", "loss=sft_soft", "loss.soft_weight=0.5", keys=["loss"])
    assert type(checked["loss"]).__name__ == "SFTPlusSoftLoss" and checked["loss"].soft_weight == 0.5
    assert refusal("train", "loss._target_=tomdistill.losses.NoSuchLoss", key="loss._target_").startswith(
        "loss._target_='tomdistill.losses.NoSuchLoss': cannot be imported")
    assert "expected a dataclass" in refusal("train", "loss._target_=tomdistill.losses.soft_cross_entropy",
                                             key="loss._target_")


def test_check_config_returns_the_validated_settings():
    from tomdistill.data.settings import DataSettings, OracleTeacherSettings
    from tomdistill.model.settings import LoraSettings, OptimSettings
    from tomdistill.trainer_settings import TrainerSettings

    checked = check("train", "+experiment=paper", keys=["optim", "model.lora", "data", "trainer"])
    assert isinstance(checked["optim"], OptimSettings) and checked["optim"].lr == 5e-5
    assert isinstance(checked["model.lora"], LoraSettings)
    assert checked["model.lora"].target_modules == ["q_proj", "v_proj"]
    assert isinstance(checked["data"], DataSettings) and isinstance(checked["data"].oracle, OracleTeacherSettings)
    assert isinstance(checked["trainer"], TrainerSettings) and checked["trainer"].strategy[TARGET].endswith(
        "deepspeed_strategy")
    assert checked["trainer"].strategy["accelerator"] == "auto"  # ${..accelerator}, resolved


def test_the_interpreter_of_sample_py_is_read_but_decides_no_record():
    """`sampler.python` (read by the pipeline) is a runtime setting: it stays out of plan.json, so the oracle teacher's
    cache digest (sampling/oracle_teacher.py cache_name) and a resumed run's plan do not depend on it."""
    from tomdistill.sampling.manifest import build_plan

    venv = check("sample", "sampler=oracle", "sampler.python=.venv-vllm/bin/python", keys=["sampler"])["sampler"]
    own = check("sample", "sampler=oracle", keys=["sampler"])["sampler"]
    assert venv.python == ".venv-vllm/bin/python" and own.python is None
    assert build_plan(venv, "oracle", "v1", ["a"]) == build_plan(own, "oracle", "v1", ["a"])
    assert "python" not in build_plan(venv, "oracle", "v1", ["a"])
    assert refusal("sample", "sampler.python=[a]", key="sampler.python").startswith("sampler.python=['a']: expected")


def test_checking_changes_nothing_in_the_config():
    """`--cfg job` prints the composed config: checking it must leave it as composed (no retyping, no new keys)."""
    cfg = compose("train", ["+experiment=demo"])
    before = OmegaConf.to_yaml(cfg)
    check_config(cfg, APP_GROUPS["train"])
    assert OmegaConf.to_yaml(cfg) == before


# ------------------------------------------------------------------------------ schema and YAML cannot drift
def group_compositions(group) -> dict[str, dict]:
    """The group as each of its option files (or its app's default) composes it, unresolved."""
    overrides = {option: [f"{group.options}={option}"] for option in option_files(group.options)} \
        if group.options else {"default": []}
    return {option: OmegaConf.to_container(OmegaConf.select(compose(group.app, extra), group.key), resolve=False)
            for option, extra in overrides.items()}


@pytest.mark.parametrize("key", list(schema_groups()))
def test_the_schema_and_the_yaml_defaults_hold_the_same_keys(key):
    """A YAML key with no schema field, or a schema field no YAML file sets, fails here (with its name)."""
    group = schema_groups()[key]
    set_somewhere = set()
    for option, values in group_compositions(group).items():
        schema = group.schema_for(values)
        fields = [f for f in dataclasses.fields(schema) if f.name not in group.context]
        known = {f.name for f in fields} | ({TARGET} if group.schema is None else set())
        assert not set(values) - known, f"{key} ({option}): YAML keys not in {schema.__name__}: {set(values) - known}"
        required = {f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        assert not required - set(values), f"{key} ({option}): no YAML default for {required - set(values)}"
        set_somewhere |= set(values)
        if group.schema is None:  # a loss's fields are its option file's alone
            assert not known - set(values), f"{key} ({option}): no YAML default for {known - set(values)}"
    if group.schema is not None:  # a field with a default may be left out of some files, not out of all of them
        for other in schema_groups().values():  # data.oracle.sampler is composed from a conf/sampler/ file
            if other.schema is group.schema and other is not group:
                set_somewhere |= {k for values in group_compositions(other).values() for k in values}
        unset = {f.name for f in dataclasses.fields(group.schema) if f.name not in group.context} - set_somewhere
        assert not unset, f"{key}: schema fields no YAML file sets: {unset}"


@pytest.mark.parametrize("key", list(schema_groups()))
def test_every_schema_field_has_its_help_text(key):
    """docs/config.md's descriptions come from `field(metadata={"help": ...})` (docs/config.md)."""
    group = schema_groups()[key]
    schemas = {group.schema_for(values) for values in group_compositions(group).values()}
    missing = sorted(f"{key}.{f.name} ({schema.__name__})" for schema in schemas for f in dataclasses.fields(schema)
                     if f.name not in group.context and not f.metadata.get("help"))
    assert not missing, f"fields without metadata help: {missing}"


def test_allowed_values_match_what_their_readers_take():
    import lightning_fabric.connector

    from tomdistill.model.lora_module import LORA_INITS
    from tomdistill.model.settings import LORA_INIT_NAMES
    from tomdistill.trainer_settings import LIGHTNING_PRECISIONS

    assert set(LORA_INIT_NAMES) == set(LORA_INITS)
    lightning = {value for literal in typing.get_args(lightning_fabric.connector._PRECISION_INPUT)
                 for value in typing.get_args(literal)}
    assert set(LIGHTNING_PRECISIONS) == lightning


# ------------------------------------------------------------------------------ docs/config.md and ConfigStore
def load_script():
    spec = importlib.util.spec_from_file_location("render_config_docs", ROOT / "scripts" / "render_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_config_md_is_up_to_date(capsys):
    code = load_script().main(["--check"])
    assert code == 0, capsys.readouterr().err


def test_a_stale_docs_page_is_one_line_naming_the_first_difference():
    rendered = render_config_docs()
    stale = rendered.replace("| `optim.lr` |", "| `optim.learning_rate` |")
    summary = load_script().stale_summary(stale, rendered, "docs/config.md")
    assert summary and "\n" not in summary and "docs/config.md is stale" in summary and "optim.lr" in summary
    assert load_script().stale_summary(rendered, rendered, "docs/config.md") is None
    for key in schema_groups():
        assert f"## `{key}`" in rendered
    assert CONFIG_DOCS.exists()


def test_the_config_store_lists_the_schemas():
    from hydra.core.config_store import ConfigStore

    listed = ConfigStore.instance().list(SCHEMA_GROUP)
    for key, group in schema_groups().items():
        if group.schema is not None:
            assert f"{key}.yaml" in listed
        else:
            assert key in listed
            options = ConfigStore.instance().list(f"{SCHEMA_GROUP}/{key}")
            assert options == sorted(f"{option}.yaml" for option in option_files(group.options))
