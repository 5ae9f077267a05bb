"""evaluate.py end to end: the paper's reference data, small synthetic datasets, W&B offline, bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tomdistill.records import FEATURES

ROOT = Path(__file__).resolve().parents[1]
SPLIT_KEYS = ("in_sample", "heldout_context", "oos_context", "oos_payoffs", "oos_game", "overall")
FIGURES = ("cooperation.png", "improvement_by_game.png", "improvement_by_context.png", "public_goods.png", "heatmap.png")
TABLES = ("headline", "propensities", "transfer_scenarios", "transfer_groups", "cooperation", "significance_payoffs",
          "distance_shares")

# (split, game, context) -> answers per role: {action: count}
SCENARIOS = {
    ("in_sample", "prisoners_dilemma", "business"): {"teacher": {"C": 8, "D": 32}, "base": {"C": 34, "D": 6}, "tuned": {"C": 20, "D": 20}},
    ("in_sample", "stag_hunt", "friends"): {"teacher": {"C": 36, "D": 4}, "base": {"C": 30, "D": 9, "unparsed": 1}, "tuned": {"C": 35, "D": 5}},
    ("oos_context", "snowdrift", "athletes"): {"teacher": {"C": 10, "D": 30}, "base": {"C": 30, "D": 10}, "tuned": {"C": 31, "D": 9}},
    ("oos_payoffs", "prisoners_dilemma_x2", "business"): {"teacher": {"C": 4, "D": 36}, "base": {"C": 33, "D": 7}, "tuned": {"C": 24, "D": 16}},
    ("oos_payoffs", "prisoners_dilemma_x2", "team"): {"teacher": {"C": 20, "D": 20}, "base": {"C": 20, "D": 20}, "tuned": {"C": 25, "D": 15}},
    ("oos_game", "public_goods", "party"): {"teacher": {"7": 30, "10": 10}, "base": {"5": 30, "2": 10}, "tuned": {"5": 20, "7": 20}},
}
MODELS = {"teacher": "oracle-logit", "base": "tiny-student", "tuned": "tiny-student-ft"}


def write_samples(directory: Path, role: str, scenarios=SCENARIOS, prompt_version="test-v1", score=False) -> Path:
    """A samples directory in the record schema (generate mode, or score mode with action_probs)."""
    rows = []
    for (split, game, context), answers in scenarios.items():
        counts = answers[role]
        if score:
            total = sum(counts.values())
            probs = {a: c / total for a, c in counts.items() if a != "unparsed"}
            expanded = [(max(probs, key=probs.get), json.dumps(probs), 0.9)]
        else:
            expanded = [(a, "", math.nan) for a, c in counts.items() for _ in range(c)]
        for i, (action, probs_json, mass) in enumerate(expanded):
            rows.append({"model": MODELS[role], "role": "teacher" if role == "teacher" else "student", "game": game,
                         "context": context, "split": split, "sample_index": i, "seed": 0,
                         "prompt_version": prompt_version, "prompt": "p", "completion": f"Answer: {action}",
                         "action": action, "motivation": "", "action_probs": probs_json, "action_mass": mass})
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(pd.DataFrame(rows, columns=list(FEATURES)), schema=FEATURES.arrow_schema, preserve_index=False)
    pq.write_table(table, directory / "shard-00000.parquet")
    (directory / "manifest.json").write_text(json.dumps({"model": MODELS[role]}))
    return directory


def make_datasets(root: Path, **kwargs) -> dict[str, Path]:
    return {role: write_samples(root / role, role, **kwargs) for role in MODELS}


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="evaluate", overrides=overrides)


def run_evaluate(dirs, output, cache, extra=()):
    from tomdistill.evaluation import evaluate

    overrides = [f"{r}={d}" for r, d in dirs.items()] + [f"output={output}", f"paths.root_dir={ROOT}", f"paths.cache_dir={cache}",
                                                         "metrics.n_bootstrap=1000", "logger=none", *extra]
    return evaluate(compose(overrides))


def check_artefacts(output: Path, figures=FIGURES):
    summary = json.loads((output / "summary.json").read_text())
    for metric in ("improvement", "alignment"):
        assert set(summary[metric]) == set(SPLIT_KEYS)
        for entry in summary[metric].values():
            assert {"value", "ci_low", "ci_high", "n_scenarios"} <= set(entry)
            if entry["value"] is not None and entry["ci_low"] is not None:
                assert entry["ci_low"] <= entry["ci_high"]
    for name in TABLES:
        assert pd.read_csv(output / f"{name}.csv").shape[0] > 0, name  # an empty table carries a note row
        assert (output / f"{name}.md").read_text().startswith("| ")
    for name in figures:
        data = (output / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert "## Headline" in (output / "report.md").read_text()
    return summary


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_reference_data_end_to_end_with_wandb_offline(tmp_path, cache):
    """The acceptance run: `python evaluate.py +experiment=paper_published` (here with W&B offline)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PROJECT_ROOT": str(ROOT)}
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "+experiment=paper_published", f"output={out}",
         f"paths.cache_dir={cache}", "metrics.n_bootstrap=1000", "logger=wandb", f"hydra.run.dir={tmp_path / 'hydra'}"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for number in ("46.65%", "18.26%", "39.95%", "28.32%", "33.02%", "15.10%", "18.76%", "46.26%", "17.90%", "28.48%"):
        assert number in proc.stdout, number
    assert "parsed answers" in proc.stdout
    summary = check_artefacts(out)
    assert summary["improvement"]["in_sample"]["value"] == pytest.approx(0.4665, abs=5e-5)
    assert summary["alignment"]["oos_game"]["value"] == pytest.approx(0.2832, abs=5e-5)
    assert summary["unparsed"]["teacher"]["total"] == 1 and summary["undefined_scenarios"] == []
    assert summary["models"] == {"teacher": "llama2-70b-chat", "base": "llama2-7b-chat", "tuned": "llama2-7b-chat-ft"}
    assert "paper_note" in summary
    # W&B offline: the run's binary log holds the headline summary; the tables and figures are files.
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in ("alignment/in_sample", "improvement/oos_context", "alignment/overall_ci_low"):
        assert key.encode() in log, key
    assert str(summary["alignment"]["in_sample"]["value"])[:8].encode() in log
    media = {p.name.split("_0_")[0] for p in (runs[0] / "files" / "media").rglob("*.*")}
    assert {"heatmap", "cooperation", "propensities", "transfer_groups"} <= media


def test_synthetic_generate_mode(tmp_path, cache):
    dirs = make_datasets(tmp_path / "samples")
    summary = run_evaluate(dirs, tmp_path / "report", cache, ["compare=paper_published"])
    check_artefacts(tmp_path / "report")
    # hand-computed: business PD gap 0.85-0.2, closed to 0.5 -> improvement 0.35/0.65
    scenarios = pd.read_csv(tmp_path / "report" / "transfer_scenarios.csv")
    pd_business = scenarios[(scenarios["game"] == "prisoners_dilemma") & (scenarios["context"] == "business")].iloc[0]
    assert pd_business["improvement"] == pytest.approx(0.35 / 0.65)
    # the team x2 scenario has no base–teacher gap: undefined, reported, left out of the mean
    assert summary["undefined_scenarios"] == [{"split": "oos_payoffs", "game": "prisoners_dilemma_x2", "context": "team", "gap": 0.0}]
    assert summary["improvement"]["oos_payoffs"]["n_defined"] == 1
    assert summary["improvement"]["oos_payoffs"]["value"] == pytest.approx((33 - 24) / (33 - 4))
    # public goods: on mean donations 7.75 (teacher), 4.25 (base), 6.0 (tuned)
    assert summary["improvement"]["oos_game"]["value"] == pytest.approx((4.25 - 6.0) / (4.25 - 7.75))
    assert summary["unparsed"]["base"]["total"] == 1
    assert "paper_published" in summary["compare"]
    assert summary["compare"]["paper_published"]["alignment"]["in_sample"]["value"] == pytest.approx(0.3302, abs=5e-5)
    headline = (tmp_path / "report" / "headline.md").read_text()
    assert "paper (published counts)" in headline and "paper (as printed)" in headline
    warnings = pd.read_csv(tmp_path / "report" / "warnings.csv")["warning"].str.cat(sep=" ")
    assert "prisoners_dilemma_x2/team" in warnings and "unparsed" in warnings


def test_synthetic_score_mode_reports_action_mass(tmp_path, cache):
    dirs = make_datasets(tmp_path / "samples", score=True)
    summary = run_evaluate(dirs, tmp_path / "report", cache)
    check_artefacts(tmp_path / "report")
    assert summary["action_mass"]["teacher"]["mean"] == pytest.approx(0.9)
    props = pd.read_csv(tmp_path / "report" / "propensities.csv")
    assert set(props["mode"]) == {"score"}
    assert summary["unparsed"]["base"]["total"] == 0
    assert "not applicable" in (tmp_path / "report" / "significance_payoffs.md").read_text()
    assert any("score mode with one record per scenario" in w for w in summary["warnings"])


def test_the_report_names_the_evaluated_model_and_adapter_directories(tmp_path, cache, capsys):
    """report.md's first screen: which samples, weights and adapter each of base and tuned are (their manifests)."""
    dirs = make_datasets(tmp_path / "samples", score=True)
    for role, adapter in (("base", None), ("tuned", str(tmp_path / "train" / "adapter"))):
        (dirs[role] / "manifest.json").write_text(json.dumps(
            {"model": MODELS[role], "adapter": adapter, "config": {"model": {"name_or_path": str(tmp_path / "ckpt")}}}))
    summary = run_evaluate(dirs, tmp_path / "report", cache)
    first_screen = (tmp_path / "report" / "report.md").read_text().splitlines()[:25]
    rows = {line.split(" | ")[0].strip("| "): line for line in first_screen if line.startswith("| ")}
    assert str(dirs["base"]) in rows["base"] and str(tmp_path / "ckpt") in rows["base"] and "| none |" in rows["base"]
    assert str(dirs["tuned"]) in rows["tuned"] and str(tmp_path / "train" / "adapter") in rows["tuned"]
    assert summary["evaluated"]["tuned"]["adapter"] == str(tmp_path / "train" / "adapter")
    assert summary["sources"] == {role: str(d) for role, d in dirs.items()}  # as before: what was passed
    assert f"adapter {tmp_path / 'train' / 'adapter'}" in capsys.readouterr().out.replace("\n", "")


# --- bad input --------------------------------------------------------------------------------------

def test_mismatched_scenarios_name_dataset_and_scenario(tmp_path, cache):
    from tomdistill.evaluation import EvaluationError

    dirs = make_datasets(tmp_path / "samples")
    fewer = {k: v for k, v in SCENARIOS.items() if k[2] != "athletes"}
    dirs["tuned"] = write_samples(tmp_path / "tuned_fewer", "tuned", scenarios=fewer)
    with pytest.raises(EvaluationError, match=r"tuned dataset lacks 1 scenario.*snowdrift/athletes"):
        run_evaluate(dirs, tmp_path / "report", cache)


def test_scenario_without_parsed_answers(tmp_path, cache):
    from tomdistill.metrics.propensity import PropensityError

    broken = {k: dict(v) for k, v in SCENARIOS.items()}
    broken[("in_sample", "stag_hunt", "friends")] = {**broken[("in_sample", "stag_hunt", "friends")], "teacher": {"unparsed": 40}}
    dirs = make_datasets(tmp_path / "samples", scenarios=broken)
    with pytest.raises(PropensityError, match=r"teacher dataset, scenario stag_hunt/friends.*no parsed answers"):
        run_evaluate(dirs, tmp_path / "report", cache)


def test_unknown_split_names(tmp_path, cache):
    from tomdistill.evaluation import EvaluationError
    from tomdistill.metrics.propensity import PropensityError

    dirs = make_datasets(tmp_path / "samples")
    with pytest.raises(EvaluationError, match=r"unknown split name\(s\) \['holdout'\]"):
        run_evaluate(dirs, tmp_path / "report", cache, ["metrics.splits=[in_sample,holdout]"])
    odd = {("holdout", "snowdrift", "athletes") if k[2] == "athletes" else k: v for k, v in SCENARIOS.items()}
    dirs["base"] = write_samples(tmp_path / "base_odd", "base", scenarios=odd)
    with pytest.raises(PropensityError, match=r"base dataset, scenario snowdrift/athletes \(holdout\): unknown split name"):
        run_evaluate(dirs, tmp_path / "report", cache)


def test_training_only_augment_split_is_left_out(tmp_path, cache):
    extra = {**SCENARIOS, ("augment", "stag_hunt_x3", "team"): {"teacher": {"C": 5, "D": 5}, "base": {"C": 5, "D": 5},
                                                               "tuned": {"C": 5, "D": 5}}}
    dirs = make_datasets(tmp_path / "samples")
    dirs["teacher"] = write_samples(tmp_path / "teacher_aug", "teacher", scenarios=extra)
    summary = run_evaluate(dirs, tmp_path / "report", cache, ["metrics.splits=[in_sample]"])
    assert summary["alignment"]["overall"]["n_scenarios"] == 2
    assert any("training-only" in w for w in summary["warnings"])


def test_split_filter(tmp_path, cache):
    dirs = make_datasets(tmp_path / "samples")
    summary = run_evaluate(dirs, tmp_path / "report", cache, ["metrics.splits=[in_sample]"])
    assert summary["alignment"]["in_sample"]["n_scenarios"] == 2
    assert summary["alignment"]["oos_context"] == {"value": None, "ci_low": None, "ci_high": None, "n_scenarios": 0}


def test_prompt_version_mismatch_exits_2_with_a_clear_message(tmp_path, cache):
    dirs = make_datasets(tmp_path / "samples")
    dirs["tuned"] = write_samples(tmp_path / "tuned_v2", "tuned", prompt_version="test-v2")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *[f"{r}={d}" for r, d in dirs.items()], f"output={tmp_path / 'r'}",
         f"paths.cache_dir={cache}", "logger=none", f"hydra.run.dir={tmp_path / 'hydra'}"],
        capture_output=True, text=True, env={**os.environ, "PROJECT_ROOT": str(ROOT)}, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "prompt_version mismatch" in proc.stderr and "tuned=test-v2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_dataset_is_a_clear_error(tmp_path, cache):
    from tomdistill.evaluation import EvaluationError

    with pytest.raises(EvaluationError, match=r"no teacher dataset given: pass teacher=DIR"):
        run_evaluate({}, tmp_path / "report", cache)
