"""`launch.py monitor --connect ENDPOINT`: attach to a running coordinator's status stream.

The coordinator publishes on a PUB socket; a monitor is a SUB that can come and go at any time:
the coordinator never waits for it and drops records a slow monitor cannot take. On a terminal
the view is a live table (rich); otherwise one plain line per record, or JSON lines (--json).
"""
from __future__ import annotations

import json
import sys
import time
from typing import Callable, Optional

import zmq

from synthgrad.common import scores, wire
from synthgrad.common.security import curve_client, resolve_keys


def test_figures(rec: dict) -> str:
    """The last evaluation, short: accuracy; on stream data bits per target and perplexity first."""
    acc = rec.get("test_accuracy")
    accuracy = "-" if acc is None else f"{100 * acc:.2f}%"
    if rec.get("test_bits") is None:
        return f"test acc {accuracy}"
    return f"test {rec['test_bits']:.3f} bits ppl {rec['test_perplexity']:.2f} acc {accuracy}"


def format_status(rec: dict) -> str:
    """One plain line for logs and non-terminal output."""
    eta = rec.get("eta_s")
    loss = rec.get("loss")
    workers = " ".join(
        f"[s{w['stage']} {w.get('samples_per_s') or 0:.0f}/s busy {100 * (w.get('busy_fraction') or 0):.0f}%"
        f" cpu {w.get('cpu_percent') or 0:.0f}% {w.get('rss_mb') or 0:.0f}MB]" for w in rec.get("workers", []))
    return (f"{rec['wall_s']:7.1f}s step {rec['step']}/{rec['total_steps']} "
            f"({100 * rec.get('progress', 0):.0f}%) {rec.get('samples_per_s', 0):.0f} samples/s "
            f"eta {'?' if eta is None else f'{eta:.0f}s'} staleness {rec.get('staleness_steps', 0)} "
            f"loss {'-' if loss is None else f'{loss:.4f}'} {test_figures(rec)} {workers}")


def status_table(rec: dict):
    """The live view: a progress line and one row per worker (rich renderable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    eta, loss = rec.get("eta_s"), rec.get("loss")
    head = Text(f"step {rec['step']}/{rec['total_steps']}  {rec.get('samples_per_s', 0):,.0f} samples/s  "
                f"eta {'?' if eta is None else f'{eta:.0f}s'}  staleness {rec.get('staleness_steps', 0)} steps  "
                f"loss {'-' if loss is None else f'{loss:.4f}'}  {test_figures(rec)}")
    table = Table(box=None, header_style="bold")
    for col in ("stage", "pid", "step", "samples/s", "compute", "wait in", "wait send", "wait grad",
                "messaging", "queue", "cpu %", "rss MB", "sg loss", "sg cos"):
        table.add_column(col, justify="right", no_wrap=True)

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.0f}%"

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for w in rec.get("workers", []):
        msg = (w.get("send_fraction") or 0) + (w.get("recv_fraction") or 0)
        table.add_row(str(w["stage"]), num(w.get("pid"), "d"), num(w.get("step"), "d"), num(w.get("samples_per_s"), ",.0f"),
                      pct(w.get("busy_fraction")), pct(w.get("wait_input_fraction")),
                      pct(w.get("wait_send_fraction")), pct(w.get("wait_grad_fraction")), pct(msg),
                      num(w.get("outstanding_steps"), "d"), num(w.get("cpu_percent"), ".0f"),
                      num(w.get("rss_mb"), ".0f"), num(w.get("sg_loss"), ".4f"), num(w.get("sg_cosine"), ".2f"))
    filled = int(40 * min(rec.get("progress", 0.0), 1.0))
    bar = Text("━" * filled, style="green") + Text("━" * (40 - filled), style="grey37") + \
        Text(f" {100 * rec.get('progress', 0.0):.0f}%")
    return Group(head, bar, table)


def watch(endpoint: str, *, timeout_s: float = 30.0, count: Optional[int] = None,
          as_json: bool = False, live: Optional[bool] = None,
          out: Callable[[str], None] = print, keys_dir: Optional[str] = None,
          secure: Optional[bool] = None) -> int:
    """Follow the stream until the run is done (0), `count` status records arrived (0), or
    nothing arrived for `timeout_s` (1). With CURVE (keys_dir), connect with the monitor key."""
    live = sys.stdout.isatty() and not as_json if live is None else live
    keys = None  # an ipc stream needs no keys unless asked (--secure, --keys)
    if endpoint.startswith("tcp://") or secure or keys_dir:
        keys = resolve_keys(secure, keys_dir, "monitor", f"--connect {endpoint}")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    if keys is not None:
        curve_client(sub, keys, keys.coordinator_public)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 64)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    seen = 0
    last = time.monotonic()
    view = None
    try:
        if live:
            from rich.live import Live
            view = Live(refresh_per_second=4, transient=False)
            view.start()
        while True:
            if not sub.poll(200):
                if time.monotonic() - last > timeout_s:
                    out(f"monitor: nothing from {endpoint} for {timeout_s:.0f}s; is the run still going?"
                        + ("" if keys else " (a run with CURVE links needs --keys)"))
                    return 1
                continue
            try:
                msg = wire.decode(wire.receive(sub))
            except wire.WireError as exc:
                out(f"monitor: ignored a malformed record: {exc}")
                continue
            if not isinstance(msg, wire.Record):
                continue
            last = time.monotonic()
            rec = msg.record
            if as_json:
                out(json.dumps(rec))
            elif rec.get("event") == "eval":
                line = f"eval  epoch {rec['epoch'] + 1} step {rec['step']}: {scores.describe(rec)}"
                view.console.print(line) if view else out(line)
            elif rec.get("event") == "status":
                view.update(status_table(rec)) if view else out(format_status(rec))
            if rec.get("event") == "status":
                seen += 1
                if rec.get("done") or (count is not None and seen >= count):
                    return 0
    finally:
        if view is not None:
            view.stop()
        sub.close(0)
        ctx.term()
