"""Bad input corpus: every entry point, run as a user runs it, stops with exit code ≠ 0 and one clear
line naming the file / key / line at fault (no traceback), and leaves nothing half-written."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_teacher

from .common import TINY_TRAIN, TWO_BY_TWO, describe, entry, files_under

ORACLE = ["sampler=oracle", "sampler.n=2", "sampler.progress=false", *TWO_BY_TWO]


def assert_clean_failure(result, *fragments: str, code: int = 2) -> None:
    assert result.returncode == code, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in the error\n{describe(result)}"


def assert_no_samples(output: Path) -> None:
    """Catalogue errors surface before any sampling: nothing in `output` but Hydra's record of the run (its
    `.hydra/` and the log holding the error; conf/base.yaml puts the run directory at `output`)."""
    written = files_under(output) if output.exists() else set()
    assert all(f.startswith(".hydra/") or f == "sample.log" for f in written), written


def assert_no_training_output(output: Path) -> None:
    """Data errors surface before any model loads: no checkpoint, no adapter."""
    written = files_under(output) if output.exists() else set()
    assert not any(f.startswith(("checkpoints", "adapter")) for f in written), written


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, catalogue):
    return write_teacher(tmp_path_factory.mktemp("teacher"), catalogue, n=2)


# --- scenario catalogue --------------------------------------------------------------------------

def test_malformed_scenario_yaml_names_the_file_and_line(tmp_path):
    extra = tmp_path / "extra"
    (extra / "games").mkdir(parents=True)
    broken = extra / "games" / "broken.yaml"
    broken.write_text("name: broken\nkind: matrix\npayoffs:\n  C: {C: 1, D: 2\n  D: {C: 3, D: 4}\n")
    output = tmp_path / "out"
    result = entry("sample.py", [*ORACLE, f"scenarios.extra_dirs=[{extra}]", f"output={output}"])
    assert_clean_failure(result, str(broken), "not valid YAML", "line ")
    last = result.stderr.strip().splitlines()[-1]
    assert str(broken) in last and "not valid YAML at line " in last  # one line, not PyYAML's drawing
    assert_no_samples(output)


def test_payoff_matrix_of_the_wrong_shape_names_the_file_and_key(tmp_path):
    extra = tmp_path / "extra"
    (extra / "games").mkdir(parents=True)
    wrong = extra / "games" / "three_by_two.yaml"
    wrong.write_text("name: three_by_two\ntitle: Wrong\nkind: matrix\npayoffs:\n  C: {C: 1, D: 2}\n"
                     "  D: {C: 3, D: 4}\n  E: {C: 0, D: 0}\n")
    output = tmp_path / "out"
    result = entry("sample.py", [*ORACLE, f"scenarios.extra_dirs=[{extra}]", f"output={output}"])
    assert_clean_failure(result, str(wrong), "key 'payoffs'", "2×2")
    assert_no_samples(output)

    missing_cell = extra / "games" / "three_by_two.yaml"
    missing_cell.write_text("name: short\ntitle: Short\nkind: matrix\npayoffs:\n  C: {C: 1, D: 2}\n  D: {C: 3}\n")
    result = entry("sample.py", [*ORACLE, f"scenarios.extra_dirs=[{extra}]", f"output={output}"])
    assert_clean_failure(result, str(missing_cell), "payoffs.D")


def test_unknown_config_group_option_is_refused_by_hydra(tmp_path):
    result = entry("train.py", ["model=gpt_nine", f"output={tmp_path / 'out'}"])
    assert result.returncode != 0
    assert "Could not find 'model/gpt_nine'" in result.stderr and "smollm2_135m" in result.stderr
    assert not (tmp_path / "out").exists()


# --- teacher datasets (train.py) ---------------------------------------------------------------------

def copy_of(teacher: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(teacher, tmp_path / "teacher"))


def test_corrupt_parquet_shard_names_the_shard(tmp_path, teacher):
    data = copy_of(teacher, tmp_path)
    shard = data / "shard-generate.parquet"
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])  # truncated mid-write
    output = tmp_path / "run"
    result = entry("train.py", [*TINY_TRAIN, f"data.teacher={data}", f"output={output}"])
    assert_clean_failure(result, "corrupt or unreadable parquet shard", str(shard))
    assert_no_training_output(output)


def test_empty_dataset_is_refused(tmp_path, catalogue):
    data = write_teacher(tmp_path / "empty", catalogue, n=2, edit=lambda records: [])
    output = tmp_path / "run"
    result = entry("train.py", [*TINY_TRAIN, f"data.teacher={data}", f"output={output}"])
    assert_clean_failure(result, str(data), "empty (0 records)")
    assert_no_training_output(output)


def test_records_with_missing_fields_name_the_fields(tmp_path, teacher):
    data = copy_of(teacher, tmp_path)
    for shard in data.glob("*.parquet"):
        table = pq.read_table(shard)
        pq.write_table(table.drop(["action", "prompt_version"]), shard)
    output = tmp_path / "run"
    result = entry("train.py", [*TINY_TRAIN, f"data.teacher={data}", f"output={output}"])
    assert_clean_failure(result, "lack required field(s)", "'action'", "'prompt_version'")
    assert_no_training_output(output)


def test_records_with_an_empty_required_value_name_the_record(tmp_path, teacher):
    data = copy_of(teacher, tmp_path)
    shard = data / "shard-generate.parquet"
    table = pq.read_table(shard)
    games = table.column("game").to_pylist()
    games[3] = ""
    pq.write_table(table.set_column(table.schema.get_field_index("game"), "game", pa.array(games)), shard)
    output = tmp_path / "run"
    result = entry("train.py", [*TINY_TRAIN, f"data.teacher={data}", f"output={output}"])
    assert_clean_failure(result, "record 3 has an empty 'game'")
    assert_no_training_output(output)


# --- adapters (sample.py) ------------------------------------------------------------------------

def test_adapter_from_another_base_model_is_refused_before_anything_is_written(tmp_path):
    from tomdistill.model.loading import tag_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    tag_adapter(adapter, "smollm2_135m")
    output = tmp_path / "out"
    args = ["model=tiny_llama", "sampler.mode=score", "sampler.progress=false", "scenarios.games=[stag_hunt]",
            "scenarios.contexts=[team]", f"output={output}"]
    result = entry("sample.py", [*args, f"adapter={adapter}"])
    assert_clean_failure(result, str(adapter), "trained on base model 'smollm2_135m'", "'tiny_llama'")
    # no plan.json pinned to the wrong adapter: the same output directory still takes a correct run
    assert not (output / "plan.json").exists() and not (output / "train").exists()


# --- evaluate.py -----------------------------------------------------------------------------------

def test_prompt_version_mismatch_between_teacher_and_student_is_refused(tmp_path, catalogue):
    teacher = write_teacher(tmp_path / "teacher", catalogue, n=2, modes=("score",))

    def other_version(records):
        return [{**r, "prompt_version": "p1-00000000"} for r in records]

    base = write_teacher(tmp_path / "base", catalogue, n=2, modes=("score",), edit=other_version)
    tuned = write_teacher(tmp_path / "tuned", catalogue, n=2, modes=("score",), edit=other_version)
    output = tmp_path / "report"
    result = entry("evaluate.py", [f"teacher={teacher}", f"base={base}", f"tuned={tuned}", f"output={output}",
                                   "metrics.n_bootstrap=1000"])
    assert_clean_failure(result, "prompt_version mismatch", "teacher=p1-", "base=p1-00000000")
    assert not (output / "summary.json").exists()


def test_a_context_name_too_long_for_a_shard_file_is_refused_naming_the_file(tmp_path):
    """Sample files are named after their scenario (schema.py, SHARD_NAME): a name no file can carry is refused as the
    catalogue loads, not met as a traceback (ENAMETOOLONG) when the first shard is written."""
    from tomdistill.scenarios.schema import NAME_MAX, shard_name_room

    name = "c" * 300
    extra = tmp_path / "extra"
    (extra / "contexts").mkdir(parents=True)
    context = extra / "contexts" / "long.yaml"
    context.write_text(f"name: {name}\ncoplayer: a stranger\npoints: points\nframing: You meet a stranger.\n")
    (extra / "splits.yaml").write_text(f"oos_context:\n  games: [stag_hunt]\n  contexts: [{name}]\n")
    output = tmp_path / "out"
    result = entry("sample.py", ["sampler=oracle", "sampler.n=2", "sampler.progress=false",
                                 "scenarios.games=[stag_hunt]", f"scenarios.contexts=[{name}]",
                                 "scenarios.splits=[oos_context]", f"scenarios.extra_dirs=[{extra}]", f"output={output}"])
    assert_clean_failure(result, str(context), "context name 'cccc", "300 bytes", f"{NAME_MAX} bytes",
                         f"{shard_name_room()} bytes")
    assert_no_samples(output)


def test_names_that_fit_keep_their_shard_file_names():
    """Existing studies resume by their shards' names: the format is unchanged."""
    from tomdistill.sampling.shards import Shard, _temp_path
    from tomdistill.scenarios.schema import Context, Game, Scenario, shard_name_room

    game = Game(name="stag_hunt", title="Stag hunt", kind="matrix")
    context = Context(name="team", coplayer="a colleague", points="points", framing="", regard=0.0, belief=0.5)
    shard = Shard(Scenario(game, context, "in_sample"), 50, 50)
    assert shard.filename == "shard-stag_hunt-team-000050.parquet"
    assert _temp_path(Path("/d") / shard.filename).name.startswith(".shard-stag_hunt-team-000050.parquet.")
    # the longest names allowed make a temp file name of at most 255 bytes, whatever the pid
    longest = Scenario(Game(name="g" * 100, title="", kind="matrix"),
                       Context(name="c" * (shard_name_room() - 100), coplayer="", points="", framing="", regard=0.0,
                               belief=0.5), "in_sample")
    assert len(f".{Shard(longest, 0, 1).filename}.4194304.part") == 255


# --- output directories that cannot be written ------------------------------------------------------

def test_an_output_under_a_read_only_directory_is_refused_before_hydra_starts(tmp_path, monkeypatch):
    """In-process, so it also holds as root (where a chmod stops no write): the check asks os.access and statvfs."""
    import os

    from tomdistill.paths import output_override_error

    locked = tmp_path / "ro"
    locked.mkdir()
    assert output_override_error(str(locked / "fresh" / "run")) is None  # writable: nothing to say
    assert not (locked / "fresh").exists()  # tried, and taken away again
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert output_override_error(str(locked / "x" / "y")) == (
        f"output={locked / 'x' / 'y'}: cannot create it: {locked} is not writable (permission denied)")
    assert output_override_error(str(locked)).startswith(f"output={locked}: cannot write into it: ")

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly())
    assert output_override_error(str(locked / "x")) == (
        f"output={locked / 'x'}: cannot create it: {locked} is not writable (read-only filesystem)")
    (tmp_path / "file").write_text("")
    assert output_override_error(str(tmp_path / "file" / "x")) == (
        f"output={tmp_path / 'file' / 'x'}: cannot create it: {tmp_path / 'file'} is not a directory")


@pytest.mark.parametrize("script", ["train.py", "-m tomdistill.pipeline"])
def test_an_entry_point_given_an_unwritable_output_says_so_in_one_line(tmp_path, script):
    import os

    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only mode stops no write (the in-process test covers the check)")
        result = entry(script, [*TINY_TRAIN, f"output={locked}/run"], timeout=120)
    finally:
        locked.chmod(0o755)
    app = "pipeline" if "pipeline" in script else script
    assert_clean_failure(result, f"{app}: error: output={locked}/run: cannot create it: {locked} is not writable")
    assert len(result.stderr.strip().splitlines()) == 1, describe(result)


def test_an_output_the_filesystem_will_not_create_is_one_line_even_as_root():
    """/proc takes no new directories, whatever the permissions say (root passes every os.access check)."""
    result = entry("train.py", [*TINY_TRAIN, "output=/proc/tomdistill-run"], timeout=120)
    assert_clean_failure(result, "train.py: error: output=/proc/tomdistill-run: cannot create it: ")
    assert len(result.stderr.strip().splitlines()) == 1, describe(result)
