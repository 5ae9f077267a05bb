"""sampler=recorded: a teacher (or student) served from recorded answers — the paper's published counts, a user's
CSV of counts, a user's dataset of answers — into the same records as a model's."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tomdistill.records import MANIFEST, load_samples, read_manifest
from tomdistill.reference import paper_published
from tomdistill.sampling import SamplingConfigError, run
from tomdistill.sampling import runner as runner_module
from tomdistill.sampling.backends import OracleBackend
from tomdistill.sampling.manifest import build_plan
from tomdistill.sampling.oracle_teacher import oracle_settings
from tomdistill.scenarios import UNPARSED, build_messages, prompt_version
from tomdistill.scenarios.prompts import plain_prompt

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "sampler.source=reference:paper_published/teacher"
# two in-sample games in two contexts, named explicitly (within every recording these tests use)
FOUR = ["scenarios.games=[prisoners_dilemma,stag_hunt]", "scenarios.contexts=[team,business]",
        "scenarios.splits=[in_sample]"]


def make_cfg(output: Path, *overrides: str):
    """The config `python sample.py sampler=recorded output=... <overrides>` runs with."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"output={output}", "sampler=recorded", "sampler.progress=false",
                                           *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def published(role: str) -> dict[str, dict[str, int]]:
    """The shipped counts of `role`: scenario id -> action -> count."""
    table = paper_published.counts()
    out: dict[str, dict[str, int]] = {}
    rows = table[table["model"] == role][["game", "context", "action", "count"]]
    for game, context, action, count in rows.itertuples(index=False):
        out.setdefault(f"{game}/{context}", {})[action] = int(count)
    return out


def by_scenario(directory: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for record in load_samples(directory):
        out.setdefault(f"{record['game']}/{record['context']}", []).append(record)
    for records in out.values():
        records.sort(key=lambda r: r["sample_index"])
    return out


def refused(tmp_path, *overrides, match: str) -> str:
    with pytest.raises(SamplingConfigError, match=match) as caught:
        run(make_cfg(tmp_path / "out", *overrides))
    message = str(caught.value)
    assert "\n" not in message  # one line
    return message


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- the shipped published counts -------------------------------------------------------------------------

@pytest.mark.parametrize("role, model", [("teacher", "llama2-70b-chat"), ("base", "llama2-7b-chat"),
                                         ("tuned", "llama2-7b-chat-ft")])
def test_score_mode_serves_the_published_distribution_exactly(tmp_path, catalogue, role, model):
    """Every scenario the counts cover, and only those: P(action) = count / parsed answers, mass = parsed / 300."""
    out = run(make_cfg(tmp_path, f"sampler.source=reference:paper_published/{role}", "sampler.mode=score",
                       "role=teacher"))
    counts, records = published(role), by_scenario(out)
    assert set(records) == set(counts)  # the default selection is narrowed to what was recorded
    version = prompt_version(catalogue, None, answer_prefix=True)
    for sid, (record,) in records.items():
        scenario = catalogue.scenario(*sid.split("/"))
        parsed = sum(c for a, c in counts[sid].items() if a != UNPARSED)
        assert json.loads(record["action_probs"]) == {a: counts[sid].get(a, 0) / parsed for a in scenario.game.actions}
        assert record["action_mass"] == parsed / 300
        assert record["model"] == model and record["prompt_version"] == version and record["split"] == scenario.split
        assert record["prompt"] == plain_prompt(build_messages(scenario, "teacher"))
    if role == "teacher":  # a few by hand: counts.csv, divided by 300 (snowdrift/friends: 231 C, 68 D, 1 unparsed)
        assert json.loads(records["prisoners_dilemma/diplomacy"][0]["action_probs"]) == {"C": 77 / 300, "D": 223 / 300}
        assert json.loads(records["stag_hunt/diplomacy"][0]["action_probs"]) == {"C": 120 / 300, "D": 180 / 300}
        friends = records["snowdrift/friends"][0]
        assert json.loads(friends["action_probs"]) == {"C": 231 / 299, "D": 68 / 299}
        assert friends["action_mass"] == 299 / 300
        goods = json.loads(records["public_goods/party"][0]["action_probs"])
        assert goods["7"] == 1.0 and sum(goods.values()) == 1.0
    manifest, plan = read_manifest(out), json.loads((out / "plan.json").read_text())
    assert manifest["model"] == plan["model"] == model and manifest["backend"] == "recorded"
    assert manifest["recording"] == {"source": f"reference:paper_published/{role}", "kind": "counts",
                                     "sha256": plan["source_sha256"]}
    assert plan["source"] == f"reference:paper_published/{role}" and len(plan["source_sha256"]) == 64


def test_generate_mode_draws_from_the_counts_deterministically_per_seed(tmp_path):
    args = (TEACHER, "sampler.n=60", "sampler.shard_size=25", *FOUR)
    first, second = by_scenario(run(make_cfg(tmp_path / "a", *args))), by_scenario(run(make_cfg(tmp_path / "b", *args)))
    other = by_scenario(run(make_cfg(tmp_path / "c", *args, "seed=1")))
    actions = {sid: [r["action"] for r in records] for sid, records in first.items()}
    assert actions == {sid: [r["action"] for r in records] for sid, records in second.items()}
    assert actions != {sid: [r["action"] for r in records] for sid, records in other.items()}
    counts = published("teacher")
    for sid, records in first.items():
        assert [r["sample_index"] for r in records] == list(range(60))
        assert {r["action"] for r in records} <= set(counts[sid])
        assert all(r["completion"] == f"Answer: {r['action']}" and r["motivation"] == "" for r in records)
        assert all(r["role"] == "student" and r["action_probs"] == "" and math.isnan(r["action_mass"]) for r in records)
    # 240 draws of four scenarios whose P(C) lie between 0.31 and 0.73: the draws follow the counts
    for sid, records in first.items():
        p = counts[sid]["C"] / 300
        share = sum(r["action"] == "C" for r in records) / len(records)
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / len(records)), (sid, share, p)


def test_generate_mode_with_n_null_draws_as_many_answers_as_were_recorded(tmp_path):
    out = run(make_cfg(tmp_path, TEACHER, "scenarios.games=[public_goods]", "scenarios.splits=[oos_game]",
                       "scenarios.contexts=[party]"))
    records = load_samples(out)
    assert len(records) == 300 and set(records["action"]) == {"7"} and read_manifest(out)["n"] == 300


def test_a_killed_generate_run_resumes_to_the_records_of_a_fresh_one(tmp_path, monkeypatch):
    args = (TEACHER, "sampler.n=30", "sampler.shard_size=7", *FOUR)
    fresh = by_scenario(run(make_cfg(tmp_path / "fresh", *args)))

    real_write, written = runner_module.write_shard, []

    def killed_after_six(directory, shard, records):
        if len(written) == 6:
            raise KeyboardInterrupt("killed")
        written.append(shard.filename)
        return real_write(directory, shard, records)

    out = tmp_path / "killed"
    monkeypatch.setattr(runner_module, "write_shard", killed_after_six)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(out, *args))
    assert not (out / MANIFEST).exists() and len(list((out / "train").glob("shard-*.parquet"))) == 6
    monkeypatch.setattr(runner_module, "write_shard", real_write)
    run(make_cfg(out, *args))
    assert _same(by_scenario(out), fresh)
    assert read_manifest(out)["complete"] is True


def _same(a: dict, b: dict) -> bool:
    """The same records (action_mass is NaN in generate mode, and NaN != NaN)."""
    strip = lambda rs: [{k: v for k, v in r.items() if k != "action_mass"} for r in rs]  # noqa: E731
    return a.keys() == b.keys() and all(strip(a[k]) == strip(b[k]) for k in a)


# --- a user's counts ----------------------------------------------------------------------------------------

def test_a_users_csv_of_counts(tmp_path):
    source = write_csv(tmp_path / "my-teacher.csv", ["game", "context", "action", "count"], [
        ["prisoners_dilemma", "team", "C", 30], ["prisoners_dilemma", "team", "D", 10],
        ["stag_hunt", "team", "C", 15], ["stag_hunt", "team", "D", 20], ["stag_hunt", "team", UNPARSED, 5]])
    out = run(make_cfg(tmp_path / "score", f"sampler.source={source}", "sampler.mode=score"))
    records = by_scenario(out)
    assert set(records) == {"prisoners_dilemma/team", "stag_hunt/team"}  # narrowed to the recording
    assert json.loads(records["prisoners_dilemma/team"][0]["action_probs"]) == {"C": 0.75, "D": 0.25}
    assert records["prisoners_dilemma/team"][0]["action_mass"] == 1.0
    assert json.loads(records["stag_hunt/team"][0]["action_probs"]) == {"C": 15 / 35, "D": 20 / 35}
    assert records["stag_hunt/team"][0]["action_mass"] == 35 / 40
    assert {r["model"] for rs in records.values() for r in rs} == {"my-teacher"}  # the file's stem
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source"] == str(source.resolve()) and plan["model"] == "my-teacher"

    named = by_scenario(run(make_cfg(tmp_path / "named", f"sampler.source={source}", "sampler.model_name=gpt-x",
                                     "sampler.mode=score")))
    assert {r["model"] for rs in named.values() for r in rs} == {"gpt-x"}
    drawn = by_scenario(run(make_cfg(tmp_path / "drawn", f"sampler.source={source}")))  # n = 40 as recorded
    assert {sid: len(rs) for sid, rs in drawn.items()} == {"prisoners_dilemma/team": 40, "stag_hunt/team": 40}


def test_a_changed_recording_is_another_plan(tmp_path):
    source = write_csv(tmp_path / "counts.csv", ["game", "context", "action", "count"],
                       [["prisoners_dilemma", "team", "C", 3], ["prisoners_dilemma", "team", "D", 1]])
    run(make_cfg(tmp_path / "out", f"sampler.source={source}", "sampler.mode=score"))
    write_csv(source, ["game", "context", "action", "count"],
              [["prisoners_dilemma", "team", "C", 2], ["prisoners_dilemma", "team", "D", 2]])
    refused(tmp_path, f"sampler.source={source}", "sampler.mode=score", match="another configuration.*source_sha256")


# --- a user's sampled answers -------------------------------------------------------------------------------

ANSWERS = [  # (game, context, answer, motivation), in the order drawn
    ("prisoners_dilemma", "team", "C", "We win together."),
    ("stag_hunt", "team", "Answer: D", "Safer."),
    ("prisoners_dilemma", "team", "I choose to defect.", "They might defect."),
    ("prisoners_dilemma", "team", "no idea", ""),
    ("stag_hunt", "team", "d", "Still safer."),
    ("stag_hunt", "team", '{"answer": "C"}', "Trust."),
    ("prisoners_dilemma", "team", "Answer: C", "Team first."),
]


def test_a_users_parquet_of_answers_with_motivations(tmp_path):
    source = tmp_path / "api-run.parquet"
    pd.DataFrame(ANSWERS, columns=["game", "context", "answer", "motivation"]).to_parquet(source)
    records = by_scenario(run(make_cfg(tmp_path / "gen", f"sampler.source={source}", "role=teacher", "sampler.n=3")))
    dilemma = records["prisoners_dilemma/team"]
    assert [(r["sample_index"], r["completion"], r["action"], r["motivation"]) for r in dilemma] == [
        (0, "C", "C", "We win together."), (1, "I choose to defect.", "D", "They might defect."),
        (2, "no idea", UNPARSED, "")]
    assert [(r["action"], r["motivation"]) for r in records["stag_hunt/team"]] == [
        ("D", "Safer."), ("D", "Still safer."), ("C", "Trust.")]
    assert {r["model"] for r in dilemma} == {"api-run"} and {r["role"] for r in dilemma} == {"teacher"}

    scored = by_scenario(run(make_cfg(tmp_path / "score", f"sampler.source={source}", "sampler.mode=score")))
    (dilemma,) = scored["prisoners_dilemma/team"]
    assert json.loads(dilemma["action_probs"]) == {"C": 2 / 3, "D": 1 / 3} and dilemma["action_mass"] == 0.75
    students = by_scenario(run(make_cfg(tmp_path / "student", f"sampler.source={source}", "sampler.n=3")))
    assert {r["motivation"] for rs in students.values() for r in rs} == {""}  # a student's answer alone


def test_a_users_csv_of_answers_without_motivations(tmp_path):
    source = write_csv(tmp_path / "answers.csv", ["game", "context", "answer"], [a[:3] for a in ANSWERS])
    refused(tmp_path, f"sampler.source={source}", "role=teacher", "sampler.n=3",
            match=r"role=teacher: motivations were not recorded .*no motivation column.*role=student.*"
                  r"sampler.mode=score")
    students = by_scenario(run(make_cfg(tmp_path / "student", f"sampler.source={source}", "sampler.n=3")))
    assert [r["action"] for r in students["prisoners_dilemma/team"]] == ["C", "D", UNPARSED]
    scored = by_scenario(run(make_cfg(tmp_path / "score", f"sampler.source={source}", "sampler.mode=score",
                                      "role=teacher")))  # score mode asks for no motivation
    assert json.loads(scored["stag_hunt/team"][0]["action_probs"]) == {"C": 1 / 3, "D": 2 / 3}


def test_a_users_jsonl_of_answers(tmp_path):
    source = tmp_path / "hosted.jsonl"
    lines = [json.dumps({"game": g, "context": c, "answer": a, "motivation": m, "id": i})
             for i, (g, c, a, m) in enumerate(ANSWERS)]
    source.write_text("\n".join(lines[:3] + ["", *lines[3:]]) + "\n")  # a blank line is skipped
    records = by_scenario(run(make_cfg(tmp_path / "out", f"sampler.source={source}", "role=teacher", "sampler.n=3")))
    assert [r["action"] for r in records["stag_hunt/team"]] == ["D", "D", "C"]
    source.write_text("\n".join(lines[:3] + ['{"game": "stag_hunt", "context": "team", "answer": "C"'] + lines[3:]))
    refused(tmp_path, f"sampler.source={source}", match=r"hosted\.jsonl, line 4: not a JSON object")


def test_motivations_inside_the_answers_and_quoted_multi_line_fields(tmp_path):
    """Without a motivation column a teacher's motivation is read from the answer after `Motivation:`; a quoted field
    may span lines (rows 2-4 and 5-6 here), and an error names the line its row starts on."""
    rows = [["prisoners_dilemma", "team", "Answer: C\nMotivation: we are a team,\nand it shows."],
            ["prisoners_dilemma", "team", "Answer: D\nMotivation: just in case."]]
    source = write_csv(tmp_path / "full.csv", ["game", "context", "answer"], rows)
    records = by_scenario(run(make_cfg(tmp_path / "out", f"sampler.source={source}", "role=teacher")))
    assert [(r["action"], r["motivation"]) for r in records["prisoners_dilemma/team"]] == [
        ("C", "we are a team,\nand it shows."), ("D", "just in case.")]
    write_csv(source, ["game", "context", "answer"], [*rows, ["chess", "team", "C"]])
    refused(tmp_path, f"sampler.source={source}", match=r"full\.csv, line 7: unknown game 'chess'")


# --- refusals -----------------------------------------------------------------------------------------------

def test_selected_scenarios_the_recording_lacks_are_named(tmp_path):
    source = write_csv(tmp_path / "rec.csv", ["game", "context", "action", "count"],
                       [["prisoners_dilemma", "team", "C", 1], ["stag_hunt", "team", "D", 1]])
    message = refused(tmp_path, f"sampler.source={source}", "sampler.mode=score", *FOUR,
                      match=r"scenarios: 2 selected scenario\(s\) are not in the recording")
    assert "prisoners_dilemma/business" in message and "stag_hunt/business" in message and "/team" not in message


def test_role_teacher_in_generate_mode_without_recorded_motivations_is_refused(tmp_path):
    refused(tmp_path, TEACHER, "role=teacher", *FOUR,
            match=r"role=teacher: motivations were not recorded in reference:paper_published/teacher \(answer counts")


def test_more_answers_than_recorded_is_refused_naming_the_scenario_and_count(tmp_path):
    source = write_csv(tmp_path / "answers.csv", ["game", "context", "answer"], [a[:3] for a in ANSWERS])
    refused(tmp_path, f"sampler.source={source}", "sampler.n=5",
            match=r"sampler\.n=5: more answers than were recorded for 2 scenario\(s\): prisoners_dilemma/team \(4\), "
                  r"stag_hunt/team \(3\); set sampler\.n ≤ 3")
    refused(tmp_path, f"sampler.source={source}", "sampler.n=4",
            match=r"sampler\.n=4: more answers than were recorded for 1 scenario\(s\): stag_hunt/team \(3\);")
    refused(tmp_path, f"sampler.source={source}",  # n=null: as many as recorded, which differs
            match=r"sampler\.n=null: the recording holds 3 to 4 answers per scenario \(stag_hunt/team: 3\); "
                  r"set sampler\.n")


@pytest.mark.parametrize("row, match", [
    (["chess", "team", "C", 1], r"bad\.csv, line 3: unknown game 'chess'"),
    (["stag_hunt", "moon", "C", 1], r"bad\.csv, line 3: unknown context 'moon'"),
    (["stag_hunt", "team", "X", 1], r"bad\.csv, line 3: action 'X' is none of stag_hunt's actions"),
    (["stag_hunt", "team", "C", "many"], r"bad\.csv, line 3: count 'many' is not a whole number"),
    (["prisoners_dilemma", "team", "C", 2], r"bad\.csv, line 3: prisoners_dilemma/team action 'C' is counted twice "
                                            r"\(first at line 2\)"),
])
def test_a_bad_row_is_refused_naming_file_and_line(tmp_path, row, match):
    source = write_csv(tmp_path / "bad.csv", ["game", "context", "action", "count"],
                       [["prisoners_dilemma", "team", "C", 1], row])
    refused(tmp_path, f"sampler.source={source}", "sampler.mode=score", match=match)


def test_a_bad_row_of_a_parquet_is_named_by_its_row(tmp_path):
    source = tmp_path / "answers.parquet"
    pd.DataFrame([("stag_hunt", "team", "C"), ("stag_hunt", "mars", "D")],
                 columns=["game", "context", "answer"]).to_parquet(source)
    refused(tmp_path, f"sampler.source={source}", match=r"answers\.parquet, row 2: unknown context 'mars'")


def test_a_split_that_disagrees_with_the_catalogue_is_refused(tmp_path):
    source = write_csv(tmp_path / "split.csv", ["split", "game", "context", "action", "count"],
                       [["oos_context", "prisoners_dilemma", "team", "C", 1]])
    refused(tmp_path, f"sampler.source={source}", "sampler.mode=score",
            match=r"line 2: split 'oos_context', but the catalogue puts prisoners_dilemma/team in 'in_sample'")


def test_a_malformed_header_names_the_file_and_the_expected_columns(tmp_path):
    source = write_csv(tmp_path / "odd.csv", ["scenario", "choice", "n"], [["pd/team", "C", 1]])
    message = refused(tmp_path, f"sampler.source={source}", match=r"odd\.csv: header \['scenario', 'choice', 'n'\]")
    assert "game,context,action,count" in message and "game,context,answer" in message


def test_a_file_of_several_models_is_refused(tmp_path):
    source = write_csv(tmp_path / "mixed.csv", ["game", "context", "action", "count", "model"],
                       [["stag_hunt", "team", "C", 1, "a"], ["stag_hunt", "team", "D", 1, "b"]])
    refused(tmp_path, f"sampler.source={source}", "sampler.mode=score", match=r"rows of several models \['a', 'b'\]")


@pytest.mark.parametrize("overrides, match", [
    ((), r"sampler\.source: sampler=recorded needs the recording"),
    (("sampler.source=reference:paper_published/judge",), r"unknown role 'judge'"),
    (("sampler.source=reference:elsewhere/teacher",), r"unknown reference data 'elsewhere'"),
    (("sampler.source=/no/such/answers.csv",), r"sampler\.source=/no/such/answers\.csv: no such file"),
    ((TEACHER, "adapter=/some/adapter"), r"adapter: the recorded backend is not a language model"),
    ((TEACHER, "scenarios.shuffle_outcomes=true"), r"scenarios\.shuffle_outcomes=true"),
    ((TEACHER, "sampler.n=0"), r"sampler\.n: must be a whole number"),
])
def test_bad_recorded_settings_name_the_key(tmp_path, overrides, match):
    refused(tmp_path, *overrides, match=match)


def test_the_other_backends_refuse_a_source_and_keep_their_plan(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"output={tmp_path}", "sampler=oracle", "+sampler.source=x.csv"])
    with pytest.raises(SamplingConfigError, match=r"sampler\.source: only sampler=recorded reads it"):
        run(cfg)
    from helpers import oracle_config

    settings = oracle_settings(oracle_config(), "generate")  # the oracle teacher's cache name hashes its plan
    plan = build_plan(settings, OracleBackend(settings).name, "v", ["a/b"])
    assert "source" not in plan and "model_name" not in plan and "source_sha256" not in plan


# --- the real entry point -----------------------------------------------------------------------------------

def test_sample_py_serves_the_published_teacher_in_score_mode(tmp_path):
    out = tmp_path / "teacher"
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "sampler=recorded", TEACHER,
                             "sampler.mode=score", "role=teacher", "sampler.progress=false", f"output={out}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = load_samples(out, name="teacher")
    assert len(records) == len(published("teacher")) and set(records["model"]) == {"llama2-70b-chat"}
    assert read_manifest(out)["complete"] is True and "samples: " in result.stdout
    refusal = subprocess.run([sys.executable, str(ROOT / "sample.py"), "sampler=recorded", TEACHER, "role=teacher",
                              f"output={tmp_path / 'refused'}"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert refusal.returncode == 2 and "Traceback" not in refusal.stderr
    assert "sample.py: error: role=teacher: motivations were not recorded" in refusal.stderr


def test_the_recorded_paper_models_evaluate_to_the_published_counts_numbers(tmp_path):
    """The 70b teacher and the paper's 7b students served by sampler=recorded (score mode) go through evaluate.py like
    any samples and give the transfer numbers that `compare=paper_published` computes from the counts themselves."""
    sources = {role: run(make_cfg(tmp_path / role, f"sampler.source=reference:paper_published/{role}",
                                  "sampler.mode=score", f"role={'teacher' if role == 'teacher' else 'student'}"))
               for role in paper_published.ROLES}
    out = tmp_path / "evaluation"
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *(f"{r}={d}" for r, d in sources.items()),
                             "compare=paper_published", "metrics.n_bootstrap=1000", f"output={out}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == {role: paper_published.MODELS[role] for role in paper_published.ROLES}
    paper = summary["compare"]["paper_published"]
    for metric in ("improvement", "alignment"):
        for split in ("in_sample", "oos_context", "oos_payoffs", "oos_game", "overall"):
            ours, theirs = summary[metric][split]["value"], paper[metric][split]["value"]
            assert ours == pytest.approx(theirs, abs=1e-12), (metric, split)
    assert summary["improvement"]["in_sample"]["value"] == pytest.approx(0.4665, abs=1e-4)  # docs/paper.md: 46.65%
