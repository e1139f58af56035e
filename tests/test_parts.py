"""The parts of the stage and coordinator processes, without processes: the mode vocabulary,
stage 0's schedule, the registry, the watchdog and the coordinator's checkpoint bookkeeping."""
from __future__ import annotations

import json

import pytest
import torch

from synthgrad.common import wire
from synthgrad.common.wire import Phase
from synthgrad.common.config import RunConfig
from synthgrad.common.data import steps_per_epoch, synthetic, total_steps
from synthgrad.common.modes import MODE_NAMES, STAGE_WORKER_MODES, Mode
from synthgrad.coordinator.checkpoints import CheckpointBook
from synthgrad.coordinator.registry import Registry
from synthgrad.common.liveness import ProcessFailure
from synthgrad.coordinator.watchdog import RunFailed, Watchdog
from synthgrad.workers.schedule import Boundary, End, Evaluate, StreamOrder, TrainBatch, schedule, split_batches


# ---------------------------------------------------------------------------- modes
def test_one_mode_vocabulary():
    assert MODE_NAMES == ("backprop", "pipeline", "locked", "unlocked", "stale", "local", "delayed", "corrected")
    assert STAGE_WORKER_MODES == ("locked", "unlocked", "stale", "local", "delayed", "corrected")
    assert [m.value for m in Mode if m.takes_n] == ["unlocked", "stale", "corrected"]
    # unlocked's predictor has a local head's gradient as its prior unless --sg-prior none
    assert RunConfig(mode="unlocked").rule.uses_head and not RunConfig(mode="unlocked", sg_prior="none").rule.uses_head
    assert Mode.LOCKED.rule.waits_for_gradient and not Mode.UNLOCKED.rule.waits_for_gradient
    assert Mode.BACKPROP.rule is None and Mode("pipeline") is Mode.PIPELINE
    assert Mode.UNLOCKED.rule.uses_predictor and not Mode.STALE.rule.uses_predictor
    locked, unlocked = RunConfig(mode="locked", true_grad_every=4), RunConfig(mode="unlocked", true_grad_every=4)
    assert [locked.true_grad_at(s) for s in range(8)] == [True] * 8
    assert [s for s in range(8) if unlocked.true_grad_at(s)] == [3, 7]
    local, delayed = RunConfig(mode="local"), RunConfig(mode="delayed")
    assert not any(local.true_grad_at(s) for s in range(8))  # nothing travels backward
    assert all(delayed.true_grad_at(s) for s in range(8)) and not Mode.DELAYED.rule.waits_for_gradient
    assert Mode.LOCAL.rule.uses_head and not Mode.LOCAL.rule.uses_predictor
    corrected = RunConfig(mode="corrected", true_grad_every=4)
    assert Mode.CORRECTED.rule.uses_head and [s for s in range(8) if corrected.true_grad_at(s)] == [3, 7]


# ---------------------------------------------------------------------------- stage 0's schedule
def _events(cfg: RunConfig, first_step: int = 0) -> list:
    ds = synthetic(cfg.synthetic_train, cfg.synthetic_test)
    per_epoch = steps_per_epoch(len(ds.train), cfg.batch_size)
    total = total_steps(len(ds.train), cfg.batch_size, cfg.epochs, cfg.steps)
    return list(schedule(cfg, split_batches(cfg, ds.train), per_epoch, total, first_step))


def test_stage0_schedule_trains_evaluates_and_offers_checkpoints():
    cfg = RunConfig(dataset="synthetic", synthetic_train=64 * 4, batch_size=64, epochs=3, steps=10, eval_every=3)
    events = _events(cfg)
    assert [e.step for e in events if isinstance(e, TrainBatch)] == list(range(10))
    # after each epoch (4 steps), every 3 steps in between, never twice at one step
    assert [(e.epoch, e.step) for e in events if isinstance(e, Evaluate)] == \
        [(0, 3), (0, 4), (1, 6), (1, 8), (2, 9), (2, 10)]
    # a checkpoint may follow any step but an epoch's last (its evaluation comes first) and the run's last
    assert [e.step for e in events if isinstance(e, Boundary)] == [0, 1, 2, 4, 5, 6, 8]
    assert events[-1] == End(10, 3)


def test_stage0_schedule_resumed_continues_the_same_sequence():
    cfg = RunConfig(dataset="synthetic", synthetic_train=64 * 4, batch_size=64, epochs=3, eval_every=3)
    fresh, resumed = _events(cfg), _events(cfg, first_step=6)
    tail = fresh[next(i for i, e in enumerate(fresh) if isinstance(e, TrainBatch) and e.step == 6):]
    assert [type(e) for e in resumed] == [type(e) for e in tail]
    for a, b in zip(tail, resumed):
        if isinstance(a, TrainBatch):
            assert (a.step, a.epoch) == (b.step, b.epoch) and torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
        else:
            assert a == b


# ---------------------------------------------------------------------------- registry
def test_registry_turns_away_what_does_not_fit_and_checks_senders():
    reg = Registry(2)
    assert reg.register(b"a", wire.Register(0, 10, "h"), started=False) is None
    assert "is taken (pid 10 on h)" in reg.register(b"b", wire.Register(0, 11, "h"), started=False)
    assert "stages 0..1" in reg.register(b"c", wire.Register(5, 12, "h"), started=False)
    assert reg.register(b"d", wire.Register(1, 13, "h"), started=False) is None and reg.complete
    reg3 = Registry(3)
    reg3.register(b"a", wire.Register(0, 10, "h"), started=False)
    assert "has started" in reg3.register(b"e", wire.Register(1, 14, "h"), started=True)
    assert not reg.set_ready(1, "ipc://x") and reg.set_ready(0, "")
    assert reg.downstream(0) == "ipc://x" and reg.downstream(1) == ""
    g = torch.zeros(2, 3)
    assert reg.sender_problem(wire.Grad(0, 0, True, g), b"d") is None  # stage 1 -> stage 0
    assert "gradient for stage 1" in reg.sender_problem(wire.Grad(0, 1, True, g), b"d")
    assert "for stage 0 from stage 1" in reg.sender_problem(wire.Heartbeat(0), b"d")
    assert "never registered" in reg.sender_problem(wire.Heartbeat(0), b"zzz")


# ---------------------------------------------------------------------------- watchdog
def test_watchdog_names_what_went_wrong():
    """The coordinator's watch over its stages, on a made-up clock (every rule and its words:
    tests/test_liveness_rules.py)."""
    cfg = RunConfig(start_timeout=5, heartbeat_timeout=2, stall_timeout=10)
    dog = Watchdog(cfg, created=100.0, num_stages=2)
    dog.ready(0)
    dog.check(104.0)
    with pytest.raises(RunFailed, match=r"stages \[1\] were not ready within 5s"):
        dog.check(106.0)
    dog.identify(0, 9, "")
    dog.start(106.0)
    dog.heard(0, 106.0)
    dog.check(107.9)
    with pytest.raises(ProcessFailure, match="stage 0 \\(pid 9\\) sent nothing for 2.5s"):
        dog.check(108.5)
    dog.heard(0, 120.0)
    dog.advanced(110.0, step=3)
    dog.advanced(111.0, step=3)  # not a new step: no progress
    with pytest.raises(RunFailed, match="no progress"):
        dog.check(120.5)


# ---------------------------------------------------------------------------- checkpoint bookkeeping
def test_checkpoint_is_complete_only_when_every_stage_saved(tmp_path):
    cfg = RunConfig(mode="locked", dataset="synthetic")
    lines: list[str] = []
    book = CheckpointBook(cfg, tmp_path, 2, lines.append, wall=lambda: 1.5)
    sent: list = []
    book.ask(sent.append, "every 1s")
    book.ask(sent.append, "again")  # one at a time
    assert len(sent) == 1 and isinstance(sent[0], wire.Checkpoint)
    book.on_saved(wire.Saved(0, 7, "/a", "h"))
    assert book.last_complete is None and not book.manifest_path.exists()
    book.on_saved(wire.Saved(1, 7, "/b", "h"))
    manifest = json.loads(book.manifest_path.read_text())
    assert manifest["step"] == 7 and manifest["stages"] == {"0": {"path": "/a", "host": "h"},
                                                             "1": {"path": "/b", "host": "h"}}
    assert book.last_complete == 7 and book.asked is None and [c["step"] for c in book.taken] == [7]
    book.ask(sent.append, "every 1s")
    book.on_saved(wire.Saved(0, 9, "/c", "h"))
    book.on_saved(wire.Saved(1, 9, "", "h", "No space left on device"))
    assert book.last_complete == 7 and book.failures == 1 and "stays step 7" in lines[-1]
    book.on_saved(wire.Saved(0, 9, "/late", "h"))  # a late SAVED of the failed checkpoint
    assert json.loads(book.manifest_path.read_text())["step"] == 7


# ---------------------------------------------------------------------------- layers
def _imports(path) -> set[str]:
    """Top packages a module imports anywhere: at the top, inside functions and under `if
    TYPE_CHECKING:` alike (an import for annotations is a dependency all the same)."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_layer(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(_layer(node.module))
    return found


def _layer(module: str) -> str:
    """'synthgrad.common.config' -> 'common'; 'synthgrad' -> 'synthgrad' (the library layer)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "synthgrad" and len(parts) > 1 else parts[0]


@pytest.mark.parametrize("layer, may_not_import", [
    ("common", {"workers", "coordinator", "synthgrad", "launch"}),
    ("workers", {"coordinator", "synthgrad", "launch"}),
    ("coordinator", {"synthgrad", "launch"}),
    ("synthgrad/cli.py", {"common", "workers", "coordinator"}),  # the command line uses the library layer only
    ("launch.py", {"common", "workers", "coordinator"}),
])
def test_imports_go_one_way(layer, may_not_import):
    from tests.helpers import ROOT
    files = [ROOT / layer] if layer.endswith(".py") else sorted((ROOT / layer).glob("*.py"))
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & may_not_import)
                 for p in files if _imports(p) & may_not_import}
    assert not offenders, offenders


def test_every_import_names_the_package():
    """`import common...` would load a second copy of a module beside synthgrad.common... (two
    ConfigError classes, two registries): every file imports the layers through synthgrad."""
    import ast
    from tests.helpers import ROOT
    files = [p for folder in ("common", "workers", "coordinator", "synthgrad", "tests", "bench", "examples")
             for p in (ROOT / folder).glob("*.py")] + [ROOT / "launch.py"]
    bare = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            bare += [f"{path.relative_to(ROOT)}: {n}" for n in names
                     if n.split(".")[0] in ("common", "workers", "coordinator")]
    assert not bare, bare


def test_the_library_layer_exports_what_it_names():
    import synthgrad
    for name in synthgrad.__all__:
        assert getattr(synthgrad, name) is not None, name
    with pytest.raises(AttributeError):
        synthgrad.nothing_here  # noqa: B018


# ---------------------------------------------------------------------------- what may arrive next
def test_stream_order_accepts_the_schedule_and_nothing_else():
    cfg = RunConfig(mode="unlocked", true_grad_every=2)
    order = StreamOrder(cfg)
    assert order.problem(Phase.TRAIN, 0, False) is None
    order.accept(Phase.TRAIN, 0)
    assert "out of order (expected 1)" in order.problem(Phase.TRAIN, 2**62, False)  # far ahead
    assert "true-gradient flag" in order.problem(Phase.TRAIN, 1, False)  # step 1 is a true step
    assert "but the last step was 0" in order.problem(Phase.CHECKPOINT, 5, False)
    assert order.problem(Phase.CHECKPOINT, 0, False) is None
    assert "but 1 steps came" in order.problem(Phase.END, 0, False)  # a forged end
    assert order.problem(Phase.EVAL, 0, False) is None
    order.accept(Phase.EVAL, 0)
    assert "evaluation batch 0 out of order" in order.problem(Phase.EVAL, 0, False)
    order.accept(Phase.EVAL_END, 1)
    assert order.problem(Phase.EVAL, 0, False) is None and order.problem(Phase.END, 1, False) is None
    resumed = StreamOrder(cfg, last_step=59)
    assert resumed.problem(Phase.TRAIN, 60, False) is None and resumed.problem(Phase.TRAIN, 0, False)


def test_non_finite_values_stop_a_stage_before_they_are_used():
    from synthgrad.common.models import build_units, stage_bounds, stage_io_shapes
    from torch import nn

    from synthgrad.workers.stage import NonFinite, StageLogic
    cfg = RunConfig(mode="unlocked", layers=(784, 32, 32, 10))
    units, shapes = build_units(cfg), stage_io_shapes(cfg)
    a, b = stage_bounds(cfg)[1]
    mid = StageLogic(cfg, 1, 3, nn.Sequential(*units[a:b]), shapes[1][0], shapes[1][1])
    before = [p.clone() for p in mid.module.parameters()]
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    x[3, 5] = float("nan")
    with pytest.raises(NonFinite, match="stage 1: the output of step 0 is NaN or infinite"):
        mid.forward(0, x, y, True)
    assert all(torch.equal(p, q) for p, q in zip(before, mid.module.parameters()))
    last = StageLogic(cfg.replace(lr=1.0), 2, 3, nn.Sequential(*units[2:3]), shapes[2][0], shapes[2][1])
    with pytest.raises(NonFinite, match="the loss of step 4"):
        last.last_step(4, torch.full((16, 32), float("inf")), y, True)
    with torch.no_grad():
        next(mid.module.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFinite, match="not saved"):
        mid.state_dict()


def test_a_stage_deletes_only_what_the_coordinator_has_committed_past(tmp_path):
    from synthgrad.common.models import build_units
    from torch import nn

    from synthgrad.workers.checkpointing import StageCheckpoints
    from synthgrad.workers.stage import StageLogic
    cfg = RunConfig(mode="locked", layers=(784, 8, 10))
    logic = StageLogic(cfg, 0, 2, nn.Sequential(build_units(cfg)[0]), (1, 28, 28), (8,))
    ckpt = StageCheckpoints(0, cfg, tmp_path, logic, 0)
    told: list = []
    for step in (9, 19, 29, 39):
        ckpt.take(step, 0, pass_marker=None, wait_for_gradients=lambda: None, tell=told.append)
    assert [m.step for m in told] == [9, 19, 29, 39] and all(m.path for m in told)
    ckpt.committed(9)  # nothing older than 9
    assert sorted(ckpt.saved) == [9, 19, 29, 39]
    ckpt.committed(9, drop=19)  # 19 failed on another stage: it will never be complete
    ckpt.committed(29)  # 29 is complete: 9 may go; 39 may still become complete
    assert sorted(ckpt.saved) == [29, 39]
    assert sorted(p.parent.name for p in tmp_path.glob("checkpoints/step-*/stage0.pt")) == \
        ["step-000000029", "step-000000039"]
    assert not (tmp_path / "checkpoints" / "step-000000009").exists()  # empty folders go too


def test_the_single_process_reference_follows_the_same_non_finite_policy(tmp_path):
    """Backprop (no processes) whose loss turns NaN fails like a stage would, and says so in
    summary.json."""
    import synthgrad
    cfg = RunConfig(mode="backprop", dataset="synthetic", optimizer="sgd", lr=100.0, momentum=0.99, steps=40,
                    synthetic_train=4096, backprop_threads=1, out=str(tmp_path / "run"))
    with pytest.raises(synthgrad.RunFailed, match=r"stage 0: the loss of step \d+ is NaN or infinite"):
        synthgrad.train(cfg, log=lambda *_: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "NaN or infinite" in summary["error"]


# ---------------------------------------------------------------------------- faults
def test_a_fault_plan_gives_each_stage_its_part():
    """The testing options become one plan; a run without them injects nothing anywhere."""
    from synthgrad.common.faults import FaultPlan, StageFaults
    assert all(FaultPlan.from_config(RunConfig()).for_stage(s).empty for s in range(4))
    plan = FaultPlan.from_config(RunConfig(slow_stage=(2, 30), fail_saves=(1, 3), link_delay_ms=4))
    assert plan.for_stage(2) == StageFaults(step_sleep_s=0.03, saves_fail_after=None, link_delay_s=0.004)
    assert plan.for_stage(1) == StageFaults(step_sleep_s=0.0, saves_fail_after=3, link_delay_s=0.004)
    assert FaultPlan.from_config(RunConfig(fail_saves=(0, 0))).for_stage(0).saves_fail_after == 0
