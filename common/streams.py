"""Stream data: one long sequence read in order, for recurrent models trained with truncated
backprop through time (TBPTT).

A stream split is a split like any other whose samples are windows: sample i is positions
[iT, (i+1)T) of the stream, with a class target at every position (IGNORE where nothing is to
be predicted, PyTorch's own ignore_index). What makes it a stream is the order its batches are
read in (`window_batches`): the stream is cut into B equal parts, one per row of a batch, and
step w takes window w of every part, so each row of consecutive batches continues the same part
and a recurrent layer can carry its state from one window to the next.

The built-in streams: the Copy and Repeat-Copy tasks (generated from a seed; the DNI paper's
section 3.1 after the Neural Turing Machine's), and characters of the Python standard library's
own source files (every machine with Python has them; no download).
"""
from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

IGNORE = -100  # a position without a target (torch.nn.functional.cross_entropy's ignore_index; the wire's IGNORE_LABEL)


class StreamError(ValueError):
    """A stream that cannot be read as asked; the message says why."""


@dataclass
class Stream:
    """One long sequence: inputs at every position (a float tensor [L, ...], or token ids [L]
    given as int64, one-hot encoded a batch at a time over `input_classes`), and a class index
    or IGNORE as the target at every position ([L] int64). This is what a user's sequence
    dataset returns, a train and a test Stream."""
    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int
    input_classes: Optional[int] = None  # token ids' vocabulary (default: num_classes)

    def __post_init__(self) -> None:
        x, y = self.inputs, self.targets
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise StreamError("a Stream's inputs and targets must be tensors")
        if y.dim() != 1 or y.dtype != torch.int64:
            raise StreamError(f"a Stream's targets must be int64 of shape [L], got {y.dtype} {list(y.shape)}")
        if x.shape[:1] != y.shape:
            raise StreamError(f"a Stream's inputs ({list(x.shape)}) and targets ({list(y.shape)}) differ in length")
        if x.is_floating_point():
            if x.dim() < 2:
                raise StreamError("float inputs need a feature dimension: [L, features]")
        elif x.dtype == torch.int64 and x.dim() == 1:
            vocab = self.input_classes or self.num_classes
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
                raise StreamError(f"token ids run from {int(x.min())} to {int(x.max())}, outside 0..{vocab - 1}")
        else:
            raise StreamError(f"a Stream's inputs must be float [L, features] or int64 token ids [L], "
                              f"got {x.dtype} {list(x.shape)}")
        if self.num_classes < 2:
            raise StreamError(f"a Stream needs at least two classes, got {self.num_classes}")
        real = y[y != IGNORE]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.num_classes):
            raise StreamError(f"targets run from {int(real.min())} to {int(real.max())}, outside "
                              f"0..{self.num_classes - 1} (or {IGNORE}: no target)")

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def features(self) -> tuple[int, ...]:
        """One position's input shape."""
        if self.inputs.is_floating_point():
            return tuple(self.inputs.shape[1:])
        return (self.input_classes or self.num_classes,)


class StreamSplit:
    """A stream as a split of windows of `window` positions (see the module docstring)."""
    ordered = True  # read by window_batches, never shuffled

    def __init__(self, stream: Stream, window: int, what: str = "stream"):
        if window < 1:
            raise StreamError(f"the window (--bptt) must be at least 1, got {window}")
        if len(stream) < window:
            raise StreamError(f"the {what} has {len(stream)} positions, fewer than one window of {window} "
                              f"(--bptt): lower --bptt or give a longer stream")
        self.stream = stream
        self.window = window
        self.what = what

    def __len__(self) -> int:
        return len(self.stream) // self.window

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.window, *self.stream.features)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows `idx` as a batch: inputs [B, T, ...] float and targets [B, T]."""
        t = self.window
        pos = (idx[:, None] * t + torch.arange(t)[None, :]).reshape(-1)
        x, y = self.stream.inputs[pos], self.stream.targets[pos]
        if not x.is_floating_point():
            x = torch.nn.functional.one_hot(x, self.stream.features[0]).float()
        return x.reshape(len(idx), t, *self.stream.features), y.reshape(len(idx), t)


def window_batches(n_windows: int, rows: int) -> Iterator[torch.Tensor]:
    """The windows each batch takes: the n_windows cut into `rows` parts, batch w = window w of
    every part (so row r of consecutive batches reads part r in order). Windows past the last
    whole batch are left out."""
    per_row = n_windows // rows
    starts = torch.arange(rows) * per_row
    for w in range(per_row):
        yield starts + w


# ---------------------------------------------------------------------- the Copy tasks
SYMBOLS = 8  # the alphabet of the Copy tasks' sequences


def copy_stream(positions: int, length: int, seed: int, repeats: int = 1) -> Stream:
    """Episodes of the Copy task (repeats=1) or Repeat-Copy (repeats R > 1) back to back, cut
    at `positions`. An episode reads `length` random symbols (one-hot over SYMBOLS channels),
    then a go position (its own channel, which for Repeat-Copy carries the repeat count r/R, r
    drawn from 1..R), and must then write the sequence r times and a stop class. Targets are
    IGNORE while reading; classes are the SYMBOLS symbols and stop. Every output depends on an
    input length + 1 positions (or more) before it."""
    if length < 1 or repeats < 1:
        raise StreamError(f"a copy task needs length and repeats of at least 1, got {length}, {repeats}")
    g = torch.Generator().manual_seed(seed)
    stop = SYMBOLS
    channels = SYMBOLS + 1
    xs, ys, n = [], [], 0
    while n < positions:
        seq = torch.randint(0, SYMBOLS, (length,), generator=g)
        r = int(torch.randint(1, repeats + 1, (1,), generator=g)) if repeats > 1 else 1
        episode = length + 1 + r * length + 1
        x = torch.zeros(episode, channels)
        x[torch.arange(length), seq] = 1.0
        x[length, SYMBOLS] = r / repeats
        y = torch.full((episode,), IGNORE, dtype=torch.int64)
        y[length + 1:length + 1 + r * length] = seq.repeat(r)
        y[-1] = stop
        xs.append(x)
        ys.append(y)
        n += episode
    return Stream(torch.cat(xs)[:positions].contiguous(), torch.cat(ys)[:positions].contiguous(), SYMBOLS + 1)


# ---------------------------------------------------------------------- text
TEXT_FIRST, TEXT_LAST = 32, 126  # printable ASCII; tab and newline are classes of their own
TEXT_SPLIT = (0.9, 0.05, 0.05)  # train, valid, test: consecutive parts of the text, in this order


def text_vocabulary() -> list[str]:
    """The classes of the text task: newline, tab, printable ASCII, and one for anything else."""
    return ["\n", "\t", *(chr(c) for c in range(TEXT_FIRST, TEXT_LAST + 1)), "<other>"]


def stdlib_text(folder: Optional[str] = None) -> str:
    """The Python standard library's top-level source files (`*.py` in its folder, or `folder`),
    sorted by name and joined: the same text on every machine with the same Python."""
    root = Path(folder or sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise StreamError(f"no *.py files in {root} (the text task reads the Python standard library's sources; "
                          f"pass --data-dir with a folder of .py files)")
    return "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def encode_text(text: str) -> torch.Tensor:
    """Character classes (text_vocabulary's indices) of `text`, as int64."""
    import numpy as np
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    other = len(text_vocabulary()) - 1
    out = np.where((codes >= TEXT_FIRST) & (codes <= TEXT_LAST), codes - TEXT_FIRST + 2, other)
    out = np.where(codes == 10, 0, np.where(codes == 9, 1, out))
    return torch.from_numpy(out)


def text_streams(text: str, chars: Optional[int] = None) -> tuple[Stream, Stream, Stream]:
    """(train, valid, test) streams of next-character prediction: the input at a position is its
    character, the target the next one. The first `chars` characters (all when None) are split
    into consecutive parts by TEXT_SPLIT."""
    codes = encode_text(text if chars is None else text[:chars + 1])
    vocab = len(text_vocabulary())
    n = len(codes) - 1
    bounds = [0]
    for share in TEXT_SPLIT:
        bounds.append(bounds[-1] + int(share * n))
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        parts.append(Stream(codes[a:b].clone(), codes[a + 1:b + 1].clone(), vocab))
    return parts[0], parts[1], parts[2]
