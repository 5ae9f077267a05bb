"""The printed summary: a rich table of the headline numbers, the paper note and the warnings."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tomdistill.metrics.transfer import TRANSFER_METRICS

from .tables import percent, present_columns, propensity_label


def _cell(entry: dict) -> str:
    """The value in bold, its interval on a second line (percent)."""
    if entry["value"] is None:
        return "—"
    text = f"[bold]{percent(entry['value'])}[/bold]"
    if entry["ci_low"] is not None and entry["ci_high"] is not None:
        text += f"\n[dim][{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}][/dim]"
    else:
        text += "\n[dim][—][/dim]"  # no interval
    return text


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
    if "paper_note" in summary:
        from tomdistill.reference.paper_published import PRINTED

        table.add_row("paper (as printed)", "improvement", *[percent(PRINTED[s], 0) if s in PRINTED else "—"
                                                              for s in columns])
    console.print(", ".join(f"{role}: {name}" for role, name in evaluation.models.items()))
    console.print(table)
    n = evaluation.headline("alignment")
    console.print("scenarios: " + ", ".join(f"{s} {n[s]['n_scenarios']}" for s in columns)
                  + f"; propensity = {propensity_label(evaluation)}; intervals: {evaluation.settings.get('bootstrap')}")
    if "paper_note" in summary:
        console.print("note: " + summary["paper_note"], soft_wrap=False)
    for warning in evaluation.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print(f"report: {output}")
