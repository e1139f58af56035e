"""Models of the kinds people bring, for the benchmarks (given to --model by import path):
layers of very unequal cost, no batch norm. Written for this project; other models of the same
kinds are what the figures are checked on.

    --model bench.models:digits_cnn        two 3x3 convs (1->32, 32->64) + max-pool + dropout,
                                           linear 9216->128, linear 128->10: the second conv
                                           costs ~50x the first
    --model bench.models:row_transformer   image rows as tokens, linear 28->64, two encoder
                                           layers (64 wide, 4 heads), mean-pool, linear
"""
from __future__ import annotations


from torch import nn


def digits_cnn(input_shape, num_classes):
    c, h, w = input_shape
    flat = 64 * ((h - 4) // 2) * ((w - 4) // 2)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU()),
        nn.Sequential(nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten()),
        nn.Sequential(nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.5)),
        nn.Linear(128, num_classes),
    )


class _Rows(nn.Module):
    """(C, H, W) images as H tokens of C*W features."""

    def forward(self, x):
        b, c, h, w = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, h, c * w)


class _MeanTokens(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def row_transformer(input_shape, num_classes, width: int = 64, heads: int = 4):
    c, h, w = input_shape
    return nn.Sequential(
        nn.Sequential(_Rows(), nn.Linear(c * w, width)),
        nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True),
        nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True),
        nn.Sequential(_MeanTokens(), nn.Linear(width, num_classes)),
    )


__all__ = ["digits_cnn", "row_transformer"]
