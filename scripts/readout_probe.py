"""What the base student already knows: a linear read-out of the teacher from its frozen features.

For every scenario the base model (no adapter) reads the student prompt up to the answer prefix; its
hidden state at the last position, at each layer, is the feature vector. A ridge regression fitted on
the trained scenarios (the in-sample split without the held-out context) predicts the teacher's
log-odds of C, and the prediction is scored with the evaluation's `alignment` on each split. This is
the least an adapter can do (change the read-out alone), so it separates "the features carry the
game" from "the optimiser has to build them". It also reports how much of the feature variance at
the last position is explained by the context and how much by the game.

    python scripts/readout_probe.py [--variants K] [--scales S ...] [--training-contexts [LIST[+LIST] ...]] [--held-out CONTEXT]
                                    [--adapter RUN/adapter [--checkpoint CKPT ...]] [--output results/readout_probe.csv]

`--variants K` adds a second fit on the trained scenarios plus the catalogue's `augment` split
(K payoff variants per in-sample game, docs/scenarios.md) in the same contexts; `--scales S …` one on the trained
scenarios plus the in-sample games with every payoff × S (`scenarios.augment.scales`), and one on all three when
both are given: whether rescaled games teach the doubled payoffs. `--training-contexts` adds one
on the trained scenarios plus every in-sample game in the catalogue's training-only contexts
(`scenarios.training_contexts`): whether more social framings make the new contexts reachable. Name lists of
`conf/scenarios/default.yaml` to compare sets, one fit each, `+` joining lists into one set:
`--training-contexts training_contexts training_contexts+paired_training_contexts`. `heldout_coordination` is the
held-out context's stag hunt and prisoner's delight alone, where a tuned student's held-out error lies. `--adapter` reads a trained
student instead (a LoRA adapter directory, loaded with plain `peft`): where the game sits after training.
`--checkpoint` reads the adapter weights of Lightning checkpoints of that run (e.g. one every 5 steps) into it, one
after another, and writes only the variance shares per checkpoint and layer: when the game reaches the answer position.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from tomdistill.metrics.transfer import alignment
from tomdistill.model.loading import load_causal_lm, load_tokenizer
from tomdistill.scenarios.catalogue import load_catalogue
from tomdistill.scenarios.oracle import action_probabilities
from tomdistill.scenarios.schema import AUGMENT_SPLIT
from tomdistill.scoring import score_prompt

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ["in_sample", "oos_context", "oos_payoffs", AUGMENT_SPLIT]  # C/D games only: public goods has no log-odds


def features(model, tokenizer, scenarios) -> tuple[np.ndarray, np.ndarray]:
    """(last-position hidden states [scenario, layer, dim], the base model's P(C))."""
    c_id, d_id = (tokenizer(" " + a, add_special_tokens=False)["input_ids"][-1] for a in ("C", "D"))
    states, p_base = [], []
    with torch.no_grad():
        for scenario in scenarios:
            ids = tokenizer(score_prompt(tokenizer, scenario), return_tensors="pt", add_special_tokens=False)
            out = model(**ids, output_hidden_states=True)
            states.append(torch.stack([h[0, -1] for h in out.hidden_states]).float().numpy())
            p_base.append(torch.softmax(out.logits[0, -1, [c_id, d_id]].float(), 0)[0].item())
    return np.stack(states), np.array(p_base)


def ridge(x: np.ndarray, y: np.ndarray, lam: float):
    """A ridge fit on standardised features (dual form when there are fewer rows than features)."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z, y_mean = (x - mean) / scale, y.mean()
    if z.shape[0] >= z.shape[1]:
        w = np.linalg.solve(z.T @ z + lam * np.eye(z.shape[1]), z.T @ (y - y_mean))
    else:
        w = z.T @ np.linalg.solve(z @ z.T + lam * np.eye(z.shape[0]), y - y_mean)
    return lambda new: ((new - mean) / scale) @ w + y_mean


def variance_shares(x: np.ndarray, games: np.ndarray, contexts: np.ndarray, standardise: bool = False
                    ) -> tuple[float, float]:
    """Shares of the total variance explained by the context means and by the game means (a balanced grid);
    `standardise`: every feature scaled to unit variance first, so a few large features cannot dominate."""
    centred = x - x.mean(0)
    if standardise:
        centred = centred / (centred.std(0) + 1e-6)
    total = (centred ** 2).sum()
    share = lambda labels: sum(((centred[labels == v].mean(0)) ** 2).sum() * (labels == v).sum()  # noqa: E731
                               for v in np.unique(labels)) / total
    return float(share(contexts)), float(share(games))


def checkpoint_shares(model, tokenizer, scenarios, checkpoints: list[str], output: str) -> None:
    """The context and game shares of the answer position's variance (in-sample grid) at each checkpoint."""
    from peft import set_peft_model_state_dict

    grid = [s for s in scenarios if s.split == "in_sample"]
    games, contexts = np.array([s.game.name for s in grid]), np.array([s.context.name for s in grid])
    rows = []
    for path in checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        # LoRADistillModule keeps `self.model` (the PeftModel), so its keys carry one leading "model."
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
        result = set_peft_model_state_dict(model, {k.replace(".default", ""): v for k, v in state.items()})
        if getattr(result, "unexpected_keys", None):
            raise SystemExit(f"{path}: adapter keys that do not fit --adapter: {result.unexpected_keys[:3]}")
        states, _ = features(model, tokenizer, grid)
        for layer in range(1, states.shape[1]):
            context_share, game_share = variance_shares(states[:, layer], games, contexts)
            rows.append({"checkpoint": Path(path).name, "step": checkpoint["global_step"], "layer": layer,
                         "variance_context": round(context_share, 4), "variance_game": round(game_share, 4)})
        print(path, checkpoint["global_step"], " ".join(f"{r['variance_game']:.3f}" for r in rows[1 - states.shape[1]:]))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(output, index=False)
    print(f"wrote {output}")


def training_context_sets(arguments: list[str] | None, lists_file: Path) -> dict[str, list[str]]:
    """`--training-contexts` arguments → {label: contexts}; each argument names lists of `lists_file` joined by +."""
    if arguments is None:
        return {}
    lists = OmegaConf.load(lists_file)
    sets = {}
    for argument in arguments or ["training_contexts"]:
        names = []
        for key in argument.split("+"):
            if not OmegaConf.is_list(lists.get(key)):
                raise SystemExit(f"--training-contexts {argument}: {lists_file} has no list `{key}` "
                                 "(e.g. training_contexts, more_training_contexts, paired_training_contexts)")
            names += [n for n in lists[key] if n not in names]
        sets[argument] = names
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--scales", type=float, nargs="*", default=[],
                        help="also fit on the in-sample games with every payoff x each scale")
    parser.add_argument("--training-contexts", nargs="*", default=None, metavar="LIST[+LIST]",
                        help="also fit on the in-sample games in training-only contexts: one fit per argument, each "
                             "a list name of conf/scenarios/default.yaml or several joined by + "
                             "(no argument: training_contexts)")
    parser.add_argument("--held-out", default="business", help="the in-sample context left out of the fit")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter directory: read the tuned student instead")
    parser.add_argument("--checkpoint", nargs="*", default=[],
                        help="Lightning checkpoints of the --adapter run: variance shares at each")
    parser.add_argument("--output", default=str(ROOT / "results/readout_probe.csv"))
    args = parser.parse_args()
    if args.checkpoint and not args.adapter:
        parser.error("--checkpoint needs --adapter (the run's adapter directory: its peft configuration)")

    context_sets = training_context_sets(args.training_contexts, ROOT / "conf/scenarios/default.yaml")
    training_contexts = list(dict.fromkeys(c for names in context_sets.values() for c in names))
    catalogue = load_catalogue(ROOT / "conf/scenarios/catalogue",
                               augment={"variants": args.variants, "seed": 0, "scales": args.scales,
                                        "contexts": training_contexts})
    cfg = OmegaConf.load(ROOT / "conf/model/smollm2_135m.yaml")
    tokenizer, model = load_tokenizer(cfg), load_causal_lm(cfg).eval()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    scenarios = catalogue.scenarios([s for s in SPLITS if s in catalogue.splits])
    if args.checkpoint:
        return checkpoint_shares(model, tokenizer, scenarios, args.checkpoint, args.output)
    start = time.time()
    states, p_base = features(model, tokenizer, scenarios)
    print(f"{len(scenarios)} scenarios read in {time.time() - start:.0f} s")

    split = np.array([s.split for s in scenarios])
    context = np.array([s.context.name for s in scenarios])
    game = np.array([s.game.name for s in scenarios])
    rescaled = np.array([s.split == AUGMENT_SPLIT and s.game.scale != 1.0 for s in scenarios])
    p_teacher = np.array([action_probabilities(s)["C"] for s in scenarios])
    log_odds = np.log(p_teacher / (1 - p_teacher))
    trained = (split == "in_sample") & (context != args.held_out)
    fits = {"trained (16)": trained}
    variants = (split == AUGMENT_SPLIT) & ~np.isin(context, training_contexts) & ~rescaled & (context != args.held_out)
    scaled = rescaled & (context != args.held_out)
    if args.variants:
        fits[f"trained + augment K={args.variants}"] = trained | variants
    if args.scales:
        fits[f"trained + scales {args.scales}"] = trained | scaled
    if args.variants and args.scales:
        fits[f"trained + augment K={args.variants} + scales"] = trained | variants | scaled
    for label, names in context_sets.items():
        fits[f"trained + {len(names)} training-only contexts ({label})"] = trained | np.isin(context, names)
    heldout = (split == "in_sample") & (context == args.held_out)
    evaluated = {"in_sample_trained": trained, "heldout_context": heldout,
                 "heldout_coordination": heldout & np.isin(game, ["stag_hunt", "prisoners_delight"]),
                 "oos_context": split == "oos_context", "oos_payoffs": split == "oos_payoffs"}

    grid = split == "in_sample"
    rows = []
    for layer in range(states.shape[1]):
        context_share, game_share = variance_shares(states[grid, layer], game[grid], context[grid])
        context_std, game_std = variance_shares(states[grid, layer], game[grid], context[grid], standardise=True)
        for fit, mask in fits.items():
            for lam in (1.0, 100.0, 1e4):
                predict = ridge(states[mask, layer], log_odds[mask], lam)
                p_fit = 1 / (1 + np.exp(-predict(states[:, layer])))
                row = {"fit": fit, "layer": layer, "ridge_lambda": lam,
                       "variance_context": round(context_share, 3), "variance_game": round(game_share, 3),
                       "variance_game_standardised": round(game_std, 3)}
                row.update({name: round(float(alignment(p_base[m], p_fit[m], p_teacher[m])), 3)
                            for name, m in evaluated.items()})
                rows.append(row)
    table = pd.DataFrame(rows)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output, index=False)
    best = table.loc[table.groupby("fit")["heldout_context"].idxmax()]
    with pd.option_context("display.width", 200):
        print(table[table.layer % 3 == 0].to_string(index=False))
        print("\nbest held-out context per fit:\n" + best.to_string(index=False))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
