"""PNG figures of finished runs, drawn from the files in their run folders (matplotlib, no display).

Each function takes run folders (or records read from them) and writes one titled, labelled PNG.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from synthgrad.common import scores  # noqa: E402

ACTIVITY_COLORS = {
    "compute": "#2e7d32", "send": "#ef6c00", "recv": "#ffb74d",
    "wait_input": "#b0bec5", "wait_send": "#78909c", "wait_grad": "#c62828",
}
ACTIVITY_LABELS = {
    "compute": "compute", "send": "send (encode + hand to ZeroMQ)", "recv": "receive (decode)",
    "wait_input": "wait for input", "wait_send": "wait: next queue full", "wait_grad": "wait for gradient",
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_stage_losses(records: list[dict]) -> tuple[list[float], list[float]]:
    workers = [r for r in records if r.get("event") == "worker" and r.get("loss") is not None]
    if not workers:
        return [], []
    last = max(r["stage"] for r in workers)
    pts = [(r["wall_s"], r["loss"]) for r in workers if r["stage"] == last]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(runs: Sequence[tuple[str, Path]], path: Path, title: str) -> None:
    """Test accuracy and training loss against wall-clock seconds, every run on one chart. Runs
    on stream data (evaluations in bits, common/scores.py) are judged in bits: test bits per
    target on the left, the training loss in bits on the right."""
    fig, (ax_test, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8))
    in_bits = False
    for label, run_dir in runs:
        recs = read_metrics(run_dir)
        evals = [r for r in recs if r.get("event") == "eval"]
        xs, ys = _last_stage_losses(recs)
        if evals and evals[-1].get("test_bits") is not None:
            in_bits = True
            ax_test.plot([r["wall_s"] for r in evals], [r["test_bits"] for r in evals], marker="o", ms=3, label=label)
            ys = [scores.bits(y) for y in ys]
        elif evals:
            ax_test.plot([r["wall_s"] for r in evals], [100 * r["test_accuracy"] for r in evals],
                         marker="o", ms=3, label=label)
        if xs:
            ax_loss.plot(xs, ys, label=label)
    seconds = "wall-clock seconds since training started"
    if in_bits:
        ax_test.set(title="Test bits per target (lower is better)", xlabel=seconds, ylabel="bits per target")
        ax_loss.set(title="Training loss (last stage, ~1 s averages)", xlabel=seconds, ylabel="bits per target")
    else:
        ax_test.set(title="Test accuracy", xlabel=seconds, ylabel="test accuracy (%)")
        ax_loss.set(title="Training loss (last stage, ~1 s averages)", xlabel=seconds, ylabel="cross-entropy")
    for ax in (ax_test, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_timeline(run_dir: Path) -> dict[int, list]:
    out = {}
    for f in sorted(Path(run_dir).glob("timeline-stage*.json")):
        out[int(f.stem.replace("timeline-stage", ""))] = json.loads(f.read_text())
    return out


def plot_timelines(runs: Sequence[tuple[str, Path]], path: Path, seconds: float | None = None) -> None:
    """What each worker did during the first steps: one panel per run, one row per stage."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(13, 1.2 + 1.1 * 4 * len(runs)), squeeze=False)
    used: set[str] = set()
    spans_by_run = [read_timeline(d) for _, d in runs]
    if seconds is None:  # one time scale for all panels: the shortest recorded window
        lengths = []
        for tl in spans_by_run:
            ev = [e for evs in tl.values() for e in evs]
            if ev:
                lengths.append(max(e[2] for e in ev) - min(e[1] for e in ev))
        seconds = min(lengths) if lengths else 1.0
    for ax, (label, _), tl in zip(axes[:, 0], runs, spans_by_run):
        events = [e for evs in tl.values() for e in evs]
        if not events:
            ax.set_title(f"{label}: no timeline recorded")
            continue
        t0 = min(e[1] for e in events)
        for stage, evs in tl.items():
            for name in ACTIVITY_COLORS:
                bars = [(e[1] - t0, e[2] - e[1]) for e in evs if e[0] == name and e[1] - t0 <= seconds]
                if bars:
                    used.add(name)
                    ax.broken_barh(bars, (stage - 0.4, 0.8), facecolors=ACTIVITY_COLORS[name])
        ax.set_yticks(sorted(tl))
        ax.set_yticklabels([f"stage {s}" for s in sorted(tl)])
        ax.invert_yaxis()
        ax.set_xlim(0, seconds)
        ax.set(title=label, xlabel="seconds since the first recorded step")
    handles = [plt.Rectangle((0, 0), 1, 1, color=ACTIVITY_COLORS[n]) for n in ACTIVITY_COLORS if n in used]
    fig.legend(handles, [ACTIVITY_LABELS[n] for n in ACTIVITY_COLORS if n in used],
               loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("Per-worker timeline of the first training steps (green = computing)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sg_heatmaps(run_dir: Path, path: Path, stage: int = 0) -> bool:
    """Synthetic beside true dL/dh (16 samples x 64 units) at a few moments of one stage."""
    f = Path(run_dir) / f"sg-snapshots-stage{stage}.json"
    if not f.exists():
        return False
    snaps = json.loads(f.read_text())
    fig, axes = plt.subplots(2, len(snaps), figsize=(3.2 * len(snaps), 5.4), squeeze=False)
    for col, snap in enumerate(snaps):
        scale = max(max(abs(v) for row in snap["true"] for v in row), 1e-12)
        for row, key in enumerate(("predicted", "true")):
            ax = axes[row, col]
            im = ax.imshow(snap[key], cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"step {snap['step']}\ncosine {snap['cosine']:.2f}", fontsize=9)
            if col == 0:
                ax.set_ylabel(("synthetic" if key == "predicted" else "true") + " dL/dh\n(samples)")
        fig.colorbar(im, ax=axes[:, col].tolist(), shrink=0.7)
    fig.suptitle(f"Stage {stage}: synthetic vs true gradient of its output (16 samples x 64 units, "
                 f"colour = per-sample gradient)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sg_cosine(runs: Sequence[tuple[str, Path]], path: Path) -> bool:
    """Cosine similarity between synthetic and true gradients over training, per stage."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    drawn = False
    for label, run_dir in runs:
        recs = [r for r in read_metrics(run_dir) if r.get("event") == "worker" and r.get("sg_cosine") is not None]
        for stage in sorted({r["stage"] for r in recs}):
            pts = [(r["wall_s"], r["sg_cosine"]) for r in recs if r["stage"] == stage]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{label}, stage {stage}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set(title="How good are the synthetic gradients? cos(synthetic, true) on true-gradient steps",
           xlabel="wall-clock seconds since training started", ylabel="cosine similarity", ylim=(-0.1, 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_workers(run_dir: Path, path: Path) -> bool:
    """Per-worker throughput and utilisation over the run, from metrics.jsonl."""
    recs = [r for r in read_metrics(run_dir) if r.get("event") == "worker"]
    if not recs:
        return False
    fig, (ax_rate, ax_busy) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for stage in sorted({r["stage"] for r in recs}):
        pts = [r for r in recs if r["stage"] == stage and not r.get("final")]
        t = [r["wall_s"] for r in pts]
        line, = ax_rate.plot(t, [r["samples_per_s"] for r in pts], label=f"stage {stage}")
        ax_busy.plot(t, [100 * r["busy_fraction"] for r in pts], color=line.get_color(),
                     label=f"stage {stage} computing")
        waits = [100 * sum(r.get(k, 0.0) for k in ("wait_input_fraction", "wait_send_fraction",
                                                     "wait_grad_fraction")) for r in pts]
        if any(waits):
            ax_busy.plot(t, waits, color=line.get_color(), linestyle="--", label=f"stage {stage} waiting")
    ax_rate.set(title="Throughput per worker (about one report a second)", ylabel="samples/s")
    ax_busy.set(title="Utilisation per worker", xlabel="wall-clock seconds since training started",
                ylabel="% of wall time", ylim=(0, 105))
    for ax in (ax_rate, ax_busy):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def draw_run(run_dir: Path, out: Path) -> list[Path]:
    """Every figure one finished run's files support, written into `out`."""
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label = run_dir.name
    written = [out / "curves.png"]
    plot_curves([(label, run_dir)], written[0], f"Run {label}")
    if plot_workers(run_dir, out / "workers.png"):
        written.append(out / "workers.png")
    if read_timeline(run_dir):
        plot_timelines([(label, run_dir)], out / "timeline.png")
        written.append(out / "timeline.png")
    if plot_sg_heatmaps(run_dir, out / "sg_heatmaps.png"):
        written.append(out / "sg_heatmaps.png")
    if plot_sg_cosine([(label, run_dir)], out / "sg_cosine.png"):
        written.append(out / "sg_cosine.png")
    return written
