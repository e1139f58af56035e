"""Recurrent layers for stream data: truncated backprop through time, and the DNI synthetic
gradient of the state carried from one window to the next.

`Recurrent` makes a recurrent core a layer like any other (input [B, T, D] -> output [B, T, H]):
it keeps the core's final state after each window and starts the next window from it, detached,
so a backward pass never leaves its window (truncated BPTT with window T). Training and
evaluation carry separate states (an evaluation reads its own streams and must not disturb the
training streams'), and a stage resets them where a stream restarts (a new epoch, a new
evaluation).

`StateSynthesizer` is the DNI paper's answer to the window's end (section 3.1): a small model
predicts dL/ds for the final state s_T from s_T itself, and that prediction enters the window's
backward pass beside the output's gradient, so the layer learns from the loss beyond its window.
It learns from the gradient the next window's backward pass gives that window's initial state
(the same s_T), which already holds the next prediction (bootstrapping, as in the paper).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

State = Union[torch.Tensor, tuple[torch.Tensor, ...]]


class RecurrentError(ValueError):
    """A recurrent core that cannot be used as a layer; the message says why."""


def _tensors(state: Optional[State]) -> tuple[torch.Tensor, ...]:
    if state is None:
        return ()
    return state if isinstance(state, tuple) else (state,)


def _like(state: State, tensors) -> State:
    tensors = tuple(tensors)
    return tensors if isinstance(state, tuple) else tensors[0]


class Recurrent(nn.Module):
    """A recurrent core as one layer: nn.LSTM / nn.GRU / nn.RNN (batch_first), a cell
    (nn.LSTMCell, nn.GRUCell, nn.RNNCell: unrolled over the window), or a user's core called as
    `core(x [B, T, D], state or None) -> (output [B, T, H], state)` where the state is a tensor or
    a tuple of tensors with the batch first. Its output is the core's output sequence."""

    def __init__(self, core: nn.Module):
        super().__init__()
        if isinstance(core, nn.RNNBase) and not core.batch_first:
            raise RecurrentError(f"{type(core).__name__} must be built with batch_first=True: stages pass "
                                 f"[batch, time, features]")
        self.core = core
        self.streaming = False  # carry the state between batches (stream data); else each starts at zero
        self._carried: dict[bool, Optional[State]] = {True: None, False: None}  # by self.training
        self.synthesizer: Optional["StateSynthesizer"] = None  # a plain attribute: not a submodule

    def __setattr__(self, name, value):
        if name == "synthesizer":  # kept out of the module's parameters, state_dict and copies' cost
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # the state's batch dimension: torch's recurrent layers keep (layers, batch, hidden)
    def _rows_dim(self) -> int:
        return 1 if isinstance(self.core, nn.RNNBase) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise RecurrentError(f"a recurrent layer takes [batch, time, features], got {list(x.shape)}")
        state = self._carried[self.training] if self.streaming else None
        if state is not None and _tensors(state)[0].shape[self._rows_dim()] != x.shape[0]:
            raise RecurrentError(f"a batch of {x.shape[0]} streams, but the state carried from the last window "
                                 f"holds {_tensors(state)[0].shape[self._rows_dim()]}: every batch of a stream "
                                 f"must have the same rows")
        synth = self.synthesizer if self.training and torch.is_grad_enabled() else None
        if synth is not None and state is not None:
            state = synth.begin_window(state, self.flat(state))
        out, new = self._run(x, state)
        if self.streaming:
            self._carried[self.training] = _like(new, (t.detach() for t in _tensors(new)))
        if synth is not None:
            out = synth.end_window(self, out, new)
        return out

    def _run(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, State]:
        core = self.core
        if isinstance(core, nn.RNNCellBase):
            outs = []
            for t in range(x.shape[1]):
                state = core(x[:, t], state)
                outs.append(state[0] if isinstance(state, tuple) else state)
            return torch.stack(outs, dim=1), state
        result = core(x, state)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.Tensor)):
            raise RecurrentError(f"{type(core).__name__} must return (output, state)")
        out, new = result
        if not all(isinstance(t, torch.Tensor) for t in _tensors(new)) or not _tensors(new):
            raise RecurrentError(f"{type(core).__name__}'s state must be a tensor or a tuple of tensors")
        return out, new

    def flat(self, state: State) -> torch.Tensor:
        """The state as [batch, size]: what a state predictor reads and predicts."""
        d = self._rows_dim()
        parts = [t.transpose(0, d).reshape(t.shape[d], -1) for t in _tensors(state)]
        return torch.cat(parts, dim=1)

    def unflat(self, flat: torch.Tensor, like: State) -> State:
        """The inverse of flat, shaped as `like`."""
        d = self._rows_dim()
        out, at = [], 0
        for t in _tensors(like):
            size = t.numel() // t.shape[d]
            rows_first = t.transpose(0, d).shape
            out.append(flat[:, at:at + size].reshape(rows_first).transpose(0, d))
            at += size
        return _like(like, out)

    # ---------------------------------------------------------------- streams
    def reset(self, training: bool) -> None:
        """Start the training (or the evaluation) streams afresh: the next window starts from zero."""
        self._carried[training] = None

    def carried(self) -> Optional[State]:
        """The training streams' state (for a checkpoint)."""
        return self._carried[True]

    def carry(self, state: Optional[State]) -> None:
        """Continue the training streams from `state` (a checkpoint's)."""
        self._carried[True] = state

    def state_size(self, x: torch.Tensor) -> int:
        """The flat state's size per stream, from one window of input `x` (no state is kept)."""
        with torch.no_grad():
            _, new = self._run(x, None)
        return int(self.flat(new).shape[1])


def recurrent_layers(module: nn.Module) -> list[Recurrent]:
    return [m for m in module.modules() if isinstance(m, Recurrent)]


def reset_streams(module: nn.Module, training: bool) -> None:
    for layer in recurrent_layers(module):
        layer.reset(training)


def stream_through(module: nn.Module) -> None:
    """Its recurrent layers carry their state from one batch to the next (stream data)."""
    for layer in recurrent_layers(module):
        layer.streaming = True


def state_sizes(module: nn.Module, in_shape: tuple[int, ...]) -> list[int]:
    """The flat state size per stream of each recurrent layer of `module` (in order), from one
    probe of a single stream (no state is kept)."""
    layers = recurrent_layers(module)
    if not layers:
        return []
    sizes: dict[int, int] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, i=i: sizes.__setitem__(i, m.state_size(args[0]))) for i, layer in enumerate(layers)]
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, *in_shape))
    finally:
        for h in hooks:
            h.remove()
        module.train(was)
        reset_streams(module, training=False)
    return [sizes[i] for i in range(len(layers))]


def as_layer(unit: nn.Module) -> nn.Module:
    """A model's unit as a layer: a bare torch recurrent layer or cell is wrapped in Recurrent
    (a model may give nn.LSTM(..., batch_first=True) directly)."""
    if isinstance(unit, (nn.RNNBase, nn.RNNCellBase)):
        return Recurrent(unit)
    return unit


class Slow(nn.Module):
    """A recurrent core that ticks every `every` positions, for a network of two timescales: it
    reads its input at positions 0, k, 2k, ... of each window (the window's length a multiple
    of k), carries its own state from tick to tick and window to window, and holds each tick's
    output for the k positions that follow, so position p sees the last tick at or before p
    (nothing from its future). Its output at a position is the input there beside the held
    output ([B, T, D + H]), so a read-out after it sees both timescales."""

    def __init__(self, core: nn.Module, every: int):
        super().__init__()
        if not isinstance(every, int) or every < 1:
            raise RecurrentError(f"a slow core ticks every k >= 1 positions, got k = {every!r}")
        self.every = every
        self.core = core if isinstance(core, Recurrent) else Recurrent(core)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] % self.every:
            raise RecurrentError(f"a slow core ticking every {self.every} positions needs windows of a multiple "
                                 f"of {self.every} positions ([batch, time, features]), got {list(x.shape)}")
        held = self.core(x[:, ::self.every]).repeat_interleave(self.every, dim=1)
        return torch.cat([x, held], dim=2)


class _WithStateGradient(torch.autograd.Function):
    """Passes the output through; in the backward pass the final state's tensors also receive
    the predicted gradients, so whichever backward a rule runs through the output, the window's
    end sees the synthetic gradient."""

    @staticmethod
    def forward(ctx, out, n, *rest):
        ctx.grads = rest[n:]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        return (g, None, *ctx.grads, *([None] * len(ctx.grads)))


class StateSynthesizer:
    """One recurrent layer's state predictor, its optimiser and its running figures. The model
    predicts the per-stream gradient (streams x dL_mean/ds) like the output predictors, so its
    targets do not depend on the batch size; `rows` is the batch's rows."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, discount: float = 1.0):
        self.model = model
        self.optimizer = optimizer
        self.discount = discount
        self._start: Optional[tuple[torch.Tensor, tuple[torch.Tensor, ...], Recurrent]] = None
        self.loss_sum = 0.0
        self.loss_n = 0
        self.cos_sum = 0.0
        self.cos_n = 0

    def begin_window(self, state: State, flat: torch.Tensor) -> State:
        """The window's initial state as leaves whose gradient will be the target of the
        prediction made for it at the end of the last window."""
        leaves = tuple(t.detach().requires_grad_(True) for t in _tensors(state))
        self._start = (flat.detach(), leaves, None)
        return _like(state, leaves)

    def end_window(self, layer: Recurrent, out: torch.Tensor, new: State) -> torch.Tensor:
        if self._start is not None:
            self._start = (self._start[0], self._start[1], layer)
        flat = layer.flat(new).detach().float()
        with torch.no_grad():
            per_stream = self.model(flat)
        tensors = _tensors(new)
        grads = tuple(g.to(t.dtype) for g, t in
                      zip(_tensors(layer.unflat(self.discount * per_stream / flat.shape[0], new)), tensors))
        return _WithStateGradient.apply(out, len(tensors), *tensors, *grads)

    def learn(self) -> None:
        """After the window's backward pass: train on the gradient its initial state received
        (nothing when it received none, e.g. at a stream's start)."""
        if self._start is None:
            return
        flat, leaves, layer = self._start
        if layer is None or any(t.grad is None for t in leaves):
            return
        self._start = None
        target = layer.flat(tuple(t.grad for t in leaves) if len(leaves) > 1 else leaves[0].grad).float()
        target = target * flat.shape[0]
        pred = self.model(flat.float())
        loss = F.mse_loss(pred, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.item()
        self.loss_n += 1
        with torch.no_grad():
            self.cos_sum += float(F.cosine_similarity(pred.reshape(1, -1), target.reshape(1, -1)))
            self.cos_n += 1

    def take(self) -> dict:
        rec = {"state_sg_loss": self.loss_sum / self.loss_n if self.loss_n else None,
               "state_sg_cosine": self.cos_sum / self.cos_n if self.cos_n else None}
        self.loss_sum = self.cos_sum = 0.0
        self.loss_n = self.cos_n = 0
        return rec

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
