"""Property-based: whatever a peer puts in a header (any msgpack value where a field, a dtype or
a shape belongs), decode either returns a message whose every field has its declared type and
which survives another encode/decode unchanged, or raises WireError from an explicit check that
names the field at fault. A message that only the catch-all in `decode` stops
(UncheckedWireError) fails these tests: it names the check to add to common/wire.py."""
from __future__ import annotations

import math
import typing

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthgrad.common import wire

# any msgpack value, nested a little
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                    st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                      max_leaves=12)
kinds = st.one_of(st.sampled_from([int(k) for k in wire.Kind]), values)
FIELDS = {k: sorted(wire._SPECS[cls][0]) for k, cls in wire.MESSAGE_TYPES.items()}
# well-typed values for each declared field type, so that generated messages also get accepted
TYPED = {int: st.integers(min_value=-2**63, max_value=2**64 - 1), float: st.floats(allow_nan=True),
         bool: st.booleans(), str: st.text(max_size=8), dict: st.dictionaries(st.text(max_size=4), values,
                                                                              max_size=4),
         wire.Phase: st.sampled_from([p.value for p in wire.Phase]) | st.text(max_size=8)}


@st.composite
def headers(draw):
    kind = draw(kinds)
    cls = wire.MESSAGE_TYPES.get(kind) if isinstance(kind, int) and not isinstance(kind, bool) else None
    names = FIELDS.get(kind, []) if cls is not None else []
    how = draw(st.sampled_from(["typed", "any", "free"]))
    if how == "typed" and cls is not None:
        types = wire._SPECS[cls][0]
        fields = {n: draw(TYPED.get(types[n], values)) for n in names}
    elif how == "any":
        fields = {n: draw(values) for n in names}
    else:
        fields = draw(values)
    tensors = draw(st.one_of(values, st.lists(st.lists(values, min_size=3, max_size=3), max_size=3),
                             st.lists(st.tuples(st.sampled_from(["g", "h", "labels", "x"]),
                                                st.one_of(st.sampled_from(list(wire.DTYPES)), values),
                                                st.one_of(st.lists(st.integers(min_value=-1, max_value=2**64 - 1),
                                                                   max_size=9), values)).map(list),
                                      max_size=3)))
    return {"kind": kind, "fields": fields, "tensors": tensors}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def decode_or_named_rejection(frames) -> None:
    """The two outcomes these tests allow (see the module docstring)."""
    try:
        msg = wire.decode(frames, max_tensor_bytes=1 << 20)
    except wire.UncheckedWireError as exc:
        pytest.fail(f"only the catch-all stopped this message; add an explicit check to "
                    f"common/wire.py for: {exc}")
    except wire.WireError as exc:
        parts = exc.field.split(".")
        assert exc.field != "message" and all(part in str(exc) for part in parts), \
            f"the rejection does not name its field ({exc.field!r}): {exc}"
        return
    cls = type(msg)
    types = typing.get_type_hints(cls)
    header_types, tensor_names = wire._SPECS[cls]
    for name, t in header_types.items():
        value = getattr(msg, name)
        assert wire._type_ok(value, t), f"{cls.__name__}.{name} = {value!r} accepted as {t.__name__}"
    for name in tensor_names:
        t = getattr(msg, name)
        assert t is None or (isinstance(t, torch.Tensor) and t.dtype in wire.DTYPE_NAMES), (name, types[name])
    again = wire.decode(wire.encode(msg))
    assert type(again) is cls
    for name in [*header_types, *tensor_names]:
        a, b = getattr(msg, name), getattr(again, name)
        assert (a is None and b is None) or _same(a, b), f"{cls.__name__}.{name}: {a!r} became {b!r}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers(), payloads=st.lists(st.binary(max_size=64), max_size=3))
def test_any_header_is_a_typed_message_or_a_named_rejection(header, payloads):
    decode_or_named_rejection([msgpack.packb(header, use_bin_type=True), *payloads])


@settings(max_examples=200, deadline=None)
@given(fields=st.fixed_dictionaries({"step": values | TYPED[int], "to_stage": values | TYPED[int],
                                     "true_grad": values | TYPED[bool], "sent_at": values | TYPED[float]}),
       dtype=st.sampled_from(list(wire.DTYPES)),
       shape=st.lists(st.integers(min_value=0, max_value=4), max_size=3) | st.lists(
           st.integers(min_value=0, max_value=2**64 - 1), max_size=9),
       frame=st.binary(max_size=64))
def test_gradient_headers_with_any_field_values(fields, dtype, shape, frame):
    header = {"kind": int(wire.Kind.GRAD), "fields": fields, "tensors": [["g", dtype, shape]]}
    decode_or_named_rejection([msgpack.packb(header, use_bin_type=True), frame])


def test_both_outcomes_occur():
    """The generators above reach acceptance as well as rejection (else the round-trip half of
    the property would check nothing)."""
    g = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    decode_or_named_rejection(wire.encode(wire.Grad(3, 1, True, g, sent_at=12.5)))
    with pytest.raises(wire.WireError) as info:
        wire.decode(wire.encode(wire.Grad(3, 1, True, g, sent_at=float("nan"))))
    assert info.value.field == "GRAD.sent_at"


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
