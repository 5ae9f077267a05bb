"""Training-only payoff augmentation: the `augment` split (config group `scenarios.augment`).

Two kinds of extra games, each paired with the in-sample contexts its base game is paired with:
- `scales`: every in-sample matrix game with its payoffs multiplied by each scale (`<game>_x<k>`);
- `variants`: K random payoff matrices per in-sample matrix game that keep the strict order of its
  four payoffs (ties stay ties), drawn from a seeded grid within [low, high] (`<game>_v<i>_<digest>`,
  the digest naming the matrix, so teacher data of another augmentation can never pass for this one).
No game of the augment split equals an evaluated matrix; no variant is a positive rescaling of one.
And one kind of extra context: `contexts` names catalogue contexts that no evaluated split uses, each paired
with every in-sample matrix game (training-only social framings), at the game's own payoffs or, with
`context_payoffs: variants`, at one of its payoff variants (the i-th context takes variant i mod K + 1).
And training-only games: `games` names catalogue games that no evaluated split uses (a volunteer's dilemma for
n players, say), each paired with every in-sample context and every context of `contexts`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Mapping

from ..settings_fields import setting
from .schema import (
    AUGMENT_SPLIT, MATRIX_ACTIONS, CatalogueError, Context, Game, evaluated_contexts, evaluated_games, scaled_game,
)

KEY = "scenarios.augment"
CELLS = tuple((mine, theirs) for mine in MATRIX_ACTIONS for theirs in MATRIX_ACTIONS)  # R, S, T, P
CELL_NAMES = {("C", "C"): "R", ("C", "D"): "S", ("D", "C"): "T", ("D", "D"): "P"}
DECIMAL_STEP = Fraction(1, 10)  # `integer: false` draws multiples of 0.1
ENUMERATE_LIMIT = 2_000  # fewer candidate matrices than this: drawn from the exact list

Matrix = tuple[Fraction, Fraction, Fraction, Fraction]  # payoffs in CELLS order


@dataclass(frozen=True)
class Augmentation:
    """The validated `scenarios.augment` group (see conf/scenarios/default.yaml)."""

    variants: int = setting("K random payoff matrices per in-sample matrix game that keep the strict order of its "
                            "payoffs", default=0)
    seed: int = setting("the variants' seed: same seed, same matrices", default=0)
    low: float = setting("the variants' payoffs lie in [low, high]", default=1)
    high: float = setting("the variants' payoffs lie in [low, high]", default=30)
    integer: bool = setting("the variants' payoffs are integers (false: multiples of 0.1)", default=True)
    scales: tuple[float, ...] = setting("also every in-sample matrix game with its payoffs × each scale, e.g. "
                                        "[1.5, 3]", default_factory=tuple)
    contexts: tuple[str, ...] = setting(
        "training-only contexts (catalogue contexts no evaluated split uses), each with every in-sample matrix game: "
        "a list of names, or named lists joined in order, e.g. [${scenarios.training_contexts}, "
        "${scenarios.paired_training_contexts}]", default_factory=tuple)
    context_payoffs: str = setting("base: the training-only contexts frame each game at its own payoffs; variants: "
                                   "at one of its payoff variants (context i: variant i mod K + 1)", default="base")
    games: tuple[str, ...] = setting(
        "training-only games (catalogue games no evaluated split uses, e.g. [volunteers_dilemma_3, "
        "volunteers_dilemma_5]), each with every in-sample context and every context of `contexts`",
        default_factory=tuple)
    # how training batches the split (per-scenario losses; data/targets/distribution.py): every other training
    # scenario in each step plus `per_step` variants in turns (0 = all of them), joining from step `from_step`
    per_step: int = setting("losses on the choice distribution (soft, jensen_shannon): every other training "
                            "scenario in each step plus this many of the augment split's, in turns; 0 = all of them",
                            default=0)
    from_step: int = setting("with per_step: the split joins from this optimiser step (a curriculum); 0 = from the "
                             "start", default=0)

    @property
    def active(self) -> bool:
        return self.variants > 0 or bool(self.scales) or bool(self.contexts) or bool(self.games)

    @property
    def step(self) -> Fraction:
        return Fraction(1) if self.integer else DECIMAL_STEP


def _context_names(contexts) -> tuple[str, ...]:
    """`contexts` as one tuple of names: a list of names, or of named lists joined in order
    (`[${scenarios.training_contexts}, ${scenarios.paired_training_contexts}]`)."""
    expected = f"{KEY}.contexts: expected a list of context names (or of lists of them), got {contexts!r}"
    if isinstance(contexts, (str, bytes)) or not isinstance(contexts, Iterable):
        raise CatalogueError(expected)
    names = []
    for entry in contexts:
        if not isinstance(entry, (str, bytes)) and isinstance(entry, Iterable):
            names.extend(entry)
        else:
            names.append(entry)
    if not all(isinstance(c, str) and c for c in names):
        raise CatalogueError(expected)
    return tuple(names)


def _names(value, key: str, what: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or not all(
            isinstance(v, str) and v for v in value):
        raise CatalogueError(f"{KEY}.{key}: expected a list of {what} names, got {value!r}")
    names = tuple(value)
    if len(set(names)) != len(names):
        raise CatalogueError(f"{KEY}.{key}: a {what} is listed twice in {list(names)!r}")
    return names


def _number(value, key: str, what: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CatalogueError(f"{KEY}.{key}: expected {what}, got {value!r}")
    return value


def augmentation_from_config(cfg: Mapping | None) -> Augmentation:
    """Validate a `scenarios.augment` mapping; every error names the key."""
    if cfg is None:
        return Augmentation()
    if not hasattr(cfg, "items"):
        raise CatalogueError(f"{KEY}: expected a mapping with some of {_FIELDS}, got {cfg!r}")
    data = dict(cfg.items())
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise CatalogueError(f"{KEY}: unknown key(s) {unknown}; expected some of {list(_FIELDS)}")
    defaults = Augmentation()
    get = lambda k: defaults.__dict__[k] if data.get(k) is None else data[k]  # noqa: E731
    variants, seed = get("variants"), get("seed")
    if isinstance(variants, bool) or not isinstance(variants, int) or variants < 0:
        raise CatalogueError(f"{KEY}.variants: expected an integer ≥ 0, got {variants!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CatalogueError(f"{KEY}.seed: expected an integer, got {seed!r}")
    low = _number(get("low"), "low", "a number")
    high = _number(get("high"), "high", "a number")
    if not low < high:
        raise CatalogueError(f"{KEY}.low/high: expected low < high, got low={low!r}, high={high!r}")
    integer = get("integer")
    if not isinstance(integer, bool):
        raise CatalogueError(f"{KEY}.integer: expected true or false, got {integer!r}")
    scales = get("scales")
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Iterable):
        raise CatalogueError(f"{KEY}.scales: expected a list of positive numbers, got {scales!r}")
    scales = tuple(scales)
    for scale in scales:
        if _number(scale, "scales", "a list of positive numbers") <= 0:
            raise CatalogueError(f"{KEY}.scales: expected a list of positive numbers, got {list(scales)!r}")
    if len(set(map(float, scales))) != len(scales):
        raise CatalogueError(f"{KEY}.scales: a scale is listed twice in {list(scales)!r}")
    contexts = _context_names(get("contexts"))
    if len(set(contexts)) != len(contexts):
        raise CatalogueError(f"{KEY}.contexts: a context is listed twice in {list(contexts)!r}")
    games = _names(get("games"), "games", "game")
    context_payoffs = get("context_payoffs")
    if context_payoffs not in CONTEXT_PAYOFFS:
        raise CatalogueError(f"{KEY}.context_payoffs: expected one of {list(CONTEXT_PAYOFFS)}, got {context_payoffs!r}")
    if context_payoffs == "variants" and not variants:
        raise CatalogueError(f"{KEY}.context_payoffs: 'variants' frames the payoff variants in the training-only "
                             f"contexts, so it needs {KEY}.variants ≥ 1 (got {variants})")
    per_step, from_step = get("per_step"), get("from_step")
    for key, value in (("per_step", per_step), ("from_step", from_step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CatalogueError(f"{KEY}.{key}: expected a whole number ≥ 0, got {value!r}")
    if from_step and not per_step:
        raise CatalogueError(f"{KEY}.from_step={from_step}: expected 0, or a step ≥ 1 together with {KEY}.per_step > 0 "
                             "(the variants join the other training scenarios from that step)")
    return Augmentation(variants=variants, seed=seed, low=low, high=high, integer=integer, scales=scales,
                        contexts=contexts, context_payoffs=context_payoffs, games=games, per_step=per_step,
                        from_step=from_step)


_FIELDS = tuple(Augmentation.__dataclass_fields__)
CONTEXT_PAYOFFS = ("base", "variants")


# ------------------------------------------------------------------------------ the science (pure)
def matrix_of(game: Game) -> Matrix:
    """A matrix game's four payoffs (R, S, T, P), exact."""
    return tuple(Fraction(repr(game.payoff(m, t))) for m, t in CELLS)


def payoff_ordering(payoffs: Iterable) -> tuple[tuple[int, ...], ...]:
    """The strict order of the four payoffs: groups of equal cells (indices into CELLS), highest first."""
    values = list(payoffs)
    levels = sorted(set(values), reverse=True)
    return tuple(tuple(i for i, v in enumerate(values) if v == level) for level in levels)


def describe_ordering(ordering: tuple[tuple[int, ...], ...]) -> str:
    """E.g. `T > R > P > S` (ties as `=`)."""
    names = [CELL_NAMES[c] for c in CELLS]
    return " > ".join(" = ".join(names[i] for i in group) for group in ordering)


def _grid(augmentation: Augmentation) -> range:
    """Grid points within [low, high] as integer multiples of the step."""
    step = augmentation.step
    low, high = Fraction(repr(augmentation.low)), Fraction(repr(augmentation.high))
    return range(math.ceil(low / step), math.floor(high / step) + 1)


def _rescalings_on_grid(matrix: Matrix, grid: range, step: Fraction) -> set[Matrix]:
    """Every positive multiple of `matrix` whose payoffs all lie on the grid."""
    pivot = max(range(4), key=lambda i: abs(matrix[i]))
    if matrix[pivot] == 0:
        return {matrix} if grid.start <= 0 < grid.stop else set()
    found = set()
    for k in grid:
        c = k * step / matrix[pivot]
        if c <= 0:
            continue
        scaled = tuple(c * v for v in matrix)
        if all((v / step).denominator == 1 and (v / step) in grid for v in scaled):
            found.add(scaled)
    return found


def ordering_variants(base: Matrix, count: int, augmentation: Augmentation, forbidden: Iterable[Matrix],
                      rng: random.Random, label: str = "the game") -> list[Matrix]:
    """`count` distinct matrices on the grid that keep `base`'s payoff ordering and are no positive
    rescaling of a `forbidden` matrix (the evaluated ones); refused when the grid holds too few."""
    ordering = payoff_ordering(base)
    grid, step = _grid(augmentation), augmentation.step
    levels = len(ordering)
    where = (f"[{augmentation.low:g}, {augmentation.high:g}] "
             f"({'integers' if augmentation.integer else 'multiples of 0.1'})")
    if len(grid) < levels:
        raise CatalogueError(
            f"{KEY}.low/high: the range {where} holds {len(grid)} distinct payoff(s), too few to keep {label}'s "
            f"ordering {describe_ordering(ordering)} ({levels} distinct payoffs)"
        )

    def build(chosen: Iterable[int]) -> Matrix:
        values = sorted(chosen, reverse=True)
        out: list[Fraction] = [Fraction(0)] * 4
        for value, group in zip(values, ordering):
            for i in group:
                out[i] = value * step
        return tuple(out)

    same_order = [m for m in forbidden if payoff_ordering(m) == ordering]
    banned = set().union(*(_rescalings_on_grid(m, grid, step) for m in same_order)) if same_order else set()
    total = math.comb(len(grid), levels)
    available = total - len(banned)
    if available < count:
        raise CatalogueError(
            f"{KEY}: only {available} payoff matrix(es) in {where} keep {label}'s ordering "
            f"{describe_ordering(ordering)} and differ from every evaluated matrix and its rescalings; "
            f"variants={count} asks for {count}: widen low/high"
        )
    if total <= ENUMERATE_LIMIT:  # small grid: draw from the exact list
        candidates = [m for m in (build(c) for c in itertools.combinations(grid, levels)) if m not in banned]
        return rng.sample(candidates, count)
    chosen: list[Matrix] = []
    while len(chosen) < count:  # a large grid: the banned matrices are a vanishing fraction of it
        candidate = build(rng.sample(grid, levels))
        if candidate not in banned and candidate not in chosen:
            chosen.append(candidate)
    return chosen


def matrix_digest(matrix: Matrix) -> str:
    return hashlib.sha256(json.dumps([str(v) for v in matrix]).encode()).hexdigest()[:6]


def game_with_matrix(base: Game, matrix: Matrix, name: str, title: str, scale: float = 1.0) -> Game:
    payoffs = {m: {} for m in MATRIX_ACTIONS}
    for (mine, theirs), value in zip(CELLS, matrix):
        payoffs[mine][theirs] = float(value)
    return Game(name=name, title=title, kind=base.kind, payoffs=payoffs, scale=scale, base=base.name)


def augment_split(games: dict[str, Game], splits: dict[str, list[tuple[str, str]]], augmentation: Augmentation,
                  catalogue_contexts: Mapping[str, Context] | None = None
                  ) -> tuple[dict[str, Game], list[tuple[str, str]]]:
    """The games the augment split adds (not already in `games`) and its (game, context) pairs.

    `catalogue_contexts`: the catalogue's contexts by name (what `augmentation.contexts` may name).
    Pure: the same catalogue and augmentation give the same games; each base game draws from its own
    generator (seed and name), so adding a game leaves the other games' variants as they were.
    """
    evaluated = {name: matrix_of(games[name]) for name in sorted(evaluated_games(splits))
                 if games[name].kind == "matrix"}
    in_sample = splits.get("in_sample", [])
    bases: dict[str, list[str]] = {}
    for game_name, context_name in in_sample:
        if games[game_name].kind == "matrix":
            bases.setdefault(game_name, []).append(context_name)
    if augmentation.active and not bases:
        raise CatalogueError(f"{KEY}: the in_sample split has no matrix game to augment")
    new: dict[str, Game] = {}
    pairs: list[tuple[str, str]] = []
    variant_names: dict[str, list[str]] = {}  # base game -> its variants' names, in draw order
    for scale in augmentation.scales:
        for base_name, contexts in bases.items():
            base = games[base_name]
            matrix = tuple(v * Fraction(repr(float(scale))) for v in matrix_of(base))
            clash = sorted(n for n, m in evaluated.items() if m == matrix)
            if clash:
                raise CatalogueError(
                    f"{KEY}.scales: scale {scale:g} turns {base_name} into the payoffs of {clash[0]}, which an evaluated "
                    f"split holds; augmentation would leak it"
                )
            scaled = scaled_game(base, scale)
            name = scaled.name
            if name in games:  # a game file's `scaled_variants` already built it: reuse it if it matches
                if matrix_of(games[name]) != matrix:
                    raise CatalogueError(f"{KEY}.scales: scale {scale:g} names {name!r}, a catalogue game with other payoffs")
            else:
                new[name] = scaled
            pairs.extend((name, c) for c in contexts)
    if augmentation.variants:
        forbidden = list(evaluated.values())
        for base_name, contexts in bases.items():
            base = games[base_name]
            rng = random.Random(f"{augmentation.seed}:{base_name}")
            drawn = ordering_variants(matrix_of(base), augmentation.variants, augmentation, forbidden, rng, base_name)
            for index, matrix in enumerate(drawn, start=1):
                name = f"{base_name}_v{index}_{matrix_digest(matrix)}"
                if name in games:
                    raise CatalogueError(f"{KEY}.variants: the generated name {name!r} is a catalogue game's name")
                new[name] = game_with_matrix(base, matrix, name, f"{base.title} (payoff variant {index})")
                variant_names.setdefault(base_name, []).append(name)
                pairs.extend((name, c) for c in contexts)
    if augmentation.contexts:
        known = dict(catalogue_contexts or {})
        evaluated = evaluated_contexts(splits)
        for position, name in enumerate(augmentation.contexts):
            if name not in known:
                raise CatalogueError(f"{KEY}.contexts: unknown context {name!r}; the catalogue has {sorted(known)}")
            if name in evaluated:
                used = sorted(split for split, ps in splits.items()
                              if split != AUGMENT_SPLIT and any(c == name for _, c in ps))
                raise CatalogueError(f"{KEY}.contexts: context {name!r} is in the evaluated split(s) {used}; a "
                                     "training-only context must be one no split uses (augmentation would leak it)")
            framed = known[name].games
            refused = [g for g in bases if framed is not None and g not in framed and games[g].kind not in framed]
            if refused:
                raise CatalogueError(f"{KEY}.contexts: context {name!r} only frames {list(framed)}, not the in-sample "
                                     f"game(s) {refused}")
            if augmentation.context_payoffs == "variants":  # the same pool size, no base payoffs in it
                pairs.extend((drawn[position % len(drawn)], name) for drawn in variant_names.values())
            else:
                pairs.extend((base_name, name) for base_name in bases)
    if augmentation.games:
        pairs.extend(training_game_pairs(games, splits, augmentation, catalogue_contexts or {}))
    return new, pairs


def training_game_pairs(games: Mapping[str, Game], splits: dict[str, list[tuple[str, str]]],
                        augmentation: Augmentation, catalogue_contexts: Mapping[str, Context]) -> list[tuple[str, str]]:
    """`augmentation.games`, each with every in-sample context and then every training-only context, in order."""
    evaluated = evaluated_games(splits)
    contexts = list(dict.fromkeys(c for _, c in splits.get("in_sample", []))) + list(augmentation.contexts)
    pairs = []
    for name in augmentation.games:
        if name not in games:
            unused = sorted(g for g in games if g not in evaluated)
            raise CatalogueError(f"{KEY}.games: unknown game {name!r}; the catalogue's games no split uses: {unused}")
        if name in evaluated:
            raise CatalogueError(f"{KEY}.games: game {name!r} is in an evaluated split; a training-only game must be "
                                 "one no split uses (augmentation would leak it)")
        game = games[name]
        for context in contexts:
            framed = catalogue_contexts[context].games
            if framed is not None and name not in framed and game.kind not in framed:
                raise CatalogueError(f"{KEY}.games: context {context!r} only frames {list(framed)}, not {name!r}")
            pairs.append((name, context))
    return pairs
