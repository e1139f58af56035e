"""mode=pipeline: PyTorch's pipeline schedules as a contender, checked against backprop."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from synthgrad.common.config import ConfigError
from synthgrad.common.files import load_model_state
from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, assert_same_evaluation, assert_states_close, run


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_pipeline_with_one_microbatch_reproduces_backprop(tiny_cfg, tmp_path):
    """One microbatch per batch: batch norm sees the whole batch, so two pipeline stages must end
    where single-process backprop ends (one torch thread each, 20 SGD steps; the tolerance as for
    locked, tests/helpers.py)."""
    tiny_cfg = tiny_cfg.replace(**EXACT_SGD)
    ref_dir, ref = run(tiny_cfg, mode="backprop", backprop_threads=1, out=str(tmp_path / "bp"))
    got_dir, got = run(tiny_cfg, mode="pipeline", schedule="gpipe", microbatches=1, stages=2,
                       out=str(tmp_path / "pp"))
    assert got["steps"] == ref["steps"] == 20
    a, b = load_model_state(ref_dir), load_model_state(got_dir)
    assert sorted(a) == [0, 1, 2, 3]
    assert_states_close(a, b, **LOCKED_EQUALS_BACKPROP)
    assert_same_evaluation(ref, got)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_pipeline_1f1b_microbatches_learns(tiny_cfg, tmp_path):
    _, s = run(tiny_cfg, mode="pipeline", schedule="1f1b", microbatches=4, steps=60, epochs=2,
               out=str(tmp_path / "pp"))
    assert s["steps"] == 60 and len(s["evals"]) == 2
    assert s["test_accuracy"] > 0.5, s["evals"]
    assert len(s["workers"]) == 4
    for unit in load_model_state(s["run_dir"]).values():
        for name, t in unit.items():
            if t.is_floating_point():
                assert math.isfinite(float(t.abs().sum())), name  # no poisoned BN statistics


def test_pipeline_config_errors(tiny_cfg):
    with pytest.raises(ConfigError, match="microbatches"):
        tiny_cfg.replace(mode="pipeline", microbatches=3)  # does not divide 64
    with pytest.raises(ConfigError, match="1f1b"):
        tiny_cfg.replace(mode="pipeline", schedule="1f1b", microbatches=2)  # 4 stages


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_diverged_pipeline_fails_naming_rank_and_step(tiny_cfg):
    """The stages' non-finite policy holds for the pipeline contender too: the run fails before a
    NaN gradient reaches the weights, the error names the rank and step, summary.json says so."""
    from synthgrad import RunFailed
    cfg = tiny_cfg.replace(mode="pipeline", schedule="gpipe", microbatches=1, stages=2, optimizer="sgd",
                           lr=100.0, momentum=0.99, steps=60, epochs=2)
    with pytest.raises(RunFailed, match=r"pipeline-rank\d: stage \d: .* of step \d+ is NaN or infinite"):
        run(cfg)
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert summary["status"] == "failed" and "NaN or infinite" in summary["error"]
