"""`launch.py compare`: contenders run side by side and the table and plots come out."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.coordinator.compare import add_time_to_backprop, parse_contenders, time_to_target
from tests.helpers import ROOT, SG_COSINE_BAR, late_cosine, sg_cosines


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
    with pytest.raises(ConfigError, match=r"only unlocked, stale, corrected\b.* take ':N'"):
        parse_contenders("locked:3", base, tmp_path)
    with pytest.raises(ConfigError, match="twice"):
        parse_contenders("locked,locked", base, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_compare_writes_table_json_and_plots(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(ROOT / "launch.py"), "compare", "--dataset", "synthetic",
           "--layers", "784,64,64,10", "--batch-size", "64", "--synthetic-train", "2048", "--lr", "5e-3",
           "--synthetic-test", "256", "--epochs", "3", "--eval-every", "16", "--stages", "2",
           "--microbatches", "2", "--contenders", "backprop,pipeline,locked,unlocked:4",
           "--target-accuracy", "0.5", "--out", str(out), "--progress-every", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=220, cwd=ROOT)
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
    from synthgrad.common.config import RunConfig
    from synthgrad.coordinator.compare import markdown
    row = {"contender": "local", "mode": "local", "cores": 2, "workers": 2, "samples_per_s": 100.0, "wall_clock_s": 1.0,
           "test_accuracy": 0.5, "time_to_target_s": None, "true_gradient_steps": 0, "messaging_fraction": 0.01,
           "bytes_backward_per_step": None, "threads": [2, 1],
           "layout": {"groups": [2, 2], "pinned": False, "replicas": [1, 1], "yields": [False, True],
                      "ceiling_samples_per_s": 200.0}}
    table = markdown([row], RunConfig(), 0.5)
    assert "| 2,1* |" in table and "Threads marked *" in table
    plain = markdown([{**row, "layout": {**row["layout"], "yields": [False, False]}}], RunConfig(), 0.5)
    assert "| 2,1 |" in plain and "Threads marked *" not in plain
