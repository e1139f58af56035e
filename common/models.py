"""Model builders: the network as a list of layers ("units"), stages cut from it, and the
synthetic-gradient models that predict dL/dh for a stage's output.

Every process builds the whole network from the same seed and keeps its own units, so a stage's
initial weights equal the single-process reference's bit for bit.
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthgrad.common.imports import ImportPathError, import_object
from synthgrad.common.recurrent import as_layer, reset_streams, stream_through
from synthgrad.common.streams import IGNORE

if TYPE_CHECKING:  # annotations only
    from synthgrad.common.config import RunConfig

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


LSTM_HIDDEN = 128


def lstm(input_shape: Sequence[int] = (16, 9), num_classes: int = NUM_CLASSES) -> list[nn.Module]:
    """`--model lstm`, for stream data: an LSTM of LSTM_HIDDEN units over the window (carrying its
    state to the next), then a linear read-out at every position. Two units: a run of two
    stages puts the recurrent core and the read-out in processes of their own."""
    if len(input_shape) != 2:
        raise ValueError(f"--model lstm needs windows of [time, features] (stream data such as --dataset "
                         f"copy), got samples of shape {tuple(input_shape)}")
    return [nn.LSTM(input_shape[1], LSTM_HIDDEN, batch_first=True), nn.Linear(LSTM_HIDDEN, num_classes)]


# the built-in models are factories of the same kind as a user's, called the same way
BUILT_IN_MODELS = {"mlp": f"{__name__}:mlp", "cnn": f"{__name__}:cnn", "lstm": f"{__name__}:lstm"}


def factory_path(model: str) -> str:
    """The import path of --model's factory (a built-in name or a user's path)."""
    return BUILT_IN_MODELS.get(model, model)


def build_units(cfg: RunConfig) -> list[nn.Module]:
    """The whole network as a list of layers ("units"), from the seed: every process builds
    the same one and keeps its own stage's units. On stream data its recurrent layers carry
    their state from one window to the next."""
    named = _named_units(cfg)
    units = [unit for _, unit in named]
    ties = tied_parameters(units)
    if ties and not cfg.untie_weights:
        first, later, name = ties[0]
        raise ModelError(
            f"layers {named[first][0]} and {named[later][0]} share a parameter ({name} of {named[later][0]}"
            f"{f', and {len(ties) - 1} more' if len(ties) > 1 else ''}): weights tied across layers, as a GPT's "
            f"embedding and read-out often are. Every stage process holds its own copy of its layers, so the tie "
            f"cannot hold across stages. Pass --untie-weights to train them as separate copies that start from "
            f"the same values (in every mode, backprop's too), or tie them inside one layer")
    for later in sorted({later for _, later, _ in ties}):
        units[later] = copy.deepcopy(units[later])  # its own parameters, at the values they started from
    if cfg.per_position:
        for unit in units:
            stream_through(unit)
    return units


def tied_parameters(units: Sequence[nn.Module]) -> list[tuple[int, int, str]]:
    """(the first layer holding it, a later layer holding it too, its name there) for every
    parameter that more than one layer holds: weights tied across layers."""
    owner: dict[int, int] = {}
    ties = []
    for i, unit in enumerate(units):
        for name, p in unit.named_parameters():
            first = owner.setdefault(id(p), i)
            if first != i:
                ties.append((first, i, name))
    return ties


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
        units = [(name, as_layer(m)) for name, m in model.named_children()]
    elif isinstance(model, (list, tuple)) and all(isinstance(m, nn.Module) for m in model):
        units = [(str(i), as_layer(m)) for i, m in enumerate(model)]
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
    if cfg.per_position:  # stream data: windows read in order, a target at every position
        from synthgrad.common.modes import Mode
        if cfg.mode == Mode.PIPELINE:
            raise ModelError("mode pipeline does not take stream data (a target at every position, a recurrent "
                             "layer's state carried between windows); use locked (the same truncated BPTT) or "
                             "another stage-worker mode (compare: leave pipeline out of --contenders)")
        if cfg.replicas is not None and max(cfg.replicas) > 1:
            raise ModelError("--replicas does not take stream data yet (each replica would carry its rows' "
                             "state); run without replicas")
    shapes = unit_shapes(units, cfg.sample_shape)
    label_shape = tuple(cfg.label_shape or ())
    want = (*label_shape, cfg.classes)
    if shapes[-1] != want:
        per = "per position of a window" if label_shape else "per sample"
        raise ModelError(f"the last layer gives {shapes[-1]} per sample; the data has {cfg.classes} classes "
                         f"{per}, so it must give {want}: one logit per class{' at every position' * bool(label_shape)}")
    loss = loss_function(cfg.loss, bool(label_shape))
    logits = torch.zeros(2, *want, requires_grad=True)
    try:
        value = loss(logits, torch.zeros(2, *label_shape, dtype=torch.long))
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(f"it returned {type(value).__name__}"
                            f"{f' of shape {tuple(value.shape)}' if isinstance(value, torch.Tensor) else ''}, "
                            f"not one number")
        value.backward()
    except Exception as exc:
        raise ModelError(f"--loss {cfg.loss} on logits {[2, *want]} and class indices {[2, *label_shape]}: "
                         f"{type(exc).__name__}: {exc}") from None
    return len(units)


def loss_function(name: str, per_position: bool = False):
    """The training loss: cross-entropy, or a user's function by import path. With targets at
    every position (stream data) it is taken over the positions that have one: a user's loss
    gets those as logits [N, classes] and class indices [N]."""
    if name == "cross_entropy":
        fn = F.cross_entropy
    else:
        try:
            fn = import_object(name)
        except ImportPathError as exc:
            raise ModelError(f"--loss {name}: {exc}") from None
        if not callable(fn):
            raise ModelError(f"--loss {name} is not a function")
    return PerPosition(fn) if per_position else fn


class PerPosition:
    """A loss over the positions with a target (not IGNORE) of logits [..., classes] and
    targets [...]. Cross-entropy is summed and divided by the count, so a batch whose windows hold
    no target gives 0 (and a zero gradient), not NaN."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        if self.fn is F.cross_entropy:
            return F.cross_entropy(flat, targets, reduction="sum", ignore_index=IGNORE) / (
                (targets != IGNORE).sum().clamp_min(1))
        keep = targets != IGNORE
        return self.fn(flat[keep], targets[keep])


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
                what = "the data's samples" if i == 0 else "the output of the layer before it"
                hint = (f". The data comes as floats (one-hot where it is tokens); an nn.Embedding wants token "
                        f"ids: give it x.argmax(-1), or use nn.Linear({sample_shape[-1]}, width, bias=False), the same map"
                        if i == 0 and any(isinstance(m, nn.Embedding) for m in u.modules()) else "")
                raise ModelError(f"layer {i} ({type(u).__name__}) cannot take {what}, per sample "
                                 f"{tuple(x.shape[1:])}: {type(exc).__name__}: {exc}{hint}") from None
            finally:
                u.train(was)
                reset_streams(u, training=False)  # a probe is not an evaluation's stream
            if not isinstance(out, torch.Tensor) or out.dim() < 2:
                raise ModelError(f"layer {i} ({type(u).__name__}) must return one tensor with a batch dimension")
            x = out
            shapes.append(tuple(x.shape[1:]))
    return shapes


def mixes_positions(units: Sequence[nn.Module], sample_shape: Sequence[int]) -> list[bool]:
    """Whether each unit mixes positions (attention, a recurrence, a convolution over time), for
    as many units from the front as the probe can tell: it stops at a unit that cannot take it
    or whose output has no positions left. Found by a probe, not by type: a random window and
    the same window with its first position changed, through each unit in turn; a unit mixes
    when any later position's output moves."""
    if len(sample_shape) < 2:
        return []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *sample_shape, generator=g)
    found: list[bool] = []
    for u in units:
        moved = x.clone()
        moved[:, 0] = torch.randn(moved[:, 0].shape, generator=g)
        was = u.training
        u.eval()
        try:
            with torch.no_grad():
                out = u(x)
                reset_streams(u, training=False)  # the second window starts where the first did
                out_moved = u(moved)
        except Exception:  # a unit that cannot take the probe: no claim about it or after it
            return found
        finally:
            u.train(was)
            reset_streams(u, training=False)
        if not isinstance(out, torch.Tensor) or out.dim() < 3 or out.shape[1] < 2:
            return found  # no positions left to tell apart
        found.append(not torch.allclose(out[:, 1:], out_moved[:, 1:]))
        x = out
    return found


def position_wise_front(mixing: Sequence[bool]) -> int:
    """How many units at the front see one position at a time (an embedding of tokens and
    positions) before the first that mixes positions; 0 when the first mixes or none does
    (`mixing`: mixes_positions). Why it matters: a per-position local head on such a unit can
    learn at best a bigram model, while the layers after it need what attention reads
    (position, keys, queries): on the small GPT a stage of the embedding alone was most of
    local's gap (docs/results.md)."""
    return next((i for i, m in enumerate(mixing) if m), 0)


def position_wise_back(mixing: Sequence[bool], units: int) -> int:
    """Where the units at the back that see one position at a time (a final norm, the
    read-out) begin, after the last that mixes positions; `units` when the probe did not reach
    the end, nothing mixes, or the last unit mixes. Why: a stage of a final norm alone trains
    almost nothing, and its head is the read-out again; it would only add a process and a hop."""
    if len(mixing) < units or not any(mixing):
        return units
    return max(i for i, m in enumerate(mixing) if m) + 1


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
            onehot = one_hot(labels, self.num_classes).to(x.dtype)  # [B, C], or [B, T, C] per position
            if onehot.dim() == 3 and not (x.dim() == 3 and x.shape[1] == onehot.shape[1]):
                onehot = onehot.mean(dim=1)  # per-position targets beside a non-sequence: their mix
            if x.dim() == 4:  # beside every pixel, as channels
                x = torch.cat([x, onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])], dim=1)
            elif x.dim() == 3 and onehot.dim() == 3:  # each position's target beside it
                x = torch.cat([x, onehot], dim=2)
            elif x.dim() == 3:  # beside every position of a sequence
                x = torch.cat([x, onehot[:, None, :].expand(-1, x.shape[1], -1)], dim=2)
            else:
                x = torch.cat([x, onehot], dim=1)
        return self.net(x).reshape(h.shape)


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """One-hot float targets; a position without one (IGNORE) is all zeros."""
    known = labels != IGNORE
    return F.one_hot(labels.clamp_min(0), classes).float() * known[..., None]


class LocalHead(nn.Module):
    """A stage's own small classifier (mode local): linear on dense activations; for conv
    activations, average-pooled to `pool` x `pool` first (2x2 as in decoupled greedy learning's
    auxiliary nets; common/costs.py choose_head takes 1x1 when 2x2 is over the budget), so the
    head stays small whatever the image size; for a sequence (T, D), the mean over positions;
    any other shape, flattened. With targets at every position (`per_position`, stream data) a
    sequence's head classifies every position."""

    def __init__(self, shape: Sequence[int], num_classes: int = NUM_CLASSES, pool: int = 2,
                 per_position: bool = False, depth: int = 0, reconstructs: Optional[Sequence[int]] = None,
                 scale_free: bool = False, attention: bool = False, hidden: Optional[int] = None,
                 side: Optional[int] = None, lead: Optional[nn.Module] = None, lead_is_output: bool = False):
        """`hidden`: a conv head's hidden channels (None: the activation's); `side`: the
        largest map its hidden convs run on, a side (None: HEAD_CONV_SIDE). `lead`: a layer the
        head runs first (--head-next-layer: a fresh copy of the layer after the stage), the rest
        of the head reading its output; `lead_is_output`: that layer is the model's last, whose
        output is already the logits, so nothing reads it."""
        super().__init__()
        shape = tuple(shape)
        decoded = shape  # a decoder reads the stage's output itself, a lead or not
        if lead is not None:
            shape = unit_shapes([lead], shape)[0]
        # reads h over its root mean square (per sample; per position with targets at every
        # position): the head's loss then has no gradient along h itself, so it cannot grow the
        # stage's activations, which a classifier's loss otherwise does without bound. A conv
        # map is pooled first (pooling is linear, so the head stays scale-free): on an early,
        # large map the normalisation would otherwise cost more than the stage's own layers
        norm = [_RootMeanSquare(per_position)] if scale_free and lead is None else []
        # decodes the stage's input (of shape `reconstructs`) from its output: --head-reconstruct
        self.decoder = Reconstruction(decoded, reconstructs) if reconstructs is not None else None
        if per_position:
            if len(shape) != 2:
                raise ValueError(f"a local head for targets at every position needs [time, features] "
                                 f"activations, got {shape}")
            context = [CausalContext(shape[1])] if attention else []
            width = shape[1] + (context[0].width if attention else 0)
            self.net = nn.Sequential(*norm, *context, *_hidden_dense(width, depth),
                                     nn.Linear(_read_width(width, depth), num_classes))
        elif len(shape) == 1:
            self.net = nn.Sequential(*norm, *_hidden_dense(shape[0], depth),
                                     nn.Linear(_read_width(shape[0], depth), num_classes))
        elif len(shape) == 3:
            c = shape[0]
            side = HEAD_CONV_SIDE if side is None else side
            width = c if hidden is None else hidden
            if side < 1 or width < 1:
                raise ValueError(f"a conv head needs a hidden width and map side of at least 1, got {width}, {side}")
            convs = [m for i in range(depth) for m in (nn.Conv2d(c if i == 0 else width, width, 3, padding=1),
                                                       nn.ReLU())]
            # hidden convs see the map pooled to at most `side` a side, so a head on a large
            # early map costs about what one on a late map does
            shrink = ([nn.AdaptiveAvgPool2d((min(shape[1], side), min(shape[2], side)))]
                      if depth and max(shape[1:]) > side else [])
            if depth:
                layers = [*shrink, *norm, *convs, nn.AdaptiveAvgPool2d(pool), nn.Flatten()]
            else:
                layers, width = [nn.AdaptiveAvgPool2d(pool), nn.Flatten(), *norm], c
            self.net = nn.Sequential(*layers, nn.Linear(width * pool * pool, num_classes))
        elif len(shape) == 2:
            self.net = nn.Sequential(_MeanOverPositions(), *norm, *_hidden_dense(shape[1], depth),
                                     nn.Linear(_read_width(shape[1], depth), num_classes))
        elif shape and math.prod(shape) >= 1:
            self.net = nn.Sequential(nn.Flatten(), *norm, nn.Linear(math.prod(shape), num_classes))
        else:
            raise ValueError(f"no local head for activations of shape {shape}")
        if lead is not None:  # the norm, where asked for, comes before the lead: it reads h
            first = [_RootMeanSquare(per_position)] if scale_free else []
            self.net = nn.Sequential(*first, lead, *([] if lead_is_output else [self.net]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class CausalContext(nn.Module):
    """What a per-position head reads besides its position: one causal self-attention layer of
    `width` (the features' up to 64, heads of 32), its output beside the input. Causal, as
    the model is: a head that saw later positions would learn to read the next target from
    them."""
    HEAD_WIDTH = 32

    def __init__(self, features: int, width: int = 64):
        super().__init__()
        self.width = min(features, width)
        self.heads = max(1, self.width // self.HEAD_WIDTH)
        self.qkv = nn.Linear(features, 3 * self.width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = (x.reshape(b, t, self.heads, -1).transpose(1, 2) for x in self.qkv(h).chunk(3, dim=-1))
        read = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.cat([h, read.transpose(1, 2).reshape(b, t, self.width)], dim=-1)


class _RootMeanSquare(nn.Module):
    def __init__(self, per_position: bool):
        super().__init__()
        self.per_position = per_position

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2 if self.per_position else 1, h.dim()))
        return h * torch.rsqrt(h.pow(2).mean(dim=dims, keepdim=True) + 1e-12)


HEAD_HIDDEN_MAX = 256  # a dense head's hidden width: the activation's, up to this
HEAD_CONV_SIDE = 8  # a conv head's hidden layers run on a map of at most this many pixels a side (--head-side)


def _hidden_dense(width: int, depth: int) -> list[nn.Module]:
    hidden = min(width, HEAD_HIDDEN_MAX)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width if i == 0 else hidden, hidden), nn.ReLU()]
    return layers


def _read_width(width: int, depth: int) -> int:
    return min(width, HEAD_HIDDEN_MAX) if depth else width


RECONSTRUCTION_MAX_WEIGHTS = 1 << 22  # a decoder larger than this is not built (the stage keeps its classifier)


class Reconstruction(nn.Module):
    """Decodes a stage's input from its output (InfoPro's reconstruction term, Wang et al. 2021,
    here of the stage's own input, the one it can see): a local loss that rewards keeping what
    the input held, where a classifier alone lets an early stage discard what later stages
    need. Conv output to conv input: a 3x3 conv to the input's channels, resized to its size;
    vectors (or every position of a sequence) to vectors: a linear map. None where no decoder
    of this kind fits (`for_shapes`)."""

    def __init__(self, out_shape: Sequence[int], in_shape: Sequence[int]):
        super().__init__()
        self.in_shape = tuple(in_shape)
        if len(out_shape) == 3:
            self.net: nn.Module = nn.Conv2d(out_shape[0], in_shape[0], 3, padding=1)
        else:
            self.net = nn.Linear(out_shape[-1], in_shape[-1])

    @staticmethod
    def fits(out_shape: Sequence[int], in_shape: Sequence[int]) -> bool:
        out_shape, in_shape = tuple(out_shape), tuple(in_shape)
        if len(out_shape) == 3 and len(in_shape) == 3:
            return out_shape[0] * in_shape[0] * 9 <= RECONSTRUCTION_MAX_WEIGHTS
        if len(out_shape) == len(in_shape) and len(out_shape) in (1, 2) and out_shape[:-1] == in_shape[:-1]:
            return out_shape[-1] * in_shape[-1] <= RECONSTRUCTION_MAX_WEIGHTS
        return False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.net(h)
        if y.dim() == 4 and tuple(y.shape[2:]) != self.in_shape[1:]:
            y = F.interpolate(y, size=self.in_shape[1:], mode="bilinear", align_corners=False)
        return y


class _MeanOverPositions(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=1)


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")
