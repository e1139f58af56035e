"""`launch.py compare`: contenders run side by side and the table and plots come out."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.coordinator.compare import (
    MATCH_BITS,
    Target,
    add_targets,
    add_time_to_backprop,
    default_contenders,
    markdown,
    parse_contenders,
    record,
    time_to_target,
)
from tests.helpers import SG_COSINE_BAR, late_cosine, sg_cosines
from tests.zygote import run_launch


def test_time_to_target_is_first_evaluation_reaching_it():
    evals = [{"wall_s": 1.0, "test_accuracy": 0.5}, {"wall_s": 2.0, "test_accuracy": 0.9},
             {"wall_s": 3.0, "test_accuracy": 0.8}]
    assert time_to_target(evals, 0.85) == 2.0
    assert time_to_target(evals, 0.5) == 1.0
    assert time_to_target(evals, 0.95) is None


def test_time_to_backprops_accuracy_is_within_half_a_point_of_its_final():
    rows = [{"mode": "backprop", "test_accuracy": 0.88, "curve": [[1.0, 0.80], [2.0, 0.88]]},
            {"mode": "local", "test_accuracy": 0.879, "curve": [[0.5, 0.86], [1.5, 0.876], [2.5, 0.879]]},
            {"mode": "unlocked", "test_accuracy": 0.80, "curve": [[0.5, 0.80]]}]
    add_time_to_backprop(rows)
    assert [r["time_to_backprop_s"] for r in rows] == [2.0, 1.5, None]
    alone = [{"mode": "local", "test_accuracy": 0.9, "curve": [[1.0, 0.9]]}]
    add_time_to_backprop(alone)
    assert alone[0]["time_to_backprop_s"] is None and alone[0]["backprop_final_accuracy"] is None


def test_contenders_parse_and_fail_before_anything_runs(tmp_path):
    base = RunConfig(dataset="synthetic")
    got = parse_contenders("backprop, unlocked:10,stale:3,locked", base, tmp_path)
    assert [c.name for c in got] == ["backprop", "unlocked N=10", "stale N=3", "locked"]
    assert got[1].config.true_grad_every == 10 and got[1].config.mode == "unlocked"
    assert all(str(c.config.out).startswith(str(tmp_path / "runs")) for c in got)
    with pytest.raises(ConfigError, match="unknown mode"):
        parse_contenders("backprop,fast", base, tmp_path)
    with pytest.raises(ConfigError, match=r"only unlocked, stale and corrected take .:N."):
        parse_contenders("locked:3", base, tmp_path)
    with pytest.raises(ConfigError, match="twice"):
        parse_contenders("locked,locked", base, tmp_path)


def test_a_contender_takes_options_of_its_own(tmp_path):
    """`local+head_next_layer=1` runs local with that option and the invocation's others; the
    plain `local` beside it keeps the invocation's value."""
    base = RunConfig(dataset="synthetic", lr=0.01)
    plain, own, split = parse_contenders("local,local+head_next_layer=1,unlocked:5+groups=2/1/1+sg_model=mlp",
                                         base, tmp_path)
    assert plain.config.head_next_layer is None and own.config.head_next_layer == 1 and own.config.lr == 0.01
    assert own.name == "local head_next_layer=1" and plain.config.out != own.config.out
    assert own.config.out.endswith("local_head_next_layer1")
    assert split.config.groups == (2, 1, 1) and split.config.sg_model == "mlp" and split.config.true_grad_every == 5
    for bad, needle in (("local+no_such=1", "unknown option no_such"), ("local+head_next_layer", "field=value"),
                        ("local+head_next_layer=-1", "head-next-layer"), ("local+mode=unlocked", "not options")):
        with pytest.raises(ConfigError, match=needle):
            parse_contenders(bad, base, tmp_path)


def test_a_field_value_reads_as_the_config_wants_it():
    from synthgrad.common.config import field_value
    assert field_value("sg-model=lowrank") == ("sg_model", "lowrank")
    assert field_value("lr=0.002") == ("lr", 0.002) and field_value("bootstrap=true") == ("bootstrap", True)
    assert field_value("groups=[3,1,1]") == ("groups", (3, 1, 1)) == field_value("groups=3/1/1")
    assert field_value("replicas=2") == ("replicas", (2,)) and field_value("head_depth=null") == ("head_depth", None)
    assert field_value("data_dir=/data/x") == ("data_dir", "/data/x")  # a path's slashes stay


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_compare_writes_table_json_and_plots(tmp_path):
    out = tmp_path / "cmp"
    cmd = ["compare", "--dataset", "synthetic",
           "--layers", "784,64,64,10", "--batch-size", "64", "--synthetic-train", "2048", "--lr", "5e-3",
           "--synthetic-test", "256", "--epochs", "3", "--eval-every", "16", "--stages", "2",
           "--microbatches", "2", "--contenders", "backprop,pipeline,locked,unlocked:4",
           "--target-accuracy", "0.5", "--out", str(out), "--progress-every", "60",
           # unlocked's predictor alone (the DNI paper's), whose cosine the bar below is set for
           # (0.14 here); the default head prior's predictor learns only the head's miss, a
           # smaller target (0.040-0.048 here: too near the bar for a test)
           "--sg-prior", "none"]
    proc = run_launch(*cmd, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "compare.json").read_text())
    assert [r["contender"] for r in rows] == ["backprop", "pipeline 1f1b x2", "locked", "unlocked N=4"]
    for r in rows:
        for key in ("mode", "cores", "workers", "samples_per_s", "wall_clock_s", "test_accuracy",
                    "time_to_target_s"):
            assert key in r, key
        assert r["samples_per_s"] > 0 and r["wall_clock_s"] > 0
        assert r["test_accuracy"] > 0.5  # chance is 0.1; the target was reached
        assert r["time_to_target_s"] is not None and r["time_to_target_s"] <= r["wall_clock_s"] + 1e-6
    assert rows[0]["workers"] == 1 and rows[1]["workers"] == rows[2]["workers"] == 2
    assert rows[3]["true_gradient_steps"] == 96 // 4
    # the unlocked contender's stage 0 learned from its synthetic gradients: its predictor
    # agrees with the true gradient better than chance (the bar's reason: test_training.py)
    cosines = sg_cosines(Path(rows[3]["run_dir"]))
    assert cosines[0] and late_cosine(cosines[0]) > SG_COSINE_BAR, cosines
    # locked sends one gradient back per step (2 stages: 64 samples x 64 floats, plus a header);
    # unlocked N=4 one step in four; backprop and pipeline send nothing through the coordinator
    assert 64 * 64 * 4 <= rows[2]["bytes_backward_per_step"] <= 64 * 64 * 4 + 512
    assert rows[3]["bytes_backward_per_step"] == pytest.approx(rows[2]["bytes_backward_per_step"] / 4)
    assert rows[0]["bytes_backward_per_step"] is None
    assert all(r["backprop_final_accuracy"] == rows[0]["test_accuracy"] for r in rows)
    table = (out / "compare.md").read_text()
    assert "| unlocked N=4 |" in table and "best locked" in table
    # threads per stage: the layout's (cores follow cost), shown in the table
    assert rows[2]["threads"] == rows[2]["layout"]["threads"] and len(rows[2]["threads"]) == 2
    yields = rows[2]["layout"]["yields"]
    shown = ",".join(f"{t}*" if y else str(t) for t, y in zip(rows[2]["threads"], yields))
    assert "threads per stage |" in table and f"| {shown} |" in table
    for png in ("curves.png", "timeline.png", "sg_heatmaps.png", "sg_cosine.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_report_draws_a_finished_run(tiny_cfg, tmp_path, capsys):
    import launch
    from synthgrad.coordinator.train import train
    run_dir, _ = train(tiny_cfg.replace(mode="unlocked", true_grad_every=2, metrics_every=0.05),
                       log=lambda *_: None)
    assert launch.main(["report", str(run_dir), "--out", str(tmp_path / "png")]) == 0
    for png in ("curves.png", "workers.png", "timeline.png", "sg_heatmaps.png", "sg_cosine.png"):
        assert (tmp_path / "png" / png).read_bytes()[:4] == b"\x89PNG", png
    assert launch.main(["report", str(tmp_path / "png")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_the_table_marks_stages_that_yield_the_cpu():
    """compare.md's threads column shows each stage's threads and marks (*) a stage that yields
    to a heavier one on shared cores, with a line saying what * means."""
    row = {"contender": "local", "mode": "local", "cores": 2, "workers": 2, "samples_per_s": 100.0, "wall_clock_s": 1.0,
           "test_accuracy": 0.5, "time_to_target_s": None, "true_gradient_steps": 0, "messaging_fraction": 0.01,
           "bytes_backward_per_step": None, "threads": [2, 1],
           "layout": {"groups": [2, 2], "pinned": False, "replicas": [1, 1], "yields": [False, True],
                      "ceiling_samples_per_s": 200.0}}
    table = markdown([row], RunConfig(), Target(accuracy=0.5))
    assert "| 2,1* |" in table and "Threads marked *" in table
    plain = markdown([{**row, "layout": {**row["layout"], "yields": [False, False]}}], RunConfig(),
                     Target(accuracy=0.5))
    assert "| 2,1 |" in plain and "Threads marked *" not in plain


LN2 = math.log(2)


def _stream_row(name: str, mode: str, samples_per_s: float, bits_curve: list[tuple[float, float]]) -> dict:
    """A compare row on stream data, as record() makes it, from (wall_s, bits per target) points."""
    loss = bits_curve[-1][1] * LN2
    return {"contender": name, "mode": mode, "cores": 2, "workers": 1 if mode == "backprop" else 4,
            "samples_per_s": samples_per_s, "wall_clock_s": bits_curve[-1][0], "test_accuracy": 0.5,
            "test_loss": loss, "test_bits": bits_curve[-1][1], "test_perplexity": math.exp(loss),
            "true_gradient_steps": 10, "messaging_fraction": None, "bytes_backward_per_step": None,
            "threads": 2, "layout": None, "curve": [[w, 0.5] for w, _ in bits_curve],
            "loss_curve": [[w, b * LN2] for w, b in bits_curve]}


def test_stream_data_is_judged_on_the_loss_in_bits():
    """On stream data the target is a test loss (lower is better), by default the best locked
    contender's final one; time to backprop's result is within MATCH_BITS of its final loss;
    the table shows bits per target and perplexity, and no accuracy target."""
    target = Target.of(per_position=True, loss_name="cross_entropy")
    assert target.on_loss and target.in_bits and target.loss is None
    rows = [_stream_row("backprop", "backprop", 500.0, [(1.0, 3.0), (2.0, 2.4), (3.0, 2.2)]),
            _stream_row("locked", "locked", 300.0, [(2.0, 2.9), (4.0, 2.5), (6.0, 2.3)]),
            _stream_row("unlocked N=10", "unlocked", 400.0, [(1.0, 2.8), (2.5, 2.21), (4.0, 2.19)])]
    add_targets(rows, target)
    # the best locked contender is backprop (fastest): its final 2.2 bits is the target
    assert all(r["target_bits"] == pytest.approx(2.2) for r in rows)
    assert [r["time_to_target_s"] for r in rows] == [3.0, None, 4.0]
    # within 0.02 bits of backprop's final 2.2: 2.21 counts, 2.3 does not
    assert MATCH_BITS == 0.02
    assert [r["time_to_backprop_s"] for r in rows] == [3.0, None, 2.5]
    table = markdown(rows, RunConfig(dataset="text", model="lstm"), target)
    assert "Target accuracy" not in table and "2.200 bits per target" in table
    assert "| test bits per target | perplexity | test acc |" in table
    assert "| unlocked N=10 | 4 | 400 | 0.80 | 4.0 | 2.190 | 4.56 | 50.00% | 4.0 |" in table
    assert "time to backprop's bits s" in table
    given = Target.of(per_position=True, loss_name="cross_entropy", bits=2.5)
    add_targets(rows, given)
    assert [r["time_to_target_s"] for r in rows] == [2.0, 4.0, 2.5]
    assert "Target: test loss down to 2.500 bits per target; lower" in markdown(rows, RunConfig(), given)


def test_a_stream_compare_without_a_locked_contender_has_no_default_target():
    rows = [_stream_row("local", "local", 400.0, [(1.0, 2.8)])]
    target = Target.of(True, "cross_entropy")
    add_targets(rows, target)
    assert rows[0]["time_to_target_s"] is None and rows[0]["time_to_backprop_s"] is None
    assert "No target" in markdown(rows, RunConfig(), target)


def test_a_stream_with_a_loss_of_its_own_is_judged_in_that_loss():
    target = Target.of(True, "mypkg.losses:focal")
    assert target.on_loss and not target.in_bits
    rows = [_stream_row("locked", "locked", 300.0, [(1.0, 2.0), (2.0, 1.5)])]
    add_targets(rows, target)
    table = markdown(rows, RunConfig(), target)
    assert "| test loss | test acc |" in table and "test loss 1.0397" in table and "bits" not in table


@pytest.mark.parametrize("args, needle", [
    ((False, "cross_entropy", None, 2.0), "--target-bits judges stream data"),
    ((False, "cross_entropy", 1.5, None), r"--target-accuracy must be in \(0, 1\]"),
    ((True, "cross_entropy", 0.85, None), "stream data is judged on the test loss"),
    ((True, "mypkg.losses:focal", None, 2.0), "--target-bits needs --loss cross_entropy"),
    ((True, "cross_entropy", None, 0.0), "--target-bits must be > 0"),
])
def test_a_target_that_does_not_fit_the_data_is_refused(args, needle):
    with pytest.raises(ConfigError, match=needle):
        Target.of(*args)


def test_class_data_keeps_its_accuracy_target():
    assert Target.of(False, "cross_entropy") == Target(accuracy=0.85)
    assert Target.of(False, "cross_entropy", 0.5).goal([]) == 0.5


def test_default_contenders_leave_out_what_stream_data_refuses():
    assert default_contenders(per_position=False) == "backprop,pipeline,locked,unlocked,stale"
    assert default_contenders(per_position=True) == "backprop,locked,unlocked,stale"


def test_a_contenders_record_carries_its_bits_and_loss_curve(tmp_path):
    (contender,) = parse_contenders("locked", RunConfig(dataset="text", model="lstm"), tmp_path)
    evals = [{"wall_s": 1.0, "test_accuracy": 0.3, "test_loss": 2.0}, {"wall_s": 2.0, "test_accuracy": 0.4,
                                                                       "test_loss": 1.5}]
    summary = {"num_stages": 2, "samples_per_s": 10.0, "wall_clock_s": 2.0, "test_accuracy": 0.4, "test_loss": 1.5,
               "test_bits": 1.5 / LN2, "test_perplexity": math.exp(1.5), "true_gradient_steps": 5,
               "workers": [], "evals": evals, "run_dir": str(tmp_path)}
    row = record(contender, summary, cores=2)
    assert row["test_bits"] == pytest.approx(2.164, abs=1e-3) and row["test_perplexity"] == pytest.approx(4.48, abs=0.01)
    assert row["loss_curve"] == [[1.0, 2.0], [2.0, 1.5]] and row["curve"] == [[1.0, 0.3], [2.0, 0.4]]
    assert time_to_target(evals, 1.8, on_loss=True) == 2.0


def test_compare_takes_its_targets_and_default_contenders_from_the_command_line():
    import launch
    ns = launch.build_parser().parse_args(["compare", "--dataset", "text", "--model", "lstm"])
    assert ns.contenders is None and ns.target_accuracy is None and ns.target_bits is None
    ns = launch.build_parser().parse_args(["compare", "--target-bits", "2.3", "--contenders", "locked"])
    assert ns.target_bits == 2.3
