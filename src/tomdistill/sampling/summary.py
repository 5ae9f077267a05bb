"""What a samples directory says, per scenario: records, unparsed answers, propensity to cooperate.

Generate mode: the share of `C` among parsed answers (public goods: the mean donation in dollars).
Score mode: the model's exact P(C) (public goods: its expected donation). Unparsed answers are
counted and shown, never dropped.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..scenarios import UNPARSED


@dataclass
class ScenarioSummary:
    game: str
    context: str
    split: str
    records: int
    unparsed: int
    cooperation: float | None  # share of C / P(C); mean or expected donation for public goods
    measure: str               # what `cooperation` is

    @property
    def id(self) -> str:
        return f"{self.game}/{self.context}"

    def to_dict(self) -> dict:
        return asdict(self)


def summarise(records, mode: str, amount_games: set[str]) -> list[ScenarioSummary]:
    """Per-scenario summaries of a samples dataset (any mapping of columns, e.g. `datasets.Dataset`).

    `amount_games`: the games whose actions are dollar amounts (public goods).
    """
    groups: dict[tuple[str, str], dict] = {}
    for game, context, split, action, probs in zip(
        records["game"], records["context"], records["split"], records["action"], records["action_probs"]
    ):
        group = groups.setdefault((game, context), {"split": split, "actions": [], "probs": []})
        group["actions"].append(action)
        if probs:
            group["probs"].append(json.loads(probs))
    out = []
    for (game, context), group in groups.items():
        actions = group["actions"]
        parsed = [a for a in actions if a != UNPARSED]
        amounts = game in amount_games
        if mode == "score" and group["probs"]:
            if amounts:
                values = [sum(int(a) * p for a, p in probs.items()) for probs in group["probs"]]
                measure = "expected $"
            else:
                values = [probs.get("C", 0.0) for probs in group["probs"]]
                measure = "P(C)"
            cooperation = sum(values) / len(values)
        elif amounts:
            cooperation = sum(int(a) for a in parsed) / len(parsed) if parsed else None
            measure = "mean $"
        else:
            cooperation = parsed.count("C") / len(parsed) if parsed else None
            measure = "share C"
        out.append(ScenarioSummary(game, context, group["split"], len(actions), len(actions) - len(parsed),
                                   cooperation, measure))
    return out


def summary_table(summaries: list[ScenarioSummary], title: str):
    """A rich table: games as rows, contexts as columns, cooperation (unparsed count) in each cell."""
    from rich.table import Table

    games = list(dict.fromkeys(s.game for s in summaries))
    contexts = list(dict.fromkeys(s.context for s in summaries))
    cells = {(s.game, s.context): s for s in summaries}
    total = sum(s.records for s in summaries)
    unparsed_total = sum(s.unparsed for s in summaries)
    measures = ", ".join(dict.fromkeys(s.measure for s in summaries))
    table = Table(title=title, caption=f"cell: cooperation ({measures}); [red](unparsed answers)[/red]. "
                                      f"Unparsed: {unparsed_total} of {total} records.")
    table.add_column("game", style="bold")
    for context in contexts:
        table.add_column(context, justify="right")
    table.add_column("unparsed", justify="right")
    for game in games:
        row, unparsed = [game], 0
        for context in contexts:
            cell = cells.get((game, context))
            if cell is None:
                row.append("")
                continue
            unparsed += cell.unparsed
            value = "—" if cell.cooperation is None else (
                f"${cell.cooperation:.2f}" if "$" in cell.measure else f"{cell.cooperation:.2f}")
            row.append(value + (f" [red]({cell.unparsed})[/red]" if cell.unparsed else ""))
        row.append(f"[red]{unparsed}[/red]" if unparsed else "0")
        table.add_row(*row)
    return table
