"""Your own model, by import path: built in every process from the same seed, checked before
anything starts, and trained by every mode; locked still equals backprop on it."""
from __future__ import annotations

import pytest

import synthgrad
from common.config import ConfigError, RunConfig
from common.files import load_model_state
from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, assert_states_close, run

TINY = dict(dataset="synthetic", batch_size=32, synthetic_train=512, synthetic_test=128, steps=6, epochs=1,
            backprop_threads=1)


@pytest.mark.parametrize("path, needle", [
    ("tests.user_models:not_a_model", "returned int; it must return an nn.Sequential"),
    ("tests.user_models:broken_chain", r"layer 1 \(Linear\) cannot take the output of the layer before it, per sample \(784,\)"),
    ("tests.user_models:wrong_classes", r"the last layer gives \(3,\) per sample; the data has 10 classes"),
    ("tests.user_models:raises", "the factory failed: RuntimeError: the user's bug"),
    ("tests.no_such_module:make", "cannot import tests.no_such_module"),
    ("tests.user_models:nothing", "tests.user_models has no nothing"),
])
def test_a_bad_model_is_refused_before_anything_starts(tmp_path, path, needle):
    cfg = RunConfig(mode="locked", model=path, out=str(tmp_path / "r"), **TINY)
    with pytest.raises(ConfigError, match=needle):
        synthgrad.train(cfg, log=lambda *_: None)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="unknown model 'my model'"):
        RunConfig(model="my model").validate()


def test_a_list_of_modules_and_the_options_it_asks_for(tmp_path):
    cfg = RunConfig(mode="backprop", model="tests.user_models:as_stage_list", out=str(tmp_path / "r"), **TINY)
    _, summary = synthgrad.train(cfg, log=lambda *_: None)
    assert summary["status"] == "done" and summary["config"]["model_layers"] == 3
    assert sorted(synthgrad.trained_model(tmp_path / "r").state_dict()) == [
        "1.bias", "1.weight", "2.bias", "2.weight"]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_locked_equals_backprop_on_a_users_model(tmp_path):
    """A CNN the test defines, split into two stages by cost: locked reproduces one-thread
    backprop (tolerance: tests/helpers.py); the other rules train it through the same processes."""
    cfg = RunConfig(model="tests.user_models:small_cnn", start_timeout=60, stall_timeout=30,
                    **{**TINY, "steps": 12}, **EXACT_SGD)
    ref_dir, _ = run(cfg, mode="backprop", out=str(tmp_path / "bp"))
    got_dir, summary = run(cfg, mode="locked", stages=2, out=str(tmp_path / "locked"))
    assert summary["layout"]["groups"] != [1, 1, 1, 1] and sum(summary["layout"]["groups"]) == 4
    assert_states_close(load_model_state(ref_dir), load_model_state(got_dir), **LOCKED_EQUALS_BACKPROP)
    for mode in ("unlocked", "local"):
        _, s = run(cfg, mode=mode, out=str(tmp_path / mode))
        assert s["status"] == "done" and s["steps"] == 12
