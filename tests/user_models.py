"""Models a user might bring, given to --model by import path (tests/test_user_model.py)."""
from __future__ import annotations

import torch
from torch import nn


def small_cnn(input_shape, num_classes):
    """A CNN of the user's own, built for whatever images the data holds."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(16 * (h // 2) * (w // 2), 32), nn.ReLU()),
        nn.Linear(32, num_classes),
    )


def as_stage_list(**options):
    """A list of modules instead of an nn.Sequential; takes every offered option."""
    return [nn.Flatten(), nn.Linear(options["layers"][0], 24), nn.Linear(24, options["num_classes"])]


def not_a_model(input_shape):
    return 42


def broken_chain(num_classes):
    return [nn.Flatten(), nn.Linear(10, 5), nn.Linear(5, num_classes)]


def token_embedding(num_classes):
    """A first layer that wants token ids (nn.Embedding), where the data gives floats."""
    return nn.Sequential(nn.Embedding(784, 8), nn.Flatten(), nn.Linear(8 * 784, num_classes))


def wrong_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))


def raises():
    raise RuntimeError("the user's bug")


def label_smoothed(logits, labels):
    """A loss of the user's own: cross-entropy with label smoothing."""
    import torch.nn.functional as F
    return F.cross_entropy(logits, labels, label_smoothing=0.1)


def per_sample(logits, labels):
    import torch.nn.functional as F
    return F.cross_entropy(logits, labels, reduction="none")  # not one number: refused


def named(input_shape, num_classes):
    """An nn.Sequential with named layers, for --split-at."""
    from collections import OrderedDict
    c, h, w = input_shape
    return nn.Sequential(OrderedDict([
        ("stem", nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU())),
        ("conv2", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())),
        ("pool", nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())),
        ("head", nn.Linear(16, num_classes)),
    ]))


def volume_net(input_shape, num_classes):
    """3-D convolutions over (C, D, H, W) samples, then a classifier; the activation between
    them is a layer of its own, without parameters."""
    c, d, h, w = input_shape
    return nn.Sequential(nn.Conv3d(c, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1),
                         nn.Sequential(nn.Flatten(), nn.Linear(4 * d * h * w, num_classes)))


def plain_mlp(input_shape, num_classes):
    """An MLP without batch norm: a batch split into microbatches computes the same gradient
    (the pipeline's microbatch test compares it with backprop on the whole batch)."""
    import math
    d = math.prod(input_shape)
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(d, 64), nn.ReLU()),
                         nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
                         nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
                         nn.Linear(64, num_classes))


def gru_cell_then_readout(input_shape, num_classes):
    """A recurrent core given as a cell (unrolled over each window by synthgrad), then a read-out."""
    return [nn.GRUCell(input_shape[-1], 16), nn.Linear(16, num_classes)]


def two_timescales(input_shape, num_classes, fast=16, slow=16, every=2):
    """A fast LSTM, then a slow one that ticks every `every` positions on its output, then a
    read-out of both (tests/test_recurrent.py writes the same network directly in PyTorch)."""
    from synthgrad import Slow
    return [nn.LSTM(input_shape[-1], fast, batch_first=True),
            Slow(nn.LSTM(fast, slow, batch_first=True), every=every),
            nn.Linear(fast + slow, num_classes)]


def two_timescales_mismatched(input_shape, num_classes):
    """The slow core expects 8 features where the fast one gives 16."""
    from synthgrad import Slow
    return [nn.LSTM(input_shape[-1], 16, batch_first=True), Slow(nn.LSTM(8, 16, batch_first=True), every=2),
            nn.Linear(32, num_classes)]


def two_timescales_never(input_shape, num_classes):
    return two_timescales(input_shape, num_classes, every=0)


def two_timescales_every_3(input_shape, num_classes):
    return two_timescales(input_shape, num_classes, every=3)


def small_lstm(input_shape, num_classes):
    """An LSTM of 32 units and a read-out at every position: --model lstm, smaller."""
    return [nn.LSTM(input_shape[-1], 32, batch_first=True), nn.Linear(32, num_classes)]


def gpt_split_readout(input_shape, num_classes):
    """A GPT whose final norm and read-out are children of their own, as many are written
    (`ln_f`, `lm_head`): position-wise layers at the back."""
    from bench.models import small_gpt
    gpt = small_gpt(input_shape, num_classes, width=16, heads=2, blocks=2)
    return nn.Sequential(*gpt[:-1], *gpt[-1])


class _Embedding(nn.Module):
    def __init__(self, vocab, width, positions):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Parameter(torch.randn(positions, width) * 0.02)

    def forward(self, x):
        return self.wte(x.argmax(-1)) + self.wpe[: x.shape[1]]


def tied_gpt(input_shape, num_classes):
    """A GPT-like stack whose read-out shares the token embedding's weights, as nanoGPT's does
    (`lm_head.weight = wte.weight`): one parameter held by the first layer and the last."""
    positions, vocab = input_shape
    embed = _Embedding(vocab, 16, positions)
    readout = nn.Linear(16, num_classes, bias=False)
    readout.weight = embed.wte.weight
    return nn.Sequential(embed, nn.Linear(16, 16), nn.LayerNorm(16), readout)
