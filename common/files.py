"""Writing run files so that a reader never sees half of one: atomic JSON and checkpoints,
and the append-only metrics log."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write to a temporary file beside `path`, fsync it, rename over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


class JsonlLog:
    """metrics.jsonl: one JSON record per line, flushed as written so a crash keeps the history."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")
        self.dropped = 0  # records lost to a write error (a full disk): training goes on

    def write(self, record: dict) -> None:
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as exc:
            self.dropped += 1
            if self.dropped == 1:
                print(f"warning: cannot write {self.path}: {exc}; training goes on, records are dropped "
                      f"until it can", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:
                pass  # what could not be flushed was counted in `dropped` or is lost with the disk


class JsonlTail:
    """Follow a JSONL file another process appends to: each call returns the records completed
    since the last call (a half-written last line waits for the next call)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def load_model_state(run_dir: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """The trained network of a run, as {unit index: state dict}, from its stage checkpoints."""
    units: dict[int, dict[str, torch.Tensor]] = {}
    files = sorted(Path(run_dir).glob("stage*.pt"))
    if not files:
        raise FileNotFoundError(f"no stage*.pt checkpoints in {run_dir}")
    for f in files:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
        units.update({int(k): v for k, v in ckpt["units"].items()})
    return units


def largest_difference(expected: dict[int, dict[str, torch.Tensor]],
                       got: dict[int, dict[str, torch.Tensor]]) -> tuple[float, str]:
    """How far apart two runs' parameters are: the largest element-wise |got - expected| over
    every floating-point tensor of every unit (both from load_model_state), and where it is."""
    worst, where = 0.0, "nowhere"
    for unit in expected:
        for name, a in expected[unit].items():
            b = got[unit][name]
            if a.is_floating_point() and a.numel():
                d = float((b.double() - a.double()).abs().max())
                if d > worst:
                    worst, where = d, f"unit {unit} {name}"
    return worst, where
