"""Property-based: whatever a peer puts in a header (any msgpack value where a field, a dtype or
a shape belongs), decode either returns a message whose every field has its declared type and
which survives another encode/decode unchanged, or raises WireError from an explicit check that
names the field at fault. A message that only the catch-all in `decode` stops
(UncheckedWireError) fails these tests: it names the check to add to common/wire.py.

What "its declared type" means is decided here, from the message dataclasses' own annotations
(`declared`, `has_declared_type`), not by wire's checks: a header whose fields the oracle says
are mistyped must be rejected, naming one of them, and an accepted message's fields must pass
it. Each property counts its outcomes over the messages it generated, and fails unless both
acceptance and rejection were common (otherwise half of it checked nothing)."""
from __future__ import annotations

import collections
import dataclasses
import enum
import math
import types
import typing
from typing import Any, Optional

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.common.costs import HeadChoice, Helpers, PredictorChoice
from synthgrad.common.records import StageSummary, WorkerReport
from tests.helpers import blank_record


def declared(cls: type) -> tuple[dict[str, Any], list[str]]:
    """A message class's header fields with their annotated types, and its tensor fields (those
    annotated as a tensor), read from the dataclass itself."""
    hints = typing.get_type_hints(cls)
    header, tensors = {}, []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if t in (torch.Tensor, Optional[torch.Tensor]):
            tensors.append(f.name)
        else:
            header[f.name] = t
    return header, tensors


def optional_of(t: Any) -> Optional[Any]:
    """X for Optional[X], read off the annotation (None for any other type)."""
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def record_types(cls: type) -> dict[str, Any]:
    """A record dataclass's fields and their annotated types."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def has_declared_type(value: Any, t: Any, *, sent: bool = False) -> bool:
    """The oracle: `value` is a `t` as the annotation means it. A float field takes an int
    (PEP 484's numeric tower), a bool is no int (a flag is not a count), a dict must be one JSON
    can write (string keys; records and configs are written as JSON), and an enum field holds a
    member, or, as `sent` over the wire, one of the members' values. Optional[X] is None or an
    X, list[X] a list of X, tuple[X, ...] a tuple of X (as `sent`, a list), and a record
    dataclass (common/records.py, RunConfig, Helpers) an instance whose every field has its
    type, or, as `sent`, a map with exactly its fields, each of its type."""
    inner = optional_of(t)
    if inner is not None:
        return value is None or has_declared_type(value, inner, sent=sent)
    if typing.get_origin(t) is list:
        (item,) = typing.get_args(t)
        return type(value) is list and all(has_declared_type(v, item, sent=sent) for v in value)
    if typing.get_origin(t) is tuple and typing.get_args(t)[1:] == (...,):
        item = typing.get_args(t)[0]
        return type(value) is (list if sent else tuple) and all(has_declared_type(v, item, sent=sent) for v in value)
    if dataclasses.is_dataclass(t):
        declared_fields = record_types(t)
        if sent and type(value) is dict:
            return set(value) == set(declared_fields) and \
                all(has_declared_type(value[n], ft, sent=True) for n, ft in declared_fields.items())
        return type(value) is t and all(has_declared_type(getattr(value, n), ft) for n, ft in declared_fields.items())
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return isinstance(value, t) or (sent and type(value) is str and value in {m.value for m in t})
    if t is float:
        return type(value) in (int, float)
    if t is dict:
        return type(value) is dict and _json(value)
    if t in (bool, int, str):
        return type(value) is t
    raise AssertionError(f"the oracle has no rule for the declared type {t!r}: add one")


def _json(value: Any) -> bool:
    """A value JSON's data model holds: null, true/false, numbers, strings, arrays, and objects
    with string keys."""
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is list:
        return all(map(_json, value))
    if type(value) is dict:
        return all(type(k) is str and _json(v) for k, v in value.items())
    return False


DECLARED = {kind: declared(cls) for kind, cls in wire.MESSAGE_TYPES.items()}

# any msgpack value, nested a little
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                    st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                      max_leaves=12)
kinds = st.one_of(st.sampled_from([int(k) for k in wire.Kind]), values)
# well-typed values for each declared field type, so that generated messages also get accepted
TYPED = {int: st.integers(min_value=-2**63, max_value=2**64 - 1), float: st.floats(allow_nan=True),
         bool: st.booleans(), str: st.text(max_size=8), dict: st.dictionaries(st.text(max_size=4), values,
                                                                              max_size=4),
         wire.Phase: st.sampled_from([p.value for p in wire.Phase]) | st.text(max_size=8)}
# values a receiver can use as well (a time is finite and not negative; a record holds only
# what JSON writes): most messages built from these are accepted
json_scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
WELL = {**TYPED, float: st.floats(min_value=0, max_value=1e12) | st.integers(0, 2**53),
        dict: st.dictionaries(st.text(max_size=4), json_values, max_size=4),
        wire.Phase: st.sampled_from([p.value for p in wire.Phase])}
# what a careless or hostile peer puts in a field of another type: bools, numbers, strings and
# bytes that look alike, an enum member's name, or anything
NEAR = st.one_of(st.booleans(), st.sampled_from([0, 1, 1.0, "1", b"1", "TRAIN", [], {}, None]), values)


def strategy(t: Any, table: dict) -> st.SearchStrategy:
    """Values of the annotated type `t` from `table` (TYPED or WELL), records and their
    Optional and list fields included; anything at all for a type the table lacks."""
    inner = optional_of(t)
    if inner is not None:
        return st.none() | strategy(inner, table)
    if typing.get_origin(t) in (list, tuple):  # a tuple[X, ...] is sent as a list
        return st.lists(strategy(typing.get_args(t)[0], table), max_size=3)
    if dataclasses.is_dataclass(t):
        return st.fixed_dictionaries({n: strategy(ft, table) for n, ft in record_types(t).items()})
    if t not in table and isinstance(t, type) and issubclass(t, enum.Enum):
        return st.sampled_from([m.value for m in t]) | st.text(max_size=8)
    return table.get(t, values)


@st.composite
def fitting_tensors(draw, names: list[str]) -> tuple[list, list[bytes]]:
    """Tensor entries for some of `names`, each with a frame of exactly its size."""
    specs, frames = [], []
    for name in draw(st.lists(st.sampled_from(names), unique=True)) if names else []:
        dtype = draw(st.sampled_from(list(wire.DTYPES)))
        shape = draw(st.lists(st.integers(min_value=0, max_value=3), max_size=3))
        size = math.prod(shape) * torch.empty((), dtype=wire.DTYPES[dtype]).element_size()
        specs.append([name, dtype, shape])
        frames.append(draw(st.binary(min_size=size, max_size=size)))
    return specs, frames


@st.composite
def messages(draw) -> list[bytes]:
    how = draw(st.sampled_from(["well", "well", "near", "typed", "any", "free"]))
    kind = draw(st.sampled_from(list(DECLARED)).map(int) if how in ("well", "near") else kinds)
    known = isinstance(kind, int) and not isinstance(kind, bool) and kind in DECLARED
    header_types, tensor_names = DECLARED[kind] if known else ({}, [])
    if how in ("well", "near", "typed") and known:
        fields = {n: draw(strategy(t, TYPED if how == "typed" else WELL)) for n, t in header_types.items()}
        if how == "near" and fields:  # one field off: a value of a kin type (a flag for a count) or any
            name = draw(st.sampled_from(sorted(fields)))
            record = fields[name]
            if isinstance(record, dict) and dataclasses.is_dataclass(header_types[name]) and draw(st.booleans()):
                if draw(st.booleans()):  # one of the record's own fields off
                    record[draw(st.sampled_from(sorted(record)))] = draw(NEAR)
                elif draw(st.booleans()):  # a field it does not have
                    record[draw(st.text(max_size=6))] = draw(NEAR)
                else:  # one missing
                    del record[draw(st.sampled_from(sorted(record)))]
            else:
                fields[name] = draw(NEAR)
    elif how == "any":
        fields = {n: draw(values) for n in header_types}
    else:
        fields = draw(values)
    if how in ("well", "near") or draw(st.booleans()):
        tensors, frames = draw(fitting_tensors(tensor_names))
    else:
        tensors = draw(st.one_of(values, st.lists(st.lists(values, min_size=3, max_size=3), max_size=3),
                                 st.lists(st.tuples(st.sampled_from(["g", "h", "labels", "x"]),
                                                    st.one_of(st.sampled_from(list(wire.DTYPES)), values),
                                                    st.one_of(st.lists(st.integers(min_value=-1,
                                                                                   max_value=2**64 - 1),
                                                                       max_size=9), values)).map(list),
                                          max_size=3)))
        frames = draw(st.lists(st.binary(max_size=64), max_size=3))
    return [msgpack.packb({"kind": kind, "fields": fields, "tensors": tensors}, use_bin_type=True), *frames]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def mistyped_fields(frames: list) -> Optional[tuple[str, list[str]]]:
    """For a header of a known kind with exactly its fields: (the kind's name, the fields the
    oracle says are not of their declared type); None for any other header."""
    header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)  # what decode reads
    kind, fields = header["kind"], header["fields"]
    if not (type(kind) is int and kind in DECLARED and isinstance(fields, dict)):
        return None
    header_types, _ = DECLARED[kind]
    if set(fields) != set(header_types):
        return None
    return wire.Kind(kind).name, [n for n, t in header_types.items() if not has_declared_type(fields[n], t, sent=True)]


def decode_or_named_rejection(frames) -> str:
    """The two outcomes these tests allow (see the module docstring); returns which it was."""
    typed = mistyped_fields(frames)
    try:
        msg = wire.decode(frames, max_tensor_bytes=1 << 20)
    except wire.UncheckedWireError as exc:
        pytest.fail(f"only the catch-all stopped this message; add an explicit check to "
                    f"common/wire.py for: {exc}")
    except wire.WireError as exc:
        parts = exc.field.split(".")
        assert exc.field != "message" and all(part in str(exc) for part in parts), \
            f"the rejection does not name its field ({exc.field!r}): {exc}"
        if typed is not None and typed[1]:  # fields are checked first: one of them is named
            name, fields = typed  # (or a field inside one: "METRICS.record.loss")
            assert any(exc.field == f"{name}.{f}" or exc.field.startswith(f"{name}.{f}.")
                       for f in DECLARED[wire.Kind[name]][0]), (exc.field, fields)
        return "rejected"
    assert typed is not None and not typed[1], f"accepted with mistyped fields {typed}: {msg!r:.300}"
    cls = type(msg)
    header_types, tensor_names = DECLARED[wire.KIND_OF[cls]]
    for name, t in header_types.items():
        value = getattr(msg, name)
        assert has_declared_type(value, t), f"{cls.__name__}.{name} = {value!r} accepted as {t}"
    for name in tensor_names:
        t = getattr(msg, name)
        assert t is None or (isinstance(t, torch.Tensor) and t.dtype in wire.DTYPES.values()), (name, t)
    again = wire.decode(wire.encode(msg))
    assert type(again) is cls
    for name in [*header_types, *tensor_names]:
        a, b = getattr(msg, name), getattr(again, name)
        assert (a is None and b is None) or _same(a, b), f"{cls.__name__}.{name}: {a!r} became {b!r}"
    return "accepted"


def assert_both_outcomes_common(outcomes: collections.Counter) -> None:
    """Acceptance and rejection each at least a tenth of the generated messages. The examples are
    derandomised (the same on every run), so the share is a property of the generator, not luck."""
    total = sum(outcomes.values())
    assert min(outcomes["accepted"], outcomes["rejected"]) >= total / 10, outcomes


def test_any_header_is_a_typed_message_or_a_named_rejection():
    outcomes: collections.Counter = collections.Counter()

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(frames=messages())
    def check(frames):
        outcomes[decode_or_named_rejection(frames)] += 1

    check()
    assert_both_outcomes_common(outcomes)


@st.composite
def gradient_messages(draw) -> list[bytes]:
    """A GRAD header whose fields are any values or usable ones, and whose one tensor's frame
    fits its shape or is any bytes."""
    how = draw(st.sampled_from(["well", "well", "near", "any"]))
    table = {t: values | TYPED[t] for t in (int, bool, float)} if how == "any" else WELL
    fields = {"step": draw(table[int]), "to_stage": draw(table[int]), "true_grad": draw(table[bool]),
              "sent_at": draw(table[float])}
    if how == "near":  # one field off
        fields[draw(st.sampled_from(sorted(fields)))] = draw(NEAR)
    if draw(st.sampled_from([True, True, False])):
        specs, frames = draw(fitting_tensors(["g"]))
    else:
        shape = draw(st.lists(st.integers(min_value=0, max_value=4), max_size=3)
                     | st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=9))
        specs, frames = [["g", draw(st.sampled_from(list(wire.DTYPES))), shape]], [draw(st.binary(max_size=64))]
    header = {"kind": int(wire.Kind.GRAD), "fields": fields, "tensors": specs}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def test_gradient_headers_with_any_field_values():
    outcomes: collections.Counter = collections.Counter()

    @settings(max_examples=100, deadline=None, derandomize=True)
    @given(frames=gradient_messages())
    def check(frames):
        outcomes[decode_or_named_rejection(frames)] += 1

    check()
    assert_both_outcomes_common(outcomes)


def test_the_oracle_judges_by_the_annotations():
    """The oracle itself, on values whose verdict is known."""
    header_types, tensors = declared(wire.Grad)
    assert header_types == {"step": int, "to_stage": int, "true_grad": bool, "sent_at": float} and tensors == ["g"]
    assert declared(wire.Activation)[0]["phase"] is wire.Phase
    assert has_declared_type(3, float) and has_declared_type(3.5, float) and not has_declared_type("3", float)
    assert has_declared_type(3, int) and not has_declared_type(True, int) and not has_declared_type(3.0, int)
    assert has_declared_type(True, bool) and not has_declared_type(1, bool)
    assert has_declared_type({"a": [1, None]}, dict) and not has_declared_type({"a": b"x"}, dict)
    assert not has_declared_type({1: 2}, dict) and not has_declared_type([], dict)
    assert has_declared_type("train", wire.Phase, sent=True) and not has_declared_type("train", wire.Phase)
    assert has_declared_type(wire.Phase.END, wire.Phase) and not has_declared_type("march", wire.Phase, sent=True)
    assert has_declared_type(None, Optional[float]) and has_declared_type(2, Optional[float])
    assert not has_declared_type("2", Optional[float]) and not has_declared_type(None, float)
    assert has_declared_type([1, 2], list[int]) and not has_declared_type([1, True], list[int])
    assert not has_declared_type((1, 2), list[int])
    report = blank_record(WorkerReport, stage=1)
    sent = wire._plain_value(report)
    assert declared(wire.Metrics)[0]["record"] is WorkerReport
    assert has_declared_type(report, WorkerReport) and has_declared_type(sent, WorkerReport, sent=True)
    assert not has_declared_type(sent, WorkerReport) and not has_declared_type({**sent, "x": 1}, WorkerReport, sent=True)
    assert not has_declared_type({**sent, "step": 1.0}, WorkerReport, sent=True)
    assert not has_declared_type({k: v for k, v in sent.items() if k != "loss"}, WorkerReport, sent=True)


def test_every_record_field_is_one_the_oracle_can_judge():
    """Each record field's type is one the oracle has a rule for, and its zero is well typed."""
    for cls in (WorkerReport, StageSummary):
        assert has_declared_type(blank_record(cls), cls)
    helpers = Helpers(PredictorChoice(8, 3, 1.0), HeadChoice(2, 1.0), (PredictorChoice(4, 1, 1.0),))
    for value in (RunConfig(), RunConfig(groups=(1, 2), threads=(2,), label_shape=()), helpers, Helpers()):
        assert has_declared_type(value, type(value))
        assert has_declared_type(wire._plain_value(value), type(value), sent=True)
    assert has_declared_type((1, 2), tuple[int, ...]) and not has_declared_type([1, 2], tuple[int, ...])
    assert has_declared_type([1, 2], tuple[int, ...], sent=True) and not has_declared_type((1,), tuple[int, ...], sent=True)


@pytest.mark.parametrize("tensors, frames, needle", [
    ([["g", ["float32"], [2]]], [b"\x00" * 8], "not allowed"),  # a dtype that is a list
    ([[["g"], "float32", [2]]], [b"\x00" * 8], "bad entry"),  # a name that is a list
    ([["g", "float32", [0, 2**64 - 1]]], [b""], "bad shape"),  # zero bytes, impossible shape
    ([["g", "float32", [0, 2**31 - 1, 2**31 - 1]]], [b""], "would exceed the bound"),
])
def test_seen_in_the_wild(tensors, frames, needle):
    header = {"kind": int(wire.Kind.GRAD), "fields": {"step": 1, "to_stage": 0, "true_grad": True, "sent_at": 0.0},
              "tensors": tensors}
    with pytest.raises(wire.WireError, match=needle) as info:
        wire.decode([msgpack.packb(header, use_bin_type=True), *frames])
    assert not isinstance(info.value, wire.UncheckedWireError)
