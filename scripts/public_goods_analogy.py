"""What the public-goods target asks of a student trained on two-player games: an analogy table.

The student never sees public goods (the `oos_game` split). Whatever it donates there, it can only have
carried over from the two-player games. This script asks the oracle teacher how it plays each in-sample game
in the public-goods scenario's own context, and scores with the evaluation's `alignment` a student that
donated exactly that share of its endowment (or the context's mean over the games). The base student's and
the teacher's public-goods propensities come from an evaluation's `transfer_scenarios.csv`, so the table is the
bar that evaluation's `oos_game` number was measured against.

    python scripts/public_goods_analogy.py --evaluation RUN/evaluate_soft [--catalogue DIR] [--output CSV]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from tomdistill import CATALOGUE_DIR
from tomdistill.metrics.transfer import alignment
from tomdistill.scenarios.catalogue import load_catalogue
from tomdistill.scenarios.oracle import action_probabilities
from tomdistill.scenarios.schema import Scenario


def analogy_table(scenarios: pd.DataFrame, catalogue) -> pd.DataFrame:
    """One row per (public-goods scenario, in-sample game, or `mean of the games`): the teacher's P(C) in that
    game in the scenario's context, and the alignment of a student donating that share."""
    two_player = sorted({game for game, _ in catalogue.splits["in_sample"]})
    rows = []
    for item in scenarios[scenarios["game"].map(lambda g: catalogue.games[g].kind == "public_goods")].itertuples():
        context = catalogue.contexts[item.context]
        shares = {game: action_probabilities(Scenario(catalogue.games[game], context, "analogy"))["C"]
                  for game in two_player}
        shares["mean of the games"] = sum(shares.values()) / len(shares)
        shares["the tuned student (measured)"] = item.p_tuned
        for analogy, share in shares.items():
            rows.append({"game": item.game, "context": item.context, "played_as": analogy,
                         "propensity": share, "p_base": item.p_base, "p_teacher": item.p_teacher,
                         "alignment": alignment([item.p_base], [share], [item.p_teacher])})
    if not rows:
        raise SystemExit("no public-goods scenario in the evaluation's transfer_scenarios.csv")
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluation", required=True, type=Path, help="an evaluate.py output directory")
    parser.add_argument("--catalogue", type=Path, default=CATALOGUE_DIR)
    parser.add_argument("--output", type=Path, default=None, help="also write the table as CSV")
    args = parser.parse_args()
    path = args.evaluation / "transfer_scenarios.csv"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (expected an evaluate.py output directory)")
    table = analogy_table(pd.read_csv(path), load_catalogue(args.catalogue))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.output, index=False)


if __name__ == "__main__":
    main()
