"""`launch.py compare`: the same model, data, seed, batch size and core budget under each
contender, one after another in one invocation, so that their ratios are measured side by side.

Writes compare.json (one record per contender), compare.md (the table, with ratios to the best
locked contender) and PNG plots into the output folder; each contender's run folder is under
runs/.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.modes import MODE_NAMES, Mode, spoken
from synthgrad.common.files import atomic_write_json
from synthgrad.common.procs import available_cores
from synthgrad.coordinator import plots
from synthgrad.coordinator.train import prepare, train

# every update waits for its true gradient: the ratios' baseline
LOCKED = (Mode.BACKPROP, Mode.PIPELINE, Mode.LOCKED)
DEFAULT_CONTENDERS = tuple(m.value for m in Mode)


@dataclass(frozen=True)
class Contender:
    name: str  # as shown: "unlocked N=10"
    config: RunConfig


def parse_contenders(text: str, base: RunConfig, out: Path) -> list[Contender]:
    """'backprop,pipeline,locked,unlocked,unlocked:10,stale:10' -> validated configs.
    A mode's ':N' sets its --true-grad-every; without it the base config's value is used."""
    cores = len(available_cores())
    result: list[Contender] = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        mode, _, n = item.partition(":")
        changes: dict = {"mode": mode}
        if n:
            if mode in MODE_NAMES and not Mode(mode).takes_n:
                takers = spoken(tuple(m.value for m in Mode if m.takes_n))
                raise ConfigError(f"contender {item!r}: only {takers} take ':N'")
            try:
                changes["true_grad_every"] = int(n)
            except ValueError:
                raise ConfigError(f"contender {item!r}: N must be an integer") from None
        if mode == Mode.BACKPROP:
            changes["backprop_threads"] = base.backprop_threads or cores
        name = mode
        if mode in MODE_NAMES and Mode(mode).takes_n:
            name = f"{mode} N={changes.get('true_grad_every', base.true_grad_every)}"
        elif mode == Mode.PIPELINE:
            name = f"pipeline {base.schedule} x{base.microbatches}"
        folder = name.replace(" ", "_").replace("=", "").replace(":", "")
        try:
            cfg = base.replace(**changes, out=str(out / "runs" / folder))
        except ConfigError as exc:
            raise ConfigError(f"contender {item!r}: {exc}") from None
        if any(c.name == name for c in result):
            raise ConfigError(f"contender {name!r} is listed twice")
        result.append(Contender(name, cfg))
    if not result:
        raise ConfigError("--contenders is empty; e.g. backprop,pipeline,locked,unlocked,stale")
    return result


def time_to_target(evals: list[dict], target: float) -> Optional[float]:
    """Wall-clock seconds at the first evaluation reaching `target`, or None."""
    for e in evals:
        if e["test_accuracy"] >= target:
            return e["wall_s"]
    return None


def record(contender: Contender, summary: dict, target: float, cores: int) -> dict:
    cfg = contender.config
    return {
        "contender": contender.name, "mode": cfg.mode, "cores": cores,
        "workers": summary["num_stages"],
        "threads": summary.get("threads") or (summary.get("layout") or {}).get("threads"),
        "true_grad_every": cfg.true_grad_every if cfg.mode.takes_n else 1,
        "samples_per_s": summary["samples_per_s"], "wall_clock_s": summary["wall_clock_s"],
        "startup_s": summary.get("startup_s"),
        "test_accuracy": summary["test_accuracy"],
        "time_to_target_s": time_to_target(summary["evals"], target),
        "target_accuracy": target,
        "true_gradient_steps": summary["true_gradient_steps"],
        # share of a worker's wall time spent encoding/decoding/sending (synthgrad workers only)
        "messaging_fraction": max((w["messaging_fraction"] for w in summary["workers"]
                                   if "messaging_fraction" in w), default=None),
        # share of a stage's compute spent predicting and training its synthetic-gradient model
        "sg_share_of_compute": max((w["sg_share_of_compute"] for w in summary["workers"]
                                    if "sg_share_of_compute" in w), default=None),
        # the layout each contender ran with (coordinator/layout.py): split, cores, ceiling
        "layout": summary.get("layout"),
        # gradient bytes that travelled backward per step (through the coordinator; stage workers only)
        "bytes_backward_per_step": summary.get("bytes_backward_per_step"),
        "curve": [[e["wall_s"], e["test_accuracy"]] for e in summary["evals"]],
        "run_dir": summary["run_dir"],
    }


MATCH_POINTS = 0.005  # "reaches backprop's accuracy": within half a point of its final one


def add_time_to_backprop(rows: list[dict]) -> None:
    """With backprop among the contenders: for each, the wall clock at which it first came within
    half a point of backprop's final test accuracy (None: never), beside backprop's own."""
    bp = next((r for r in rows if r["mode"] == Mode.BACKPROP and r["test_accuracy"] is not None), None)
    for r in rows:
        r["backprop_final_accuracy"] = bp["test_accuracy"] if bp else None
        r["time_to_backprop_s"] = (time_to_target([{"wall_s": w, "test_accuracy": a} for w, a in r["curve"]],
                                                  bp["test_accuracy"] - MATCH_POINTS) if bp else None)


def best_locked(rows: list[dict]) -> Optional[dict]:
    locked = [r for r in rows if r["mode"] in LOCKED]
    return max(locked, key=lambda r: r["samples_per_s"]) if locked else None


def markdown(rows: list[dict], base: RunConfig, target: float) -> str:
    best = best_locked(rows)
    model = {"mlp": f"MLP {'-'.join(map(str, base.layers))}", "cnn": "CNN"}.get(base.model, base.model)
    lines = [
        f"# synthgrad compare: {model}, {base.dataset}, batch {base.batch_size}, "
        f"{base.epochs} epoch(s){'' if base.steps is None else f' / {base.steps} steps'}, "
        f"{rows[0]['cores']} cores, device {base.device}, {base.precision}",
        "",
        f"Ratios are to the best locked contender ({best['contender'] if best else 'none'}), "
        f"measured in this one invocation. Target accuracy {100 * target:.1f}%.",
        "",
        "| contender | processes | samples/s | x best locked | wall s | test acc | time to target s "
        "| x best locked | time to backprop's acc s | true-grad steps | bytes back per step "
        "| max messaging | layers per stage | threads per stage | pinned | ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in rows:
        ratio = r["samples_per_s"] / best["samples_per_s"] if best else float("nan")
        ttt = r["time_to_target_s"]
        best_ttt = best["time_to_target_s"] if best else None
        ttt_ratio = f"{ttt / best_ttt:.2f}" if ttt is not None and best_ttt else "-"
        acc = "-" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}%"
        msg = "n/a" if r["messaging_fraction"] is None else f"{100 * r['messaging_fraction']:.1f}%"
        lay = r.get("layout") or {}
        split = ",".join(map(str, lay["groups"])) if lay else "all"
        pinned = ("yes" if lay["pinned"] else "no") if lay else "-"
        threads = r.get("threads")
        replicas = lay.get("replicas") or []
        yields = lay.get("yields") or []
        if isinstance(threads, list):  # a replicated stage: processes x threads each; * yields the CPU
            threads = ",".join((f"{replicas[i]}x{max(t // replicas[i], 1)}" if i < len(replicas) and replicas[i] > 1
                                else str(t)) + ("*" if i < len(yields) and yields[i] else "")
                               for i, t in enumerate(threads))
        else:
            threads = str(threads or "-")
        ceiling = f"{lay['ceiling_samples_per_s']:.0f}" if lay and lay.get("ceiling_samples_per_s") else "-"
        to_bp = r.get("time_to_backprop_s")
        to_bp = "-" if r.get("backprop_final_accuracy") is None else ("never" if to_bp is None else f"{to_bp:.1f}")
        back = r.get("bytes_backward_per_step")
        back = "-" if back is None else f"{back / 1024:,.0f} KiB"
        lines.append(
            f"| {r['contender']} | {r['workers']} | {r['samples_per_s']:.0f} | {ratio:.2f} | "
            f"{r['wall_clock_s']:.1f} | {acc} | {'never' if ttt is None else f'{ttt:.1f}'} | "
            f"{ttt_ratio} | {to_bp} | {r['true_gradient_steps']} | {back} | {msg} | {split} | {threads} | {pinned} | "
            f"{ceiling} |")
    bp = next((r for r in rows if r["mode"] == Mode.BACKPROP), None)
    if bp is not None and any(r["mode"] == Mode.LOCKED for r in rows):
        lines += ["", f"What equals what: `locked` (one torch thread per stage) performs the operations "
                  f"of `backprop` on one thread (`--backprop-threads 1`) on the same data, so its "
                  f"parameters equal them bit for bit on the machines measured (bench/equivalence.py). "
                  f"`backprop` here uses {bp['threads']} threads, which sum in another order: its "
                  f"parameters drift from the one-thread result by rounding (~1e-5 after 200 Adam "
                  f"steps), so small differences in final accuracy between the two are rounding, not "
                  f"a difference in the algorithm."]
    if best is not None and any(r.get("backprop_final_accuracy") is not None for r in rows):
        lines += ["", f"Time to backprop's accuracy: the wall clock at which a contender's test accuracy first "
                  f"came within {100 * MATCH_POINTS:.1f} point of backprop's final "
                  f"{100 * rows[0]['backprop_final_accuracy']:.2f}%. Bytes back: gradient bytes sent "
                  f"towards stage 0 per step, all stages together."]
    lines += ["", "Ceiling: the most samples/s the busiest core allows at this machine's best "
              "single-core matmul rate, from the layout's FLOP counts (coordinator/layout.py); "
              "messages, elementwise work and waiting come on top."]
    if any(any((r.get("layout") or {}).get("yields") or []) for r in rows):
        lines += ["", "Threads marked *: a stage that yields the CPU to heavier ones on shared cores "
                  "(nice 19; docs/usage.md)."]
    lines += ["", "Plots: curves.png (accuracy and loss vs wall clock), timeline.png (first steps per "
              "worker), sg_heatmaps.png and sg_cosine.png (synthetic vs true gradients).", ""]
    return "\n".join(lines)


def run_compare(base: RunConfig, contenders_text: str, target: float, out: Optional[str] = None,
                log: Callable[[str], None] = print) -> tuple[Path, list[dict]]:
    """Run every contender; write compare.json, compare.md and plots; return (folder, rows)."""
    if not 0 < target <= 1:
        raise ConfigError(f"--target-accuracy must be in (0, 1], got {target}")
    folder = Path(out or base.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    contenders = parse_contenders(contenders_text, base.validate(), folder)  # all checked up front
    for c in contenders:  # data, model and devices too: a late contender must not fail after hours
        try:
            prepare(c.config)
        except ConfigError as exc:
            raise ConfigError(f"contender {c.name!r}: {exc}") from None
    folder.mkdir(parents=True, exist_ok=True)
    cores = len(available_cores())
    log(f"compare: {len(contenders)} contenders on {cores} cores: {', '.join(c.name for c in contenders)}")
    rows: list[dict] = []
    for i, c in enumerate(contenders, 1):
        log(f"[{i}/{len(contenders)}] {c.name}")
        _, summary = train(c.config, log=lambda line, n=c.name: log(f"  [{n}] {line}"))
        rows.append(record(c, summary, target, cores))
        add_time_to_backprop(rows)
        atomic_write_json(folder / "compare.json", rows)  # a partial table survives an abort
    (folder / "compare.md").write_text(markdown(rows, base, target))
    draw(folder, rows)
    return folder, rows


def draw(folder: Path, rows: list[dict]) -> list[Path]:
    runs = [(r["contender"], Path(r["run_dir"])) for r in rows]
    written = [folder / "curves.png"]
    plots.plot_curves(runs, written[0], "Locked vs unlocked on the wall clock")
    side = [(r["contender"], Path(r["run_dir"])) for r in rows if r["mode"] in (Mode.LOCKED, Mode.UNLOCKED)]
    if side:
        plots.plot_timelines(side, folder / "timeline.png")
        written.append(folder / "timeline.png")
    unlocked = [r for r in rows if r["mode"] == Mode.UNLOCKED]
    if unlocked and plots.plot_sg_heatmaps(Path(unlocked[0]["run_dir"]), folder / "sg_heatmaps.png"):
        written.append(folder / "sg_heatmaps.png")
    if plots.plot_sg_cosine([(r["contender"], Path(r["run_dir"])) for r in unlocked], folder / "sg_cosine.png"):
        written.append(folder / "sg_cosine.png")
    return written
