"""The wire protocol: every message type, and how it becomes ZeroMQ frames and back.

A message is a multipart ZeroMQ message: frame 0 is a msgpack header
``{"kind": int, "fields": {...}, "tensors": [[name, dtype, shape], ...]}``, then one raw frame
per tensor, sent with ``copy=False`` and decoded with ``torch.frombuffer`` (no copy, no pickle).
``decode`` trusts nothing: the kind must be known, the fields must be exactly the dataclass's
with the right types (a record field, such as METRICS' WorkerReport or START's RunConfig and
Helpers, is checked the same way, field by field, from the dataclass's annotations: a field added
to one needs no change here), each tensor's dtype must be allowed and its frame length must equal
``prod(shape) * itemsize``, and nothing may exceed the size bounds.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, fields
from enum import Enum, IntEnum
from typing import Any, Optional, Sequence, Union

import msgpack
import torch

from synthgrad.common.config import RunConfig
from synthgrad.common.costs import Helpers
from synthgrad.common.liveness import Verdict
from synthgrad.common.records import StageSummary, WorkerReport

# frombuffer on a read-only ZeroMQ frame warns once; the tensors are only read, never written.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

MAX_HEADER_BYTES = 64 * 1024
MAX_TENSOR_DIMS = 8
MAX_DIM = 2**31 - 1  # one dimension's size
# torch's CPU allocator starts every tensor on a 64-byte boundary. MKL chooses how to block (and
# so how to round) a matrix product by its operands' alignment: a tensor read in place from a
# ZeroMQ frame at another offset makes `locked` round differently from single-process backprop.
ALIGNMENT = 64

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """A message that is malformed, truncated, oversized or not what the link agreed on.
    `field` names what was wrong ("header", "kind", "GRAD.step", "ACTIVATION.h", ...)."""

    def __init__(self, message: str, field: str = "message"):
        super().__init__(message)
        self.field = field


class UncheckedWireError(WireError):
    """A message that got past every explicit check and still broke decoding. It is rejected
    all the same, but it means a check is missing: the property tests fail on it."""


class Kind(IntEnum):
    REGISTER = 1  # worker -> coordinator: I am stage i (pid, host)
    START = 2  # coordinator -> worker: the config, the run folder, the core to use
    ACTIVATION = 3  # stage i -> stage i+1: h_i with labels (or an end-of-stream marker)
    GRAD = 4  # stage i -> coordinator -> stage i-1: dL/dh_{i-1} for one step
    METRICS = 5  # worker -> coordinator: counters for the last interval
    EVAL = 6  # last stage -> coordinator: test loss and accuracy for one evaluation
    DONE = 7  # worker -> coordinator: finished, final figures, checkpoint written
    STOP = 8  # coordinator -> worker: shut down now
    ERROR = 9  # worker -> coordinator: I (or my replica) failed, here is the verdict
    READY = 10  # worker -> coordinator: set up (model built, data loaded), input bound at ...
    BEGIN = 11  # coordinator -> worker: everyone is ready; your downstream endpoint; train
    HEARTBEAT = 12  # both ways, when nothing else was sent for a while: I am alive
    CHECKPOINT = 13  # coordinator -> stage 0: save at the next step boundary (a marker follows the stream)
    SAVED = 14  # worker -> coordinator: my state after step N is on disk at PATH
    COMMITTED = 15  # coordinator -> every stage: step N is complete everywhere (older files may go)
    RECORD = 16  # status stream -> monitors: one metrics.jsonl record (status, eval)


@dataclass(frozen=True)
class Register:
    stage: int
    pid: int
    host: str


@dataclass(frozen=True)
class Start:
    config: RunConfig  # checked field by field; the worker validates it
    run_dir: str
    core: int  # core to pin to, -1 = none
    total_steps: int  # training steps in the run (workers other than stage 0 load no data)
    helpers: Helpers  # the stage's helper models, as its layout chose them (common/costs.py)
    resume_step: int = -1  # continue after this step (-1: a new run)
    resume_path: str = ""  # this stage's checkpoint of resume_step, on its host
    threads: int = 1  # torch threads (and cores from `core` on, when pinned)
    share: float = 1.0  # this stage's share of the run's FLOPs (a worker placing itself sizes by it)
    yields: bool = False  # run at the lowest CPU priority (common/placement.py yielding_stages)


@dataclass(frozen=True)
class Ready:
    stage: int
    endpoint: str  # where this stage receives activations ("" for stage 0)


@dataclass(frozen=True)
class Begin:
    downstream: str  # endpoint of stage i+1 ("" for the last stage)


class Phase(str, Enum):
    """What an Activation carries: a batch (train, eval) or a marker that follows the batches
    down the FIFO links and carries no tensors (eval_end: the evaluation's last batch came;
    checkpoint: save after `step`; end: no more training)."""
    TRAIN = "train"
    EVAL = "eval"
    EVAL_END = "eval_end"
    CHECKPOINT = "checkpoint"
    END = "end"

    @property
    def is_marker(self) -> bool:
        return self not in (Phase.TRAIN, Phase.EVAL)


@dataclass(frozen=True)
class Activation:
    step: int  # training step, or evaluation batch index
    epoch: int
    phase: Phase
    true_grad: bool  # this step's true gradient will flow back
    h: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    sent_at: float = 0.0  # sender's time.monotonic(); only --link-delay-ms reads it (one host)

    @classmethod
    def marker(cls, phase: Phase, step: int, epoch: int) -> "Activation":
        """A marker of `phase` after training step (or evaluation) `step`: no tensors."""
        if not phase.is_marker:
            raise ValueError(f"{phase.value} carries a batch; it is not a marker")
        return cls(step, epoch, phase, False)


@dataclass(frozen=True)
class Grad:
    step: int
    to_stage: int  # the stage whose output this is the gradient of
    true_grad: bool  # true gradient (False: a bootstrapped synthetic target)
    g: Optional[torch.Tensor] = None
    sent_at: float = 0.0  # as Activation.sent_at


@dataclass(frozen=True)
class Metrics:
    stage: int
    record: WorkerReport


@dataclass(frozen=True)
class EvalResult:
    epoch: int
    step: int
    loss: float
    accuracy: float
    samples: int


@dataclass(frozen=True)
class Done:
    stage: int
    summary: StageSummary


@dataclass(frozen=True)
class Record:
    """A line of metrics.jsonl as the status stream publishes it (coordinator/stream.py): its
    readers (monitors) print it, so it stays a JSON object of any shape."""
    record: dict


@dataclass(frozen=True)
class Stop:
    reason: str


@dataclass(frozen=True)
class Error:
    """A stage cannot go on: why, as liveness says it (common/liveness.py): the process (the stage
    itself, or one of its replicas), the cause, its words and what it ran into."""
    stage: int
    verdict: Verdict


@dataclass(frozen=True)
class Checkpoint:
    reason: str  # "every N s", "interrupted", ... (for the log)


@dataclass(frozen=True)
class Saved:
    stage: int
    step: int  # the last step whose update (and every gradient up to it) is in the file
    path: str
    host: str
    error: str = ""  # why it could not be saved (a full disk, ...); then path is ""


@dataclass(frozen=True)
class Committed:
    step: int  # the manifest names this checkpoint (-1: none yet): a stage may delete its older ones
    drop: int = -1  # a checkpoint that failed on some stage and will never be complete: delete it too


@dataclass(frozen=True)
class Heartbeat:
    stage: int  # the sender's stage; -1 from the coordinator


Message = Union[Register, Start, Ready, Begin, Activation, Grad, Metrics, EvalResult, Done, Stop, Error,
                Heartbeat, Checkpoint, Saved, Committed, Record]
MESSAGE_TYPES: dict[Kind, type] = {
    Kind.REGISTER: Register, Kind.START: Start, Kind.ACTIVATION: Activation, Kind.GRAD: Grad,
    Kind.METRICS: Metrics, Kind.EVAL: EvalResult, Kind.DONE: Done, Kind.STOP: Stop,
    Kind.ERROR: Error, Kind.READY: Ready, Kind.BEGIN: Begin, Kind.HEARTBEAT: Heartbeat,
    Kind.CHECKPOINT: Checkpoint, Kind.SAVED: Saved, Kind.COMMITTED: Committed, Kind.RECORD: Record,
}
KIND_OF = {cls: kind for kind, cls in MESSAGE_TYPES.items()}


def _field_specs(cls: type) -> tuple[dict[str, Any], list[str]]:
    """Header field types and tensor field names of a message class (computed once per class)."""
    hints = typing.get_type_hints(cls)
    header: dict[str, Any] = {}
    tensors: list[str] = []
    for f in fields(cls):
        t = hints[f.name]
        if t in (torch.Tensor, Optional[torch.Tensor]):
            tensors.append(f.name)
        else:
            header[f.name] = t
    return header, tensors


_SPECS = {cls: _field_specs(cls) for cls in MESSAGE_TYPES.values()}
# the most frames any message has: its header and one frame per tensor field
MAX_FRAMES = 1 + max(len(tensors) for _, tensors in _SPECS.values())


def receive(sock: Any, envelope: int = 0) -> list[Any]:
    """One multipart message from `sock`, holding at most `envelope` (a ROUTER's identity) +
    MAX_FRAMES + 1 frames: a longer one is read to its end and its extra frames dropped as they
    come, so a peer cannot make this process hold a million frames; the one extra frame kept
    makes decode reject the message (its header cannot account for it). libzmq has already
    buffered the whole message by now; ZMQ_MAXMSGSIZE bounds each frame, the receive high-water
    mark the number of messages."""
    keep = envelope + MAX_FRAMES + 1
    frames = [sock.recv(copy=False)]
    while frames[-1].more:
        frame = sock.recv(copy=False)
        if len(frames) < keep:
            frames.append(frame)
        elif not frame.more:
            break
    return frames


def _plain(value: Any, depth: int = 0) -> bool:
    """JSON's kinds of value (what a record or a config may hold: it is written as JSON), at
    most 16 deep."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True  # NaN in a metrics record is news (a diverging stage), not a forgery
    if depth >= 16:
        return False
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _value_problem(name: str, value: Any) -> Optional[str]:
    """Why a field of the right type still cannot be used (None when it can)."""
    if name == "sent_at" and not (math.isfinite(value) and value >= 0):
        return f"{value!r} is not a time (finite, not negative)"
    if isinstance(value, dict) and not _plain(value):
        return "holds a value JSON cannot write (bytes, a non-string key, or nesting past 16)"
    return None


def _type_ok(value: Any, t: Any) -> bool:
    """`value` (as msgpack decoded it) is a scalar of type `t`, or an enum member's value."""
    if isinstance(t, type) and issubclass(t, Enum):  # sent as its value: one of the members'
        return isinstance(value, t) or (isinstance(value, str) and value in t._value2member_map_)
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, t)


def _type_name(t: Any) -> str:
    if isinstance(t, type) and issubclass(t, Enum):
        return " | ".join(map(repr, t._value2member_map_))
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _optional_of(t: Any) -> Optional[Any]:
    """X for Optional[X] (None for any other type)."""
    if typing.get_origin(t) in (Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(t)) == 2:
            return args[0]
    return None


MAX_ENTRIES = 1024  # of a list or tuple field


def _sequence_of(t: Any) -> Optional[Any]:
    """X for list[X] and tuple[X, ...] (None for any other type)."""
    args = typing.get_args(t)
    if typing.get_origin(t) is list:
        return args[0]
    if typing.get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


_HINTS: dict[type, dict[str, Any]] = {}


def record_fields(cls: type) -> dict[str, Any]:
    """A record dataclass's fields and their types (computed once per class)."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in fields(cls)}
    return _HINTS[cls]


def _checked(value: Any, t: Any, where: str) -> Any:
    """`value` as a field of type `t` holds it (a record dataclass built, an enum member), or
    WireError naming the field at fault (`where`: "METRICS.record.loss")."""
    inner = _optional_of(t)
    if inner is not None:
        return None if value is None else _checked(value, inner, where)
    item = _sequence_of(t)
    if item is not None:  # a list, or a tuple of any length (sent as a list)
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list, got {value!r:.60}", where)
        if len(value) > MAX_ENTRIES:
            raise WireError(f"{where}: {len(value)} entries (at most {MAX_ENTRIES})", where)
        items = [_checked(v, item, f"{where}.{i}") for i, v in enumerate(value)]
        return items if typing.get_origin(t) is list else tuple(items)
    if dataclasses.is_dataclass(t):
        declared = record_fields(t)
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected a {t.__name__} record, got {value!r:.60}", where)
        if set(value) != set(declared):
            unknown = sorted(map(str, set(value) - set(declared)))
            missing = sorted(set(declared) - set(value))
            raise WireError(f"{where}: fields do not match {t.__name__}: unknown {unknown!s:.200}, "
                            f"missing {missing}", where)
        return t(**{name: _checked(value[name], ft, f"{where}.{name}") for name, ft in declared.items()})
    if not _type_ok(value, t):
        raise WireError(f"{where}: expected {_type_name(t)}, got {value!r:.60}", where)
    name = where.rsplit(".", 1)[-1]
    problem = _value_problem(name, value)
    if problem is not None:
        raise WireError(f"{where}: {problem}", where)
    if isinstance(t, type) and issubclass(t, Enum):
        return t(value)
    return value


# ------------------------------------------------------------------------------ tensors
def tensor_frame(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a buffer ZeroMQ can send without copying (copies only if strided)."""
    if t.dtype not in DTYPE_NAMES:
        raise WireError(f"dtype {t.dtype} cannot be sent; allowed: {', '.join(DTYPES)}")
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_from_frame(buf: Any, dtype_name: str, shape: Sequence[int], name: str,
                      align: bool = True) -> torch.Tensor:
    """The tensor in the frame, read in place; copied once onto an ALIGNMENT boundary when the
    frame is not on one (`align`), so that kernels compute on it exactly as on any tensor."""
    dtype = DTYPES[dtype_name]
    view = memoryview(buf).cast("B")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if view.nbytes != expected:
        raise WireError(f"{name}: frame has {view.nbytes} bytes, "
                        f"header says {dtype_name}{list(shape)} = {expected} bytes (truncated?)", name)
    if expected == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    t = torch.frombuffer(view, dtype=dtype).reshape(tuple(shape))
    if align and t.data_ptr() % ALIGNMENT:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


# ------------------------------------------------------------------------------ encode / decode
def encode(msg: Message) -> list[Any]:
    """Frames for one message: the msgpack header, then one buffer per tensor present."""
    cls = type(msg)
    header_types, tensor_names = _SPECS[cls]
    specs, frames = [], []
    for name in tensor_names:
        t = getattr(msg, name)
        if t is None:
            continue
        specs.append([name, DTYPE_NAMES.get(t.dtype, str(t.dtype)), list(t.shape)])
        frames.append(tensor_frame(t))
    header = {"kind": int(KIND_OF[cls]),
              "fields": {name: _plain_value(getattr(msg, name)) for name in header_types},
              "tensors": specs}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def decode(frames: Sequence[Any], *, max_tensor_bytes: int = 256 << 20, align: bool = True) -> Message:
    """Parse and check one multipart message; raise WireError saying what is wrong, whatever is
    wrong with it (nothing else escapes). `align=False` leaves every tensor in its frame (for a
    reader that only checks or relays it)."""
    try:
        return _decode(frames, max_tensor_bytes, align)
    except WireError:
        raise
    except Exception as exc:  # a case the checks below missed: still a rejection, never a crash
        raise UncheckedWireError(f"malformed message ({type(exc).__name__}: {exc})", "?") from None


def _decode(frames: Sequence[Any], max_tensor_bytes: int, align: bool) -> Message:
    if not frames:
        raise WireError("empty message (no frames)", "frames")
    raw = memoryview(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header of {raw.nbytes} bytes exceeds the {MAX_HEADER_BYTES}-byte bound", "header")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"header is not valid msgpack: {exc}", "header") from None
    if not isinstance(header, dict) or set(header) != {"kind", "fields", "tensors"}:
        raise WireError("header must be a map with exactly the keys kind, fields, tensors", "header")
    try:
        kind = Kind(header["kind"])
    except (ValueError, TypeError):
        raise WireError(f"unknown message kind {header['kind']!r:.100}", "kind") from None
    cls = MESSAGE_TYPES[kind]
    header_types, tensor_names = _SPECS[cls]
    values = header["fields"]
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values) \
            or set(values) != set(header_types):
        got = sorted(map(str, values)) if isinstance(values, dict) else type(values).__name__
        raise WireError(f"{kind.name}.fields: {got!s:.200} do not match {sorted(header_types)}",
                        f"{kind.name}.fields")
    checked = {name: _checked(values[name], t, f"{kind.name}.{name}") for name, t in header_types.items()}
    specs = header["tensors"]
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        n = len(specs) if isinstance(specs, list) else "?"
        raise WireError(f"{kind.name}.tensors: the header lists {n} but {len(frames) - 1} tensor frames came",
                        f"{kind.name}.tensors")
    tensors: dict[str, torch.Tensor] = {}
    total = 0
    for spec, frame in zip(specs, frames[1:]):
        if (not isinstance(spec, list) or len(spec) != 3 or not isinstance(spec[0], str)
                or spec[0] not in tensor_names or spec[0] in tensors):
            raise WireError(f"{kind.name}.tensors: bad entry {spec!r:.200}; allowed names {tensor_names}",
                            f"{kind.name}.tensors")
        name, dtype_name, shape = spec
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise WireError(f"{kind.name}.{name}: dtype {dtype_name!r:.100} not allowed", f"{kind.name}.{name}")
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
                or not all(_type_ok(s, int) and 0 <= s <= MAX_DIM for s in shape)):
            raise WireError(f"{kind.name}.{name}: bad shape {shape!r:.200}", f"{kind.name}.{name}")
        itemsize = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
        # a zero-sized dimension makes any shape zero bytes: bound the others too
        if math.prod(max(s, 1) for s in shape) * itemsize > max_tensor_bytes:
            raise WireError(f"{kind.name}.{name}: shape {shape} would exceed the bound of "
                            f"{max_tensor_bytes} bytes (--max-message-mb)", f"{kind.name}.{name}")
        total += math.prod(shape) * itemsize
        if total > max_tensor_bytes:
            raise WireError(f"{kind.name}.tensors: {total} bytes in all exceed the bound of "
                            f"{max_tensor_bytes} bytes (--max-message-mb)", f"{kind.name}.tensors")
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        tensors[name] = tensor_from_frame(buf, dtype_name, shape, f"{kind.name}.{name}", align)
    return cls(**checked, **tensors)


def _plain_value(value: Any) -> Any:
    """A header field as msgpack sends it (an enum member as its value, a record as a map, a
    tuple as a list)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_value(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    return value.value if isinstance(value, Enum) else value


def check_tensor(t: Optional[torch.Tensor], what: str, dtype: torch.dtype,
                 tail_shape: Sequence[int], max_batch: int, exact: bool = False) -> torch.Tensor:
    """Check a received tensor against what the link agreed on: [batch, *tail_shape] with
    batch == max_batch (`exact`: a training batch, always full) or 1 <= batch <= max_batch."""
    if t is None:
        raise WireError(f"{what}: tensor missing", what)
    if t.dtype != dtype:
        raise WireError(f"{what}: dtype {DTYPE_NAMES.get(t.dtype, t.dtype)}, "
                        f"expected {DTYPE_NAMES[dtype]}", what)
    batch_ok = t.dim() >= 1 and (t.shape[0] == max_batch if exact else 1 <= t.shape[0] <= max_batch)
    if t.dim() != 1 + len(tail_shape) or tuple(t.shape[1:]) != tuple(tail_shape) or not batch_ok:
        rows = str(max_batch) if exact else f"1..{max_batch}"
        raise WireError(f"{what}: shape {list(t.shape)}, expected [{rows}, "
                        f"{', '.join(map(str, tail_shape))}]", what)
    return t


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise WireError(f"{what}: NaN or infinite values", what)
    return t


IGNORE_LABEL = -100  # a stream position without a target (common/streams.py IGNORE)


def check_labels(labels: torch.Tensor, num_classes: int, what: str, positions: bool = False) -> torch.Tensor:
    """Class indices in 0..num_classes-1 (`positions`: targets at every position of a window,
    where IGNORE_LABEL marks a position without one)."""
    real = labels[labels != IGNORE_LABEL] if positions else labels
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= num_classes):
        raise WireError(f"{what}: labels outside 0..{num_classes - 1}"
                        f"{f' (or {IGNORE_LABEL}: no target)' if positions else ''}", what)
    return labels
