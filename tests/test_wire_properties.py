"""Property-based: whatever a peer puts in a header (any msgpack value where a field, a dtype or
a shape belongs), decode returns a message or raises WireError: nothing else escapes a loop."""
from __future__ import annotations

import msgpack
import pytest
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


@st.composite
def headers(draw):
    kind = draw(kinds)
    names = FIELDS.get(kind, []) if isinstance(kind, int) and not isinstance(kind, bool) else []
    fields = {n: draw(values) for n in names} if draw(st.booleans()) else draw(values)
    tensors = draw(st.one_of(values, st.lists(st.lists(values, min_size=3, max_size=3), max_size=3),
                             st.lists(st.tuples(st.sampled_from(["g", "h", "labels", "x"]),
                                                st.one_of(st.sampled_from(list(wire.DTYPES)), values),
                                                st.one_of(st.lists(st.integers(min_value=-1, max_value=2**64 - 1),
                                                                   max_size=9), values)).map(list),
                                      max_size=3)))
    return {"kind": kind, "fields": fields, "tensors": tensors}


def _only_wire_errors(frames) -> None:
    try:
        wire.decode(frames, max_tensor_bytes=1 << 20)
    except wire.WireError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers(), payloads=st.lists(st.binary(max_size=64), max_size=3))
def test_type_confused_headers_are_rejected_not_raised(header, payloads):
    _only_wire_errors([msgpack.packb(header, use_bin_type=True), *payloads])


@settings(max_examples=200, deadline=None)
@given(fields=st.fixed_dictionaries({"step": values, "to_stage": values, "is_true": values, "sent_at": values}),
       shape=st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=9), frame=st.binary(max_size=64))
def test_gradient_headers_with_any_field_values(fields, shape, frame):
    header = {"kind": int(wire.Kind.GRAD), "fields": fields, "tensors": [["g", "float32", shape]]}
    _only_wire_errors([msgpack.packb(header, use_bin_type=True), frame])


@pytest.mark.parametrize("tensors, frames, needle", [
    ([["g", ["float32"], [2]]], [b"\x00" * 8], "not allowed"),  # a dtype that is a list
    ([[["g"], "float32", [2]]], [b"\x00" * 8], "bad tensor entry"),  # a name that is a list
    ([["g", "float32", [0, 2**64 - 1]]], [b""], "bad shape"),  # zero bytes, impossible shape
    ([["g", "float32", [0, 2**31 - 1, 2**31 - 1]]], [b""], "would exceed the bound"),
])
def test_seen_in_the_wild(tensors, frames, needle):
    header = {"kind": int(wire.Kind.GRAD), "fields": {"step": 1, "to_stage": 0, "is_true": True, "sent_at": 0.0},
              "tensors": tensors}
    with pytest.raises(wire.WireError, match=needle):
        wire.decode([msgpack.packb(header, use_bin_type=True), *frames])
