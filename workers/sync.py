"""What keeps the replicas of a stage equal (workers/replicas.py): before any of its models
steps, that model's gradients are summed over the replicas by one torch.distributed all-reduce
(gloo) of a flat buffer. Every replica then takes the same step from the same state, so their
weights, optimiser states, predictors and heads stay equal without ever being sent."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GradientSync:
    def __init__(self, replicas: int, group=None):
        self.replicas = replicas
        self.share = 1.0 / replicas  # each replica's part of a batch (equal parts)
        self.group = group  # the replicas' process group (None: the default group)

    def total(self, t: torch.Tensor) -> None:
        """Sum a small tensor over the replicas, in place (every replica calls it at the same
        point, as with reduce)."""
        dist.all_reduce(t, group=self.group)

    def reduce(self, model: nn.Module) -> None:
        """Sum the gradients of `model`'s parameters over the replicas, in place. Every replica
        calls this at the same point with the same parameters holding gradients (they all run
        the same code on equal parts of the same batch), so the collectives pair up."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
