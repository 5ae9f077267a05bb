"""The sample record: the contract between sample.py, train.py and evaluate.py.

One record per sample (generate mode) or per scenario (score mode). A samples directory holds
parquet shards (`train/shard-*.parquet`; the subfolder keeps `datasets` from reading
`manifest.json` as data) plus `manifest.json` and `plan.json`, loadable with
`datasets.load_dataset("parquet", data_dir=DIR)` or `load_samples(DIR)`.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets

from .errors import UserError

RECORD_COLUMNS = (
    "model", "role", "game", "context", "split", "sample_index", "seed", "prompt_version",
    "prompt", "completion", "action", "motivation", "action_probs", "action_mass",
)

FEATURES = datasets.Features(
    {
        "model": datasets.Value("string"),
        "role": datasets.Value("string"),
        "game": datasets.Value("string"),
        "context": datasets.Value("string"),
        "split": datasets.Value("string"),
        "sample_index": datasets.Value("int64"),
        "seed": datasets.Value("int64"),
        "prompt_version": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "completion": datasets.Value("string"),
        "action": datasets.Value("string"),  # "C", "D", an amount, or "unparsed"
        "motivation": datasets.Value("string"),
        "action_probs": datasets.Value("string"),  # score mode: JSON {action: probability}; else ""
        "action_mass": datasets.Value("float64"),  # score mode: raw mass on the action tokens; else NaN
    }
)

MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.parquet"


MASS_TOLERANCE = 1e-6  # an action mass above 1 + this means the scored actions overlap: a scoring bug
MIN_MASS = 0.5         # below this, most of the model's answer is not one of the actions


def mass_warning(scenario_id: str, mass: float) -> str | None:
    """A message when a scenario's `action_mass` is impossible (> 1) or too small to trust, else None."""
    if mass > 1.0 + MASS_TOLERANCE:
        return (f"{scenario_id}: the scored actions hold {mass:.6f} > 1 of the probability: they are not disjoint "
                "answers (a scoring bug), so these probabilities are wrong")
    if mass < MIN_MASS:
        return (f"{scenario_id}: only {mass:.3f} of the probability falls on the actions: the model mostly answers "
                "something else, so its choice probabilities may not reflect its answers")
    return None


class SamplesError(ValueError, UserError):
    """An unusable samples dataset; the message names the dataset and what was expected."""


def action_probs_of(record: dict) -> dict[str, float] | None:
    raw = record.get("action_probs")
    if raw in (None, ""):
        return None
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SamplesError(f"{path}: manifest is not valid JSON ({err})") from err


def load_samples(source: str | Path, name: str = "samples") -> datasets.Dataset:
    """Load a samples dataset from a directory of parquet shards, a parquet file, or a hub id.

    Errors name the dataset (`name`, e.g. "teacher") and the file at fault.
    """
    path = Path(str(source))
    if path.is_dir():
        files = sorted(path.glob(SHARD_GLOB)) or sorted(path.rglob("*.parquet"))
        if not files:
            raise SamplesError(f"{name} dataset {path}: no parquet shards found (expected {SHARD_GLOB})")
        folders = sorted({str(f.parent.relative_to(path)) for f in files})
        if len(folders) > 1:  # e.g. a study directory: teacher, base and tuned samples side by side
            raise SamplesError(
                f"{name} dataset {path} holds the shards of several runs (in {', '.join(folders[:6])}"
                f"{' …' if len(folders) > 6 else ''}): point at one run's directory")
    elif path.suffix == ".parquet":
        if not path.exists():
            raise SamplesError(f"{name} dataset {path}: file not found")
        files = [path]
    elif path.exists():
        raise SamplesError(f"{name} dataset {path}: expected a directory of parquet shards or a .parquet file")
    else:
        if "/" not in str(source) or str(source).startswith((".", "/")):
            raise SamplesError(f"{name} dataset {source}: no such directory or file")
        try:  # a datasets hub id (needs network or a local cache)
            return _validate(datasets.load_dataset(str(source), split="train"), f"{name} dataset {source}")
        except Exception as err:  # noqa: BLE001 - the hub raises many kinds
            raise SamplesError(f"{name} dataset {source}: not a local path and could not be loaded from the hub ({err})") from err
    import pyarrow.parquet as pq

    tables = []
    for file in files:
        try:
            tables.append(pq.read_table(file))
        except Exception as err:  # noqa: BLE001 - pyarrow raises several error types for corrupt files
            raise SamplesError(f"{name} dataset: corrupt or unreadable parquet shard {file}: {err}") from err
    import pyarrow as pa

    try:
        table = pa.concat_tables(tables, promote_options="default")
    except Exception as err:  # noqa: BLE001
        raise SamplesError(f"{name} dataset {path}: shards have incompatible schemas ({err})") from err
    return _validate(datasets.Dataset(table), f"{name} dataset {path}")


def _validate(dataset: datasets.Dataset, label: str) -> datasets.Dataset:
    required = [c for c in RECORD_COLUMNS if c not in ("action_mass",)]
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise SamplesError(f"{label}: records lack required field(s) {missing}; expected the columns {list(RECORD_COLUMNS)}")
    if len(dataset) == 0:
        raise SamplesError(f"{label}: the dataset is empty (0 records)")
    models = sorted(set(dataset.data.column("model").to_pylist()))
    if len(models) > 1:
        raise SamplesError(f"{label}: records of several models {models[:4]} in one dataset; sample each model into "
                           "its own directory (two teachers must never pass for one)")
    for column in ("game", "context", "action", "prompt_version"):
        values = dataset.data.column(column).to_pylist()  # arrow column: no per-row python decoding
        bad = next((i for i, v in enumerate(values) if v is None or v == ""), None)
        if bad is not None:
            raise SamplesError(f"{label}: record {bad} has an empty {column!r}")
    return dataset


def prompt_versions(dataset: datasets.Dataset) -> set[str]:
    return set(dataset.unique("prompt_version"))


def check_same_prompt_version(datasets_by_name: dict[str, datasets.Dataset], *,
                              elicitation_may_differ: tuple[str, ...] = ()) -> str:
    """All datasets must come from the same prompts; return the (first dataset's) version.

    The datasets named in `elicitation_may_differ` need only share the scenario text (template,
    catalogue, outcome shuffle: `scenarios.scenario_version`) and may differ in how the answer was
    elicited (e.g. a teacher asked to reason freely, students scored after `Answer:`).
    """
    from .scenarios.prompts import scenario_version

    versions = {name: prompt_versions(ds) for name, ds in datasets_by_name.items()}
    for name, found in versions.items():
        if len(found) > 1:
            raise SamplesError(f"{name} dataset mixes prompt versions {sorted(found)}")
    version = {name: next(iter(v)) for name, v in versions.items()}
    strict = {name: v for name, v in version.items() if name not in elicitation_may_differ}
    loose = {name: scenario_version(v) for name, v in version.items()}
    if len(set(strict.values())) > 1 or len(set(loose.values())) > 1:
        listing = ", ".join(f"{n}={v}" for n, v in version.items())
        raise SamplesError(
            f"prompt_version mismatch between datasets ({listing}): they were rendered from different "
            "prompt templates, scenario catalogues, outcome orders or answer prompts and cannot be compared"
        )
    return next(iter(version.values()))
