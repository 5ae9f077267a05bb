"""The scenario catalogue: games, contexts and splits, loaded from YAML and validated.

The catalogue is data (`conf/scenarios/catalogue/`): `games/*.yaml`, `contexts/*.yaml` and
`splits.yaml`. A user adds a game or a context by dropping a YAML file there (or in a directory
listed in `extra_dirs`); every problem is reported with the file and the key at fault.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml


# the building blocks (splits, games, contexts, scenarios) live in schema.py, below augment.py and this file
from .schema import (  # noqa: F401
    AUGMENT_SPLIT, GAME_KINDS, HELDOUT_CONTEXT, MATRIX_ACTIONS, NAME_MAX, REPORT_SPLITS, SHARD_NAME, SPLITS,
    CatalogueError, Context, Game, Scenario, evaluated_contexts, evaluated_games, scaled_game, shard_name_room,
)


@dataclass(frozen=True)
class Catalogue:
    games: dict[str, Game]
    contexts: dict[str, Context]
    splits: dict[str, list[tuple[str, str]]]  # split -> [(game, context)]
    source: str = ""
    generated: frozenset[str] = frozenset()  # games the augmentation added (only in the augment split)

    def scenarios(
        self,
        splits: Iterable[str] | None = None,
        games: Iterable[str] | None = None,
        contexts: Iterable[str] | None = None,
    ) -> list[Scenario]:
        """Scenarios of the chosen splits (all by default), in catalogue order."""
        chosen = list(splits) if splits is not None else list(self.splits)
        for split in chosen:
            if split not in self.splits:
                raise CatalogueError(
                    f"unknown split {split!r}: the catalogue {self.source} has {sorted(self.splits)}"
                )
        game_filter = set(games) if games is not None else None
        context_filter = set(contexts) if contexts is not None else None
        out = []
        for split in chosen:
            for game_name, context_name in self.splits[split]:
                # a payoff variant (augment split) passes the filter with the game it varies
                if game_filter is not None and game_name not in game_filter and not (
                        split == AUGMENT_SPLIT and self.games[game_name].base in game_filter):
                    continue
                if context_filter is not None and context_name not in context_filter:
                    continue
                out.append(Scenario(self.games[game_name], self.contexts[context_name], split))
        return out

    def scenario(self, game: str, context: str) -> Scenario:
        for split, pairs in self.splits.items():
            if (game, context) in pairs:
                return Scenario(self.games[game], self.contexts[context], split)
        raise KeyError(f"no scenario ({game}, {context}) in the catalogue {self.source}")

    def fingerprint(self) -> str:
        """A short hash of everything that reaches a prompt (for `prompt_version`).

        The training-only augment split is left out: it adds scenarios but changes no evaluated prompt,
        so students and teachers sampled with and without it compare. `augment_fingerprint` names it. So
        are the games and contexts no evaluated split uses (training-only games and contexts, `scenarios.augment`).
        """
        blob = json.dumps(
            {
                "games": {k: g.to_dict() for k, g in sorted(self.games.items()) if k in self.evaluated_games},
                "contexts": {k: c.to_dict() for k, c in sorted(self.contexts.items()) if k in self.evaluated_contexts},
                "splits": {k: v for k, v in sorted(self.splits.items()) if k != AUGMENT_SPLIT},
            },
            sort_keys=True,
            default=list,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def augment_fingerprint(self) -> str:
        """A short hash of the augment split (its scenarios and their payoffs); "" without one. With
        `fingerprint` it identifies the training data (the oracle teacher's cache key uses both)."""
        pairs = self.splits.get(AUGMENT_SPLIT)
        if not pairs:
            return ""
        content = [[g, c, self.games[g].payoffs] for g, c in pairs]
        training_only = sorted({c for _, c in pairs} - self.evaluated_contexts)
        if training_only:  # their framings and oracle parameters reach training prompts and labels
            content.append({c: self.contexts[c].to_dict() for c in training_only})
        training_games = sorted({g for g, _ in pairs} - self.evaluated_games - self.generated)
        if training_games:  # catalogue games no evaluated split uses: their rules reach training prompts and labels
            content.append({"games": {g: self.games[g].to_dict() for g in training_games}})
        blob = json.dumps(content, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    @property
    def evaluated_contexts(self) -> set[str]:
        return evaluated_contexts(self.splits)

    @property
    def evaluated_games(self) -> set[str]:
        return evaluated_games(self.splits)


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        # one line: the problem and where (PyYAML's own text spans several lines with a drawing of the spot)
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        context = getattr(err, "context", None)
        raise CatalogueError(f"{path}: not valid YAML{where}: {problem}" + (f" ({context})" if context else "")) \
            from err
    if not isinstance(data, dict):
        raise CatalogueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _require(data: dict, key: str, path: Path, kind: type | tuple = object):
    if key not in data or data[key] is None:
        raise CatalogueError(f"{path}: missing required key {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise CatalogueError(f"{path}: key {key!r} must be {names}, got {value!r}")
    return value


def _parse_game(data: dict, path: Path) -> list[Game]:
    name = _require(data, "name", path, str)
    kind = data.get("kind", "matrix")
    title = data.get("title", name)
    known = {"name", "title", "kind", "actions", "payoffs", "scaled_variants", "players", "endowment", "multiplier",
             "benefit", "cost"}
    unknown = set(data) - known
    if unknown:
        raise CatalogueError(f"{path}: unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}")
    if kind == "public_goods":
        players = _require(data, "players", path, int)
        endowment = _require(data, "endowment", path, int)
        multiplier = float(_require(data, "multiplier", path, (int, float)))
        if players < 2 or endowment < 1 or multiplier <= 0:
            raise CatalogueError(f"{path}: 'players' must be ≥ 2, 'endowment' ≥ 1 and 'multiplier' > 0")
        return [Game(name=name, title=title, kind=kind, players=players, endowment=endowment, multiplier=multiplier)]
    if kind == "volunteer":
        players = _require(data, "players", path, int)
        benefit = float(_require(data, "benefit", path, (int, float)))
        cost = float(_require(data, "cost", path, (int, float)))
        if isinstance(data["players"], bool) or players < 2 or not 0 < cost < benefit:
            raise CatalogueError(f"{path}: 'players' must be ≥ 2 and 0 < 'cost' < 'benefit' (a volunteer still gains), "
                                 f"got players={players}, benefit={benefit:g}, cost={cost:g}")
        return [Game(name=name, title=title, kind=kind, players=players, benefit=benefit, cost=cost)]
    if kind not in GAME_KINDS:
        raise CatalogueError(f"{path}: key 'kind' must be one of {list(GAME_KINDS)}, got {kind!r}")
    actions = tuple(data.get("actions", MATRIX_ACTIONS))
    if actions != MATRIX_ACTIONS:
        raise CatalogueError(f"{path}: key 'actions' must be [C, D], got {list(actions)}")
    payoffs = _require(data, "payoffs", path, dict)
    if set(payoffs) != set(MATRIX_ACTIONS):
        bad = sorted(set(payoffs) ^ set(MATRIX_ACTIONS))
        raise CatalogueError(
            f"{path}: key 'payoffs' must have exactly the rows C and D (a 2×2 matrix); "
            f"unknown or missing action(s) {bad}"
        )
    matrix: dict[str, dict[str, float]] = {}
    for mine in MATRIX_ACTIONS:
        row = payoffs[mine]
        if not isinstance(row, dict) or set(row) != set(MATRIX_ACTIONS):
            raise CatalogueError(
                f"{path}: key 'payoffs.{mine}' must map both C and D to a number, got {row!r}"
            )
        for theirs in MATRIX_ACTIONS:
            value = row[theirs]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise CatalogueError(f"{path}: key 'payoffs.{mine}.{theirs}' must be a number, got {value!r}")
        matrix[mine] = {t: float(row[t]) for t in MATRIX_ACTIONS}
    games = [Game(name=name, title=title, kind=kind, payoffs=matrix)]
    for scale in data.get("scaled_variants", []) or []:
        if not isinstance(scale, (int, float)) or scale <= 0:
            raise CatalogueError(f"{path}: key 'scaled_variants' must list positive numbers, got {scale!r}")
        games.append(scaled_game(games[0], scale))
    return games


def _parse_context(data: dict, path: Path) -> Context:
    known = {"name", "coplayer", "points", "framing", "oracle", "games", "group"}
    unknown = set(data) - known
    if unknown:
        raise CatalogueError(f"{path}: unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}")
    oracle = data.get("oracle") or {}
    if not isinstance(oracle, dict):
        raise CatalogueError(f"{path}: key 'oracle' must be a mapping with 'regard' and 'belief'")
    regard = oracle.get("regard", 0.0)
    belief = oracle.get("belief", 0.5)
    for key, value in (("oracle.regard", regard), ("oracle.belief", belief)):
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise CatalogueError(f"{path}: key {key!r} must be a number in [0, 1], got {value!r}")
    games = data.get("games")
    return Context(
        name=_require(data, "name", path, str),
        coplayer=_require(data, "coplayer", path, str),
        points=_require(data, "points", path, str),
        framing=" ".join(_require(data, "framing", path, str).split()),
        regard=float(regard),
        belief=float(belief),
        games=tuple(games) if games else None,
        group=_require(data, "group", path, str) if "group" in data else None,
    )


def _check_name_lengths(splits: dict, game_files: dict[str, Path], context_files: dict[str, Path],
                        generated: dict[str, Game]) -> None:
    """Every scenario's shard file name must fit a file name (schema.py, SHARD_NAME): refused here, naming the file,
    rather than as a traceback when sampling writes the first shard. Names are kept, not shortened: a resumed
    study finds its shards by them."""
    room = shard_name_room()
    for pairs in splits.values():
        for game, context in pairs:
            size = len(game.encode()) + len(context.encode())
            if size <= room:
                continue
            # the longer name is at fault; a generated payoff variant's comes from the game it varies
            if len(context.encode()) >= len(game.encode()):
                where, kind, name = context_files[context], "context", context
            else:
                where = game_files.get(game) or game_files.get(generated[game].base, "scenarios.augment")
                kind, name = "game", game
            shown = name if len(name) <= 40 else f"{name[:40]}…"
            raise CatalogueError(
                f"{where}: {kind} name {shown!r} is {len(name.encode())} bytes, too long: its sample files, "
                f"{SHARD_NAME} (written through a temp name), must fit in {NAME_MAX} bytes, so a game's and a "
                f"context's names may take {room} bytes together ({size} here); give it a shorter name")


def load_catalogue(
    directory: str | Path,
    extra_dirs: Iterable[str | Path] = (),
    augment=None,
) -> Catalogue:
    """Load and validate a catalogue directory (plus optional directories of extra games/contexts).

    `augment` (a scenarios.augment.Augmentation, or the `scenarios.augment` mapping) adds the
    training-only `augment` split.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CatalogueError(f"{directory}: scenario catalogue directory not found")
    dirs = [directory, *[Path(d) for d in extra_dirs]]
    games: dict[str, Game] = {}
    game_files: dict[str, Path] = {}
    contexts: dict[str, Context] = {}
    context_files: dict[str, Path] = {}
    for root in dirs:
        for path in sorted((root / "games").glob("*.yaml")):
            for game in _parse_game(_load_yaml(path), path):
                if game.name in games:
                    raise CatalogueError(
                        f"{path}: duplicate game name {game.name!r} (already defined in {game_files[game.name]})"
                    )
                games[game.name] = game
                game_files[game.name] = path
        for path in sorted((root / "contexts").glob("*.yaml")):
            context = _parse_context(_load_yaml(path), path)
            if context.name in contexts:
                raise CatalogueError(
                    f"{path}: duplicate context name {context.name!r} (already defined in {context_files[context.name]})"
                )
            contexts[context.name] = context
            context_files[context.name] = path
    splits: dict[str, list[tuple[str, str]]] = {}
    for root in dirs:
        path = root / "splits.yaml"
        if not path.exists():
            if root == directory:
                raise CatalogueError(f"{path}: missing splits file")
            continue
        for split, spec in _load_yaml(path).items():
            if split not in SPLITS:
                raise CatalogueError(f"{path}: unknown split {split!r}; expected one of {list(SPLITS)}")
            if not isinstance(spec, dict) or "games" not in spec or "contexts" not in spec:
                raise CatalogueError(f"{path}: key {split!r} must have 'games' and 'contexts' lists")
            pairs = splits.setdefault(split, [])
            for game_name in spec["games"]:
                if game_name not in games:
                    raise CatalogueError(f"{path}: key '{split}.games' names unknown game {game_name!r}")
                for context_name in spec["contexts"]:
                    if context_name not in contexts:
                        raise CatalogueError(
                            f"{path}: key '{split}.contexts' names unknown context {context_name!r}"
                        )
                    context = contexts[context_name]
                    game = games[game_name]
                    if context.games is not None and game.name not in context.games and game.kind not in context.games:
                        raise CatalogueError(
                            f"{path}: key '{split}': context {context_name!r} only frames {list(context.games)}, "
                            f"not {game_name!r}"
                        )
                    if game.players > 2 and context.group is None:  # "you and the other athlete", 4 players
                        raise CatalogueError(
                            f"{path}: key '{split}': {game_name!r} has {game.players} players, and context "
                            f"{context_name!r} names one coplayer: add 'group' (the other players, e.g. 'the other "
                            f"{game.players - 1} …') to its file"
                        )
                    if (game_name, context_name) in [p for ps in splits.values() for p in ps]:
                        raise CatalogueError(
                            f"{path}: key '{split}': scenario ({game_name}, {context_name}) is listed twice"
                        )
                    pairs.append((game_name, context_name))
    from .augment import Augmentation, augment_split, augmentation_from_config

    if not isinstance(augment, Augmentation):
        augment = augmentation_from_config(augment)
    generated: dict[str, Game] = {}
    if augment.active:
        generated, pairs = augment_split(games, splits, augment, contexts)
        games.update(generated)
        splits[AUGMENT_SPLIT] = pairs
    _check_name_lengths(splits, game_files, context_files, generated)
    return Catalogue(games=games, contexts=contexts, splits=splits, source=str(directory),
                     generated=frozenset(generated))


def catalogue_from_config(scenarios_cfg) -> Catalogue:
    """The catalogue described by a `scenarios` config group (see conf/scenarios/default.yaml)."""
    get = scenarios_cfg.get if hasattr(scenarios_cfg, "get") else lambda k, d=None: getattr(scenarios_cfg, k, d)
    return load_catalogue(get("catalogue_dir"), get("extra_dirs") or (), augment=get("augment"))
