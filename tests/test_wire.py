"""The wire protocol round-trips every tensor kind and rejects every malformed message."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import msgpack
import pytest
import torch
import zmq

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.common.costs import HeadChoice, Helpers, PredictorChoice
from synthgrad.common.modes import Mode
from synthgrad.common.records import StageSummary, WorkerReport
from tests.helpers import blank_record


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_round_trip_dtypes(dtype):
    t = (torch.randn(5, 7) * 100).to(dtype)
    msg = wire.decode(wire.encode(wire.Grad(3, 1, True, t)))
    assert isinstance(msg, wire.Grad) and msg.step == 3 and msg.to_stage == 1 and msg.true_grad
    assert msg.g.dtype == dtype and torch.equal(msg.g, t)


@pytest.mark.parametrize("t", [
    torch.randn(6, 4).t(),  # non-contiguous
    torch.randn(8, 8)[::2, 1::3],  # strided slice
    torch.empty(0, 16),  # empty
    torch.tensor(3.5),  # scalar
    torch.randn(2, 3, 4, 5),
], ids=["transposed", "strided", "empty", "scalar", "4d"])
def test_round_trip_shapes(t):
    msg = wire.decode(wire.encode(wire.Activation(1, 0, wire.Phase.TRAIN, False, t, torch.arange(2))))
    assert msg.h.shape == t.shape and torch.equal(msg.h, t)
    assert torch.equal(msg.labels, torch.arange(2))


@pytest.mark.parametrize("offset", [0, 4, 8, 24])
def test_decoded_tensors_start_on_the_allocator_alignment(offset):
    """A frame at any offset decodes to a tensor on a 64-byte boundary (read in place when the
    frame is aligned), the alignment of every tensor torch allocates; the coordinator, which only
    relays, can keep frames as they are."""
    t = torch.randn(64, 32)
    header, frame = wire.encode(wire.Grad(0, 0, True, t))
    raw = bytes(frame)
    buf = bytearray(len(raw) + 2 * wire.ALIGNMENT)
    start = (-torch.frombuffer(buf, dtype=torch.uint8).data_ptr()) % wire.ALIGNMENT + offset
    buf[start:start + len(raw)] = raw
    at = memoryview(buf)[start:start + len(raw)]
    msg = wire.decode([header, at])
    assert torch.equal(msg.g, t) and msg.g.data_ptr() % wire.ALIGNMENT == 0
    in_place = msg.g.data_ptr() == torch.frombuffer(at, dtype=torch.uint8).data_ptr()
    assert in_place == (offset == 0)
    relayed = wire.decode([header, at], align=False)
    assert relayed.g.data_ptr() % wire.ALIGNMENT == offset


def test_round_trip_over_zeromq_without_tensors():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://t")
        b.connect("inproc://t")
        big = torch.randn(256, 256)
        report = blank_record(WorkerReport, stage=1, step=7, samples_per_s=1.5, loss=None)
        a.send_multipart(wire.encode(wire.Activation(9, 2, wire.Phase.EVAL, True, big, None)), copy=False)
        a.send_multipart(wire.encode(wire.Metrics(1, report)))
        m1 = wire.decode(b.recv_multipart(copy=False))
        m2 = wire.decode(b.recv_multipart(copy=False))
        assert torch.equal(m1.h, big) and m1.labels is None and m1.phase is wire.Phase.EVAL
        assert m2 == wire.Metrics(1, report) and m2.record.loss is None
    finally:
        a.close(0), b.close(0), ctx.term()


def test_a_phase_travels_as_its_name_and_decodes_to_its_member():
    for phase in wire.Phase:
        msg = wire.decode(wire.encode(wire.Activation.marker(phase, 3, 0) if phase.is_marker
                                      else wire.Activation(3, 0, phase, False, torch.zeros(2, 1), torch.zeros(2))))
        assert msg.phase is phase
    with pytest.raises(ValueError, match="not a marker"):
        wire.Activation.marker(wire.Phase.TRAIN, 0, 0)
    fields = {"step": 1, "epoch": 0, "phase": "pause", "true_grad": False, "sent_at": 0.0}
    with pytest.raises(wire.WireError, match="'train' \\| 'eval'") as err:
        wire.decode([_header(int(wire.Kind.ACTIVATION), fields)])
    assert err.value.field == "ACTIVATION.phase" and not isinstance(err.value, wire.UncheckedWireError)


def _header(kind, fields, tensors=()):
    return msgpack.packb({"kind": kind, "fields": fields, "tensors": list(tensors)})


GOOD_FIELDS = {"step": 1, "to_stage": 0, "true_grad": True, "sent_at": 0.0}


@pytest.mark.parametrize("frames, needle", [
    ([], "empty message"),
    ([b"\xc1\xff\x00"], "not valid msgpack"),
    ([msgpack.packb([1, 2, 3])], "must be a map"),
    ([_header(99, {})], "unknown message kind"),
    ([_header(4, {"step": 1})], "do not match"),
    ([_header(4, {**GOOD_FIELDS, "extra": 1})], "do not match"),
    ([_header(4, {**GOOD_FIELDS, "step": "one"})], "expected int"),
    ([_header(4, {**GOOD_FIELDS, "true_grad": 1})], "expected bool"),
    ([_header(4, GOOD_FIELDS, [["g", "float32", [2, 2]]])], "tensor frames"),
    ([_header(4, GOOD_FIELDS, [["g", "float32", [2, 2]]]), b"\x00" * 15], "truncated"),
    ([_header(4, GOOD_FIELDS, [["g", "float32", [2, 2]]]), b"\x00" * 17], "16 bytes"),
    ([_header(4, GOOD_FIELDS, [["g", "complex", [2]]]), b"\x00" * 8], "not allowed"),
    ([_header(4, GOOD_FIELDS, [["nope", "float32", [1]]]), b"\x00" * 4], "bad entry"),
    ([_header(4, GOOD_FIELDS, [["g", "float32", [-1]]]), b""], "bad shape"),
    ([_header(4, GOOD_FIELDS, [["g", "float32", [1 << 20, 1 << 10]]]), b""], "exceed the bound"),
    ([b"\x00" * (wire.MAX_HEADER_BYTES + 1)], "exceeds"),
], ids=["empty", "garbage", "not-map", "bad-kind", "missing-field", "extra-field", "wrong-type",
        "int-for-bool", "missing-frame", "truncated", "too-long", "bad-dtype", "bad-name",
        "negative-dim", "oversized", "huge-header"])
def test_malformed_messages_rejected(frames, needle):
    with pytest.raises(wire.WireError, match=needle):
        wire.decode(frames, max_tensor_bytes=1 << 20)


def test_check_tensor_enforces_link_agreement():
    ok = torch.zeros(4, 8)
    assert wire.check_tensor(ok, "h", torch.float32, (8,), 4) is ok
    with pytest.raises(wire.WireError, match="dtype float16"):
        wire.check_tensor(ok.half(), "h", torch.float32, (8,), 4)
    with pytest.raises(wire.WireError, match=r"shape \[4, 9\]"):
        wire.check_tensor(torch.zeros(4, 9), "h", torch.float32, (8,), 4)
    with pytest.raises(wire.WireError, match="expected \\[1..4"):
        wire.check_tensor(torch.zeros(5, 8), "h", torch.float32, (8,), 4)
    with pytest.raises(wire.WireError, match="missing"):
        wire.check_tensor(None, "h", torch.float32, (8,), 4)


def test_a_message_of_many_frames_is_held_bounded_and_rejected():
    """A peer sending 100,000 empty frames in one message: this process keeps a handful of them,
    decode rejects the message, and the next message on the link reads normally."""
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        pull.bind("inproc://frames")
        push.connect("inproc://frames")
        good = wire.encode(wire.Grad(3, 1, True, torch.ones(2, 2)))
        push.send_multipart([good[0], *([b""] * 100_000)])
        push.send_multipart(good)
        frames = wire.receive(pull)
        assert len(frames) == wire.MAX_FRAMES + 1
        with pytest.raises(wire.WireError, match="tensor frames came"):
            wire.decode(frames)
        msg = wire.decode(wire.receive(pull))
        assert isinstance(msg, wire.Grad) and msg.step == 3
        push.send_multipart([b"id", *good])  # a ROUTER's identity frame comes on top
        assert len(wire.receive(pull, envelope=1)) == 1 + len(good)
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def _record_header(kind: wire.Kind, stage: int, record: dict) -> list[bytes]:
    name = "record" if kind is wire.Kind.METRICS else "summary"
    return [msgpack.packb({"kind": int(kind), "fields": {"stage": stage, name: record}, "tensors": []})]


def test_records_travel_typed_and_come_back_equal():
    """METRICS and DONE carry dataclasses; decode rebuilds them, lists and None included."""
    summary = blank_record(StageSummary, stage=2, last_step=19, checkpoint="/x/stage2.pt", host="h",
                           units=[3, 5], replica_pids=[11, 12], cores_allowed=None, gradient_delay_max=4)
    done = wire.decode(wire.encode(wire.Done(2, summary)))
    assert done == wire.Done(2, summary) and isinstance(done.summary, StageSummary)
    assert done.summary.units == [3, 5] and done.summary.cores_allowed is None
    report = blank_record(WorkerReport, stage=1, state_sg_loss=0.5, final=True)
    assert wire.decode(wire.encode(wire.Metrics(1, report))).record == report
    assert wire.decode(wire.encode(wire.Record({"event": "status", "x": [1, None]}))).record == \
        {"event": "status", "x": [1, None]}


@pytest.mark.parametrize("change, field, needle", [
    ({"surprise": 1}, "METRICS.record", r"unknown \['surprise'\]"),
    ({"step": "5"}, "METRICS.record.step", "expected int"),
    ({"step": True}, "METRICS.record.step", "expected int"),
    ({"step": None}, "METRICS.record.step", "expected int"),  # not Optional: None is no step
    ({"loss": "low"}, "METRICS.record.loss", "expected float"),
    ({"final": 1}, "METRICS.record.final", "expected bool"),
])
def test_a_records_unknown_or_mistyped_field_is_named(change, field, needle):
    rec = {**wire._plain_value(blank_record(WorkerReport, stage=1)), **change}
    with pytest.raises(wire.WireError, match=needle) as info:
        wire.decode(_record_header(wire.Kind.METRICS, 1, rec))
    assert info.value.field == field and not isinstance(info.value, wire.UncheckedWireError)


def test_a_summarys_missing_or_mistyped_field_is_named():
    rec = wire._plain_value(blank_record(StageSummary, stage=0))
    del rec["host"]
    with pytest.raises(wire.WireError, match=r"missing \['host'\]") as info:
        wire.decode(_record_header(wire.Kind.DONE, 0, rec))
    assert info.value.field == "DONE.summary"
    for value, field in (([1, "2"], "DONE.summary.units.1"), ({"a": 1}, "DONE.summary.units"),
                         (None, "DONE.summary.units")):
        bad = {**wire._plain_value(blank_record(StageSummary, stage=0)), "units": value}
        with pytest.raises(wire.WireError) as info:
            wire.decode(_record_header(wire.Kind.DONE, 0, bad))
        assert info.value.field == field, (value, info.value)
    with pytest.raises(wire.WireError, match="DONE.summary: expected a StageSummary"):
        wire.decode(_record_header(wire.Kind.DONE, 0, [1]))  # type: ignore[arg-type]


def _start() -> wire.Start:
    cfg = RunConfig(mode="local", groups=(1, 2), threads=(2,), input_shape=(1, 28, 28), num_classes=10,
                    label_shape=())
    helpers = Helpers(PredictorChoice(8, 3, 1.5), HeadChoice(2, 3.0, depth=1, hidden=16, side=4, lead=2),
                      (PredictorChoice(4, 1, 2.0),))
    return wire.Start(cfg, "/runs/a", 3, 100, helpers, threads=2)


def test_start_carries_the_config_and_helpers_typed():
    """START's RunConfig and Helpers come back equal: the mode a Mode, tuples tuples, the
    helpers' choices dataclasses (a hand-started worker gets everything through it)."""
    start = _start()
    got = wire.decode(wire.encode(start))
    assert got == start and got.config.mode is Mode.LOCAL and got.config.groups == (1, 2)
    assert isinstance(got.helpers.predictor, PredictorChoice) and isinstance(got.helpers.state_predictors, tuple)
    assert (got.helpers.head.hidden, got.helpers.head.side) == (16, 4)


def _start_header(change: Callable[[dict], None]) -> list[bytes]:
    fields = wire._plain_value(_start())
    change(fields)
    return [msgpack.packb({"kind": int(wire.Kind.START), "fields": fields, "tensors": []})]


@pytest.mark.parametrize("change, field, needle", [
    (lambda f: f["config"].update(lr="fast"), "START.config.lr", "expected float"),
    (lambda f: f["config"].update(mode="sideways"), "START.config.mode", "expected"),
    (lambda f: f["config"].update(groups=[1, "2"]), "START.config.groups.1", "expected int"),
    (lambda f: f["config"].update(surprise=1), "START.config", r"unknown \['surprise'\]"),
    (lambda f: f["config"].pop("seed"), "START.config", r"missing \['seed'\]"),
    (lambda f: f["helpers"]["predictor"].update(rank=1.5), "START.helpers.predictor.rank", "expected int"),
    (lambda f: f["helpers"]["head"].update(hidden="wide"), "START.helpers.head.hidden", "expected"),
    (lambda f: f["helpers"]["state_predictors"][0].pop("kernel"), "START.helpers.state_predictors.0",
     r"missing \['kernel'\]"),
    (lambda f: f.update(helpers={}), "START.helpers", "missing"),
])
def test_a_starts_unknown_or_mistyped_field_is_named(change, field, needle):
    with pytest.raises(wire.WireError, match=needle) as info:
        wire.decode(_start_header(change))
    assert info.value.field == field and not isinstance(info.value, wire.UncheckedWireError)


def test_the_wire_checks_every_field_a_choice_declares():
    """The check is read from the dataclasses' fields: it follows a field added to one."""
    @dataclasses.dataclass(frozen=True)
    class Wider(PredictorChoice):
        width: int = 0

    assert set(wire.record_fields(Wider)) == {f.name for f in dataclasses.fields(PredictorChoice)} | {"width"}
    assert wire._checked({"rank": 1, "kernel": 3, "flops": 1.0, "width": 5}, Wider, "X") == Wider(1, 3, 1.0, 5)
    with pytest.raises(wire.WireError, match="missing"):
        wire._checked({"rank": 1, "kernel": 3, "flops": 1.0}, Wider, "X")


def test_an_error_carries_a_verdict_typed():
    """ERROR says who failed and how in liveness's words: a replica's exit travels as itself."""
    import signal

    from synthgrad.common.liveness import Cause, Fault, Process, Role, exit_verdict, reported
    for verdict in (exit_verdict(Process.of_replica(1, 2, pid=99), -signal.SIGKILL, "during the run"),
                    reported(Process.of_stage(1, 7), "ConfigError: no", fault=Fault.CONFIGURATION)):
        got = wire.decode(wire.encode(wire.Error(1, verdict)))
        assert got == wire.Error(1, verdict) and got.verdict.cause in Cause and got.verdict.process.role in Role
    fields = wire._plain_value(wire.Error(1, verdict))
    for change, field in (({"cause": "exploded"}, "ERROR.verdict.cause"), ({"fault": 1}, "ERROR.verdict.fault"),
                          ({"code": "9"}, "ERROR.verdict.code")):
        bad = {**fields, "verdict": {**fields["verdict"], **change}}
        with pytest.raises(wire.WireError) as info:
            wire.decode([msgpack.packb({"kind": int(wire.Kind.ERROR), "fields": bad, "tensors": []})])
        assert info.value.field == field
