"""Datasets a user might bring, given to --dataset by import path (tests/test_user_model.py)."""
from __future__ import annotations

import torch


class Patterns:
    """Three classes of 8x8 single-channel images, each a fixed pattern plus noise; map-style."""
    classes = ["stripes", "checks", "dots"]

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.templates = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.noise = torch.randn(n, 1, 8, 8, generator=g)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int):
        y = int(self.labels[i])
        return 0.5 * self.templates[y] + self.noise[i], y


def patterns(data_dir=None):
    return Patterns(512, seed=1), Patterns(96, seed=2)


class _Bad(Patterns):
    def __init__(self, kind: str):
        super().__init__(16, seed=3)
        self.kind = kind

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        if self.kind == "label" and i == 0:
            return x, 0.5
        if self.kind == "shape" and i == len(self) - 1:
            return x[:, :4], y
        if self.kind == "ints":
            return (x * 100).long(), y
        return x, y


def float_label():
    return _Bad("label"), _Bad("label")


def ragged():
    return _Bad("ok"), _Bad("shape")


def int_samples():
    return _Bad("ints"), _Bad("ints")


def not_a_pair():
    return Patterns(8, seed=0)


class Volumes(Patterns):
    """Samples of four dimensions (channels x depth x height x width), as a 3-D scan would be."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x.reshape(1, 2, 4, 8), y


def volumes(data_dir=None):
    return Volumes(128, seed=1), Volumes(32, seed=2)


def streams(data_dir=None):
    """A user's stream data: token ids in, the next token's class out (two Streams)."""
    from synthgrad import Stream
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 6, (1201,), generator=g)
    return (Stream(tokens[:1000], tokens[1:1001], 6),
            Stream(tokens[1000:1200], tokens[1001:1201], 6))


def short_stream():
    """A test stream of 3 positions: shorter than any window over 3."""
    from synthgrad import Stream
    x = torch.zeros(200, 2)
    y = torch.zeros(200, dtype=torch.int64)
    return Stream(x, y, 2), Stream(x[:3], y[:3], 2)
