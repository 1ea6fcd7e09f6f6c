"""Encoded training data and how it is cut into steps: length buckets drawn anew each epoch.

One step consumes a group of batch_size * grad_accumulation_steps samples (the global batch;
each data-parallel rank takes every world-size-th row of each micro-batch). An epoch's last,
partial group is kept, and a rank whose share of it is empty adds zero gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..models.modeling import make_batch

# Written into checkpoints: how training batches are composed (epoch_groups), so that a
# resumed run can tell a checkpoint of another composition.
DATA_ORDER = "length-buckets-reshuffled-per-epoch"


@dataclass
class EncodedData:
    """Encoded samples with the reference quantity each objective compares with: aligned
    scores r_ref [N] (NaN where not needed); training/dpo.PairData holds pairs."""

    samples: list
    encodings: list
    r_ref: np.ndarray

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> np.ndarray:
        """Tokens per sample (a pair: its longer reply): what batching sorts by."""
        if hasattr(self.encodings, "lengths"):  # an EncodingTable: read off its bounds
            return self.encodings.lengths()
        return np.array([len(e.tokens) for e in self.encodings], np.int64)

    def supervised_tokens(self) -> np.ndarray:
        """Supervised (predicted) tokens per sample: what a token-normalised objective counts."""
        if hasattr(self.encodings, "supervised"):
            return self.encodings.supervised()
        return np.array([e.mask[1:].sum() for e in self.encodings], np.float64)

    def batches(self, batch_size: int, among=None) -> list[np.ndarray]:
        """Length-sorted groups of the samples `among` (default all), so that padding stays small:
        evaluation's batches (training draws new groups each epoch: epoch_groups)."""
        idx = np.arange(len(self)) if among is None else np.sort(np.asarray(among, np.int64))
        order = idx[np.argsort(self.lengths()[idx], kind="stable")]
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def batch(self, index: np.ndarray, rank: int = 0, world: int = 1):
        mine = index[rank::world]
        return make_batch([self.encodings[i] for i in mine], mine, self.r_ref[mine])


def length_buckets(lengths: np.ndarray, pad_to: int = 16) -> np.ndarray:
    """Classes of samples that may share a batch at little padding cost: rows are padded to a
    multiple of `pad_to` anyway (modeling.make_batch), and longer ones group within ~9%."""
    padded = np.maximum(-(-np.asarray(lengths, np.int64) // pad_to) * pad_to, pad_to)
    return np.floor(8 * np.log2(padded)).astype(np.int64)


def epoch_groups(lengths: np.ndarray, group_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Which samples share a step in `epoch`: sorted by length bucket, randomly within a
    bucket, then cut into groups of `group_size` (the last one may be smaller).

    A function of (seed, epoch) alone, so a resumed run composes the same groups; a new
    draw each epoch, so epoch 2 does not repeat epoch 1's groups in another order.
    """
    lengths = np.asarray(lengths)
    tie = np.random.default_rng([seed, epoch, 1]).permutation(len(lengths))
    order = np.lexsort((tie, length_buckets(lengths)))
    return [order[i:i + group_size] for i in range(0, len(order), group_size)]


def epoch_order(n_groups: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch's groups are visited."""
    return np.random.default_rng([seed, epoch]).permutation(n_groups)


def shuffled_epochs(lengths: np.ndarray, group_size: int, seed: int):
    """The default schedule: epoch -> its groups in visit order (epoch_groups, epoch_order)."""
    def schedule(epoch: int) -> list[np.ndarray]:
        groups = epoch_groups(lengths, group_size, seed, epoch)
        return [groups[i] for i in epoch_order(len(groups), seed, epoch)]
    return schedule


def shares(group: np.ndarray, accum: int, rank: int, world: int) -> list[np.ndarray]:
    """The rows of `group` that `rank` computes, one array per micro-batch; an array is empty
    where the group has fewer rows than accum * world (an epoch's last group)."""
    n = len(group)
    return [group[k * n // accum:(k + 1) * n // accum][rank::world] for k in range(accum)]


def eval_groups(data: EncodedData, batch_size: int, max_batches: int = -1, seed: int = 0) -> list[np.ndarray]:
    """The batches an evaluation takes: all of `data`, or `max_batches` batches of a seeded
    sample of it, the same sample at every evaluation so that the losses compare.

    Not the first batches of the length-sorted set: those hold only its shortest samples.
    """
    if max_batches <= 0 or max_batches * batch_size >= len(data):
        return data.batches(batch_size)
    pick = np.random.default_rng([seed, 0x76616C]).choice(len(data), max_batches * batch_size, replace=False)
    return data.batches(batch_size, among=pick)
