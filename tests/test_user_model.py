"""Your own model and data, by import path: built in every process from the same seed, checked
before anything starts, and trained by every mode; locked still equals backprop on them."""
from __future__ import annotations

import pytest
import torch

import synthgrad
from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.files import load_model_state
from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, assert_states_close, run

TINY = dict(dataset="synthetic", batch_size=32, synthetic_train=512, synthetic_test=128, steps=6, epochs=1,
            backprop_threads=1)


@pytest.mark.parametrize("path, needle", [
    ("tests.user_models:not_a_model", "returned int; it must return an nn.Sequential"),
    ("tests.user_models:broken_chain", r"layer 1 \(Linear\) cannot take the output of the layer before it, per sample \(784,\)"),
    ("tests.user_models:token_embedding", r"layer 0 \(Embedding\) cannot take the data's samples, per sample "
                                          r"\(1, 28, 28\): .*an nn.Embedding wants token ids: give it x.argmax\(-1\)"),
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


def test_a_users_loss(tmp_path):
    base = RunConfig(mode="backprop", **TINY)
    _, plain = synthgrad.train(base.replace(out=str(tmp_path / "ce")), log=lambda *_: None)
    _, smoothed = synthgrad.train(base.replace(loss="tests.user_models:label_smoothed", out=str(tmp_path / "ls")),
                                  log=lambda *_: None)
    assert smoothed["evals"][-1]["test_loss"] != plain["evals"][-1]["test_loss"]  # the loss is used
    with pytest.raises(ConfigError, match=r"--loss tests.user_models:per_sample .* not one number"):
        synthgrad.train(base.replace(loss="tests.user_models:per_sample", out=str(tmp_path / "x")), log=lambda *_: None)
    with pytest.raises(ConfigError, match="unknown --loss 'mse'"):
        base.replace(loss="mse")


def test_a_list_of_modules_and_the_options_it_asks_for(tmp_path):
    cfg = RunConfig(mode="backprop", model="tests.user_models:as_stage_list", out=str(tmp_path / "r"), **TINY)
    result = synthgrad.train(cfg, log=lambda *_: None)
    assert result.summary["status"] == "done" and result.summary["config"]["model_layers"] == 3
    model = result.model()  # the trained network, from the run's files
    assert sorted(model.state_dict()) == ["1.bias", "1.weight", "2.bias", "2.weight"]
    assert not model.training
    for name, tensor in synthgrad.trained_model(tmp_path / "r").state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name])


@pytest.mark.parametrize("path, needle", [
    ("tests.user_data:float_label", r"train\[0\]: the label is float; it must be a class index"),
    ("tests.user_data:ragged", r"test\[15\] is a sample of shape \(1, 4, 8\); train\[0\] is \(1, 8, 8\)"),
    ("tests.user_data:int_samples", "the sample is Tensor of torch.int64; it must be a float tensor"),
    ("tests.user_data:not_a_pair", "returned Patterns; it must return \\(train, test\\)"),
    ("tests.user_data:missing", "tests.user_data has no missing"),
])
def test_a_bad_dataset_is_refused_before_anything_starts(tmp_path, path, needle):
    cfg = RunConfig(mode="locked", dataset=path, layers=(64, 8, 3), out=str(tmp_path / "r"),
                    **{k: v for k, v in TINY.items() if k != "dataset"})
    with pytest.raises(synthgrad.DataError, match=needle):
        synthgrad.train(cfg, log=lambda *_: None)
    assert not (tmp_path / "r").exists()


def test_a_users_dataset_batches_like_the_built_in_ones():
    from synthgrad.common.data import DataSpec, train_batches
    from synthgrad.common.datasets import data_spec, load_dataset
    assert data_spec("tests.user_data:patterns", None) == DataSpec((1, 8, 8), 3)
    ds = load_dataset("tests.user_data:patterns", None)
    (x, y), (x2, y2) = next(train_batches(ds.train, 32, 0, 0)), next(train_batches(ds.train, 32, 0, 0))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64 and torch.equal(x, x2) and torch.equal(y, y2)
    order = torch.randperm(512, generator=torch.Generator().manual_seed(0 * 1000003 + 0))[:32]
    assert torch.equal(y, ds.train.data.labels[order])  # the one seeded order of every mode


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_locked_equals_backprop_on_a_users_model_and_data(tmp_path):
    """A CNN, a dataset and a loss the test defines, the CNN split into two stages by cost: locked
    reproduces one-thread backprop (tolerance: tests/helpers.py); an unlocking rule trains it too."""
    cfg = RunConfig(model="tests.user_models:small_cnn", loss="tests.user_models:label_smoothed",
                    start_timeout=60, stall_timeout=30,
                    **{**TINY, "steps": 12, "dataset": "tests.user_data:patterns"}, **EXACT_SGD)
    ref_dir, _ = run(cfg, mode="backprop", out=str(tmp_path / "bp"))
    got_dir, summary = run(cfg, mode="locked", stages=2, out=str(tmp_path / "locked"))
    assert summary["layout"]["groups"] != [1, 1, 1, 1] and sum(summary["layout"]["groups"]) == 4
    assert_states_close(load_model_state(ref_dir), load_model_state(got_dir), **LOCKED_EQUALS_BACKPROP)
    _, s = run(cfg, mode="local", out=str(tmp_path / "local"))  # heads on the user's conv activations
    assert s["status"] == "done" and s["steps"] == 12


def test_weights_tied_across_layers_are_refused_or_untied():
    """A GPT whose read-out shares the token embedding's weights (nanoGPT's `lm_head.weight =
    wte.weight`): every stage holds its own layers, so the tie cannot hold across stages and
    would break silently. It is refused, naming the layers and the way out; with --untie-weights
    every layer owns its parameters from the tied start, in every mode alike (all build the
    network with build_units), so locked still equals backprop on it."""
    from synthgrad.common.models import build_units, tied_parameters
    from synthgrad.coordinator.train import _resolve
    cfg = RunConfig(mode="local", dataset="text", model="tests.user_models:tied_gpt", bptt=8, batch_size=4, steps=3)
    with pytest.raises(ConfigError, match=r"layers 0 and 3 share a parameter \(weight of 3\).*--untie-weights"):
        _resolve(cfg)
    untied, layout = _resolve(cfg.replace(untie_weights=True))
    assert sum(layout.groups) == 4
    units = build_units(untied)
    assert tied_parameters(units) == [] and torch.equal(units[0].wte.weight, units[3].weight)
    units[3].weight.data.add_(1.0)  # the read-out's copy moves alone
    assert not torch.equal(units[0].wte.weight, units[3].weight)
    assert sorted(tied_parameters([units[0], units[0]])) == [(0, 1, "wpe"), (0, 1, "wte.weight")]


def test_split_points_by_layer_name(tmp_path):
    base = RunConfig(mode="locked", model="tests.user_models:named", **TINY)
    from synthgrad.coordinator.train import _resolve
    cfg, layout = _resolve(base.replace(split_at="conv2,head"))
    assert cfg.groups == (1, 2, 1) and layout.groups == (1, 2, 1) and cfg.split_at is None
    with pytest.raises(ConfigError, match="no layer named fc; the layers are stem, conv2, pool, head"):
        _resolve(base.replace(split_at="fc"))
    with pytest.raises(ConfigError, match="in order, after the first"):
        _resolve(base.replace(split_at="head,conv2"))
    with pytest.raises(ConfigError, match="give one of --stages"):
        base.replace(split_at="head", stages=2)
    assert _resolve(RunConfig(mode="locked", split_at="2", **TINY))[0].groups == (2, 2)  # built-ins: 0, 1, ...


def test_the_built_in_models_are_factories_like_a_users():
    """--model mlp, cnn and lstm name factories called exactly as a user's: by their import path
    they build the same layers with the same weights."""
    from synthgrad.common.models import BUILT_IN_MODELS, build_units
    for name, path in BUILT_IN_MODELS.items():
        data = {"input_shape": (16, 9), "label_shape": (16,)} if name == "lstm" else {}
        by_name = build_units(RunConfig(model=name, layers=(784, 32, 10), **data))
        by_path = build_units(RunConfig(model=path, layers=(784, 32, 10), **data))
        assert [type(u) for u in by_name] == [type(u) for u in by_path]
        for a, b in zip(by_name, by_path):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_samples_of_four_dimensions(tmp_path):
    """A dataset of (C, D, H, W) volumes and a Conv3d model: the run reads the shape, the
    parameter-free ReLU rides with the layer before it (by default and by cost; a split by hand
    that leaves it alone is refused), the predictors take the stages' (4, 2, 4, 8) activations,
    and the model trains."""
    from synthgrad.coordinator.train import prepare
    cfg = RunConfig(mode="unlocked", model="tests.user_models:volume_net", dataset="tests.user_data:volumes",
                    batch_size=16, steps=4, epochs=1, out=str(tmp_path / "r"))
    resolved, layout = prepare(cfg)
    assert resolved.input_shape == (1, 2, 4, 8) and layout.groups == (2, 1, 1)
    assert prepare(cfg.replace(stages=2))[1].groups in ((2, 2), (3, 1))
    with pytest.raises(ConfigError, match="--stages 4: the model has 3 layers with parameters"):
        prepare(cfg.replace(stages=4))
    with pytest.raises(ConfigError, match=r"stage 1 \(layers 1..1\) has no parameters to train"):
        prepare(cfg.replace(groups=(1, 1, 2)))
    from tests.test_stage import chain, run_step
    every2 = resolved.replace(true_grad_every=2)
    stages = chain(every2)
    assert stages[0].parts.predictor is not None and stages[0].parts.predictor.model.flatten  # (4, 2, 4, 8) activations: flattened
    before = [p.detach().clone() for p in stages[0].module.parameters()]
    for step in range(4):
        run_step(stages, step, torch.randn(16, 1, 2, 4, 8), torch.randint(0, 3, (16,)), every2)
    assert stages[0].stats.true_grads == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, stages[0].module.parameters()))
    _, summary = synthgrad.train(cfg.replace(mode="backprop", backprop_threads=1), log=lambda *_: None)
    assert summary["status"] == "done" and summary["steps"] == 4
