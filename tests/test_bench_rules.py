"""bench/rules.py, the stage-by-stage diagnosis of docs/results.md, on a tiny MLP in one process:
its probe sets each stage's gradient beside the exact one, its oracle steps a stage on it."""
from __future__ import annotations

import pytest
import torch

from bench.rules import make_rule, train_rule
from synthgrad.common.config import RunConfig
from synthgrad.common.datasets import run_dataset

from tests.chain import one_thread

SMALL = dict(dataset="synthetic", synthetic_train=512, synthetic_test=256, layers=(784, 32, 32, 10),
             batch_size=64, epochs=1, steps=8)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_rule_names_set_the_mode_and_the_prior():
    assert make_rule("dni:10")[0] == {"mode": "unlocked", "true_grad_every": 10, "sg_prior": "none"}
    assert make_rule("residual:4")[0] == {"mode": "unlocked", "true_grad_every": 4, "sg_prior": "head"}
    assert make_rule("local")[0] == {"mode": "local", "true_grad_every": 1}


def test_the_oracle_stage_steps_on_the_exact_gradient():
    cfg = RunConfig(**SMALL)
    ds = run_dataset(cfg)
    probed = train_rule("local", cfg, ds, hop_delay=1, probe_every=1, oracle=None)
    stages = probed["probes"]
    assert [s["probes"] for s in stages] == [8, 8]
    assert all(-1 <= s["cosine"] <= 1 and -1 <= s["weights_cosine"] <= 1 and 0 <= s["error_ceiling"] <= 1
               for s in stages)
    # stage 0 stepped on the exact gradient instead of its head's: a different run
    oracle = train_rule("local", cfg, ds, hop_delay=1, probe_every=0, oracle=0)
    assert oracle["test_loss"] != probed["test_loss"]


def test_the_probe_sets_the_step_beside_the_exact_gradient_on_the_weights():
    """on_weights: the cosine of the weights' gradients the step and the exact gradient give,
    and how far the batch's two halves agree on the error's: fully where the second half
    repeats the first, hardly where the error is noise independent of the input."""
    from bench.rules import on_weights
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, generator=gen).repeat(2, 1)
    exact = torch.randn(2, 3, generator=gen).repeat(2, 1)
    along, halves = on_weights(layer, layer(x), 0.5 * exact, exact)
    assert abs(along - 1) < 1e-9 and abs(halves - 1) < 1e-9
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(512, 64, generator=gen)
    stepped, exact = torch.randn(512, 32, generator=gen), torch.randn(512, 32, generator=gen)
    along, halves = on_weights(layer, layer(x), stepped, exact)
    # independent directions among 2,080 weights: cosines of about 1/sqrt(2080) = 0.02
    assert abs(halves) < 0.1 and abs(along) < 0.1, (halves, along)


def test_the_probe_changes_nothing_it_watches():
    """Probing draws no random numbers the run would draw and puts every buffer back: a probed
    run ends exactly where an unprobed one does."""
    cfg = RunConfig(**SMALL)
    ds = run_dataset(cfg)
    plain = train_rule("dni:2", cfg, ds, hop_delay=1)
    probed = train_rule("dni:2", cfg, ds, hop_delay=1, probe_every=2)
    assert probed["test_loss"] == plain["test_loss"] and probed["test_accuracy"] == plain["test_accuracy"]
    assert torch.isfinite(torch.tensor(plain["test_loss"]))


def test_heads_from_the_readout_give_the_stage_before_it_the_exact_gradient():
    """--heads-from-readout: every head is the model's last stage at its current weights, so on
    the stage just before it the head's gradient is the exact one (cosine 1 at every probe),
    and the heads never step the read-out's weights."""
    cfg = RunConfig(**{**SMALL, "layers": (784, 32, 32, 32, 10)})
    ds = run_dataset(cfg)
    tied = train_rule("local", cfg, ds, hop_delay=1, probe_every=1, heads_from_readout=True)
    last_hidden = tied["probes"][-1]
    assert last_hidden["probes"] == 8 and last_hidden["cosine"] > 0.9999, last_hidden
    own = train_rule("local", cfg, ds, hop_delay=1, probe_every=1)
    assert own["probes"][-1]["cosine"] < 0.999, own["probes"][-1]
