"""A hostile peer for tests: connects to a worker's activation input (PUSH) and the
coordinator's socket (DEALER) and sends malformed frames of every kind, then reports how many.

    python tests/fuzz.py ENDPOINT_KIND=ENDPOINT ... --count N --seed S
    python tests/fuzz.py --targets-from-stdin ...   (reads that list as one line first)

ENDPOINT_KIND is `inbox` or `coordinator`. Every message is invalid: random bytes, a valid
header with a truncated tensor frame, a tensor larger than the bound, a message kind that does
not belong on that socket, wrong field types, missing frames, type-confused tensor entries (a
dtype that is a list, a zero-byte impossible shape); on activation links, well-formed messages
that must still be refused: labels outside the classes, a batch of one, NaN activations, a
training step far ahead, forged end and checkpoint markers, and fuzzed sent_at, epoch and
true-gradient flags; at the coordinator, well-formed messages of every kind a stage sends
(Register from a peer that disconnects at once, Error, Done, Saved, Metrics, Grad with fuzzed
sent_at and flags, an evaluation), none of them from a registered stage. Prints one JSON line
of counts.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import msgpack
import torch
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthgrad.common import wire  # noqa: E402
from synthgrad.common.liveness import Process, reported  # noqa: E402
from synthgrad.common.records import StageSummary, WorkerReport  # noqa: E402
from tests.helpers import blank_record  # noqa: E402


def _header(kind: int, fields: dict, tensors: list) -> bytes:
    return msgpack.packb({"kind": kind, "fields": fields, "tensors": tensors}, use_bin_type=True)


def bad_messages(rng: random.Random, target: str, max_bytes: int, width: int, batch: int, classes: int):
    """An endless stream of (name, frames), each of them wrong for `target`."""
    act = {"step": 1, "epoch": 0, "phase": "train", "true_grad": False, "sent_at": 0.0}
    grad = {"step": 1, "to_stage": 0, "true_grad": True, "sent_at": 0.0}
    kinds = 15 if target == "inbox" else 18
    odd_times = [float("nan"), float("inf"), -1.0, 1e18, 0.0]

    def activation(step: int, phase: wire.Phase, h: torch.Tensor, labels: torch.Tensor):
        return wire.encode(wire.Activation(step, 0, phase, False, h, labels))

    while True:
        choice = rng.randrange(kinds)
        if choice == 0:
            yield "random-bytes", [rng.randbytes(rng.randrange(1, 300))]
        elif choice == 1:
            yield "empty-frame", [b""]
        elif choice == 2:  # header promises 64x256 floats, frame carries fewer
            yield "truncated", [_header(3, act, [["h", "float32", [64, 256]], ["labels", "int64", [64]]]),
                                rng.randbytes(1000), rng.randbytes(64 * 8)]
        elif choice == 3:  # a tensor above the bound (sent for real: the receiver must not keep it)
            rows = max_bytes // (4 * 256) + 64
            yield "oversized", [_header(3, act, [["h", "float32", [rows, 256]], ["labels", "int64", [rows]]]),
                                bytes(rows * 256 * 4), bytes(rows * 8)]
        elif choice == 4:  # a well-formed message of the wrong kind for this socket
            if target == "inbox":
                yield "wrong-kind", wire.encode(wire.Stop("fuzz"))
            else:
                yield "wrong-kind", wire.encode(wire.Begin("tcp://127.0.0.1:9"))
        elif choice == 5 and target == "coordinator" and rng.random() < 0.5:  # a record's field unknown or mistyped
            report = wire._plain_value(blank_record(WorkerReport, stage=1))
            summary = wire._plain_value(blank_record(StageSummary, stage=1))
            yield "wrong-field-type", rng.choice([
                [_header(5, {"stage": 1, "record": {**report, "surprise": 1}}, [])],
                [_header(5, {"stage": 1, "record": {**report, "step": "x"}}, [])],
                [_header(7, {"stage": 1, "summary": {**summary, "last_step": None}}, [])],
            ])
        elif choice == 5:
            yield "wrong-field-type", [_header(4 if target == "coordinator" else 3,
                                               {**(grad if target == "coordinator" else act), "step": "x"}, [])]
        elif choice == 6:
            yield "unknown-kind", [_header(99, {}, [])]
        elif choice == 7:  # header lists two tensors, only one frame follows
            yield "missing-frame", [_header(3, act, [["h", "float32", [1, 4]], ["labels", "int64", [1]]]),
                                    bytes(16)]
        elif choice == 8:  # a tensor entry whose dtype is a list (unhashable)
            kind, fields, name = (4, grad, "g") if target == "coordinator" else (3, act, "h")
            yield "dtype-list", [_header(kind, fields, [[name, ["float32"], [2]]]), bytes(8)]
        elif choice == 9:  # zero bytes, so within the size bound, but no such tensor can exist
            kind, fields, name = (4, grad, "g") if target == "coordinator" else (3, act, "h")
            yield "impossible-shape", [_header(kind, fields, [[name, "float32", [0, 2**64 - 1]]]), b""]
        elif choice >= 10 and target == "coordinator":  # well-formed, but not from a registered stage
            g = torch.randn(batch, width)
            forged = [
                ("forged-register", lambda: wire.encode(wire.Register(rng.randrange(4), 1, "x"))),
                ("forged-error", lambda: wire.encode(wire.Error(rng.randrange(4), reported(Process.of_stage(0), "forged failure")))),
                ("forged-done", lambda: wire.encode(wire.Done(rng.randrange(4), blank_record(StageSummary, steps=1)))),
                ("forged-saved", lambda: wire.encode(wire.Saved(rng.randrange(4), 0, "/forged.pt", "x"))),
                ("forged-metrics", lambda: wire.encode(wire.Metrics(rng.randrange(4), blank_record(WorkerReport, step=2**40)))),
                ("forged-eval", lambda: wire.encode(wire.EvalResult(0, 1, 0.0, 1.0, 512))),
                ("forged-grad", lambda: wire.encode(wire.Grad(rng.randrange(1 << 20), rng.randrange(-1, 4),
                                                              rng.random() < 0.5, g,
                                                              sent_at=rng.choice(odd_times[1:])))),
                ("forged-grad-nan-time", lambda: [_header(4, {**grad, "sent_at": float("nan")},
                                                          [["g", "float32", [batch, width]]]), g.numpy().tobytes()]),
            ]
            name, make = forged[choice - 10]
            yield name, make()
        elif choice == 10:
            yield "labels-out-of-range", activation(1, wire.Phase.TRAIN, torch.randn(batch, width),
                                                    torch.full((batch,), classes + 999_999))
        elif choice == 11:
            yield "batch-of-one", activation(1, wire.Phase.TRAIN, torch.randn(1, width), torch.zeros(1, dtype=torch.long))
        elif choice == 13:  # fuzzed sent_at, epoch and true-gradient flag on a forged step
            fields = {**act, "step": rng.choice([2**40, -7]), "epoch": rng.choice([-1, 2**62, 0]),
                      "true_grad": rng.random() < 0.5, "sent_at": rng.choice(odd_times)}
            h, labels = torch.randn(batch, width), torch.randint(0, classes, (batch,))
            yield "fuzzed-fields", [_header(3, fields, [["h", "float32", [batch, width]], ["labels", "int64", [batch]]]),
                                    h.numpy().tobytes(), labels.numpy().tobytes()]
        elif choice == 14:  # a marker is a marker by its phase: one with a batch attached is not from the run
            yield "marker-with-tensors", wire.encode(wire.Activation(
                1, 0, wire.Phase.EVAL_END, False, torch.randn(batch, width), torch.randint(0, classes, (batch,))))
        else:  # well-formed, right shapes and labels: only the order or the values give them away
            which = rng.randrange(4)
            labels = torch.randint(0, classes, (batch,))
            if which == 0:
                yield "nan-activation", activation(1, wire.Phase.TRAIN, torch.full((batch, width), float("nan")), labels)
            elif which == 1:
                yield "step-far-ahead", activation(2**62, wire.Phase.TRAIN, torch.randn(batch, width), labels)
            elif which == 2:
                yield "forged-end", wire.encode(wire.Activation.marker(wire.Phase.END, -1, 0))
            else:
                yield "forged-checkpoint", wire.encode(wire.Activation.marker(wire.Phase.CHECKPOINT, -5, 0))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("targets", nargs="*", help="inbox=EP or coordinator=EP")
    p.add_argument("--targets-from-stdin", action="store_true",
                   help="read the targets as one line from stdin (start, import, then wait for them)")
    p.add_argument("--count", type=int, default=200, help="messages per target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bytes", type=int, default=1 << 20)
    p.add_argument("--pause-ms", type=float, default=2.0)
    p.add_argument("--width", type=int, default=64, help="features of the activations the inboxes take")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--hold", action="store_true",
                   help="after sending, print the counts and keep the connections open until stdin closes "
                        "(libzmq drops what a receiver has not read yet when its sender disconnects)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    targets = sys.stdin.readline().split() if args.targets_from_stdin else args.targets
    ctx = zmq.Context()
    socks = []
    for target in targets:
        kind, endpoint = target.split("=", 1)
        sock = ctx.socket(zmq.PUSH if kind == "inbox" else zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(endpoint)
        socks.append((kind, endpoint, sock, bad_messages(rng, kind, args.max_bytes, args.width, args.batch, args.classes)))
    sent: dict[str, dict[str, int]] = {}
    for _ in range(args.count):
        for kind, endpoint, sock, stream in socks:
            name, frames = next(stream)
            if name == "forged-register":  # from a peer that is gone before the answer comes
                once = ctx.socket(zmq.DEALER)
                once.setsockopt(zmq.LINGER, 5000)
                once.connect(endpoint)
                once.send_multipart(frames)
                once.close()
            else:
                sock.send_multipart(frames)
            sent.setdefault(kind, {}).setdefault(name, 0)
            sent[kind][name] += 1
        time.sleep(args.pause_ms / 1000)
    if args.hold:
        print(json.dumps(sent), flush=True)
        sys.stdin.read()  # the test closes it once the run is over
    for _, _, sock, _ in socks:
        sock.close()  # LINGER: deliver what is queued
    ctx.term()
    if not args.hold:
        print(json.dumps(sent), flush=True)


if __name__ == "__main__":
    main()
