#!/usr/bin/env python3
"""Activation messages between two processes, as the workers send them (wire.encode over a
PUSH/PULL pair, decoded and shape-checked on arrival), next to a plain memory copy of the same
bytes measured in the same run.

    python bench/transport.py                  # ipc, tcp and tcp+curve, 4 KiB .. 16 MiB
    python bench/transport.py --transports tcp,tcp+curve --seconds 0.5

Throughput: the sender streams messages for ~--seconds; the receiver decodes each one and
reports bytes/s. Latency: a ping-pong of one message each way, half the round trip (median).
memcpy: torch's copy_ of the same number of bytes (one thread), the ceiling for moving bytes.
tcp+curve: tcp with CURVE encryption and ZAP authentication, set up as a secure run does
(common/security.py, keys made for the run in a temporary folder): what security costs.
Writes bench/results/transport.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import zmq  # noqa: E402

from synthgrad.common import wire  # noqa: E402
from synthgrad.common.endpoints import bind_wildcard  # noqa: E402
from synthgrad.common.procs import ProcessGroup, available_cores, pin_to_core  # noqa: E402
from synthgrad.common.security import Guard, Keys, curve_client, make_keys  # noqa: E402

SIZES_KIB = (4, 64, 256, 1024, 4096, 16384)


def _message(nbytes: int) -> wire.Activation:
    h = torch.randn(64, max(nbytes // 4 // 64, 1))
    return wire.Activation(0, 0, "train", False, h, torch.zeros(64, dtype=torch.int64))


def receiver(endpoint_file: str, transport: str, core: int, keys_dir: str) -> None:
    """Bind, publish the endpoint, then: throughput rounds (count, then decode that many) and
    ping-pong rounds, until told to stop. With keys_dir, both listeners are CURVE servers."""
    pin_to_core(core)
    torch.set_num_threads(1)
    ctx = zmq.Context()
    guard = Guard(ctx, Keys.load(keys_dir, "coordinator") if keys_dir else None)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 4)
    guard.server(pull, "bench")
    endpoint = bind_wildcard(pull, transport, "127.0.0.1")
    back = ctx.socket(zmq.PUSH)
    guard.server(back, "bench-back")
    back_ep = bind_wildcard(back, transport, "127.0.0.1")
    Path(endpoint_file).write_text(json.dumps([endpoint, back_ep]))
    while True:
        frames = pull.recv_multipart(copy=False)
        if frames[0].bytes == b"stop":
            break
        msg = wire.decode(frames)
        if msg.step == -1:  # ping: answer at once
            back.send_multipart(wire.encode(msg), copy=False)
        elif msg.step == -2:  # end of a throughput round
            back.send(b"ok")
    pull.close(0)
    back.close(0)
    guard.close()
    ctx.term()


def memcpy_bytes_per_s(nbytes: int, seconds: float) -> float:
    src = torch.randn(max(nbytes // 4, 1))
    dst = torch.empty_like(src)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        dst.copy_(src)
        n += 1
    return n * src.numel() * 4 / (time.perf_counter() - t0)


def measure(transport: str, seconds: float, cores: list[int]) -> list[dict]:
    base, curve = transport.split("+")[0], transport.endswith("+curve")
    keys_dir = tempfile.mkdtemp(prefix="synthgrad-bench-keys-") if curve else ""
    keys = None
    if curve:
        make_keys(Path(keys_dir))
        keys = Keys.load(keys_dir, "worker")
    group = ProcessGroup()
    endpoint_file = Path(f"/tmp/synthgrad-bench-{base}-{id(group)}.json")
    endpoint_file.unlink(missing_ok=True)
    rows = []
    try:
        group.start("receiver", receiver, str(endpoint_file), base, cores[-1], keys_dir)
        deadline = time.monotonic() + 60
        while not endpoint_file.exists() or not endpoint_file.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("receiver did not start within 60 s")
            time.sleep(0.05)
        ep, back_ep = json.loads(endpoint_file.read_text())
        pin_to_core(cores[0])
        torch.set_num_threads(1)
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 4)
        back = ctx.socket(zmq.PULL)
        if keys is not None:
            curve_client(push, keys, keys.coordinator_public)
            curve_client(back, keys, keys.coordinator_public)
        push.connect(ep)
        back.connect(back_ep)
        for kib in SIZES_KIB:
            msg = _message(kib * 1024)
            nbytes = msg.h.numel() * 4
            # throughput
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                push.send_multipart(wire.encode(msg), copy=False)
                n += 1
            push.send_multipart(wire.encode(wire.Activation(-2, 0, "end", False)))
            back.recv()
            bps = n * nbytes / (time.perf_counter() - t0)
            # latency (ping-pong)
            ping = wire.Activation(-1, 0, "train", False, msg.h, msg.labels)
            lat = []
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end or len(lat) < 5:
                t1 = time.perf_counter()
                push.send_multipart(wire.encode(ping), copy=False)
                wire.decode(back.recv_multipart(copy=False))
                lat.append((time.perf_counter() - t1) / 2)
            mc = memcpy_bytes_per_s(nbytes, seconds)
            rows.append({"transport": transport, "size_kib": kib, "bytes": nbytes,
                         "messages_per_s": bps / nbytes, "bytes_per_s": bps,
                         "latency_us": 1e6 * statistics.median(lat),
                         "memcpy_bytes_per_s": mc, "fraction_of_memcpy": bps / mc})
            print(f"{transport:<9} {kib:>6} KiB  {bps / 2**30:7.2f} GiB/s  {bps / nbytes:9.0f} msg/s  "
                  f"latency {rows[-1]['latency_us']:8.1f} us   memcpy {mc / 2**30:6.2f} GiB/s  "
                  f"-> {100 * bps / mc:5.1f}% of memcpy", flush=True)
        push.send(b"stop")
        push.close(2000)
        back.close(0)
        ctx.term()
    finally:
        group.shutdown()
        endpoint_file.unlink(missing_ok=True)
        if keys_dir:
            shutil.rmtree(keys_dir, ignore_errors=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transports", default="ipc,tcp,tcp+curve")
    p.add_argument("--seconds", type=float, default=1.0, help="per size and measurement")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "transport.json"))
    return p


def main() -> None:
    args = build_parser().parse_args()
    cores = available_cores()
    print(f"{len(cores)} cores; sender on core {cores[0]}, receiver on core {cores[-1]}; "
          f"messages are float32 activations of 64 rows")
    rows = []
    for t in args.transports.split(","):
        rows += measure(t.strip(), args.seconds, cores)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cores": len(cores), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
