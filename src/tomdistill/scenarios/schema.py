"""The catalogue's building blocks: split names, games, contexts and scenarios, and the scaled-game rule.

Plain frozen dataclasses with no I/O; `catalogue.py` loads them from YAML, `augment.py` derives
training-only games from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

SPLITS = ("in_sample", "oos_context", "oos_payoffs", "oos_game")
# Evaluation only: in-sample games in contexts an adapter was NOT trained on (held out for validation).
# `in_sample` then means the scenarios the adapter was trained on, as in the paper.
HELDOUT_CONTEXT = "heldout_context"
REPORT_SPLITS = ("in_sample", HELDOUT_CONTEXT, "oos_context", "oos_payoffs", "oos_game")  # the order reports use
# Training-only scenarios (`scenarios.augment`, scenarios/augment.py): the in-sample games with rescaled
# payoffs and/or random payoffs that keep each game's ordering, so a student sees payoff numbers vary.
# Never evaluated; never equal to an evaluated matrix.
AUGMENT_SPLIT = "augment"
MATRIX_ACTIONS = ("C", "D")

# A scenario's samples are files named after its game and context (sampling/shards.py), each written first to a hidden
# temp file beside it: the longer temp name must fit a file name (255 bytes on ext4, xfs, btrfs, NFS and Lustre).
# The format may not change: a resumed study finds its written shards by these names.
SHARD_NAME = "shard-{game}-{context}-{start:06d}.parquet"
SHARD_TEMP_NAME = ".{name}.{pid}.part"
NAME_MAX = 255
PID_DIGITS = 7  # Linux's largest pid_max is 4194304


def shard_name_room() -> int:
    """Bytes a game's and a context's names may take together in a shard's temp file name."""
    empty = SHARD_TEMP_NAME.format(name=SHARD_NAME.format(game="", context="", start=0), pid="9" * PID_DIGITS)
    return NAME_MAX - len(empty.encode())


class CatalogueError(ValueError, UserError):
    """An invalid catalogue file; the message names the file and the key."""


GAME_KINDS = ("matrix", "public_goods", "volunteer")
# fields a kind added later: left out of a game's dict while unset, so the games before it keep their fingerprint
_LATER_FIELDS = ("benefit", "cost")


@dataclass(frozen=True)
class Game:
    name: str
    title: str
    # "matrix" (two actions C/D, a 2×2 payoff matrix), "public_goods" (a donation 0..endowment) or "volunteer"
    # (C volunteers, D stays out: each of the `players` gets `benefit` if anyone volunteers; a volunteer pays `cost`)
    kind: str
    payoffs: dict[str, dict[str, float]] = field(default_factory=dict)  # [mine][theirs] -> my points
    scale: float = 1.0
    base: str | None = None  # the game this one was scaled from
    players: int = 2
    endowment: int = 0
    multiplier: float = 0.0
    benefit: float = 0.0
    cost: float = 0.0

    @property
    def actions(self) -> tuple[str, ...]:
        if self.kind == "public_goods":
            return tuple(str(d) for d in range(self.endowment + 1))
        return MATRIX_ACTIONS

    def payoff(self, mine: str, theirs: str) -> float:
        return self.payoffs[mine][theirs]

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not (k in _LATER_FIELDS and not v)}


@dataclass(frozen=True)
class Context:
    name: str
    coplayer: str
    points: str
    framing: str
    regard: float  # oracle: weight on the coplayer's payoff
    belief: float  # oracle: belief that the coplayer cooperates
    games: tuple[str, ...] | None = None  # game kinds/names this context may frame; None = all matrix games
    group: str | None = None  # the other players of a game for more than two ("the other three athletes")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def others(self, players: int) -> str:
        """The other players of a game for `players`: the coplayer, the context's `group`, or (a training-only game
        for more than two in a context without one) the coplayer and the rest in the same position."""
        if players <= 2:
            return self.coplayer
        if self.group:
            return self.group
        rest = players - 2
        return f"{self.coplayer} and {rest} other{'s' if rest > 1 else ''} in the same position"


@dataclass(frozen=True)
class Scenario:
    game: Game
    context: Context
    split: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.game.name, self.context.name)

    @property
    def id(self) -> str:
        return f"{self.game.name}/{self.context.name}"

    def shard_name(self, start: int) -> str:
        return SHARD_NAME.format(game=self.game.name, context=self.context.name, start=start)


def scaled_game(base: Game, scale: float) -> Game:
    """The scaled-game rule (a game file's `scaled_variants`, `scenarios.augment.scales`): `base` with every
    payoff × `scale`, named `<base>_x<scale>`, its `base` recorded so reports group it without parsing names."""
    label = int(scale) if float(scale).is_integer() else scale
    return Game(
        name=f"{base.name}_x{label}",
        title=f"{base.title} (payoffs ×{label})",
        kind=base.kind,
        payoffs={m: {t: v * scale for t, v in row.items()} for m, row in base.payoffs.items()},
        scale=float(scale),
        base=base.name,
    )


def evaluated_games(splits: dict[str, list[tuple[str, str]]]) -> set[str]:
    """The games of the evaluated splits: every split's but the training-only augment split's."""
    return {game for split, pairs in splits.items() if split != AUGMENT_SPLIT for game, _ in pairs}


def evaluated_contexts(splits: dict[str, list[tuple[str, str]]]) -> set[str]:
    """The contexts of the evaluated splits: every split's but the training-only augment split's."""
    return {context for split, pairs in splits.items() if split != AUGMENT_SPLIT for _, context in pairs}
