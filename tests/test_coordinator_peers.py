"""The coordinator against peers that misbehave with well-formed messages, in this process (its
real ROUTER socket, real DEALER peers over tcp, no workers): a stranger that registers and
vanishes, and registered stages that speak for other stages. Every one is refused and counted,
and nothing a peer sends or fails to receive ends the run."""
from __future__ import annotations

import time

import pytest
import torch
import zmq

from synthgrad.common import wire
from synthgrad.common.liveness import Process, reported
from synthgrad.common.records import StageSummary, WorkerReport
from synthgrad.coordinator.coordinator import Coordinator
from tests.helpers import blank_record


@pytest.fixture
def coordinator(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(transport="tcp", host="127.0.0.1", secure=False)
    lines: list[str] = []
    coord = Coordinator(cfg, tmp_path / "run", total_steps=20, log=lines.append)
    coord.lines = lines  # type: ignore[attr-defined]
    ctx = zmq.Context()
    coord.peer_ctx = ctx  # type: ignore[attr-defined]
    yield coord
    coord.close()
    ctx.destroy(linger=0)


def _peer(coord, identity: bytes) -> zmq.Socket:
    sock = coord.peer_ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(coord.endpoint)
    return sock


def _serve_until_quiet(coord, seconds: float = 0.2) -> None:
    """Run the coordinator's handling of what has arrived (as its loop does) until nothing has
    come for a while; any exception it raises propagates to the test."""
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < seconds:
        if coord.sock.poll(20):
            coord._handle(wire.receive(coord.sock, envelope=1))
            quiet_since = time.monotonic()


def test_a_refused_stranger_that_has_gone_does_not_end_the_run(coordinator):
    """The refusal (a Stop) goes to an identity whose connection has closed: with
    ROUTER_MANDATORY that send fails (EHOSTUNREACH); it is counted, and the run goes on."""
    first = _peer(coordinator, b"stage-1-a")
    first.send_multipart(wire.encode(wire.Register(1, 101, "a")))
    _serve_until_quiet(coordinator)
    assert coordinator.registry.stage_of == {b"stage-1-a": 1}
    stranger = _peer(coordinator, b"stranger")
    stranger.send_multipart(wire.encode(wire.Register(1, 1, "x")))
    stranger.close()  # LINGER: the Register leaves first, then the connection closes
    time.sleep(0.25)  # the coordinator reads it only after the stranger has gone (a local close takes microseconds)
    _serve_until_quiet(coordinator)
    assert coordinator.faults.rejected == 1 and coordinator.faults.undelivered == 1
    assert any("refused stage 1 (pid 1 on x): stage 1 is taken" in line for line in coordinator.lines)
    assert any("could not deliver a refusal to peer b'stranger'" in line for line in coordinator.lines)
    assert coordinator.registry.stage_of == {b"stage-1-a": 1}  # stage 1 is still the first
    # sends to a registered stage that has gone: heartbeats, commits, STOP, a relayed gradient
    first.close()
    time.sleep(0.5)
    coordinator.watchdog._last_beat = 0.0
    coordinator._heartbeat()
    coordinator._committed(3, -1)
    coordinator.stop_all("run complete")
    coordinator._relay(wire.Grad(7, 1, True, torch.zeros(2, 2)), wire.encode(wire.Grad(7, 1, True, torch.zeros(2, 2))))
    assert coordinator.faults.undelivered == 5 and coordinator.relay.true == [0, 0, 0, 0]


def _register_all(coord) -> dict[int, zmq.Socket]:
    peers = {s: _peer(coord, f"stage-{s}".encode()) for s in range(4)}
    for s, sock in peers.items():
        sock.send_multipart(wire.encode(wire.Register(s, 100 + s, "h")))
    _serve_until_quiet(coord)
    assert coord.registry.complete
    return peers


def test_a_registered_peer_cannot_take_a_second_stage(coordinator):
    peer = _peer(coordinator, b"stage-0")
    peer.send_multipart(wire.encode(wire.Register(0, 100, "h")))
    peer.send_multipart(wire.encode(wire.Register(2, 100, "h")))  # stage 2 is still free
    _serve_until_quiet(coordinator)
    assert coordinator.registry.identities == {0: b"stage-0"} and coordinator.faults.rejected == 1
    assert any("this peer is stage 0 already" in line for line in coordinator.lines)


def test_registered_stages_cannot_speak_for_others(coordinator):
    """Stage 1 claims to be stage 0 (or 2) in every message that carries a stage number, sends a
    gradient to a stage that is not the one before it, and registers again as another stage:
    each is rejected and counted, and nothing of it is believed."""
    peers = _register_all(coordinator)
    g = torch.zeros(64, 64)
    forgeries = [
        wire.Metrics(0, blank_record(WorkerReport, stage=0, step=5, samples_per_s=1.0)),
        wire.Done(0, blank_record(StageSummary, stage=0, steps=20, checkpoint="/x", host="h", last_step=19)),
        wire.Error(0, reported(Process.of_stage(0), "forged failure")),
        wire.Saved(0, 3, "/forged.pt", "h"),
        wire.Ready(2, "tcp://127.0.0.1:9"),
        wire.Heartbeat(2),
        wire.Grad(3, 2, True, g),  # a gradient for itself, not for stage 0
        wire.Grad(3, 1, True, g),  # its own number
        wire.Register(2, 1, "h"),  # a second stage for one peer
        wire.Register(1, 1, "h"),  # itself again
        wire.EvalResult(0, 5, 0.1, 0.99, 512),  # only the last stage evaluates
    ]
    for msg in forgeries:
        peers[1].send_multipart(wire.encode(msg))
    _serve_until_quiet(coordinator)
    assert coordinator.faults.rejected == len(forgeries), coordinator.lines
    assert coordinator.done == {} and coordinator.registry.ready == {}
    assert coordinator.registry.stage_of[b"stage-1"] == 1 and coordinator.registry.identities[2] == b"stage-2"
    assert coordinator.relay.true == [0, 0, 0, 0] and coordinator.stream.latest == {}


def test_strangers_are_refused_every_kind(coordinator):
    """The same kinds from a peer that never registered (a Register from it is a refusal)."""
    _register_all(coordinator)
    stranger = _peer(coordinator, b"stranger")
    g = torch.zeros(64, 64)
    kinds = [wire.Metrics(1, blank_record(WorkerReport, stage=1, step=5)), wire.Done(1, blank_record(StageSummary, stage=1)), wire.Error(1, reported(Process.of_stage(1), "forged")), wire.Saved(1, 3, "/x", "h"),
             wire.Grad(3, 0, True, g, sent_at=1e18), wire.Grad(3, 0, False, g), wire.Register(1, 1, "h"),
             wire.EvalResult(0, 5, 0.1, 0.99, 512), wire.Heartbeat(1)]
    for msg in kinds:
        stranger.send_multipart(wire.encode(msg))
    _serve_until_quiet(coordinator)
    assert coordinator.faults.rejected == len(kinds), coordinator.lines
    assert coordinator.done == {} and coordinator.relay.true == [0, 0, 0, 0]
    assert coordinator.stream.evals == []


def test_every_send_on_the_router_goes_through_one_method():
    """True by construction: the ROUTER's only send is in `_deliver`, which cannot raise for a
    peer that has gone; a new send written elsewhere fails this test."""
    import inspect

    import synthgrad.coordinator.coordinator as module
    source = inspect.getsource(module)
    assert source.count(".send_multipart(") == 1 and source.count(".send(") == 0
    assert ".send_multipart(" in inspect.getsource(Coordinator._deliver)


def test_the_coordinator_holds_its_state_in_a_few_parts(coordinator):
    """Related counters and settings live in small parts with one job each (relay counts, peer
    faults, the clock, the start plan), so the shell stays readable: at most 20 attributes."""
    own = set(vars(coordinator)) - {"lines", "peer_ctx"}  # the two the fixture adds
    assert len(own) <= 20, sorted(own)


def test_a_stages_error_names_its_replica_or_itself_with_the_cause(coordinator):
    """ERROR carries a verdict: a replica's exit reaches the coordinator's verdict as the
    replica's (cause, pid; its stage's host), a stage's own error as its own with what it ran
    into, and a verdict about anyone else is taken as the stage's own words."""
    import signal

    from synthgrad.common.liveness import Cause, Fault, ProcessFailure, Role, exit_verdict
    peers = _register_all(coordinator)
    sent = [
        (1, exit_verdict(Process.of_replica(1, 2, pid=4242), -signal.SIGKILL)),
        (2, reported(Process.of_stage(2, 77), "NonFinite: loss of step 5 is NaN", fault=Fault.DIVERGED)),
        (3, exit_verdict(Process.of_replica(0, 1, pid=5), 1)),  # stage 3 speaking of stage 0's replica
    ]
    got = []
    for stage, verdict in sent:
        peers[stage].send_multipart(wire.encode(wire.Error(stage, verdict)))
        with pytest.raises(ProcessFailure) as caught:
            _serve_until_quiet(coordinator)
        got.append(caught.value.verdict)
    replica, own, other = got
    assert (replica.cause, replica.code, replica.process.role, replica.process.stage, replica.process.index,
            replica.process.pid) == (Cause.KILLED, -signal.SIGKILL, Role.REPLICA, 1, 2, 4242)
    assert str(replica) == "stage 1: its replica 2 (pid 4242 on h) killed by SIGKILL"  # on its stage's host
    assert (own.cause, own.fault, own.process.role, own.process.pid) == (Cause.REPORTED, Fault.DIVERGED, Role.STAGE, 102)
    assert str(own) == "stage 2 failed: NonFinite: loss of step 5 is NaN"
    assert (other.cause, other.process.role, other.process.index) == (Cause.REPORTED, Role.STAGE, 3)
