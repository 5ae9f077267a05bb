"""Which examples train in which step, on which rank: the training batch samplers of `TeacherQADataModule`.

- `LengthGroupedBatchSampler`: batches of similar length (less padding), reshuffled per epoch, rank-aware; with
  `split_batches` every batch is a global batch split over the ranks (`shard`) with loss weights that keep the
  ranks' averaged loss the global batch's mean (the soft loss's scenario batches).
- `AnchoredBatchSampler`: every anchor example in each step plus a rotating share of a pool
  (`scenarios.augment.per_step`: the in-sample scenarios every step, the payoff variants in turns; from a given
  step on with `scenarios.augment.from_step`).
- `WeightedExamples` hands each example's loss weight to the collator.
Pure Python over indices and lengths: no tokenizer, model or trainer.
"""
from __future__ import annotations

import math
import random
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def shard(batch: Sequence[int], num_replicas: int, rank: int) -> tuple[list[int], list[float]]:
    """This rank's part of a global batch, and each example's loss weight.

    With G examples on N ranks: G ≥ N gives contiguous shards of ⌊G/N⌋ or ⌈G/N⌉ examples (contiguous, so a
    length-grouped batch keeps similar lengths together on each rank); G < N gives every rank one example,
    cycling, so no rank is ever empty. The weight of an example with c copies across ranks is N / (G·c): a
    rank's loss Σ weight·loss, averaged over the N ranks (what DDP and DeepSpeed do to gradients), is then
    exactly the mean loss over the G examples of the global batch, whatever the shard sizes.
    """
    size, n = len(batch), num_replicas
    if size >= n:
        base, extra = divmod(size, n)
        start = rank * base + min(rank, extra)
        mine = list(batch[start:start + base + (1 if rank < extra else 0)])
        return mine, [n / size] * len(mine)
    slot = rank % size
    copies = len(range(slot, n, size))
    return [batch[slot]], [n / (size * copies)]


class LengthGroupedBatchSampler(Sampler[list]):
    """Batches of similar length: shuffle, sort within mega-batches, shuffle the batches.

    Rank-aware, so Lightning's distributed sampler is not needed; `set_epoch` reshuffles per epoch.
    Every rank gets distinct batches and the same number of them (a collective step on one rank
    and not on another is a hang):
    - by default each of `num_replicas` ranks gets every num_replicas-th batch; when the count is not a
      multiple of the ranks, the epoch's batches are cycled to fill the last round;
    - with `split_batches` every batch is a global batch, split across the ranks (`shard`): each rank
      yields `(index, weight)` pairs, the weights making the ranks' averaged loss the global batch's mean.
    On one rank both yield exactly the batches of `batches()`, as plain indices.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, group_by_length: bool = True,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0, mega_batch_factor: int = 16,
                 split_batches: bool = False):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.mega_batch_factor = mega_batch_factor
        self.split_batches = split_batches
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained) after a checkpoint restore

    @property
    def sampler(self) -> "LengthGroupedBatchSampler":
        # Lightning calls `set_epoch` on `dataloader.sampler` and `dataloader.batch_sampler.sampler` only (never
        # on the batch sampler itself): pointing `.sampler` here is what makes each epoch reshuffle
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """The next iteration over `epoch` starts after its first `batches_done` batches (this rank's)."""
        self._resume = (epoch, batches_done)

    def batches(self) -> list[list[int]]:
        """All batches of this epoch, over all ranks (global batches when `split_batches`)."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            mega = self.batch_size * self.mega_batch_factor
            order = [i for s in range(0, len(order), mega)
                     for i in sorted(order[s:s + mega], key=lambda j: -self.lengths[j])]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        if self.num_replicas > 1 and batches and not self.split_batches:  # same number of batches on every rank
            missing = len(self) * self.num_replicas - len(batches)
            batches += [batches[i % len(batches)] for i in range(missing)]  # cycled: fewer batches than ranks too
        return batches

    def rank_batches(self) -> list[list]:
        """This rank's batches of the epoch: indices, or `(index, weight)` pairs when `split_batches`."""
        batches = self.batches()
        if self.num_replicas == 1:
            return batches
        if not self.split_batches:
            return batches[self.rank::self.num_replicas]
        return [list(zip(*shard(batch, self.num_replicas, self.rank))) for batch in batches]

    def __iter__(self) -> Iterator[list]:
        mine = self.rank_batches()
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1] if self._resume[1] < len(mine) else 0
        self._resume = None
        yield from mine[skip:]

    def __len__(self) -> int:
        batches = math.ceil(len(self.lengths) / self.batch_size)
        return batches if self.split_batches else math.ceil(batches / self.num_replicas)


class AnchoredBatchSampler(LengthGroupedBatchSampler):
    """Global batches of every `anchors` example plus `per_batch` examples of a rotating `pool`
    (`scenarios.augment.per_step`: the trained scenarios in every step, the payoff variants in turns).

    Each epoch shuffles the pool and deals it one member of each group at a time (a group: the variants of
    one game in one context), so a batch holds at most one variant of a game and context until every group
    has given one, and an epoch shows every pool example exactly once. Split over ranks like
    `LengthGroupedBatchSampler(split_batches=True)`. Before global batch `pool_from_batch` (counted over epochs)
    the batches hold the anchors alone: a curriculum, the pool's examples dealt to those batches are not shown.
    """

    def __init__(self, lengths: Sequence[int], anchors: Sequence[int], pool_groups: Sequence[Sequence[int]],
                 per_batch: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, pool_from_batch: int = 0):
        pool_size = sum(len(g) for g in pool_groups)
        if per_batch < 1 or pool_size == 0:
            raise ValueError(f"AnchoredBatchSampler needs per_batch ≥ 1 and a pool, got {per_batch} and {pool_size}")
        super().__init__(lengths, len(anchors) + per_batch, shuffle=True, group_by_length=False, seed=seed,
                         num_replicas=num_replicas, rank=rank, split_batches=True)
        self.anchors, self.pool_groups, self.per_batch = list(anchors), [list(g) for g in pool_groups], per_batch
        self.pool_size, self.pool_from_batch = pool_size, pool_from_batch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups = [rng.sample(g, len(g)) for g in self.pool_groups]
        rng.shuffle(groups)
        dealt = [g[r] for r in range(max(map(len, groups))) for g in groups if r < len(g)]
        first = self.epoch * len(self)  # this epoch's first global batch
        return [self.anchors + (dealt[s:s + self.per_batch] if first + b >= self.pool_from_batch else [])
                for b, s in enumerate(range(0, len(dealt), self.per_batch))]

    def __len__(self) -> int:
        return math.ceil(self.pool_size / self.per_batch)


class WeightedExamples(torch.utils.data.Dataset):
    """A map-style dataset that also takes `(index, weight)` keys and returns the example with its `weight`.

    What lets `LengthGroupedBatchSampler(split_batches=True)` hand each example's loss weight to the
    collator; plain integer keys give the plain examples.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[dict]:
        if not keys or not isinstance(keys[0], tuple):
            return self.dataset.__getitems__(list(keys))
        indices, weights = zip(*keys)
        examples = self.dataset.__getitems__(list(indices))
        return [{**example, "weight": weight} for example, weight in zip(examples, weights)]


def padding_fraction(batches: list[list[int]], lengths: Sequence[int]) -> float:
    """Share of the tokens in padded batches that are padding."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return 1.0 - real / padded if padded else 0.0
