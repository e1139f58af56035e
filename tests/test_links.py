"""A stage's links are a few parts with one job each (sockets, agreed terms, rejections, the
simulated delay, the watch over the coordinator): no process is started here."""
from __future__ import annotations

import time

import pytest

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.common.liveness import ProcessFailure
from synthgrad.workers.links import Delay, Handlers, Links, Rejections
from synthgrad.workers.timings import Timings


@pytest.fixture
def links(tmp_path):
    made = Links(1, f"ipc://{tmp_path}/nobody", -1, None, Timings())
    try:
        yield made
    finally:
        made.close()


def test_the_links_hold_their_state_in_a_few_parts(links, tmp_path):
    cfg = RunConfig(mode="unlocked", dataset="synthetic", layers=(784, 32, 32, 10))
    handlers = Handlers(lambda g: None, lambda reason: None, lambda step, drop: None, lambda: None)
    links.configure(cfg, (32,), 10, False, "127.0.0.1", "ipc", handlers, delay_s=0.01)
    assert links.endpoint.startswith("ipc://") and links.sockets.outbox is not None
    assert links.terms.max_bytes == cfg.max_message_mb << 20 and links.terms.in_shape == (32,)
    for part in (links, links.sockets, links.terms, links.rejections, links.delay, links.alive):
        assert len(vars(part)) <= 20, (type(part).__name__, sorted(vars(part)))


def test_a_delayed_gradient_is_released_when_due_and_a_future_stamp_counts_as_now():
    delay = Delay(0.05)
    now = time.monotonic()
    first, second = wire.Grad(1, 0, True, sent_at=now), wire.Grad(2, 0, True, sent_at=now + 3600)
    delay.hold(first)
    delay.hold(second)
    assert list(delay.released()) == [] and delay.next_due() == pytest.approx(now + 0.05, abs=0.01)
    time.sleep(0.07)
    assert list(delay.released()) == [first, second] and delay.next_due() is None


def test_rejections_count_bad_messages(capsys):
    rejections = Rejections(3)
    for _ in range(12):
        rejections.reject(ValueError("garbage"))
    assert rejections.count == 12
    assert capsys.readouterr().err.count("[stage 3] rejected message") == 10


def test_a_message_the_coordinator_socket_cannot_queue_never_waits_forever(tmp_path):
    """A refused handshake leaves the coordinator socket without a pipe, and a plain send would
    wait for one forever: the handshake's send gives up at once, and any other send waits only
    while the coordinator may still be there."""
    endpoint = f"ipc://{tmp_path}/nobody"
    links = Links(1, endpoint, 2**22 + 1, None, Timings())  # above any pid_max: a coordinator gone
    try:
        links.sockets.coord.disconnect(endpoint)  # no pipe left to queue into, as after a refusal
        register = wire.Register(1, 1, "here")
        assert not links.try_send_coord(register)
        started = time.monotonic()
        with pytest.raises(ProcessFailure, match="coordinator"):
            links.send_coord(register)
        assert time.monotonic() - started < 10
    finally:
        links.close()


def test_a_stage_whose_input_is_always_ready_still_keeps_its_heartbeats(links, monkeypatch):
    """A heavy stage working through a backlog (every evaluation batch queued before it) finds
    its input ready at every wait: it must still beat, or the coordinator takes it for hung."""
    cfg = RunConfig(mode="unlocked", dataset="synthetic", layers=(784, 32, 32, 10))
    handlers = Handlers(lambda g: None, lambda reason: None, lambda step, drop: None, lambda: None)
    links.configure(cfg, (32,), 10, False, "127.0.0.1", "ipc", handlers)
    checks = []
    monkeypatch.setattr(links, "beat", lambda: checks.append(time.monotonic()))
    for _ in range(3):
        links.wait("wait_input", lambda: True)
    assert len(checks) == 3
