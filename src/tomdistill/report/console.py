"""The printed summary: a rich table of the headline numbers, the paper note and the warnings."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tomdistill.metrics.transfer import HEADLINE_METRIC, TRANSFER_METRICS

from .tables import NULL_SOURCE, off_format_text, percent, present_columns, propensity_label


def _cell(entry: dict) -> str:
    """The value in bold, its interval on a second line (percent); a public-goods split off format says so."""
    if entry.get("off_format"):
        return f"[red]{off_format_text(entry.get('action_mass') or {})}[/red]"
    if entry["value"] is None:
        return "—"
    text = f"[bold]{percent(entry['value'])}[/bold]"
    if entry["ci_low"] is not None and entry["ci_high"] is not None:
        text += f"\n[dim][{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}][/dim]"
    else:
        text += "\n[dim][—][/dim]"  # no interval
    return text


def _null_cell(entry: dict | None) -> str:
    if not entry:
        return "—"
    if entry.get("off_format"):
        return f"[dim]{off_format_text(entry.get('action_mass') or {})}[/dim]"
    return f"[dim]{percent(entry[HEADLINE_METRIC])}[/dim]"


def print_summary(evaluation, summary: dict, output, reference=None, console: Console | None = None) -> None:
    console = console or Console(width=140)
    level = int(round(100 * evaluation.settings["confidence"]))
    table = Table(title=f"Transfer toward the teacher: value and {level}% bootstrap CI (%)", show_lines=True)
    table.add_column("source")
    table.add_column("metric")
    columns = present_columns(evaluation)
    for split in columns:
        table.add_column(split, justify="right")
    rows = [("this run", evaluation)] + ([("paper (published counts)", reference)] if reference is not None else [])
    for source, data in rows:
        for metric in TRANSFER_METRICS:
            headline = data.headline(metric)
            cells = [_cell(headline[c]) for c in columns]
            table.add_row(source, metric, *cells)
        if data is evaluation:  # the null students beside the tuned one: point values of the headline metric
            for name, splits in evaluation.null_headline().items():
                table.add_row(f"[dim]{NULL_SOURCE.format(name)}[/dim]", HEADLINE_METRIC,
                              *[_null_cell(splits.get(c)) for c in columns])
    if "paper_note" in summary:
        from tomdistill.reference.paper_published import PRINTED

        table.add_row("paper (as printed)", "improvement", *[percent(PRINTED[s], 0) if s in PRINTED else "—"
                                                              for s in columns])
    evaluated = summary.get("evaluated") or {}
    for role, name in evaluation.models.items():  # what answered: the model, and the adapter on it where there is one
        facts = evaluated.get(role) or {}
        line = f"{role}: {name}" + (f" + adapter {facts['adapter']}" if facts.get("adapter") else "")
        console.print(escape(line + (f" (samples {facts['samples']})" if facts.get("samples") else "")))
    console.print(table)
    n = evaluation.headline("alignment")
    console.print("scenarios: " + ", ".join(f"{s} {n[s]['n_scenarios']}" for s in columns)
                  + f"; propensity = {propensity_label(evaluation)}; intervals: {evaluation.settings.get('bootstrap')}"
                  + ("; null students: the teacher's training averages, point values" if len(evaluation.null_students)
                     else ""))
    if "paper_note" in summary:
        console.print("note: " + summary["paper_note"], soft_wrap=False)
    folded = summary.get("warnings_folded", evaluation.warnings)  # one line per role and kind; all in warnings.md
    for warning in folded:
        console.print("[yellow]warning:[/yellow] " + escape(warning))
    if len(folded) < len(evaluation.warnings):
        console.print(f"({len(evaluation.warnings)} warnings in all: {escape(str(output))}/warnings.md)")
    console.print(f"report: {output}")
