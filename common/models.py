"""Model builders: the network as a list of layers ("units"), stages cut from it, and the
synthetic-gradient models that predict dL/dh for a stage's output.

Every process builds the whole network from the same seed and keeps its own units, so a stage's
initial weights equal the single-process reference's bit for bit.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import RunConfig

NUM_CLASSES = 10  # the default of the helper models' label conditioning (the run passes its own)


def mlp_units(sizes: Sequence[int]) -> list[nn.Module]:
    """Hidden layers are Linear + BatchNorm + ReLU (as in the DNI paper), the last a plain Linear.

    A layer followed by BatchNorm has no bias: the batch mean is subtracted, so its true gradient
    is exactly zero and autograd would hand the optimiser only rounding noise (which Adam turns
    into full-size steps of either sign)."""
    units: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        head = [nn.Flatten()] if i == 0 else []
        if i == len(sizes) - 2:
            units.append(nn.Sequential(*head, nn.Linear(n_in, n_out)))
        else:
            units.append(nn.Sequential(*head, nn.Linear(n_in, n_out, bias=False), nn.BatchNorm1d(n_out), nn.ReLU()))
    return units


def cnn_units(sample_shape: Sequence[int] = (1, 28, 28), classes: int = NUM_CLASSES) -> list[nn.Module]:
    """A small CNN in four units: two conv blocks, a hidden Linear block, the classifier (no bias
    before BatchNorm, as in mlp_units). Images of C x H x W (H, W >= 4)."""
    if len(sample_shape) != 3 or min(sample_shape[1:]) < 4:
        raise ValueError(f"--model cnn needs images (channels x height x width, at least 4x4), "
                         f"got samples of shape {tuple(sample_shape)}")
    c, h, w = sample_shape
    return [
        nn.Sequential(nn.Conv2d(c, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 128, bias=False), nn.BatchNorm1d(128),
                      nn.ReLU()),
        nn.Sequential(nn.Linear(128, classes)),
    ]


def build_units(cfg: RunConfig) -> list[nn.Module]:
    torch.manual_seed(cfg.seed)
    return mlp_units(cfg.layers) if cfg.model == "mlp" else cnn_units(cfg.sample_shape, cfg.classes)


def stage_bounds(cfg: RunConfig) -> list[tuple[int, int]]:
    """[start, end) unit indices of each stage."""
    bounds, start = [], 0
    for n in cfg.stage_groups:
        bounds.append((start, start + n))
        start += n
    return bounds


def unit_shapes(units: Sequence[nn.Module], sample_shape: Sequence[int] = (1, 28, 28)) -> list[tuple[int, ...]]:
    """Per-sample output shape of each unit (fixed up front so links can check what they get)."""
    shapes = []
    x = torch.zeros(2, *sample_shape)
    with torch.no_grad():
        for u in units:
            was = u.training
            u.eval()
            x = u(x)
            u.train(was)
            shapes.append(tuple(x.shape[1:]))
    return shapes


def stage_io_shapes(cfg: RunConfig, units: Optional[Sequence[nn.Module]] = None
                    ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) per sample for each stage (of `units` when already built)."""
    outs = unit_shapes(units if units is not None else build_units(cfg), cfg.sample_shape)
    result = []
    for a, b in stage_bounds(cfg):
        result.append((cfg.sample_shape if a == 0 else outs[a - 1], outs[b - 1]))
    return result


class SyntheticGradient(nn.Module):
    """Predicts dL/dh from h (and the labels, for cDNI). The last layer starts at zero, so the
    first updates are zero rather than noise. It predicts the per-sample gradient
    (batch size x dL_mean/dh), which keeps its targets O(1) whatever the batch size."""

    def __init__(self, shape: Sequence[int], kind: str = "linear", hidden: int = 1024,
                 conditioned: bool = False, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.shape = tuple(shape)
        self.conditioned = conditioned
        self.num_classes = num_classes
        extra = num_classes if conditioned else 0
        if len(self.shape) == 1:
            d = self.shape[0]
            if kind == "linear":  # a full (d + labels) x d map: costs about what a wide layer does
                layers: list[nn.Module] = [nn.Linear(d + extra, d)]
            elif kind == "lowrank":  # d -> r -> d, no nonlinearity: a rank-r linear map
                layers = [nn.Linear(d + extra, hidden, bias=False), nn.Linear(hidden, d)]
            else:
                layers = [nn.Linear(d + extra, hidden), nn.ReLU(), nn.Linear(hidden, d)]
        elif len(self.shape) == 3:
            c = self.shape[0]
            if kind == "linear":
                layers = [nn.Conv2d(c + extra, c, 3, padding=1)]
            elif kind == "lowrank":  # a 1x1 bottleneck to r channels, then a 3x3 back to c
                layers = [nn.Conv2d(c + extra, hidden, 1, bias=False), nn.Conv2d(hidden, c, 3, padding=1)]
            else:
                layers = [nn.Conv2d(c + extra, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)]
        else:
            raise ValueError(f"no synthetic-gradient model for activations of shape {self.shape}")
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.conditioned:
            if labels is None:
                raise ValueError("a conditioned synthetic-gradient model needs the labels")
            onehot = F.one_hot(labels, self.num_classes).to(h.dtype)
            if h.dim() == 4:
                onehot = onehot[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
            h = torch.cat([h, onehot], dim=1)
        return self.net(h)


class LocalHead(nn.Module):
    """A stage's own small classifier (mode local): linear on dense activations; for conv
    activations, average-pooled to 2x2 first (as in decoupled greedy learning's auxiliary
    nets), so the head stays small whatever the image size."""

    def __init__(self, shape: Sequence[int], num_classes: int = NUM_CLASSES):
        super().__init__()
        shape = tuple(shape)
        if len(shape) == 1:
            self.net = nn.Linear(shape[0], num_classes)
        elif len(shape) == 3:
            self.net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(shape[0] * 4, num_classes))
        else:
            raise ValueError(f"no local head for activations of shape {shape}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")
