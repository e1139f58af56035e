#!/usr/bin/env python3
"""A small sequence model whose stages pass (batch, time, features) activations, on generated
data: which of three frequencies does a noisy multi-channel signal carry?

    python examples/sequence_model.py                 # unlocked (synthetic gradients), 3 stages
    python examples/sequence_model.py --mode local

The synthetic-gradient predictors and local heads take (B, T, D) activations as they come: a
predictor works at every time step (the labels beside each), a head on the mean over time.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

import synthgrad

MODULE = Path(__file__).stem if __name__ == "__main__" else __name__
STEPS_IN_TIME, CHANNELS, CLASSES = 32, 4, 3


class Signals:
    """dataset[i] -> (signal [T, C], frequency class); map-style, generated from a seed."""
    classes = ["slow", "medium", "fast"]

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        t = torch.arange(STEPS_IN_TIME, dtype=torch.float32)[None, :, None]
        freq = (1.0 + 2.0 * self.labels.float())[:, None, None] * 2 * math.pi / STEPS_IN_TIME
        phase = torch.rand(n, 1, CHANNELS, generator=g) * 2 * math.pi
        self.x = torch.sin(freq * t + phase) + 0.5 * torch.randn(n, STEPS_IN_TIME, CHANNELS, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], int(self.labels[i])


def data(data_dir=None):
    return Signals(4096, seed=1), Signals(512, seed=2)


class MeanOverTime(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=1)


class TimeConv(nn.Module):
    """A 1-D convolution over time on (B, T, D): the layer that mixes time steps."""

    def __init__(self, d: int):
        super().__init__()
        self.conv = nn.Conv1d(d, d, 5, padding=2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)


def make(input_shape, num_classes):
    t, c = input_shape
    return [nn.Sequential(nn.Linear(c, 32), nn.ReLU()),  # (B, T, 32)
            TimeConv(32),                                 # (B, T, 32)
            nn.Sequential(MeanOverTime(), nn.Linear(32, num_classes))]


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="unlocked")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="runs/example-sequence")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = synthgrad.RunConfig(model=f"{MODULE}:make", dataset=f"{MODULE}:data", mode=args.mode, epochs=args.epochs,
                              steps=args.steps, batch_size=64, out=args.out)
    _, summary = synthgrad.train(cfg)
    print(synthgrad.format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
