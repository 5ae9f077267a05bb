"""`sampler=recorded`: a teacher (or student) served from recorded answers instead of a model.

`sampler.source` is one of
- `reference:paper_published/teacher` (`/base`, `/tuned`): the paper's published counts shipped in
  `tomdistill/reference/paper_published/counts.csv` (LLaMa-2-70b chat, the 7b base and the fine-tuned 7b);
- a CSV of answer counts per scenario: columns `game,context,action,count` (optional `split`, `model`), `action`
  being `C`, `D`, a dollar amount or `unparsed`;
- a dataset of sampled answers (`.csv`, `.parquet`, `.jsonl`), one row per answer, in the order they were drawn:
  columns `game,context,answer` (optional `motivation`, `split`, `model`), `answer` being the model's text, parsed
  as sample.py parses a model's (scenarios/parsing.py); without a `motivation` column a teacher's motivation is read
  from the answer text (after `Motivation:`), as for a model's completion.

Score mode gives per scenario the distribution over the parsed answers (`action_probs`) and the share of parsed
answers (`action_mass`, 1 - the unparsed share). Generate mode gives the recorded answers in order (sample `i` is
the `i`-th recorded answer of its scenario), or, from counts, one draw per sample from its own seed.

The records carry this catalogue's `prompt_version` and prompts (what a student trains on and is evaluated with) and
the recording's model identity (`sampler.model_name`; default the reference's model, else the file's stem). The plan
holds the source and a sha256 of its content, so a changed recording is a different plan.

Nothing is dropped silently: a row naming a game, context or scenario the catalogue lacks, an action a game does not
have, a malformed header, scenarios selected that the recording lacks, `n` beyond what was recorded, or motivations
asked for (`role=teacher`, generate mode) that were not recorded are each refused in one line.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..scenarios import SPLITS, UNPARSED, Catalogue, Scenario, answer_text, catalogue_from_config, parse_action
from ..scenarios import parse_motivation
from ..scenarios.prompts import plain_prompt
from .interface import Backend, Completion, GenerationRequest, ScoredScenario
from .settings import SamplerSettings, SamplingConfigError

log = logging.getLogger(__name__)

REFERENCE_PREFIX = "reference:"  # as evaluation.py names the shipped reference data
COUNTS_COLUMNS = ("game", "context", "action", "count")
ANSWERS_COLUMNS = ("game", "context", "answer")
OPTIONAL_COLUMNS = {"counts": ("split", "model"), "answers": ("motivation", "split", "model")}
SUFFIXES = (".csv", ".parquet", ".jsonl")
SHOWN = 20  # scenarios named in one refusal before "… and N more"


class RecordingError(SamplingConfigError):
    """A recording that cannot be served as asked; the message names the source (file and line or row) or the key."""


@dataclass(frozen=True)
class RecordedAnswer:
    text: str        # the recorded answer as given ("" for a draw of an unparsed count)
    action: str      # parsed: C, D, an amount, or unparsed
    motivation: str  # "" where none was recorded


@dataclass
class RecordedCompletion(Completion):
    """A completion that comes parsed: the runner keeps its action and motivation instead of parsing the text."""
    action: str
    motivation: str


@dataclass
class Recording:
    source: str                  # canonical: reference:paper_published/<role>, or the file's absolute path
    kind: str                    # "counts" | "answers"
    model: str                   # the model identity records carry
    counts: dict[str, dict[str, int]] = field(default_factory=dict)     # scenario id -> action -> answers
    answers: dict[str, list[RecordedAnswer]] = field(default_factory=dict)  # answers kind: in recorded order
    motivations: bool = False    # whether any answer came with a motivation
    motivation_column: bool = False  # answers kind: whether the source has a `motivation` column

    def total(self, scenario_id: str) -> int:
        return sum(self.counts[scenario_id].values())


# --- the source --------------------------------------------------------------------------------------------

def _reference(source: str) -> tuple[str, Path]:
    """The role of a `reference:paper_published/<role>` source and its counts file."""
    from ..reference import paper_published

    name, _, role = source[len(REFERENCE_PREFIX):].partition("/")
    if name != paper_published.NAME:
        raise RecordingError(f"sampler.source={source}: unknown reference data {name!r}; available: "
                             f"{paper_published.NAME} (reference:{paper_published.NAME}/teacher|base|tuned)")
    if role not in paper_published.ROLES:
        raise RecordingError(f"sampler.source={source}: unknown role {role!r}; expected one of "
                             f"{'|'.join(paper_published.ROLES)} (reference:{paper_published.NAME}/<role>)")
    return role, paper_published.COUNTS_FILE


def _file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise RecordingError(
            f"sampler.source={source}: no such file; expected reference:paper_published/teacher|base|tuned, a .csv of "
            f"answer counts ({','.join(COUNTS_COLUMNS)}) or a .csv/.parquet/.jsonl of answers "
            f"({','.join(ANSWERS_COLUMNS)}[,motivation])")
    if path.suffix.lower() not in SUFFIXES:
        raise RecordingError(f"sampler.source={source}: expected a .csv, .parquet or .jsonl file, got {path.suffix!r}")
    return path.resolve()


def _path(source: str) -> Path:
    """The file a source reads."""
    return _reference(source)[1] if source.startswith(REFERENCE_PREFIX) else _file(source)


def canonical_source(source: str) -> str:
    """`source` as the plan records it: the reference name, or the file's absolute path."""
    path = _path(source)
    return source if source.startswith(REFERENCE_PREFIX) else str(path)


def source_sha256(source: str) -> str:
    return hashlib.sha256(_path(source).read_bytes()).hexdigest()


def source_kind(source: str) -> str:
    """"counts" or "answers", from the source's columns."""
    path = _path(source)
    return _kind(path, _rows(path)[0])


def provenance(source: str) -> dict:
    """What plan.json holds of the source: where it is and a hash of its content."""
    return {"source": canonical_source(source), "source_sha256": source_sha256(source)}


def recorded_model_name(settings: SamplerSettings) -> str:
    """The `model` field of the records: `sampler.model_name`, else the reference's model, else the file's stem."""
    if settings.model_name:
        return settings.model_name
    source = settings.source or ""
    if source.startswith(REFERENCE_PREFIX):
        from ..reference import paper_published

        return paper_published.MODELS[_reference(source)[0]]
    return Path(source).stem


# --- reading rows ------------------------------------------------------------------------------------------

def _header_error(path: Path, columns) -> RecordingError:
    return RecordingError(
        f"sampler.source {path}: header {list(columns)} is neither answer counts (columns "
        f"{','.join(COUNTS_COLUMNS)}, optional {','.join(OPTIONAL_COLUMNS['counts'])}) nor answers (columns "
        f"{','.join(ANSWERS_COLUMNS)}, optional {','.join(OPTIONAL_COLUMNS['answers'])})")


def _kind(path: Path, columns) -> str:
    names = set(columns)
    if set(COUNTS_COLUMNS) <= names:
        return "counts"
    if set(ANSWERS_COLUMNS) <= names:
        return "answers"
    raise _header_error(path, columns)


def _rows(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """The columns and rows of a source file, each row with where it is (`line N` or `row N`)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            try:
                header = [c.strip() for c in next(reader)]
            except StopIteration:
                raise _header_error(path, []) from None
            except csv.Error as err:
                raise RecordingError(f"sampler.source {path}, line 1: not a readable CSV ({err})") from None
            rows, line = [], reader.line_num
            try:
                for values in reader:
                    start, line = line + 1, reader.line_num  # a quoted field may span several lines
                    if not any(v.strip() for v in values):
                        continue
                    if len(values) != len(header):
                        raise RecordingError(f"sampler.source {path}, line {start}: {len(values)} fields, but the "
                                             f"header has {len(header)} ({','.join(header)})")
                    rows.append((f"line {start}", dict(zip(header, values))))
            except csv.Error as err:
                raise RecordingError(f"sampler.source {path}, line {reader.line_num}: not a readable CSV ({err})") \
                    from None
        return header, rows
    if suffix == ".jsonl":
        rows = []
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise RecordingError(f"sampler.source {path}, line {number}: not a JSON object ({err.msg})") from None
            if not isinstance(row, dict):
                raise RecordingError(f"sampler.source {path}, line {number}: not a JSON object")
            rows.append((f"line {number}", row))
        # the keys of every object make the header (a row without `game` is then refused by its line)
        return list(dict.fromkeys(k for _, row in rows for k in row)), rows
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several error types for corrupt files
        raise RecordingError(f"sampler.source {path}: not a readable parquet file ({err})") from None
    return table.column_names, [(f"row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _scenario(catalogue: Catalogue, path: Path, where: str, row: dict) -> Scenario:
    game, context = _text(row.get("game")).strip(), _text(row.get("context")).strip()
    if game not in catalogue.games:
        raise RecordingError(f"sampler.source {path}, {where}: unknown game {game!r}; the catalogue has "
                             f"{sorted(catalogue.games)}")
    if context not in catalogue.contexts:
        raise RecordingError(f"sampler.source {path}, {where}: unknown context {context!r}; the catalogue has "
                             f"{sorted(catalogue.contexts)}")
    try:
        scenario = catalogue.scenario(game, context)
    except KeyError:
        raise RecordingError(f"sampler.source {path}, {where}: ({game}, {context}) is no scenario of the catalogue "
                             "(no split pairs that game with that context)") from None
    split = _text(row.get("split")).strip()
    if split and split != scenario.split:
        raise RecordingError(f"sampler.source {path}, {where}: split {split!r}, but the catalogue puts "
                             f"{scenario.id} in {scenario.split!r}")
    return scenario


def load_recording(source: str, catalogue: Catalogue, model: str) -> Recording:
    """The recording `source` names, checked against `catalogue` (every problem named by file and line/row)."""
    role = None
    if source.startswith(REFERENCE_PREFIX):
        role, path = _reference(source)
    else:
        path = _file(source)
    header, rows = _rows(path)
    kind = _kind(path, header)
    if role is not None:  # the shipped counts hold three models: keep the one asked for
        rows = [(where, row) for where, row in rows if row.get("model") == role]
    elif "model" in header:
        models = sorted({_text(row.get("model")) for _, row in rows})
        if len(models) > 1:
            raise RecordingError(f"sampler.source {path}: rows of several models {models[:6]} in one recording; keep "
                                 "one model's rows per file (two models must never pass for one)")
    if not rows:
        raise RecordingError(f"sampler.source {source}: no rows (an empty recording)")
    recording = Recording(source=canonical_source(source), kind=kind, model=model,
                          motivation_column=kind == "answers" and "motivation" in header)
    first_at: dict[tuple[str, str], str] = {}
    for where, row in rows:
        scenario = _scenario(catalogue, path, where, row)
        counts = recording.counts.setdefault(scenario.id, {})
        if kind == "counts":
            action = _text(row.get("action")).strip()
            if action not in (*scenario.game.actions, UNPARSED):
                shown = list(scenario.game.actions) if len(scenario.game.actions) <= 4 else \
                    f"{scenario.game.actions[0]}..{scenario.game.actions[-1]}"
                raise RecordingError(f"sampler.source {path}, {where}: action {action!r} is none of "
                                     f"{scenario.game.name}'s actions ({shown}) nor {UNPARSED!r}")
            count = row.get("count")
            raw = str(int(count)) if isinstance(count, float) and count.is_integer() else _text(count).strip()
            if not (raw.isascii() and raw.isdigit()):
                raise RecordingError(f"sampler.source {path}, {where}: count {raw!r} is not a whole number ≥ 0")
            count = int(raw)
            key = (scenario.id, action)
            if key in first_at:
                raise RecordingError(f"sampler.source {path}, {where}: {scenario.id} action {action!r} is counted "
                                     f"twice (first at {first_at[key]})")
            first_at[key] = where
            counts[action] = count
        else:
            text = _text(row.get("answer"))
            action = parse_action(text, scenario.game)
            motivation = _text(row.get("motivation")).strip() if recording.motivation_column else parse_motivation(text)
            recording.answers.setdefault(scenario.id, []).append(RecordedAnswer(text, action, motivation))
            counts[action] = counts.get(action, 0) + 1
            recording.motivations = recording.motivations or bool(motivation)
    empty = [sid for sid in recording.counts if recording.total(sid) == 0]
    if empty:
        raise RecordingError(f"sampler.source {path}: no answers counted for {_named(empty)}")
    return recording


def _named(ids: list[str]) -> str:
    shown = ", ".join(ids[:SHOWN])
    return shown + (f" … and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")


# --- what the run serves -----------------------------------------------------------------------------------

def serve_recording(cfg, settings: SamplerSettings, selected: list[Scenario]) -> tuple[SamplerSettings, list[Scenario]]:
    """The scenarios the run serves and its settings with `n` known, or a one-line refusal.

    Scenario coverage: a selection left at everything the catalogue evaluates (scenarios.splits at its four evaluated
    splits, no games or contexts filter) is narrowed to the scenarios the recording covers; a narrower or other
    selection (a filter, a split left out, the augment split added) must lie within the recording, else the scenarios
    it lacks are named."""
    scenarios_cfg = cfg.scenarios
    if scenarios_cfg.get("shuffle_outcomes"):
        raise RecordingError("scenarios.shuffle_outcomes=true: a recording's answers were given to prompts of their "
                             "own; their outcome order cannot be shuffled afterwards (leave it false with "
                             "sampler=recorded)")
    catalogue = catalogue_from_config(scenarios_cfg)
    recording = load_recording(settings.source, catalogue, recorded_model_name(settings))
    covered = recording.counts
    evaluated = {s.id for s in catalogue.scenarios([s for s in SPLITS if s in catalogue.splits])}
    if {s.id for s in selected} == evaluated:
        served = [s for s in selected if s.id in covered]
        if not served:
            raise RecordingError(f"sampler.source={settings.source}: the recording covers none of the catalogue's "
                                 f"evaluated scenarios (it covers {_named(sorted(covered))}); select them with "
                                 "scenarios.splits")
        if len(served) < len(selected):
            log.info("sampler=recorded: serving the %d scenarios %s covers, of the %d the catalogue evaluates (not "
                     "recorded: %s)", len(served), recording.source, len(selected),
                     _named([s.id for s in selected if s.id not in covered]))
    else:
        missing = [s.id for s in selected if s.id not in covered]
        if missing:
            raise RecordingError(f"scenarios: {len(missing)} selected scenario(s) are not in the recording "
                                 f"{recording.source}: {_named(missing)}; leave them out (scenarios.splits/games/"
                                 "contexts), or leave the selection at its default to serve what was recorded")
        served = selected
    if settings.mode == "score":
        unparsed_only = [s.id for s in served if not any(a != UNPARSED for a in covered[s.id])]
        if unparsed_only:
            raise RecordingError(f"sampler.mode=score: every recorded answer of {_named(unparsed_only)} is unparsed, "
                                 "so there is no choice distribution to serve; leave them out (scenarios.games/"
                                 "contexts) or use sampler.mode=generate")
        return settings, served
    if settings.role == "teacher" and not recording.motivations:
        why = ("answer counts hold none" if recording.kind == "counts" else "its motivation column is empty"
               if recording.motivation_column else "no motivation column, and no 'Motivation:' in the answers")
        raise RecordingError(f"role=teacher: motivations were not recorded in {recording.source} ({why}); use "
                             "role=student for the answers alone, or sampler.mode=score for the choice distribution")
    n = settings.n
    if n is None:  # as many as were recorded
        totals = sorted({recording.total(s.id) for s in served})
        if len(totals) > 1:
            smallest = min(served, key=lambda s: recording.total(s.id))
            raise RecordingError(f"sampler.n=null: the recording holds {totals[0]} to {totals[-1]} answers per "
                                 f"scenario ({smallest.id}: {totals[0]}); set sampler.n")
        n = totals[0]
    elif recording.kind == "answers":
        short = [s for s in served if recording.total(s.id) < n]
        if short:
            listing = _named([f"{s.id} ({recording.total(s.id)})" for s in short])
            raise RecordingError(f"sampler.n={n}: more answers than were recorded for {len(short)} scenario(s): "
                                 f"{listing}; set sampler.n ≤ {min(recording.total(s.id) for s in short)}")
    return replace(settings, n=n), served


# --- the backend -------------------------------------------------------------------------------------------

class RecordedBackend(Backend):
    """Serves a `Recording`: exact shares in score mode, recorded answers (or seeded draws from counts) in generate."""

    def __init__(self, recording: Recording, settings: SamplerSettings, shuffle_seed: int | None = None):
        super().__init__(settings, shuffle_seed)
        self.recording = recording
        self.name = recording.model

    @classmethod
    def from_config(cls, cfg, settings: SamplerSettings, shuffle_seed: int | None = None) -> "RecordedBackend":
        catalogue = catalogue_from_config(cfg.scenarios)
        return cls(load_recording(settings.source, catalogue, recorded_model_name(settings)), settings, shuffle_seed)

    def prompt(self, scenario: Scenario) -> str:
        return plain_prompt(self.messages(scenario))  # no tokenizer, so no chat template (as the oracle)

    def _counts(self, scenario: Scenario) -> dict[str, int]:
        try:
            return self.recording.counts[scenario.id]
        except KeyError:
            raise RecordingError(f"sampler.source={self.recording.source}: {scenario.id} is not in the recording") \
                from None

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        out = []
        for request in requests:
            counts = self._counts(request.scenario)
            if self.recording.kind == "answers":
                if request.indices is None:
                    raise RuntimeError("the recorded backend serves answers by sample index; the request has none")
                answers = self.recording.answers[request.scenario.id]
                if max(request.indices, default=-1) >= len(answers):
                    raise RecordingError(f"sampler.n: {request.scenario.id} has {len(answers)} recorded answers, "
                                         f"sample {max(request.indices)} asked for")
                chosen = [answers[i] for i in request.indices]
            else:
                chosen = [self._draw(request.scenario, counts, seed) for seed in request.seeds]
            out.append([RecordedCompletion(a.text, 0, a.action, a.motivation) for a in chosen])
        return out

    @staticmethod
    def _draw(scenario: Scenario, counts: dict[str, int], seed: int) -> RecordedAnswer:
        """One answer drawn from the counts with its own seed (integer arithmetic: the same on every platform)."""
        order = [a for a in (*scenario.game.actions, UNPARSED) if counts.get(a)]
        k = random.Random(seed).randrange(sum(counts[a] for a in order))
        for action in order:
            k -= counts[action]
            if k < 0:
                return RecordedAnswer(answer_text(action) if action != UNPARSED else "", action, "")
        raise AssertionError("unreachable")

    def score(self, scenarios: list[Scenario]) -> list[ScoredScenario]:
        scored = []
        for scenario in scenarios:
            counts = self._counts(scenario)
            parsed = sum(c for a, c in counts.items() if a != UNPARSED)
            total = sum(counts.values())
            probs = {a: counts.get(a, 0) / parsed for a in scenario.game.actions}
            scored.append(ScoredScenario(self.prompt(scenario), probs, parsed / total))
        return scored
