"""mode=pipeline: PyTorch's pipeline schedules as a contender, checked against backprop."""
from __future__ import annotations

import json
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
def test_pipeline_1f1b_microbatches_reproduce_backprop(tiny_cfg, tmp_path):
    """Four microbatches per step under 1F1B compute the whole batch's gradient, so on a model
    without batch norm (whose statistics would differ per microbatch) the pipeline trains what
    backprop trains. Only the order of summing the microbatches' gradients differs: a few units
    in the last place per step (6e-8 seen after 60 steps), which SGD with momentum keeps small,
    far inside LOCKED_EQUALS_BACKPROP (tests/helpers.py); a wrong or missing microbatch is off
    by ~1e-3."""
    cfg = tiny_cfg.replace(model="tests.user_models:plain_mlp", groups=(1, 1, 1, 1), steps=60, epochs=2,
                           **EXACT_SGD)
    ref_dir, ref = run(cfg, mode="backprop", backprop_threads=1, out=str(tmp_path / "bp"))
    got_dir, got = run(cfg, mode="pipeline", schedule="1f1b", microbatches=4, out=str(tmp_path / "pp"))
    assert got["steps"] == ref["steps"] == 60 and len(got["evals"]) == 2 and len(got["workers"]) == 4
    assert_states_close(load_model_state(ref_dir), load_model_state(got_dir), **LOCKED_EQUALS_BACKPROP)
    assert_same_evaluation(ref, got)


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
    with pytest.raises(RunFailed, match=r"pipeline rank \d failed: stage \d: .* of step \d+ is NaN or infinite"):
        run(cfg)
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert summary["status"] == "failed" and "NaN or infinite" in summary["error"]
