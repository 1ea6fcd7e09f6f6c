"""A run's length, computed here and nowhere else: steps per epoch and steps in all."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig


@dataclass(frozen=True)
class Plan:
    samples: int
    group_size: int  # samples per step: batch_size * grad_accumulation_steps
    steps_per_epoch: int
    total_steps: int

    def epoch(self, step: int) -> tuple[int, int]:
        """(epoch, position in it) of the 0-based step `step`."""
        return divmod(step, self.steps_per_epoch)

    def step_at_epoch(self, epoch: float) -> int:
        """The step at which `epoch` epochs are done (capped at the run's length)."""
        return min(round(epoch * self.steps_per_epoch), self.total_steps)


def plan(args: TrainConfig, n_samples: int) -> Plan:
    """train.iters steps, else train.epochs epochs of one step per group of batch_size * accum
    samples, the last partial group included, for every number of ranks: dropping a group
    smaller than world * accum made a 2-rank run take a step fewer than one process. Losses
    are sums normalised over the whole group and reduced across ranks, so uneven shares of a
    group change nothing."""
    group = args.batch_size * args.grad_accumulation_steps
    per_epoch = -(-n_samples // group)
    total = args.iters or max((args.epochs or 1) * per_epoch, 1)
    return Plan(n_samples, group, per_epoch, total)
