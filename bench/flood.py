#!/usr/bin/env python3
"""A run under a flood of junk: does it complete, does memory stay flat, does the log stay short?

    python bench/flood.py                       # 60 s of flood at every socket, ~1000 msg/s each
    python bench/flood.py --seconds 20 --rate 500

Starts `launch.py train` (locked, 4 stages over tcp, one stage slowed so the run outlasts the
flood), then one flooding process that connects to every stage's activation input (PUSH), to the
coordinator's socket (DEALER) and to the status stream (SUB, sending a new random subscription
with every message), and sends small junk at `--rate` messages per second per socket: random
bytes, wrong kinds, well-formed activations out of order, forged markers. Prints the run's end,
what was rejected, each process's memory at the start and the end of the flood (from the run's
own metrics.jsonl), and how many log lines the run wrote. Writes bench/results/flood.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthgrad.common.procs import available_cores  # noqa: E402


def flood(targets: list[str], seconds: float, rate: float, seed: int) -> dict:
    """The flooding process's job: junk at every target for `seconds` (run in a child)."""
    import torch
    import zmq

    from synthgrad.common import wire
    rng = random.Random(seed)
    ctx = zmq.Context()
    socks = []
    for target in targets:
        kind, endpoint = target.split("=", 1)
        sock = ctx.socket({"inbox": zmq.PUSH, "coordinator": zmq.DEALER, "status": zmq.SUB}[kind])
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)  # a flood that cannot be delivered is dropped here
        sock.connect(endpoint)
        socks.append((kind, sock))
    junk = [wire.encode(wire.Stop("flood")), wire.encode(wire.Activation(-1, 0, "end", False)),
            wire.encode(wire.Activation(2**40, 0, "train", False, torch.randn(64, 64),
                                        torch.zeros(64, dtype=torch.long)))]
    sent = dict.fromkeys([t.split("=", 1)[0] for t in targets], 0)
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        for kind, sock in socks:
            if kind == "status":  # a subscriber's only way to send: subscriptions, all different
                sock.setsockopt(zmq.SUBSCRIBE, rng.randbytes(16))
            else:
                frames = junk[n % 3] if n % 4 else [rng.randbytes(rng.randrange(1, 200))]
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    continue
            sent[kind] += 1
        n += 1
        time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
    for _, sock in socks:
        sock.close()
    ctx.term()
    return sent


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=1000.0, help="messages per second at each socket")
    p.add_argument("--flooder", nargs="+", help=argparse.SUPPRESS)  # the child's targets
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.flooder:
        print(json.dumps(flood(args.flooder, args.seconds, args.rate, seed=0)), flush=True)
        return
    slow_ms = 10  # stage 2 takes >= 10 ms a step: the run lasts about seconds + 15 s
    steps = int((args.seconds + 15) * 1000 / slow_ms)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        # --no-secure: the worst case, where junk reaches the decoders (with CURVE, the default
        # for tcp, a process without the run's keys is refused at the handshake)
        cmd = [sys.executable, "-u", str(ROOT / "launch.py"), "train", "--mode", "locked", "--transport", "tcp",
               "--no-secure",
               "--dataset", "synthetic", "--layers", "784,64,64,64,10", "--batch-size", "64",
               "--synthetic-train", "4096", "--epochs", "1000", "--steps", str(steps), "--slow-stage",
               f"2,{slow_ms}", "--metrics-every", "1", "--progress-every", "5", "--out", str(out)]
        run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        for line in run.stdout:
            lines.append(line)
            if "stage inputs:" in line:
                break
        text = "".join(lines)
        coordinator = re.search(r"coordinator at (\S+);", text).group(1)
        status = re.search(r"monitor --connect (\S+)", text).group(1)
        inputs = re.findall(r"(\d)=(\S+)", line.split("stage inputs:")[1])
        targets = [f"inbox={ep}" for _, ep in inputs] + [f"coordinator={coordinator}", f"status={status}"]
        t_flood = time.monotonic()
        flooder = subprocess.run([sys.executable, __file__, "--seconds", str(args.seconds), "--rate",
                                  str(args.rate), "--flooder", *targets], capture_output=True, text=True)
        flood_s = time.monotonic() - t_flood
        rest, _ = run.communicate(timeout=args.seconds * 10 + 120)
        lines += rest.splitlines(keepends=True)
        sent = json.loads(flooder.stdout or "{}")
        summary = json.loads((out / "summary.json").read_text())
        records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    workers = [r for r in records if r["event"] == "worker"]
    statuses = [r for r in records if r["event"] == "status"]
    t0 = statuses[0]["wall_s"] if statuses else 0.0
    memory = {}
    for stage in sorted({r["stage"] for r in workers}):
        series = [r["rss_mb"] for r in workers if r["stage"] == stage]
        memory[f"stage {stage}"] = (series[min(2, len(series) - 1)], series[-1])
    coord = [r["coordinator_rss_mb"] for r in statuses if r["wall_s"] >= t0]
    memory["coordinator"] = (coord[min(2, len(coord) - 1)], coord[-1])
    result = {"cores": len(available_cores()), "flood_s": flood_s, "rate_per_socket": args.rate,
              "sent": sent, "status": summary.get("status"), "exit_code": run.returncode,
              "steps": summary["steps"], "rejected_messages": summary.get("rejected_messages"),
              "rejected_per_stage": {w["stage"]: w.get("rejected_messages") for w in summary["workers"]},
              "rss_mb_start_end": memory, "log_lines": len(lines),
              "samples_per_s": summary["samples_per_s"]}
    print(f"flood: {sum(sent.values())} messages in {flood_s:.0f} s at {len(targets)} sockets "
          f"({args.rate:.0f}/s each; {result['cores']} cores): {sent}")
    print(f"run: exit {run.returncode}, status {result['status']}, {summary['steps']} steps, "
          f"{summary['samples_per_s']:.0f} samples/s, rejected {result['rejected_messages']} "
          f"(per stage {result['rejected_per_stage']}), {len(lines)} log lines")
    for who, (a, b) in memory.items():
        print(f"  {who:<12} RSS {a:7.1f} MB -> {b:7.1f} MB")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "flood.json").write_text(json.dumps(result, indent=1))
    os.sync()


if __name__ == "__main__":
    main()
