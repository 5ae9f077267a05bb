"""Render docs/results.md from results/*.csv and the schema in results/README.md; check a typed row against its run.

    python scripts/render_results.py                 # write docs/results.md
    python scripts/render_results.py --check         # exit 1, one line, when the committed docs/results.md is stale
    python scripts/render_results.py row --summary RUN/evaluate_soft/summary.json
    python scripts/render_results.py row --split-alignment RUN/split_alignment.json
    python scripts/render_results.py check-row 31 --summary runs/demo_seeds/evaluate_soft_s0/summary.json
    python scripts/render_results.py study runs/demo_70b --machine "2-core Xeon, AVX512-BF16 + AMX, idle"

results/README.md is the one description of the tables: each `### name` section under "## Schemas" names its files
(`Files:`), how the page shows them (`Rendered:`) and every column's meaning. A CSV no schema claims, a column no
schema describes or a described column no file has is refused in one line. `row` prints the measured columns of a
new `transfer_probes.csv` row from a run's own numbers; `check-row` compares a typed row with them (data rows count
from 1, the header excluded), each number within the precision it was typed with. `study` writes a finished study's
rows into `results/studies.csv` from its own `study.json` (replacing that study's rows of the same commit), and
re-renders docs/results.md and the README's results table, which shows the newest row of each study, variant and set
of seeds (a later row hides the earlier ones whose seeds it covers).
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
SCHEMA_PAGE = RESULTS / "README.md"
PAGE = ROOT / "docs" / "results.md"
PROBES = RESULTS / "transfer_probes.csv"
STUDIES = RESULTS / "studies.csv"
README = ROOT / "README.md"
README_BEGIN = "<!-- results table: rendered by scripts/render_results.py from results/studies.csv -->"
README_END = "<!-- end of the rendered results table -->"
SPLITS = ("in_sample", "heldout_context", "oos_context", "oos_payoffs", "oos_game")


class ResultsError(ValueError):
    """A results table or its schema is inconsistent; the message is one line."""


@dataclass
class Schema:
    name: str
    include: list[str]
    exclude: list[str]
    rendered: str
    description: str
    columns: dict[str, str] = field(default_factory=dict)

    def claims(self, name: str) -> bool:
        return (any(fnmatch.fnmatch(name, p) for p in self.include)
                and not any(fnmatch.fnmatch(name, p) for p in self.exclude))


def read_schemas(page: Path = SCHEMA_PAGE) -> list[Schema]:
    """The `### name` sections under "## Schemas" of results/README.md."""
    text = page.read_text()
    if "\n## Schemas\n" not in text:
        raise ResultsError(f"{page.relative_to(ROOT)}: no '## Schemas' section")
    schemas: list[Schema] = []
    for block in re.split(r"^### ", text.split("\n## Schemas\n", 1)[1], flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        include, exclude, rendered, prose, columns = [], [], "", [], {}
        for line in body.splitlines():
            if line.startswith("Files:"):
                before, _, after = line[len("Files:"):].partition(" except ")
                include, exclude = re.findall(r"`([^`]+)`", before), re.findall(r"`([^`]+)`", after)
            elif line.startswith("Rendered:"):
                rendered = line[len("Rendered:"):].strip()
            elif line.startswith("| `"):
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
                columns[cells[0].strip("`")] = cells[1]
            elif not line.startswith("|"):
                prose.append(line)
        if not include:
            raise ResultsError(f"{page.relative_to(ROOT)}: schema {name.strip()!r} has no 'Files:' line")
        schemas.append(Schema(name.strip(), include, exclude, rendered, "\n".join(prose).strip(), columns))
    return schemas


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def assign(schemas: list[Schema], results: Path = RESULTS) -> dict[str, list[Path]]:
    """{schema name: its CSV files}, every CSV claimed by exactly one schema, every column described."""
    files: dict[str, list[Path]] = {s.name: [] for s in schemas}
    for path in sorted(results.glob("*.csv")):
        owners = [s for s in schemas if s.claims(path.name)]
        if len(owners) != 1:
            raise ResultsError(f"results/{path.name}: claimed by {len(owners)} schemas of results/README.md "
                               f"({', '.join(s.name for s in owners) or 'none'}); expected one")
        header, _ = read_table(path)
        undocumented = [c for c in header if c not in owners[0].columns]
        if undocumented:
            raise ResultsError(f"results/{path.name}: column(s) {', '.join(undocumented)} not described in "
                               f"results/README.md (schema {owners[0].name})")
        files[owners[0].name].append(path)
    for schema in schemas:
        present = {c for path in files[schema.name] for c in read_table(path)[0]}
        absent = [c for c in schema.columns if c not in present]
        if absent:
            raise ResultsError(f"results/README.md: schema {schema.name} describes column(s) {', '.join(absent)} "
                               f"that none of its files has")
    return files


def number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def cell(text: str) -> str:
    """A value as typed, floats with more than 3 decimals rounded to 3; escaped for a Markdown table."""
    text = (text or "").strip()
    if re.fullmatch(r"-?\d+\.\d{4,}", text):
        text = f"{float(text):.3f}"
    elif re.fullmatch(r"-?\d+(\.\d+)?e-?\d+", text):  # e.g. 1.8e-07 from a sweep's float
        text = f"{float(text):.3f}"
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def best_per_fit(header: list[str], rows: list[dict[str, str]]) -> tuple[str, list[str], list[list[str]]]:
    best: dict[str, dict[str, str]] = {}
    for row in rows:
        value = number(row.get("heldout_context", ""))
        if value is None:
            continue
        kept = best.get(row["fit"])
        if kept is None or value > number(kept["heldout_context"]):
            best[row["fit"]] = row
    note = (f"{len(rows)} rows; shown: per fit, the layer and λ with the best `heldout_context` "
            f"({len(best)} rows).")
    return note, header, [[row[c] for c in header] for row in best.values()]


def by_layer_and_step(header: list[str], rows: list[dict[str, str]]) -> tuple[str, list[str], list[list[str]]]:
    steps = sorted({int(r["step"]) for r in rows})
    layers = sorted({int(r["layer"]) for r in rows})
    value = {(int(r["layer"]), int(r["step"])): r["variance_game"] for r in rows}
    note = f"{len(rows)} rows; shown: `variance_game` by layer and step."
    return note, ["layer", *(f"step {s}" for s in steps)], [
        [str(layer), *(value.get((layer, s), "") for s in steps)] for layer in layers]


def every_row(header: list[str], rows: list[dict[str, str]]) -> tuple[str, list[str], list[list[str]]]:
    return f"{len(rows)} rows.", header, [[row[c] for c in header] for row in rows]


VIEWS = {"readout_probe": best_per_fit, "readout_probe_checkpoints": by_layer_and_step}


def render(schemas: list[Schema] | None = None, results: Path = RESULTS) -> str:
    schemas = read_schemas() if schemas is None else schemas
    files = assign(schemas, results)
    out = ["# Results", "",
           "<!-- generated by scripts/render_results.py from results/*.csv and results/README.md: do not edit -->",
           "",
           "Every table of [`results/`](../results/README.md), rendered: the schema and the rules for adding a row are",
           "in [results/README.md](../results/README.md), what the numbers say in [findings.md](findings.md).",
           "Regenerate with `python scripts/render_results.py` (`--check` in CI).", "", "Tables:", ""]
    for schema in schemas:
        for path in files[schema.name]:
            out.append(f"- [{path.name}](#{path.stem.lower()}) ({schema.name})")
    for schema in schemas:
        out += ["", f"## Schema `{schema.name}`", "", schema.description, "", "Rendered: " + schema.rendered, ""]
        out += markdown_table(["column", "meaning"], [[f"`{c}`", m] for c, m in schema.columns.items()])
        view = VIEWS.get(schema.name, every_row)
        for path in files[schema.name]:
            header, rows = read_table(path)
            note, shown_header, shown = view(header, rows)
            out += ["", f"### {path.stem}", "", f"[`results/{path.name}`](../results/{path.name}): {note}", ""]
            out += markdown_table(shown_header, shown)
    return "\n".join(out) + "\n"


# --- a transfer_probes row from a run's own numbers ------------------------------------------------------------

def measured(summary: Path | None = None, split_alignment: Path | None = None) -> dict[str, float | None]:
    """The transfer_probes columns a run's summary.json (evaluate.py) or split_alignment.json (train.py) holds."""
    if summary is not None:
        data = json.loads(summary.read_text())
        align = data.get("alignment", {})
        values = {f"alignment_{s}": align.get(s, {}).get("value") for s in SPLITS}
        values["in_sample_ci_low"] = align.get("in_sample", {}).get("ci_low")
        values["tuned_mass_all_scenarios"] = data.get("action_mass", {}).get("tuned", {}).get("mean")
        values["tuned_mass_public_goods"] = align.get("oos_game", {}).get("action_mass", {}).get("tuned")
        return values
    data = json.loads(split_alignment.read_text())["splits"]
    values = {f"alignment_{s}": data[s]["alignment"] for s in SPLITS if s in data}
    if "oos_game" in data:
        values["tuned_mass_public_goods"] = data["oos_game"]["action_mass"]
    return values


def within_typed_precision(typed: str, value: float) -> bool:
    decimals = len(typed.split(".", 1)[1]) if "." in typed else 0
    return abs(float(typed) - value) <= 0.5 * 10 ** -decimals + 1e-9


def check_row(index: int, values: dict[str, float | None], table: Path = PROBES) -> list[str]:
    """The mismatches between data row `index` (from 1) of `table` and a run's numbers; [] when it matches."""
    _, rows = read_table(table)
    if not 1 <= index <= len(rows):
        raise ResultsError(f"{table.name}: no data row {index} (it has {len(rows)})")
    row, problems = rows[index - 1], []
    for column, value in values.items():
        typed = (row.get(column) or "").strip()
        if value is None or not typed:
            continue
        if number(typed) is None or not within_typed_precision(typed, float(value)):
            problems.append(f"{column}: the row says {typed}, the run {value:.4f}")
    return problems


# --- a study's rows (results/studies.csv) from its own study.json -----------------------------------------------

STUDY_COLUMNS = ["study", "variant", "seeds", *(f"alignment_{s}" for s in SPLITS), *(f"sd_{s}" for s in SPLITS),
                 "tuned_mass_all_scenarios", "train_seconds", "study_seconds", "peak_rss_gb", "machine", "commit",
                 "measured", "command"]


def git_commit() -> str:
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() or "unknown"


def study_rows(study_dir: Path, machine: str, commit: str, measured_on: str) -> list[dict[str, str]]:
    """One row per variant of a finished study (means over its seeds, with their sd), and one for the paper's
    numbers where the study compared against them; numbers to 3 decimals, times from the stages' usage.json."""
    import yaml

    study = json.loads((study_dir / "study.json").read_text())
    if "variants" not in study:
        raise ResultsError(f"{study_dir / 'study.json'}: no 'variants' (written by an older tomdistill): rerun "
                           "the pipeline, which rewrites it from the evaluations")
    overrides = yaml.safe_load((study_dir / ".hydra" / "overrides.yaml").read_text())
    command = " ".join(["python -m tomdistill.pipeline", *(o for o in overrides if not o.startswith("output="))])
    composed = yaml.safe_load((study_dir / ".hydra" / "config.yaml").read_text())
    name = composed["pipeline"]["name"]
    stages = study.get("stages") or {}

    def fixed(value) -> str:
        return "" if value is None or value != value else f"{value:.3f}"

    rows = []
    for variant, table in study["variants"].items():
        align = table.get("alignment", {})
        cells = {s: align.get(s) or {} for s in SPLITS}
        seeds = next((c.get("seeds") for c in cells.values() if c.get("seeds")), None)
        # the variant's training stages: `train [soft]`, or `train [soft_s0]` per seed (study.run_name), not `soft_long`'s
        trains = [u["seconds"] for n, u in stages.items()
                  if n == f"train [{variant}]" or re.fullmatch(rf"train \[{re.escape(variant)}_s\d+\]", n)]
        row = {"study": name, "variant": variant, "seeds": " ".join(map(str, seeds or [composed.get("seed", "")])),
               **{f"alignment_{s}": fixed(c.get("value")) for s, c in cells.items()},
               **{f"sd_{s}": fixed(c.get("sd")) for s, c in cells.items()},
               "tuned_mass_all_scenarios": fixed(((table.get("action_mass") or {}).get("tuned") or {}).get("mean")),
               "train_seconds": f"{sum(trains) / len(trains):.0f}" if trains else "",
               "study_seconds": f"{sum(u['seconds'] for u in stages.values()):.0f}" if stages else "",
               "peak_rss_gb": f"{max(u['peak_rss_gb'] for u in stages.values()):.2f}" if stages else "",
               "machine": machine, "commit": commit, "measured": measured_on, "command": command}
        if "action_mass" not in table:  # the paper's own row: nothing trained or timed here
            row.update(train_seconds="", study_seconds="", peak_rss_gb="", machine="", seeds="")
        rows.append(row)
    return rows


def write_study_rows(rows: list[dict[str, str]], table: Path = STUDIES) -> None:
    """Upsert into `table` (atomic): a row replaces the one of the same study, variant and commit."""
    kept = read_table(table)[1] if table.exists() else []
    new = {(r["study"], r["variant"], r["commit"]) for r in rows}
    kept = [r for r in kept if (r["study"], r["variant"], r["commit"]) not in new]
    tmp = table.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, STUDY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows([*kept, *rows])
    tmp.replace(table)


def readme_table(table: Path = STUDIES) -> list[str]:
    """The README's results table: the newest row of each study, variant and set of seeds, mean ± sd over seeds.
    A later row hides the earlier ones of its study and variant whose seeds it covers (seed 2 finished, a rerun); a
    one-seed check of newer code does not hide the 3-seed measurement (the commit column tells them apart)."""
    _, rows = read_table(table)
    shown_rows: list[dict[str, str]] = []
    for row in rows:  # rows are appended as measured; a later row takes the place of the first one it covers
        seeds = set(row["seeds"].split())
        covered = [i for i, r in enumerate(shown_rows) if (r["study"], r["variant"]) == (row["study"], row["variant"])
                   and set(r["seeds"].split()) <= seeds]
        if covered:
            shown_rows[covered[0]] = row
            shown_rows = [r for i, r in enumerate(shown_rows) if i not in covered[1:]]
        else:
            shown_rows.append(row)

    def shown(row: dict[str, str], split: str) -> str:
        value, sd = row[f"alignment_{split}"], row[f"sd_{split}"]
        if not value:
            return "—"
        return f"{float(value):.2f} ± {float(sd):.2f}" if sd else f"{float(value):.2f}"

    header = ["study", "variant", "seeds", "trained", "held-out context", "new contexts", "doubled payoffs",
              "public goods", "study time, peak memory, machine, commit"]
    lines = markdown_table(header, [
        [f"`{r['study']}`", r["variant"], r["seeds"], *(shown(r, s) for s in SPLITS),
         (f"{r['study_seconds']} s, {r['peak_rss_gb']} GB, {r['machine']}, {r['commit']}" if r["study_seconds"]
          else f"published counts, evaluated at {r['commit']}")]
        for r in shown_rows])
    return [README_BEGIN, *lines, README_END]


def render_readme(text: str, table: Path = STUDIES) -> str:
    if README_BEGIN not in text or README_END not in text:
        raise ResultsError(f"README.md: no rendered results table (the lines {README_BEGIN!r} … {README_END!r})")
    before, rest = text.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    return before + "\n".join(readme_table(table)) + after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/results.md is not what this renders")
    sub = parser.add_subparsers(dest="command")
    for name in ("row", "check-row"):
        cmd = sub.add_parser(name)
        if name == "check-row":
            cmd.add_argument("index", type=int, help="data row of results/transfer_probes.csv, from 1")
        source = cmd.add_mutually_exclusive_group(required=True)
        source.add_argument("--summary", type=Path, help="the run's evaluate_*/summary.json")
        source.add_argument("--split-alignment", type=Path, help="the run's split_alignment.json")
    study = sub.add_parser("study", help="write a finished study's rows into results/studies.csv")
    study.add_argument("study_dir", type=Path, help="the study's directory (runs/<name>)")
    study.add_argument("--machine", required=True, help="the machine and its load, e.g. '2-core Xeon, AMX, idle'")
    study.add_argument("--commit", default=None, help="the commit whose code ran the study (default: HEAD)")
    args = parser.parse_args(argv)
    try:
        if args.command == "study":
            import datetime

            rows = study_rows(args.study_dir, args.machine, args.commit or git_commit(),
                              datetime.date.today().isoformat())
            write_study_rows(rows)
            print(f"wrote {len(rows)} row(s) of {args.study_dir} into {STUDIES.relative_to(ROOT)}")
            args.command, args.check = None, False  # and render the page and the README's table from them
        if args.command:
            values = measured(args.summary, args.split_alignment)
            if args.command == "row":
                writer = csv.writer(sys.stdout, lineterminator="\n")
                writer.writerow(values)
                writer.writerow("" if v is None else f"{v:.3f}" for v in values.values())
                return 0
            problems = check_row(args.index, values)
            for problem in problems:
                print(f"transfer_probes.csv row {args.index}: {problem}", file=sys.stderr)
            if not problems:
                print(f"transfer_probes.csv row {args.index} matches {args.summary or args.split_alignment}")
            return 1 if problems else 0
        text, readme = render(), render_readme(README.read_text())
        if args.check:
            stale = [p.relative_to(ROOT).as_posix() for p, t in ((PAGE, text), (README, readme))
                     if not p.exists() or p.read_text() != t]
            if stale:
                print(f"{' and '.join(stale)} stale: run python scripts/render_results.py", file=sys.stderr)
                return 1
            return 0
        for path, content in ((PAGE, text), (README, readme)):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(content)
            tmp.replace(path)
        print(f"wrote {PAGE.relative_to(ROOT)} and the results table of README.md")
        return 0
    except (ResultsError, OSError, KeyError, json.JSONDecodeError) as err:
        print(f"render_results: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
