"""Models of the kinds people bring, for the benchmarks (given to --model by import path):
layers of very unequal cost, no batch norm. Written for this project; other models of the same
kinds are what the figures are checked on.

    --model bench.models:digits_cnn        two 3x3 convs (1->32, 32->64) + max-pool + dropout,
                                           linear 9216->128, linear 128->10: the second conv
                                           costs ~50x the first
    --model bench.models:row_transformer   image rows as tokens, linear 28->64, two encoder
                                           layers (64 wide, 4 heads), mean-pool, linear
    --model bench.models:dominant_cnn      a cheap 5x5 stem, one heavy block of two 3x3 convs, a
                                           strided conv, two linears (5 layers; one dominates)
    --model bench.models:deep_cnn          eight 3x3 convs (32-32-pool-64-64-pool-128-128-128-128),
                                           global pool, linear (9 layers)
    --model bench.models:small_gpt         stream data (--dataset text): one-hot characters and
                                           learned positions, 4 pre-norm causal blocks (d 128, 4
                                           heads), a norm and a read-out at every position (6 layers)
    --model bench.models:encoder_gpt       stream data, written another way: torch's own
                                           nn.TransformerEncoderLayer (pre-norm, causal mask,
                                           dropout 0.1) x 5, d 96, 3 heads, fixed sinusoidal
                                           positions, the final norm and the read-out as layers of
                                           their own (8 layers); the defaults were not tuned on it
"""
from __future__ import annotations

import math

import torch
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


def dominant_cnn(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, 16, 5, padding=2), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten()),
        nn.Sequential(nn.Linear(64 * ((h // 2 + 1) // 2) * ((w // 2 + 1) // 2), 128), nn.ReLU()),
        nn.Linear(128, num_classes),
    )


def deep_cnn(input_shape, num_classes):
    c, h, w = input_shape
    widths = (32, 32, 64, 64, 128, 128, 128, 128)
    pool_after = {1, 3}
    units, previous = [], c
    for i, width in enumerate(widths):
        layer = [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU()]
        if i in pool_after:
            layer.append(nn.MaxPool2d(2))
        units.append(nn.Sequential(*layer))
        previous = width
    units.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, num_classes)))
    return nn.Sequential(*units)


class _Embed(nn.Module):
    """One-hot characters [B, T, V] to vectors, plus a learned vector per position."""

    def __init__(self, vocab: int, width: int, positions: int):
        super().__init__()
        self.tokens = nn.Linear(vocab, width, bias=False)
        self.positions = nn.Parameter(torch.randn(positions, width) * 0.02)

    def forward(self, x):
        return self.tokens(x) + self.positions[: x.shape[1]]


class _Block(nn.Module):
    """A pre-norm causal transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        t = x.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        y = self.norm1(x)
        x = x + self.attention(y, y, y, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def small_gpt(input_shape, num_classes, width: int = 128, heads: int = 4, blocks: int = 4):
    positions, vocab = input_shape
    return nn.Sequential(_Embed(vocab, width, positions), *[_Block(width, heads) for _ in range(blocks)],
                         nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes)))


class _SinusoidEmbed(nn.Module):
    """One-hot characters [B, T, V] to vectors, plus fixed sine and cosine positions."""

    def __init__(self, vocab: int, width: int, positions: int):
        super().__init__()
        self.tokens = nn.Linear(vocab, width, bias=False)
        position = torch.arange(positions).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
        table = torch.zeros(positions, width)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        self.register_buffer("table", table)

    def forward(self, x):
        return self.tokens(x) + self.table[: x.shape[1]]


class _CausalEncoderLayer(nn.Module):
    """torch's encoder layer, pre-norm, with a causal mask: a GPT block as torch ships it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(width, heads, 3 * width, dropout=0.1, activation="gelu",
                                                batch_first=True, norm_first=True)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.layer(x, src_mask=mask, is_causal=True)


def encoder_gpt(input_shape, num_classes, width: int = 96, heads: int = 3, blocks: int = 5):
    positions, vocab = input_shape
    return nn.Sequential(_SinusoidEmbed(vocab, width, positions),
                         *[_CausalEncoderLayer(width, heads) for _ in range(blocks)],
                         nn.LayerNorm(width), nn.Linear(width, num_classes))


__all__ = ["digits_cnn", "row_transformer", "dominant_cnn", "deep_cnn", "small_gpt", "encoder_gpt"]
