"""One schema for the config groups users set: what each key is, its type, its allowed values and its help text,
as dataclasses next to the code that reads them; `check_config` validates a composed config against them before
anything loads, and `render_config_docs` writes docs/config.md from them.

| key | schema | read by |
|---|---|---|
| `optim` | `model.settings.OptimSettings` | model/lora_module.py |
| `model.lora` | `model.settings.LoraSettings` | model/lora_module.py |
| `data` | `data.settings.DataSettings` | training.py, data/datamodule.py, data/targets/ |
| `data.oracle.sampler` | `sampling.settings.SamplerSettings` (role teacher) | sampling/oracle_teacher.py |
| `loss` | the dataclass its `_target_` names (losses/) | losses/ |
| `sampler` | `sampling.settings.SamplerSettings` (with the top-level `role`, `seed`, `adapter`) | sampling/ |
| `scenarios.augment` | `scenarios.augment.Augmentation` | scenarios/augment.py, data/targets/ |
| `trainer` | `trainer_settings.TrainerSettings` | training.py (`build_trainer`) |

Why not Hydra's own structured configs (a dataclass as each group's node in a defaults list), which is what this
module stands in for: the defaults stay in the YAML files and the dataclasses only check and document them. A
structured node in the defaults list would retype and reorder the composed config (ints become floats, `--cfg job`
changes), would fight the `_target_` nodes the groups are built from (a loss's fields depend on its `_target_`;
`trainer.strategy` is a name or a `_target_` config) and the interpolations they hold (`${seed}`,
`${..accelerator}`), and a default written in Python would be a second copy of the YAML's. So the YAML files stay
the one place for defaults and `--cfg job` is unchanged; each group is checked as composed and resolved: unknown
keys (a typo such as `optim.lr_plus_ratio` is refused, not ignored), then types (an OmegaConf structured merge
against the schema, its errors turned into one line), then the dataclass's own rules (`__post_init__`, or the
builder that validates it). The schemas are also stored in Hydra's ConfigStore (group `schema`), where Hydra's
tooling lists them.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

from . import CONF_DIR, PROJECT_ROOT
from .errors import UserError

CONFIG_DOCS = PROJECT_ROOT / "docs" / "config.md"
SCHEMA_GROUP = "schema"  # the ConfigStore group the schemas are stored under
TARGET = "_target_"


from .settings_fields import ConfigSchemaError, check_choices, expect, is_number, is_whole, setting  # noqa: F401


# ------------------------------------------------------------------------------ the registry
@dataclass(frozen=True, eq=False)  # each group is one object, compared by identity
class Group:
    """One config group and its schema."""

    key: str  # where it sits in the composed config
    app: str  # the config (conf/<app>.yaml) whose composed defaults docs/config.md shows: train | sample
    reader: str  # the code that reads it
    schema: type | None  # the dataclass; None: the one the group's `_target_` names (loss)
    options: str | None = None  # a conf/ directory of options for the group (docs/config.md shows each one's defaults)
    context: tuple[str, ...] = ()  # schema fields taken from top-level keys, not from the group
    # a key the config may write in more forms than the field's type (the reader converts): its type in the config
    config_types: Mapping[str, str] = field(default_factory=dict)
    # allowed values kept as module constants by a schema that does not carry them in its fields' metadata
    choices: Mapping[str, tuple] = field(default_factory=dict)
    # the group's own rules on its typed values (default: the schema's constructor, i.e. its __post_init__)
    build: Callable[[dict, DictConfig], Any] | None = None
    note: str = ""  # docs/config.md: how the group is read, where the schema alone does not say

    def schema_for(self, values: Mapping) -> type:
        """The dataclass these values are checked against."""
        if self.schema is not None:
            return self.schema
        return target_class(values.get(TARGET), self.key)

    def keys(self, schema: type) -> list[str]:
        """The keys the group may hold."""
        names = [f.name for f in dataclasses.fields(schema) if f.name not in self.context]
        return names + [TARGET] if self.schema is None else names


def target_class(target, key: str) -> type:
    """The dataclass a group's `_target_` names (a loss's own settings are its fields)."""
    if not target:
        raise ConfigSchemaError(f"{key}.{TARGET}: missing; expected the dotted path of a dataclass such as "
                                "tomdistill.losses.SoftLabelLoss (conf/loss/*.yaml)")
    try:
        cls = locate(str(target))
    except (ImportError, AttributeError) as err:
        raise ConfigSchemaError(f"{key}.{TARGET}={target!r}: cannot be imported ({err})") from None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigSchemaError(f"{key}.{TARGET}={target!r}: expected a dataclass whose fields are the group's keys "
                                "(a tomdistill.losses class)")
    return cls


def locate(path: str):
    """The object at a dotted path (`package.module.Name`), as Hydra's instantiate finds a `_target_` (without its
    error log line)."""
    import importlib

    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError as err:
            if err.name and not ".".join(parts[:split]).startswith(err.name):
                raise  # the module exists but imports something missing
            continue
        for name in parts[split:]:
            if not hasattr(found, name):
                raise AttributeError(f"{'.'.join(parts[:split])} has no {'.'.join(parts[split:])}")
            found = getattr(found, name)
        return found
    raise ImportError(f"no module {parts[0]!r}")


# sample.py's top-level keys SamplerSettings holds beside the sampler group's (sampling/settings.py)
SAMPLER_CONTEXT = ("role", "seed", "adapter")


def _build_sampler(values: dict, cfg: DictConfig):
    from .sampling.settings import settings_from_config

    return settings_from_config({"sampler": values, **{k: OmegaConf.select(cfg, k) for k in SAMPLER_CONTEXT}})


def _build_oracle_sampler(values: dict, cfg: DictConfig):
    """The oracle teacher's settings in both modes train.py may sample it in (sampling/oracle_teacher.py)."""
    from .sampling.oracle_teacher import oracle_settings

    oracle = {"seed": OmegaConf.select(cfg, "data.oracle.seed"), "sampler": values}
    return {mode: oracle_settings(oracle, mode) for mode in ("generate", "score")}


def _build_augmentation(values: dict, cfg: DictConfig):
    from .scenarios.augment import augmentation_from_config

    return augmentation_from_config(values)


@functools.cache
def schema_groups() -> dict[str, Group]:
    """The registry, by key (imported on first use: the schemas import the code that reads them)."""
    from .data.settings import DataSettings
    from .model.settings import LoraSettings, OptimSettings
    from .sampling.settings import BACKENDS, DTYPES, MODES, SamplerSettings
    from .scenarios.augment import CONTEXT_PAYOFFS, Augmentation
    from .trainer_settings import TrainerSettings

    sampler = dict(schema=SamplerSettings, context=SAMPLER_CONTEXT,
                   config_types={"max_new_tokens": "int | None"},  # null: by role (sampling/settings.py)
                   choices={"backend": BACKENDS, "mode": MODES, "dtype": DTYPES})
    groups = [
        Group("optim", "train", "src/tomdistill/model/lora_module.py (configure_optimizers)", OptimSettings),
        Group("model.lora", "train", "src/tomdistill/model/lora_module.py (build_lora_model)", LoraSettings),
        Group("data", "train", "src/tomdistill/training.py (build_datamodule), src/tomdistill/data/", DataSettings),
        Group("data.oracle.sampler", "train", "src/tomdistill/sampling/oracle_teacher.py (oracle_settings)",
              build=_build_oracle_sampler, note="The sampler group's keys (conf/sampler/oracle.yaml with "
              "conf/data/default.yaml's changes), checked as `sample.py sampler=oracle role=teacher "
              "seed=<data.oracle.seed>` checks them, in both modes (the recipe sets `mode`).", **sampler),
        Group("loss", "train", "src/tomdistill/losses/ (built from its _target_ by training.build_loss)", None,
              options="loss"),
        Group("sampler", "sample", "src/tomdistill/sampling/ (settings_from_config)", options="sampler",
              build=_build_sampler, note="Beside these keys SamplerSettings takes the top-level `role`, `seed` and "
              "`adapter` (conf/base.yaml).", **sampler),
        Group("scenarios.augment", "train", "src/tomdistill/scenarios/augment.py (augmentation_from_config), "
              "src/tomdistill/data/targets/ (per_step, from_step)", Augmentation,
              # lists in the config (tuples in Augmentation); contexts may hold named lists, joined in order
              config_types={"scales": "list[float]", "contexts": "list[str | list[str]]", "games": "list[str]"},
              choices={"context_payoffs": CONTEXT_PAYOFFS}, build=_build_augmentation),
        Group("trainer", "train", "src/tomdistill/training.py (build_trainer)", TrainerSettings, options="trainer"),
    ]
    registry = {group.key: group for group in groups}
    store_schemas(registry.values())
    return registry


# what each entry point reads (the pipeline checks each stage's config with its script's groups)
APP_GROUPS = {
    "train": ("optim", "model.lora", "data", "data.oracle.sampler", "loss", "scenarios.augment", "trainer"),
    "sample": ("sampler", "scenarios.augment"),
}


# ------------------------------------------------------------------------------ types OmegaConf checks
def _evaluated(annotation: str, owner: type):
    """A field's annotation text as a type, in its class's module (`from __future__ import annotations`)."""
    import sys

    namespace = {**vars(typing), **vars(sys.modules[owner.__module__])}
    return eval(annotation, namespace)  # noqa: S307 - annotation text from our own dataclasses


def field_types(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _omegaconf_expresses(hint) -> bool:
    """Whether OmegaConf can type-check a field of this type (2.3: no unions that hold a container)."""
    try:
        OmegaConf.structured(dataclasses.make_dataclass("Probe", [("value", hint)]))
    except Exception:  # noqa: BLE001 - OmegaConf raises several kinds for a type it cannot express
        return False
    return True


def config_view(group: Group, schema: type) -> type:
    """A dataclass of the group's keys typed as OmegaConf checks them: the schema's types, `config_types` where the
    config takes more forms, Any where OmegaConf cannot express the type (the schema's own rules check those), a
    nested schema as its own view, and the `_target_` that chose the schema. No defaults: a key left out stays
    missing."""
    return _view(schema, group.context, tuple(sorted(group.config_types.items())), group.schema is None)


@functools.cache
def _view(schema: type, context: tuple[str, ...] = (), config_types: tuple[tuple[str, str], ...] = (),
          chosen_by_target: bool = False) -> type:
    hints, written = field_types(schema), dict(config_types)
    specs = []
    for spec in dataclasses.fields(schema):
        if spec.name in context:
            continue
        hint = _evaluated(written[spec.name], schema) if spec.name in written else hints[spec.name]
        if dataclasses.is_dataclass(hint):
            hint = _view(hint)
        elif not _omegaconf_expresses(hint):
            hint = Any
        specs.append((spec.name, hint))
    if chosen_by_target:
        specs.append((TARGET, str))
    return dataclasses.make_dataclass(schema.__name__, specs)


def type_text(schema: type, name: str, group: Group | None = None) -> str:
    """A key's type as docs/config.md and the errors write it: the annotation as written, or the group's
    `config_types` entry (`group`: when `schema` is the group's own, not a nested one)."""
    if group is not None and name == TARGET and group.schema is None:
        return "str"
    if group is not None and name in group.config_types:
        return group.config_types[name]
    spec = next(f for f in dataclasses.fields(schema) if f.name == name)
    if dataclasses.is_dataclass(field_types(schema)[name]):
        return "mapping"
    return spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))


# ------------------------------------------------------------------------------ checking
_ABSENT = object()


def check_config(cfg: DictConfig, keys: Sequence[str] | None = None, where: str | None = None) -> dict[str, Any]:
    """Validate the groups `keys` (default: every registered group the config holds) of a composed config: unknown
    keys, then types, then each schema's own rules, every error one line naming the full key (prefixed by `where`,
    e.g. a pipeline stage, when given). Returns the validated settings by key."""
    groups = schema_groups()
    unknown = [key for key in keys or () if key not in groups]
    if unknown:
        raise ValueError(f"check_config: no schema for {unknown}; registered: {list(groups)}")
    checked = {}
    try:
        for key, group in groups.items():
            if keys is not None and key not in keys:
                continue
            values = resolved(cfg, key)
            if values is _ABSENT:
                if keys is not None:
                    raise ConfigSchemaError(f"{key}: missing from the config (conf/ composes it)")
                continue
            checked[key] = check_group(group, values, cfg)
    except UserError as err:
        if where:
            raise ConfigSchemaError(f"{where}: {err}") from err
        raise
    return checked


def resolved(cfg: DictConfig, key: str):
    """The group at `key` as plain values, interpolations resolved; `_ABSENT` when the config has no such key."""
    try:
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        if node is _ABSENT or node is None:
            return _ABSENT if node is _ABSENT else node
        if not isinstance(node, DictConfig):
            raise ConfigSchemaError(f"{key}={node!r}: expected a mapping of {key}.* keys")
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigSchemaError(f"{err.full_key or key}: missing value (???); set it, e.g. {err.full_key}=...") \
            from None
    except InterpolationResolutionError as err:
        reason = str(err.msg).splitlines()[0]
        raise ConfigSchemaError(f"{err.full_key or key}: cannot resolve its interpolation ({reason})") from None


def check_group(group: Group, values, cfg: DictConfig):
    """One group's values (resolved): keys, types, the schema's rules; the validated settings."""
    if not isinstance(values, dict):
        raise ConfigSchemaError(f"{group.key}={values!r}: expected a mapping of {group.key}.* keys")
    schema = group.schema_for(values)
    check_keys(group, schema, values)
    typed = typed_values(group, schema, values)
    chooser = {TARGET} if group.schema is None else set()  # the `_target_` that chose the schema is no field of it
    build = group.build or (lambda values, _: construct(schema, {k: v for k, v in values.items() if k not in chooser}))
    try:
        return build(typed, cfg)
    except UserError:
        raise
    except (TypeError, ValueError) as err:  # a constructor's own complaint that is not yet a user error
        raise ConfigSchemaError(f"{group.key} ({schema.__name__}): {str(err).splitlines()[0]}") from err


def check_keys(group: Group, schema: type, values: Mapping, key: str | None = None) -> None:
    """No key the schema does not know (the nearest known one suggested), none it needs missing; nested schemas
    the same."""
    key = key or group.key
    known = group.keys(schema) if key == group.key else [f.name for f in dataclasses.fields(schema)]
    for name in values:
        if name not in known:
            near = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {key}.{near[0]}?)" if near else ""
            raise ConfigSchemaError(f"{key}.{name}: unknown key{hint}; {key} has {', '.join(known)}")
    types_by_name = field_types(schema)
    for spec in dataclasses.fields(schema):
        if spec.name in group.context and key == group.key:
            continue
        if spec.name not in values:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                expected = type_text(schema, spec.name, group if key == group.key else None)
                raise ConfigSchemaError(f"{key}.{spec.name}: missing; expected {expected} "
                                        f"({spec.metadata.get('help', 'see docs/config.md')})")
            continue
        nested = types_by_name[spec.name]
        if dataclasses.is_dataclass(nested) and isinstance(values[spec.name], dict):
            check_keys(group, nested, values[spec.name], f"{key}.{spec.name}")


def typed_values(group: Group, schema: type, values: Mapping) -> dict:
    """The values merged into the group's OmegaConf view: each converted to its key's type as Hydra would, or one
    line naming the key, the type expected and the value."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_view(group, schema)), values)
    except OmegaConfBaseException as err:
        path = str(err.full_key or "")
        raise ConfigSchemaError(_type_error(group, schema, values, path, err)) from None
    typed = OmegaConf.to_container(merged, throw_on_missing=False)
    return {k: v for k, v in typed.items() if k in values}  # a key left out keeps the dataclass's default


def _type_error(group: Group, schema: type, values: Mapping, path: str, err: Exception) -> str:
    """`key=value: expected <type>` for the field the merge refused (a list item or nested key: its field)."""
    names = [part.split("[")[0] for part in path.split(".") if part]
    owner, value, expected = schema, values, None
    for depth, name in enumerate(names):
        if not (dataclasses.is_dataclass(owner) and name in field_types(owner)):
            break
        expected = type_text(owner, name, group if depth == 0 else None)
        value = value.get(name) if isinstance(value, Mapping) else value
        owner = field_types(owner)[name]
    if expected is None:
        return f"{group.key}: {str(getattr(err, 'msg', err)).splitlines()[0]}"
    offending = getattr(err, "value", None)
    item = f" ({path}={offending!r})" if "[" in path else ""
    return f"{group.key}.{'.'.join(names)}={value!r}: expected {expected}{item}"


def construct(schema: type, values: Mapping):
    """The dataclass from typed values, nested schemas built first; its __post_init__ checks its own rules."""
    types_by_name = field_types(schema)
    kwargs = {}
    for name, value in values.items():
        nested = types_by_name.get(name)
        if dataclasses.is_dataclass(nested) and isinstance(value, Mapping):
            value = construct(nested, value)
        kwargs[name] = value
    return schema(**kwargs)


# ------------------------------------------------------------------------------ ConfigStore
def register_schemas() -> list[str]:
    """The schemas' names in Hydra's ConfigStore (stored when the registry is first built, `schema_groups`)."""
    return store_schemas(schema_groups().values())


def store_schemas(groups: Iterable[Group]) -> list[str]:
    """Store each group's schema (its OmegaConf view) in Hydra's ConfigStore under `schema/`: `schema/optim`, …,
    and `schema/loss/<option>` for each conf/loss/ option. Returns the names stored."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    names = []
    for group in groups:
        if group.schema is not None:
            store.store(group=SCHEMA_GROUP, name=group.key, node=config_view(group, group.schema))
            names.append(f"{SCHEMA_GROUP}/{group.key}")
            continue
        for option, values in option_files(group.options).items():
            schema = group.schema_for(values)
            store.store(group=f"{SCHEMA_GROUP}/{group.key}", name=option, node=config_view(group, schema))
            names.append(f"{SCHEMA_GROUP}/{group.key}/{option}")
    return names


def option_files(directory: str) -> dict[str, dict]:
    """conf/<directory>/*.yaml by option name, as written (not composed)."""
    import yaml

    return {path.stem: yaml.safe_load(path.read_text()) or {} for path in sorted((CONF_DIR / directory).glob("*.yaml"))}


# ------------------------------------------------------------------------------ docs/config.md
def experiment_names() -> list[str]:
    """conf/experiment/*.yaml that configure training and sampling (not the evaluation-only ones)."""
    import yaml

    return [path.stem for path in sorted((CONF_DIR / "experiment").glob("*.yaml"))
            if not (yaml.safe_load(path.read_text()) or {}).get("evaluate_only")]


def compose(app: str, overrides: Sequence[str] = ()) -> DictConfig:
    """conf/<app>.yaml composed with Hydra's compose API (not resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from .paths import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(app, overrides=list(overrides))


def _select(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _format(value) -> str:
    """A value as YAML flow text, for a table cell."""
    if value is _ABSENT:
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_format(v)}" for k, v in value.items()) + "}"
    return str(value)


def _brief(value):
    """A `_target_` config as its target alone (the option's file holds the rest)."""
    if isinstance(value, dict) and TARGET in value:
        return f"{{{TARGET}: {value[TARGET]}, …}}" if len(value) > 1 else value
    return value


def _cell(text: str, code: bool = True) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if code and text else text


def _pipeline_overrides(tree: dict) -> list[tuple[str, str]]:
    """(key, where) for each `key=value` in an experiment's pipeline stage lists (pipeline.teacher, …,
    pipeline.variants.<name>)."""
    pipeline = tree.get("pipeline") or {}
    lists = {f"pipeline.{name}": pipeline.get(name) for name in ("teacher", "teacher_scores", "student", "train",
                                                                   "evaluate")}
    variants = pipeline.get("variants") or {}
    lists.update({f"pipeline.variants.{name}": overrides for name, overrides in variants.items()})
    found = []
    for where, overrides in lists.items():
        for override in overrides or []:
            key = str(override).split("=", 1)[0].lstrip("+~")
            if "=" in str(override) and "." in key:
                found.append((key, where))
    return found


@dataclass
class _Compositions:
    """The composed (unresolved) configs docs/config.md reads: each app's default, its group options, and each
    experiment's."""

    defaults: dict[str, dict] = field(default_factory=dict)
    options: dict[tuple[str, str], dict] = field(default_factory=dict)  # (group key, option) -> config
    experiments: dict[str, dict[str, dict]] = field(default_factory=dict)  # app -> experiment -> config

    @classmethod
    def compose_all(cls, groups: Iterable[Group]) -> "_Compositions":
        plain = lambda cfg: OmegaConf.to_container(cfg, resolve=False)  # noqa: E731
        found = cls()
        for app in ("train", "sample"):
            found.defaults[app] = plain(compose(app))
            found.experiments[app] = {name: plain(compose(app, [f"+experiment={name}"]))
                                      for name in experiment_names()}
        for group in groups:
            for option in option_files(group.options) if group.options else ():
                found.options[group.key, option] = plain(compose(group.app, [f"{group.options}={option}"]))
        return found


def _describe(schema: type) -> str:
    """The schema's docstring (a dataclass without one: its module's first paragraph), on one line."""
    import sys

    doc = schema.__doc__ or ""
    if not doc or doc.startswith(f"{schema.__name__}("):  # the signature dataclasses writes in
        doc = sys.modules[schema.__module__].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _choices(group: Group, schema: type, name: str) -> tuple | None:
    spec = next((f for f in dataclasses.fields(schema) if f.name == name), None)
    if spec is not None and "choices" in spec.metadata:
        return spec.metadata["choices"]
    return group.choices.get(name)


def _help(schema: type, name: str) -> str:
    spec = next((f for f in dataclasses.fields(schema) if f.name == name), None)
    return spec.metadata.get("help", "") if spec is not None else ""


def _rows(group: Group, schema: type, default: dict, experiments: dict[str, dict],
          alternatives: dict[str, dict] | None = None) -> list[str]:
    """The table of one group: key, type, default, [other options,] allowed values, experiments, help."""
    names = group.keys(schema)
    if group.schema is None:
        names = [TARGET] + [n for n in names if n != TARGET]
    head = ["key", "type", "default"] + (["other options"] if alternatives else []) + ["allowed", "experiments",
                                                                                       "description"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    types_by_name = field_types(schema)
    entries = []  # (dotted key below the group, owner schema, name)
    for name in names:
        nested = types_by_name.get(name)
        if dataclasses.is_dataclass(nested):  # one row per nested key (data.oracle.seed)
            entries += [(f"{name}.{f.name}", nested, f.name) for f in dataclasses.fields(nested)]
        else:
            entries.append((name, schema, name))
    overrides_by_key: dict[str, list[tuple[str, str]]] = {}
    for experiment, tree in experiments.items():
        for key, where in _pipeline_overrides(tree):
            overrides_by_key.setdefault(key, []).append((experiment, where))
    for dotted, owner, name in entries:
        full = f"{group.key}.{dotted}"
        value = _select(default, full)
        section = full in schema_groups() and full != group.key  # a group of its own (data.oracle.sampler)
        row = [_cell(full), _cell(type_text(owner, name, group if owner is schema else None)),
               f"the `{full}` section" if section else _cell(_format(value))]
        if alternatives:
            other = [f"{option}: {_format(_brief(_select(tree, full)))}" for option, tree in alternatives.items()
                     if _select(tree, full) != value]
            row.append(_cell("; ".join(other)))
        allowed = _choices(group, owner, name)
        row.append(_cell(" | ".join(dict.fromkeys(_format(c) for c in allowed))) if allowed else "")
        changed = {} if section else {name_: [] for name_, tree in experiments.items() if _select(tree, full) != value}
        for experiment, where in overrides_by_key.get(full, []):
            changed.setdefault(experiment, []).append(where)
        row.append(", ".join(f"{name_} ({', '.join(where)})" if where else name_ for name_, where in changed.items()))
        description = _help(owner, name) or ("the class these settings build" if name == TARGET else "")
        row.append(_cell(description, code=False))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render_config_docs() -> str:
    """docs/config.md: one section per group (per option for `loss`), from the schemas and the composed defaults
    of conf/train.yaml and conf/sample.yaml."""
    groups = list(schema_groups().values())
    found = _Compositions.compose_all(groups)
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python scripts/render_config_docs.py` from the schemas in src/tomdistill/config_schema.py "
        "and the composed defaults of conf/; do not edit by hand (tests/test_config_schema.py fails when it is "
        "stale). -->",
        "",
        "Every group below is checked before anything loads (`tomdistill.config_schema.check_config`): a key the "
        "group does not have, a value of the wrong type, or one outside its allowed values stops the run with one "
        "line naming the key. The defaults are those of the composed configs (`conf/train.yaml`, `conf/sample.yaml`), "
        "written as in the YAML files (`${...}` is an interpolation); *other options* gives the values another "
        "option of the group sets (`trainer=ddp`, `sampler=oracle`, ...); *experiments* names the "
        "`conf/experiment/*.yaml` whose composed config holds another value, and the pipeline stage lists that set "
        "the key. How the groups fit together: [design.md](design.md), \"Configuration\".",
        "",
    ]
    for group in groups:
        app_experiments = found.experiments[group.app]
        default = found.defaults[group.app]
        if group.schema is None:  # one section per option: each names its own dataclass
            for option, tree in ((o, found.options[group.key, o]) for o in option_files(group.options)):
                values = _select(tree, group.key)
                schema = group.schema_for(values)
                chosen = [name for name, exp in app_experiments.items()
                          if _select(exp, f"{group.key}.{TARGET}") == values.get(TARGET)]
                default_option = _select(default, f"{group.key}.{TARGET}") == values.get(TARGET)
                out += [f"## `{group.key}` ({group.options}={option}{', the default' if default_option else ''})", "",
                        f"`{schema.__module__}.{schema.__qualname__}`, read by {group.reader}. "
                        f"{_describe(schema)}", ""]
                if chosen:
                    out += [f"Chosen by the experiments {', '.join(chosen)}.", ""]
                same = {name: exp for name, exp in app_experiments.items() if name in chosen}
                out += _rows(group, schema, tree, same) + [""]
            continue
        alternatives = None
        if group.options:
            alternatives = {option: found.options[group.key, option] for option in option_files(group.options)}
        out += [f"## `{group.key}`", "", f"`{group.schema.__module__}.{group.schema.__qualname__}`, read by "
                f"{group.reader}. {_describe(group.schema)}", ""]
        if group.note:
            out += [group.note, ""]
        out += _rows(group, group.schema, default, app_experiments, alternatives) + [""]
    return "\n".join(out).rstrip("\n") + "\n"
