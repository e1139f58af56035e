"""Model builders: the network as a list of layers ("units"), stages cut from it, and the
synthetic-gradient models that predict dL/dh for a stage's output.

Every process builds the whole network from the same seed and keeps its own units, so a stage's
initial weights equal the single-process reference's bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthgrad.common.config import RunConfig
from synthgrad.common.imports import ImportPathError, import_object

NUM_CLASSES = 10  # the default of the helper models' label conditioning (the run passes its own)


def mlp(layers: Sequence[int]) -> list[nn.Module]:
    """`--model mlp`, a factory like a user's: sizes from --layers (RunConfig checks them against
    the data). Hidden layers are Linear + BatchNorm + ReLU (as in the DNI paper), the last a
    plain Linear.

    A layer followed by BatchNorm has no bias: the batch mean is subtracted, so its true gradient
    is exactly zero and autograd would hand the optimiser only rounding noise (which Adam turns
    into full-size steps of either sign)."""
    units: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(layers[:-1], layers[1:])):
        head = [nn.Flatten()] if i == 0 else []
        if i == len(layers) - 2:
            units.append(nn.Sequential(*head, nn.Linear(n_in, n_out)))
        else:
            units.append(nn.Sequential(*head, nn.Linear(n_in, n_out, bias=False), nn.BatchNorm1d(n_out), nn.ReLU()))
    return units


def cnn(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = NUM_CLASSES) -> list[nn.Module]:
    """`--model cnn`, a factory like a user's: a small CNN in four units: two conv blocks, a
    hidden Linear block, the classifier (no bias before BatchNorm, as in mlp). Images of
    C x H x W (H, W >= 4)."""
    if len(input_shape) != 3 or min(input_shape[1:]) < 4:
        raise ValueError(f"--model cnn needs images (channels x height x width, at least 4x4), "
                         f"got samples of shape {tuple(input_shape)}")
    c, h, w = input_shape
    return [
        nn.Sequential(nn.Conv2d(c, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 128, bias=False), nn.BatchNorm1d(128),
                      nn.ReLU()),
        nn.Sequential(nn.Linear(128, num_classes)),
    ]


# the built-in models are factories of the same kind as a user's, called the same way
BUILT_IN_MODELS = {"mlp": f"{__name__}:mlp", "cnn": f"{__name__}:cnn"}


def factory_path(model: str) -> str:
    """The import path of --model's factory (a built-in name or a user's path)."""
    return BUILT_IN_MODELS.get(model, model)


def build_units(cfg: RunConfig) -> list[nn.Module]:
    """The whole network as a list of layers ("units"), from the seed: every process builds
    the same one and keeps its own stage's units."""
    return [unit for _, unit in _named_units(cfg)]


def _named_units(cfg: RunConfig) -> list[tuple[str, nn.Module]]:
    torch.manual_seed(cfg.seed)
    return user_named_units(factory_path(cfg.model), input_shape=cfg.sample_shape, num_classes=cfg.classes,
                            layers=cfg.layers)


class ModelError(ValueError):
    """A model given by import path cannot be used; the message says why."""


def unit_names(cfg: RunConfig) -> list[str]:
    """Each layer's name, for --split-at: an nn.Sequential's children's names, else 0, 1, ..."""
    return [name for name, _ in _named_units(cfg)]


def groups_at(names: list[str], split_at: str) -> tuple[int, ...]:
    """Layers per stage when a new stage begins at each named layer (in order, not the first)."""
    wanted = [n.strip() for n in split_at.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ModelError(f"--split-at {split_at}: no layer named {', '.join(unknown)}; the layers are "
                         f"{', '.join(names)}")
    starts = [names.index(n) for n in wanted]
    if starts != sorted(set(starts)) or 0 in starts:
        raise ModelError(f"--split-at {split_at}: name the layers where stages begin, in order, after the "
                         f"first ({names[0]})")
    bounds = [0, *starts, len(names)]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def user_named_units(path: str, **offered) -> list[tuple[str, nn.Module]]:
    """Call the factory at `path` ('package.module:function') with those of `offered`
    (input_shape, num_classes, layers) its signature names, and take its answer apart into
    named units: the children of an nn.Sequential, or the modules of a list (named 0, 1, ...)."""
    import inspect
    try:
        factory = import_object(path)
    except ImportPathError as exc:
        raise ModelError(str(exc)) from None
    if not callable(factory):
        raise ModelError(f"{path} is not a function")
    try:
        params = inspect.signature(factory).parameters
        takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
        model = factory(**{k: v for k, v in offered.items() if takes_all or k in params})
    except Exception as exc:  # the user's code: any failure is theirs to see, named
        raise ModelError(f"the factory failed: {type(exc).__name__}: {exc}") from None
    if isinstance(model, nn.Sequential):
        units = list(model.named_children())
    elif isinstance(model, (list, tuple)) and all(isinstance(m, nn.Module) for m in model):
        units = [(str(i), m) for i, m in enumerate(model)]
    else:
        raise ModelError(f"the factory returned {type(model).__name__}; it must return an nn.Sequential "
                         f"or a list of nn.Modules (one per layer, in order)")
    if not units:
        raise ModelError("the factory returned no layers")
    return units


def check_model(cfg: RunConfig) -> int:
    """Build the network once, before any process starts, and check that its layers chain on the
    data's samples and end in one logit per class, and that the loss takes those logits and
    gives a scalar to differentiate. Returns its number of layers (units)."""
    units = build_units(cfg)
    shapes = unit_shapes(units, cfg.sample_shape)
    if shapes[-1] != (cfg.classes,):
        raise ModelError(f"the last layer gives {shapes[-1]} per sample; the data has {cfg.classes} classes, "
                         f"so it must give ({cfg.classes},): one logit per class")
    loss = loss_function(cfg.loss)
    logits = torch.zeros(2, cfg.classes, requires_grad=True)
    try:
        value = loss(logits, torch.zeros(2, dtype=torch.long))
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(f"it returned {type(value).__name__}"
                            f"{f' of shape {tuple(value.shape)}' if isinstance(value, torch.Tensor) else ''}, "
                            f"not one number")
        value.backward()
    except Exception as exc:
        raise ModelError(f"--loss {cfg.loss} on logits [2, {cfg.classes}] and class indices [2]: "
                         f"{type(exc).__name__}: {exc}") from None
    return len(units)


def loss_function(name: str):
    """The training loss: cross-entropy, or a user's function by import path."""
    if name == "cross_entropy":
        return F.cross_entropy
    try:
        fn = import_object(name)
    except ImportPathError as exc:
        raise ModelError(f"--loss {name}: {exc}") from None
    if not callable(fn):
        raise ModelError(f"--loss {name} is not a function")
    return fn


def stage_bounds(cfg: RunConfig) -> list[tuple[int, int]]:
    """[start, end) unit indices of each stage."""
    bounds, start = [], 0
    for n in cfg.stage_groups:
        bounds.append((start, start + n))
        start += n
    return bounds


def unit_shapes(units: Sequence[nn.Module], sample_shape: Sequence[int] = (1, 28, 28)) -> list[tuple[int, ...]]:
    """Per-sample output shape of each unit (fixed up front so links can check what they get).
    Raises ModelError naming the unit whose input it cannot take or that returns no tensor."""
    shapes = []
    x = torch.zeros(2, *sample_shape)
    with torch.no_grad():
        for i, u in enumerate(units):
            was = u.training
            u.eval()
            try:
                out = u(x)
            except Exception as exc:
                raise ModelError(f"layer {i} ({type(u).__name__}) cannot take the output of the layer before "
                                 f"it, per sample {tuple(x.shape[1:])}: {type(exc).__name__}: {exc}") from None
            finally:
                u.train(was)
            if not isinstance(out, torch.Tensor) or out.dim() < 2:
                raise ModelError(f"layer {i} ({type(u).__name__}) must return one tensor with a batch dimension")
            x = out
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


def _dense(d_in: int, d_out: int, kind: str, hidden: int) -> list[nn.Module]:
    """A predictor over the last dimension: full linear map, rank-`hidden` map, or one ReLU layer."""
    if kind == "linear":  # a full d_in x d_out map: costs about what a wide layer does
        return [nn.Linear(d_in, d_out)]
    if kind == "lowrank":  # d -> r -> d, no nonlinearity: a rank-r linear map
        return [nn.Linear(d_in, hidden, bias=False), nn.Linear(hidden, d_out)]
    return [nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)]


class SyntheticGradient(nn.Module):
    """Predicts dL/dh from h (and the labels, for cDNI). The last layer starts at zero, so the
    first updates are zero rather than noise. It predicts the per-sample gradient
    (batch size x dL_mean/dh), which keeps its targets O(1) whatever the batch size.

    Per activation shape (one sample's): (D,) a dense predictor; (C, H, W) convolutions; (T, D)
    (a sequence) the dense predictor at every position, the labels beside every position; any
    other shape is flattened to one vector and predicted densely."""

    def __init__(self, shape: Sequence[int], kind: str = "linear", hidden: int = 1024,
                 conditioned: bool = False, num_classes: int = NUM_CLASSES, kernel: int = 3):
        super().__init__()
        self.shape = tuple(shape)
        self.conditioned = conditioned
        self.num_classes = num_classes
        extra = num_classes if conditioned else 0
        self.flatten = len(self.shape) not in (1, 2, 3)
        if len(self.shape) == 3:
            c = self.shape[0]
            if kind == "linear":
                layers = [nn.Conv2d(c + extra, c, 3, padding=1)]
            elif kind == "lowrank":  # a 1x1 bottleneck to r channels, then a kxk (3 or 1) back to c
                layers = [nn.Conv2d(c + extra, hidden, 1, bias=False),
                          nn.Conv2d(hidden, c, kernel, padding=kernel // 2)]
            else:
                layers = [nn.Conv2d(c + extra, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)]
        elif len(self.shape) in (1, 2):
            layers = _dense(self.shape[-1] + extra, self.shape[-1], kind, hidden)
        else:
            size = math.prod(self.shape)
            if size < 1:
                raise ValueError(f"no synthetic-gradient model for activations of shape {self.shape}")
            layers = _dense(size + extra, size, kind, hidden)
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = h.reshape(h.shape[0], -1) if self.flatten else h
        if self.conditioned:
            if labels is None:
                raise ValueError("a conditioned synthetic-gradient model needs the labels")
            onehot = F.one_hot(labels, self.num_classes).to(x.dtype)
            if x.dim() == 4:  # beside every pixel, as channels
                x = torch.cat([x, onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])], dim=1)
            elif x.dim() == 3:  # beside every position of a sequence
                x = torch.cat([x, onehot[:, None, :].expand(-1, x.shape[1], -1)], dim=2)
            else:
                x = torch.cat([x, onehot], dim=1)
        return self.net(x).reshape(h.shape)


class LocalHead(nn.Module):
    """A stage's own small classifier (mode local): linear on dense activations; for conv
    activations, average-pooled to `pool` x `pool` first (2x2 as in decoupled greedy learning's
    auxiliary nets; common/costs.py choose_head takes 1x1 when 2x2 is over the budget), so the
    head stays small whatever the image size; for a sequence (T, D), the mean over positions;
    any other shape, flattened."""

    def __init__(self, shape: Sequence[int], num_classes: int = NUM_CLASSES, pool: int = 2):
        super().__init__()
        shape = tuple(shape)
        if len(shape) == 1:
            self.net = nn.Linear(shape[0], num_classes)
        elif len(shape) == 3:
            self.net = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
                                     nn.Linear(shape[0] * pool * pool, num_classes))
        elif len(shape) == 2:
            self.net = nn.Sequential(_MeanOverPositions(), nn.Linear(shape[1], num_classes))
        elif shape and math.prod(shape) >= 1:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), num_classes))
        else:
            raise ValueError(f"no local head for activations of shape {shape}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class _MeanOverPositions(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=1)


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")
