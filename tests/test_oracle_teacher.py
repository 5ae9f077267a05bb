"""The in-process oracle teacher (data.teacher=null) is `sample.py sampler=oracle role=teacher`, record for record,
cached once and never half-written (src/tomdistill/sampling/oracle_teacher.py), sampled by the training recipe
before the datamodule reads it (training.build_datamodule)."""
from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, TINY, check, oracle_config, run_train, summary
from tomdistill.data.datamodule import DataError, TeacherQADataModule
from tomdistill.losses import SFTLoss, SoftLabelLoss
from tomdistill.records import load_samples
from tomdistill.sampling import runner
from tomdistill.sampling.oracle_teacher import CACHE_FOLDER, oracle_settings, oracle_teacher
from tomdistill.sampling.settings import SamplingConfigError
from tomdistill.training import build_datamodule, build_loss, oracle_teacher_directories, training_record

N, SEED = 3, 5  # not the defaults: the in-process path must pass both on


@pytest.fixture(scope="module")
def tokenizer(tiny_model_cfg):
    from tomdistill.model.loading import load_tokenizer

    return load_tokenizer(tiny_model_cfg, padding_side="right")


def datamodule(tokenizer, catalogue, cache_dir: Path, loss) -> TeacherQADataModule:
    """What train.py builds without data.teacher: the recipe samples the oracle teacher, the datamodule reads it."""
    directories = oracle_teacher_directories(catalogue, loss.target_kind().teacher_modes, oracle_config(N, SEED),
                                             cache_dir)
    dm = TeacherQADataModule(directories["teacher"], tokenizer, catalogue, teacher_probs=directories["teacher_probs"],
                             target_kind=loss.target_kind(), cache_dir=cache_dir)
    dm.setup("fit")
    return dm


def train_config(tmp_path: Path, *overrides: str):
    """conf/train.yaml without data.teacher; the oracle's cache in tmp_path (the tokenizer's stays where it is)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["model=tiny_llama", f"data.cache_dir={tmp_path}/cache",
                                           f"data.oracle.sampler.n={N}", f"data.oracle.seed={SEED}",
                                           "data.oracle.sampler.progress=false", *overrides])


def sample_py(output: Path, *overrides: str) -> Path:
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "sampler=oracle", "role=teacher", f"sampler.n={N}", f"seed={SEED}",
         "sampler.progress=false", f"output={output}", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return output


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((directory / "train").iterdir())}


def test_the_in_process_teacher_is_what_sample_py_writes(tokenizer, catalogue, tmp_path):
    dm = datamodule(tokenizer, catalogue, tmp_path / "cache", SFTLoss())  # trains on tokens: both modes
    in_process = {"generate": Path(dm.teacher), "score": Path(dm.teacher_probs_source)}
    cli = {"generate": sample_py(tmp_path / "generate"), "score": sample_py(tmp_path / "score", "sampler.mode=score")}
    for mode in ("generate", "score"):
        ours, theirs = in_process[mode], cli[mode]
        # the same shards, byte for byte: same seeds, same layout, same records
        assert digests(ours) == digests(theirs) and len(digests(ours)) == len(catalogue.scenarios())
        assert json.loads((ours / "plan.json").read_text()) == json.loads((theirs / "plan.json").read_text())
        manifest, expected = (json.loads((d / "manifest.json").read_text()) for d in (ours, theirs))
        assert manifest.keys() == expected.keys()
        for key in expected.keys() - {"created", "config"}:
            assert manifest[key] == expected[key], key
        for key in ("role", "seed", "adapter", "sampler"):  # the rest of sample.py's config is its whole sample.yaml
            assert manifest["config"][key] == expected["config"][key], key
        assert manifest["config"]["output"] == str(ours) and manifest["complete"] is True
    assert len(load_samples(in_process["generate"])) == N * len(catalogue.scenarios())


def test_the_loss_decides_the_modes_and_a_soft_loss_trains_on_the_exact_scores(tokenizer, catalogue, tmp_path):
    soft = datamodule(tokenizer, catalogue, tmp_path / "cache", SoftLabelLoss())
    assert soft.teacher == soft.teacher_probs_source and Path(soft.teacher).name.startswith("score-")
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / CACHE_FOLDER).iterdir()) == ["score"]
    from tomdistill.scenarios.oracle import action_probabilities

    for target in soft.targets:
        assert target.teacher_probs == pytest.approx(action_probabilities(target.scenario))
    sft = datamodule(tokenizer, catalogue, tmp_path / "cache", SFTLoss())
    assert Path(sft.teacher).name.startswith("generate-") and sft.teacher_probs_source == soft.teacher  # reused


def test_the_cache_is_reused_and_a_crashed_sampling_leaves_nothing_behind(catalogue, tmp_path, monkeypatch):
    oracle = oracle_config(N, SEED)
    real_write, written = runner.write_shard, []

    def crash_after_two(directory, shard, records):
        if len(written) == 2:
            raise KeyboardInterrupt("killed mid-run")
        written.append(shard.filename)
        return real_write(directory, shard, records)

    monkeypatch.setattr(runner, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        oracle_teacher(catalogue, tmp_path, oracle, ("generate",))
    assert len(written) == 2 and list((tmp_path / CACHE_FOLDER).iterdir()) == []  # no half-written directory
    monkeypatch.setattr(runner, "write_shard", real_write)
    first = oracle_teacher(catalogue, tmp_path, oracle, ("generate",))["generate"]
    stamp = (first / "manifest.json").stat().st_mtime_ns

    def no_sampling(*args, **kwargs):
        raise AssertionError("a complete cached directory was sampled again")

    monkeypatch.setattr("tomdistill.sampling.oracle_teacher.sample_into", no_sampling)
    assert oracle_teacher(catalogue, tmp_path, oracle, ("generate",))["generate"] == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    changed = oracle_config(N, SEED)
    changed["sampler"]["temperature"] = 0.5  # a setting outside the readable name still keys the cache
    with pytest.raises(AssertionError, match="sampled again"):
        oracle_teacher(catalogue, tmp_path, changed, ("generate",))


@pytest.mark.parametrize("edit, key", [
    (lambda o: o["sampler"].update(n=0), "data.oracle.sampler.n"),
    (lambda o: o.update(seed=-1), "data.oracle.seed"),
    (lambda o: o["sampler"].update(backend="hf"), "data.oracle.sampler.backend"),
])
def test_bad_oracle_settings_name_their_key(edit, key):
    oracle = oracle_config()
    edit(oracle)
    with pytest.raises(SamplingConfigError, match=rf"^{key}"):
        oracle_settings(oracle, "generate")


def test_without_a_teacher_the_recipe_samples_the_oracle_before_the_datamodule_reads_it(tmp_path):
    cfg = train_config(tmp_path, "loss=sft_soft")  # trains on tokens: both modes
    dm = build_datamodule(cfg, build_loss(cfg))
    teacher, scores = Path(dm.teacher), Path(dm.teacher_probs_source)
    for directory, mode in ((teacher, "generate"), (scores, "score")):  # complete before setup() reads anything
        assert directory.parent == tmp_path / "cache" / CACHE_FOLDER and directory.name.startswith(f"{mode}-")
        assert f"-n{N}-s{SEED}-" in directory.name
        assert json.loads((directory / "manifest.json").read_text())["complete"] is True
    assert cfg.data.teacher is None and cfg.data.teacher_probs is None  # config.yaml keeps what the user gave
    assert not hasattr(dm, "oracle")  # data.oracle is the recipe's
    dm.setup("fit")
    assert training_record(dm, cfg)["teacher"] == str(teacher)
    assert dm.stats["records"] == N * len(dm.targets)  # N sampled answers per trained or validation scenario
    soft = build_datamodule(train_config(tmp_path, "loss=soft"), SoftLabelLoss())  # scores alone, reused
    assert Path(soft.teacher) == Path(soft.teacher_probs_source) == scores


def test_a_null_teacher_with_teacher_probs_or_without_a_cache_is_refused_by_the_recipe(tmp_path):
    cfg = train_config(tmp_path, f"data.teacher_probs={tmp_path}/scores")
    with pytest.raises(DataError, match=r"^data.teacher_probs=.* with data.teacher=null"):
        build_datamodule(cfg, build_loss(cfg))
    cfg = train_config(tmp_path, "data.cache_dir=null")
    with pytest.raises(DataError, match=r"^data.teacher is null \(the oracle teacher\) but no cache_dir"):
        build_datamodule(cfg, build_loss(cfg))
    assert not (tmp_path / "cache").exists()


def test_the_datamodule_given_no_teacher_names_data_teacher(tokenizer, catalogue):
    with pytest.raises(DataError, match=r"^data.teacher is null: the datamodule reads a teacher dataset"):
        TeacherQADataModule(None, tokenizer, catalogue, target_kind=SoftLabelLoss().target_kind())


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module an import statement of `path` (in `package`) names, absolute: `from ..x import y` in
    tomdistill.data is tomdistill.x and tomdistill.x.y."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            modules |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return modules


def test_the_data_package_imports_nothing_from_sampling():
    source = ROOT / "src"
    found = {}
    for path in sorted((source / "tomdistill" / "data").rglob("*.py")):
        package = ".".join(path.parent.relative_to(source).parts)
        found[path.relative_to(source).as_posix()] = imported_modules(path, package)
    assert "tomdistill.records" in found["tomdistill/data/datamodule.py"]  # relative imports are resolved
    offenders = {name: sorted(m for m in modules if m == "tomdistill.sampling" or m.startswith("tomdistill.sampling."))
                 for name, modules in found.items()}
    assert {name: ms for name, ms in offenders.items() if ms} == {}


def test_train_py_without_a_teacher_trains_on_the_sampled_directories(tmp_path):
    check(run_train([*TINY, "loss=sft_soft", "trainer.max_steps=1", "trainer.val_check_interval=1",
                     "data.oracle.sampler.n=2", f"output={tmp_path}/run"], timeout=300))
    training = json.loads((tmp_path / "run" / "adapter" / "tomdistill_adapter.json").read_text())["training"]
    teacher = Path(training["teacher"])
    assert teacher.parent.name == CACHE_FOLDER and teacher.name.startswith("generate-") and "-n2-s0-" in teacher.name
    assert json.loads((teacher / "manifest.json").read_text())["complete"] is True
    assert summary(tmp_path / "run")["data"]["records"] == 2 * len(training["trained_scenarios"] +
                                                                     training["validation_scenarios"])
