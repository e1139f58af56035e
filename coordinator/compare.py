"""`launch.py compare`: the same model, data, seed, batch size and core budget under each
contender, one after another in one invocation, so that their ratios are measured side by side.

Writes compare.json (one record per contender), compare.md (the table, with ratios to the best
locked contender) and PNG plots into the output folder; each contender's run folder is under
runs/. On class data the contenders are judged by test accuracy; on stream data (a target at
every position) by test loss, in bits per target with perplexity beside (common/scores.py).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from synthgrad.common import scores
from synthgrad.common.config import ConfigError, RunConfig, rule_options
from synthgrad.common.datasets import StreamOptions, data_spec
from synthgrad.common.modes import MODE_NAMES, Mode, spoken
from synthgrad.common.files import atomic_write_json
from synthgrad.common.procs import available_cores
from synthgrad.coordinator import plots
from synthgrad.coordinator.train import prepare, train

# every update waits for its true gradient: the ratios' baseline
LOCKED = (Mode.BACKPROP, Mode.PIPELINE, Mode.LOCKED)
DEFAULT_CONTENDERS = (Mode.BACKPROP, Mode.PIPELINE, Mode.LOCKED, Mode.UNLOCKED, Mode.STALE)
STREAM_REFUSERS = (Mode.PIPELINE,)  # modes that do not take stream data (common/models.py check_model)
DEFAULT_TARGET_ACCURACY = 0.85
MATCH_POINTS = 0.005  # "reaches backprop's accuracy": within half a point of its final one
MATCH_BITS = 0.02  # "reaches backprop's loss" (stream data): within 0.02 bits per target of its final one


def default_contenders(per_position: bool) -> str:
    """The contenders when --contenders is not given: backprop, pipeline, locked, unlocked and
    stale; on stream data without the modes that refuse it (pipeline)."""
    return ",".join(m.value for m in DEFAULT_CONTENDERS if not (per_position and m in STREAM_REFUSERS))


@dataclass(frozen=True)
class Target:
    """What "time to target" and "time to backprop's result" are taken on: test accuracy on class
    data (higher is better); the test loss on stream data (lower is better; in bits per target
    under cross-entropy). `loss` is in the loss's own units (nats); None on stream data: the best
    locked contender's final test loss, known once it has run."""
    on_loss: bool = False
    in_bits: bool = False
    accuracy: float = DEFAULT_TARGET_ACCURACY
    loss: Optional[float] = None

    @classmethod
    def of(cls, per_position: bool, loss_name: str, accuracy: Optional[float] = None,
           bits: Optional[float] = None) -> Target:
        """From compare's options and the data: a bad or misplaced target is refused before
        anything runs."""
        if not per_position:
            if bits is not None:
                raise ConfigError("--target-bits judges stream data (a target at every position); "
                                  "on class data use --target-accuracy")
            accuracy = DEFAULT_TARGET_ACCURACY if accuracy is None else accuracy
            if not 0 < accuracy <= 1:
                raise ConfigError(f"--target-accuracy must be in (0, 1], got {accuracy}")
            return cls(accuracy=accuracy)
        if accuracy is not None:
            raise ConfigError("stream data is judged on the test loss, not accuracy: use --target-bits "
                              "(default: the best locked contender's final bits per target)")
        in_bits = scores.in_bits(per_position, loss_name)
        if bits is not None and not in_bits:
            raise ConfigError(f"--target-bits needs --loss cross_entropy; --loss {loss_name} has its own "
                              f"units (leave the target out: the best locked contender's final loss)")
        if bits is not None and not bits > 0:
            raise ConfigError(f"--target-bits must be > 0, got {bits}")
        return cls(on_loss=True, in_bits=in_bits, loss=None if bits is None else bits * scores.LN2)

    def goal(self, rows: list[dict]) -> Optional[float]:
        """The value to reach: the accuracy, the loss, or the best locked contender's final loss."""
        if not self.on_loss:
            return self.accuracy
        if self.loss is not None:
            return self.loss
        best = best_locked(rows)
        return best["test_loss"] if best else None

    def reached(self, value: float, goal: float) -> bool:
        return value <= goal if self.on_loss else value >= goal

    def curve(self, row: dict) -> list[list[float]]:
        """[wall_s, value] of a contender's evaluations, in what this target is taken on."""
        return row["loss_curve"] if self.on_loss else row["curve"]

    def final(self, row: dict) -> Optional[float]:
        return row.get("test_loss") if self.on_loss else row.get("test_accuracy")

    def matched(self, final: float) -> float:
        """The value that counts as reaching a final result (backprop's): half a point of
        accuracy, or MATCH_BITS bits per target of loss."""
        return final + MATCH_BITS * scores.LN2 if self.on_loss else final - MATCH_POINTS

    def say(self, value: float) -> str:
        """A value of what this target is taken on, in words."""
        if not self.on_loss:
            return f"{100 * value:.2f}%"
        return f"{scores.bits(value):.3f} bits per target" if self.in_bits else f"test loss {value:.4f}"


@dataclass(frozen=True)
class Contender:
    name: str  # as shown: "unlocked N=10"
    config: RunConfig


def _spelled(value) -> str:
    """An option's value as a contender's name spells it: a tuple's numbers separated by "/"."""
    return "/".join(str(v) for v in value) if isinstance(value, tuple) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def parse_contenders(text: str, base: RunConfig, out: Path) -> list[Contender]:
    """'backprop,pipeline,locked,unlocked,unlocked:10,stale:10,local+head_next_layer=1' ->
    validated configs. A mode's ':N' sets its --true-grad-every; without it the base config's
    value is used. `+field=value` sets an option for that contender alone (on top of the
    invocation's), so that one invocation measures a rule with and without it."""
    cores = len(available_cores())
    result: list[Contender] = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        try:
            rule, options = rule_options(item)
        except ConfigError as exc:
            raise ConfigError(f"contender {item!r}: {exc}") from None
        if {"mode", "true_grad_every", "out"} & set(options):
            raise ConfigError(f"contender {item!r}: the mode, its N (':N') and the folder are not options here")
        mode, _, n = rule.partition(":")
        changes: dict = {"mode": mode, **options}
        if n:
            if mode in MODE_NAMES and not Mode(mode).takes_n:
                takers = spoken(tuple(m.value for m in Mode if m.takes_n))
                raise ConfigError(f"contender {item!r}: only {takers} take ':N'")
            try:
                changes["true_grad_every"] = int(n)
            except ValueError:
                raise ConfigError(f"contender {item!r}: N must be an integer") from None
        if mode == Mode.BACKPROP:
            changes.setdefault("backprop_threads", base.backprop_threads or cores)
        try:
            cfg = base.replace(**changes)
        except ConfigError as exc:
            raise ConfigError(f"contender {item!r}: {exc}") from None
        name = mode
        if mode in MODE_NAMES and Mode(mode).takes_n:
            name = f"{mode} N={cfg.true_grad_every}"
        elif mode == Mode.PIPELINE:
            name = f"pipeline {cfg.schedule} x{cfg.microbatches}"
        name += "".join(f" {k}={_spelled(v)}" for k, v in options.items())
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "", name.replace(" ", "_").replace("/", "-"))
        if any(c.name == name or Path(c.config.out).name == folder for c in result):
            raise ConfigError(f"contender {name!r} is listed twice")
        result.append(Contender(name, cfg.replace(out=str(out / "runs" / folder))))
    if not result:
        raise ConfigError("--contenders is empty; e.g. backprop,pipeline,locked,unlocked,stale")
    return result


def time_to_target(evals: list[dict], target: float, on_loss: bool = False) -> Optional[float]:
    """Wall-clock seconds at the first evaluation reaching `target` (test accuracy at least it; on
    stream data, `on_loss`, test loss at most it), or None."""
    for e in evals:
        if (e["test_loss"] <= target) if on_loss else (e["test_accuracy"] >= target):
            return e["wall_s"]
    return None


def record(contender: Contender, summary: dict, cores: int) -> dict:
    cfg = contender.config
    return {
        "contender": contender.name, "mode": cfg.mode, "cores": cores,
        "workers": summary["num_stages"],
        "threads": summary.get("threads") or (summary.get("layout") or {}).get("threads"),
        "true_grad_every": cfg.true_grad_every if cfg.mode.takes_n else 1,
        "samples_per_s": summary["samples_per_s"], "wall_clock_s": summary["wall_clock_s"],
        "startup_s": summary.get("startup_s"),
        "test_accuracy": summary["test_accuracy"], "test_loss": summary.get("test_loss"),
        # stream data under cross-entropy: the loss in bits per target, and perplexity
        "test_bits": summary.get("test_bits"), "test_perplexity": summary.get("test_perplexity"),
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
        "loss_curve": [[e["wall_s"], e["test_loss"]] for e in summary["evals"]],
        "run_dir": summary["run_dir"],
    }


def _first(curve: list[list[float]], goal: float, target: Target) -> Optional[float]:
    return next((w for w, v in curve if target.reached(v, goal)), None)


def add_targets(rows: list[dict], target: Target) -> None:
    """Each contender's time to the target, and (with backprop among the contenders) the wall
    clock at which it first came within MATCH_POINTS of backprop's final accuracy, or on stream
    data within MATCH_BITS of its final loss (None: never). Called again as rows come in: the
    default target on stream data is the best locked contender's final loss."""
    goal = target.goal(rows)
    bp = next((r for r in rows if r["mode"] == Mode.BACKPROP and target.final(r) is not None), None)
    for r in rows:
        if target.on_loss:
            r["target_loss"] = goal
            r["target_bits"] = None if goal is None or not target.in_bits else scores.bits(goal)
            r["backprop_final_loss"] = bp["test_loss"] if bp else None
        else:
            r["target_accuracy"] = goal
        r["time_to_target_s"] = None if goal is None else _first(target.curve(r), goal, target)
        r["backprop_final_accuracy"] = bp["test_accuracy"] if bp else None
        r["time_to_backprop_s"] = (_first(target.curve(r), target.matched(target.final(bp)), target)
                                   if bp else None)


def add_time_to_backprop(rows: list[dict]) -> None:
    """add_targets on class data at the default target (rows without loss curves)."""
    add_targets(rows, Target())


def best_locked(rows: list[dict]) -> Optional[dict]:
    locked = [r for r in rows if r["mode"] in LOCKED]
    return max(locked, key=lambda r: r["samples_per_s"]) if locked else None


def _judged(r: dict, target: Target) -> list[str]:
    """A contender's test columns: accuracy; on stream data its loss (bits, perplexity) first."""
    acc = "-" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}%"
    if not target.on_loss:
        return [acc]
    if target.in_bits:
        bits, ppl = r.get("test_bits"), r.get("test_perplexity")
        return ["-" if bits is None else f"{bits:.3f}", "-" if ppl is None else f"{ppl:.2f}", acc]
    return ["-" if r.get("test_loss") is None else f"{r['test_loss']:.4f}", acc]


def _target_words(rows: list[dict], target: Target) -> str:
    """The table's line on what "time to target" means in this compare."""
    goal = target.goal(rows)
    if not target.on_loss:
        return f"Target accuracy {100 * goal:.1f}%."
    if goal is None:
        return "No target: no locked contender ran, and no --target-bits was given."
    whose = ("" if target.loss is not None else
             f" (the final result of the best locked contender, {best_locked(rows)['contender']})")
    return f"Target: test loss down to {target.say(goal)}{whose}; lower is better."


def markdown(rows: list[dict], base: RunConfig, target: Target) -> str:
    best = best_locked(rows)
    model = {"mlp": f"MLP {'-'.join(map(str, base.layers))}", "cnn": "CNN"}.get(base.model, base.model)
    unit = "bits" if target.in_bits else "loss" if target.on_loss else "acc"
    tests = (["test bits per target", "perplexity", "test acc"] if target.in_bits
             else ["test loss", "test acc"] if target.on_loss else ["test acc"])
    lines = [
        f"# synthgrad compare: {model}, {base.dataset}, batch {base.batch_size}, "
        f"{base.epochs} epoch(s){'' if base.steps is None else f' / {base.steps} steps'}, "
        f"{rows[0]['cores']} cores, device {base.device}, {base.precision}",
        "",
        f"Ratios are to the best locked contender ({best['contender'] if best else 'none'}), "
        f"measured in this one invocation. {_target_words(rows, target)}",
        "",
        f"| contender | processes | samples/s | x best locked | wall s | {' | '.join(tests)} | time to target s "
        f"| x best locked | time to backprop's {unit} s | true-grad steps | bytes back per step "
        "| max messaging | layers per stage | threads per stage | pinned | ceiling |",
        f"|---|---:|---:|---:|---:|{'---:|' * len(tests)}---:|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in rows:
        ratio = r["samples_per_s"] / best["samples_per_s"] if best else float("nan")
        ttt = r["time_to_target_s"]
        best_ttt = best["time_to_target_s"] if best else None
        ttt_ratio = f"{ttt / best_ttt:.2f}" if ttt is not None and best_ttt else "-"
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
        ttt_text = "-" if ttt is None and target.goal(rows) is None else "never" if ttt is None else f"{ttt:.1f}"
        lines.append(
            f"| {r['contender']} | {r['workers']} | {r['samples_per_s']:.0f} | {ratio:.2f} | "
            f"{r['wall_clock_s']:.1f} | {' | '.join(_judged(r, target))} | {ttt_text} | "
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
    bp_final = next((target.final(r) for r in rows if r["mode"] == Mode.BACKPROP and target.final(r) is not None),
                    None)
    if best is not None and bp_final is not None:
        if target.on_loss:
            lines += ["", f"Time to backprop's {unit}: the wall clock at which a contender's test loss first came "
                      f"within {MATCH_BITS} bits per target of backprop's final {target.say(bp_final)}."]
        else:
            lines += ["", f"Time to backprop's acc: the wall clock at which a contender's test accuracy first "
                      f"came within {100 * MATCH_POINTS:.1f} point of backprop's final {target.say(bp_final)}."]
        lines[-1] += " Bytes back: gradient bytes sent towards stage 0 per step, all stages together."
    if target.in_bits:
        lines += ["", "Stream data is judged in bits: test bits per target = test loss / ln 2, perplexity = "
                  "exp(test loss); test acc is the share of targets predicted right."]
    lines += ["", "Ceiling: the most samples/s the busiest core allows at this machine's best "
              "single-core matmul rate, from the layout's FLOP counts (coordinator/layout.py); "
              "messages, elementwise work and waiting come on top."]
    if any(any((r.get("layout") or {}).get("yields") or []) for r in rows):
        lines += ["", "Threads marked *: a stage that yields the CPU to heavier ones on shared cores "
                  "(nice 19; docs/usage.md)."]
    curves = "test bits per target and training loss" if target.in_bits else "accuracy and loss"
    lines += ["", f"Plots: curves.png ({curves} vs wall clock), timeline.png (first steps per "
              "worker), sg_heatmaps.png and sg_cosine.png (synthetic vs true gradients).", ""]
    return "\n".join(lines)


def run_compare(base: RunConfig, contenders_text: Optional[str] = None, target_accuracy: Optional[float] = None,
                out: Optional[str] = None, log: Callable[[str], None] = print,
                target_bits: Optional[float] = None) -> tuple[Path, list[dict]]:
    """Run every contender; write compare.json, compare.md and plots; return (folder, rows).
    Without contenders, default_contenders for the data; the target is `target_accuracy` on class
    data, `target_bits` on stream data (class Target)."""
    base = base.validate()
    spec = data_spec(base.dataset, base.data_dir, StreamOptions.of(base))
    per_position = bool(spec.label_shape)
    target = Target.of(per_position, base.loss, target_accuracy, target_bits)
    folder = Path(out or base.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    contenders = parse_contenders(contenders_text or default_contenders(per_position), base, folder)  # checked up front
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
        rows.append(record(c, summary, cores))
        add_targets(rows, target)
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
