"""Stage logic without processes: locked stages chained by hand are backprop; unlocked stages
update from the synthetic gradient and return the true dL/dx of the step's own weights."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from synthgrad.common.config import RunConfig
from synthgrad.common.devices import Compute
from synthgrad.common.models import LocalHead, SyntheticGradient, build_units
from synthgrad.common.parts import TRUST_DECAY
from synthgrad.workers.stage import StageLogic
from tests.chain import chain, run_step


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_locked_chain_equals_backprop(precision):
    """In one process, with SGD: the chained stages run backprop's kernels on the same aligned
    tensors, so the result is bitwise equal here; the tolerance (a few float32 ulps of the
    weights) only allows for a kernel that picks its path by something else (tests/helpers.py).
    In bf16 each stage runs its layers and the loss under backprop's autocast, and bf16 is what
    its layers return anyway: sending it as bf16 rounds nothing."""
    cfg = RunConfig(mode="locked", layers=(784, 32, 32, 10), optimizer="sgd", lr=0.1, precision=precision)
    stages = chain(cfg)
    ref = nn.Sequential(*build_units(cfg))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(5)
    for step in range(5):
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        run_step(stages, step, x, y, cfg)
        opt.zero_grad()
        with Compute(torch.device("cpu"), precision).autocast():
            loss = F.cross_entropy(ref(x), y)
        loss.backward()
        opt.step()
    got = [p for s in stages for p in s.module.parameters()]
    assert all(p.dtype == torch.float32 for p in got)  # the weights stay float32 in bf16 too
    for a, b in zip(got, ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_synthetic_gradient_starts_at_zero_and_conditions_on_labels():
    sg = SyntheticGradient((8,), "mlp", 16, conditioned=True)
    h, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    assert torch.count_nonzero(sg(h, y)) == 0
    with pytest.raises(ValueError, match="needs the labels"):
        sg(h, None)
    conv = SyntheticGradient((3, 5, 5), "linear", 4, conditioned=True)
    assert conv(torch.randn(2, 3, 5, 5), torch.tensor([1, 2])).shape == (2, 3, 5, 5)


def test_unlocked_true_gradient_uses_the_weights_of_its_step():
    cfg = RunConfig(mode="unlocked", sg_prior="none", layers=(784, 32, 32, 10), true_grad_every=1, sg_lr=1e-2,
                    sg_trust_scale=False)  # full steps on the predictor, so the weights move before g comes
    stages = chain(cfg)
    mid = stages[1]
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    frozen = copy.deepcopy(mid.module)  # the weights at forward time
    h = mid.forward(0, x, y, True)
    mid.local_update(0)
    # prime the SG so that its next update moves the weights, then change them with a second step
    g = torch.randn_like(h) / 16
    xx = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(frozen(xx), xx, g)[0]
    mid.forward(1, torch.randn(16, 32), y, True)
    kept = mid.kept[1]
    mid.parts.predictor.learn(kept.h_detached, kept.labels, torch.randn_like(h))
    mid.local_update(1)
    assert not all(torch.equal(a, b) for a, b in zip(frozen.parameters(), mid.module.parameters()))
    dx = mid.receive_grad(0, g, True)
    torch.testing.assert_close(dx, expected)
    assert mid.stats.true_grads == 1 and mid.parts.predictor.stats.loss_n == 2
    assert mid.outstanding() == 1


def test_replay_steps_the_predictor_on_each_kept_true_gradient_again():
    """--sg-replay R: each true gradient steps the predictor once, then once more on each of the
    last R before it, oldest first; R = 0 keeps nothing. With the same pairs seen again, a
    predictor of a fixed linear gradient gets nearer it than one that saw each pair once."""
    torch.manual_seed(0)
    target_map = torch.randn(32, 32) / 8
    pairs = [(torch.randn(16, 32), torch.randint(0, 10, (16,))) for _ in range(12)]
    errors = {}
    for replay in (0, 3):
        cfg = RunConfig(mode="unlocked", layers=(784, 32, 32, 10), true_grad_every=1, sg_model="linear",
                        sg_lr=1e-2, sg_replay=replay)
        predictor = chain(cfg)[0].parts.predictor
        for n, (h, y) in enumerate(pairs, start=1):
            predictor.learn(h, y, h @ target_map / 16)
            steps = predictor.optimizer.state[next(iter(predictor.model.parameters()))]["step"]
            assert int(steps) == sum(1 + min(k, replay) for k in range(n))  # the new pair, then R old
            assert len(predictor.memory) == min(n, replay)
        h = torch.randn(256, 32)
        errors[replay] = float((predictor.predict(h, torch.randint(0, 10, (256,))) - h @ target_map).norm())
    assert errors[3] < 0.8 * errors[0], errors


def test_unlocked_update_moves_weights_once_the_sg_has_learned():
    """The DNI paper's rule: the true gradient only trains the predictor, whose steps are full."""
    cfg = RunConfig(mode="unlocked", sg_prior="none", layers=(784, 32, 10), sg_lr=1e-2, sg_trust_scale=False, sg_true_updates=False)
    first = chain(cfg)[0]
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = [p.clone() for p in first.module.parameters()]
    first.forward(0, x, y, True)
    first.local_update(0)  # the zero-initialised SG predicts zero: Adam sees zero gradients
    torch.testing.assert_close(before[0], first.module[0][1].weight)
    first.receive_grad(0, torch.randn(16, 32), True)
    first.forward(1, x, y, False)
    first.local_update(1)
    assert not torch.equal(before[0], first.module[0][1].weight)


def test_a_stage_steps_on_its_predictor_only_once_it_predicts():
    """--sg-min-cosine: the layers keep their weights while the predictor's running cosine with
    the true gradients is below the bar, and step once it is above it (the same steps as
    without the bar from then on). The predictor learns meanwhile."""
    torch.manual_seed(0)
    cfg = RunConfig(mode="unlocked", sg_prior="none", layers=(784, 32, 10), sg_lr=1e-2, sg_min_cosine=0.5)
    first = chain(cfg)[0]
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    target = torch.randn(16, 32) / 16  # one fixed dL/dh: the predictor can learn it exactly
    weight = first.module[0][1].weight
    step = 0
    while first.parts.predictor.trust < 0.5:
        before = weight.clone()
        first.forward(step, x, y, True)
        first.local_update(step)
        assert torch.equal(before, weight), f"step {step}: a stage stepped on a predictor it did not trust"
        first.receive_grad(step, target, True)
        step += 1
        assert step < 200, f"the predictor never reached the bar (running cosine {first.parts.predictor.trust:.2f})"
    assert first.parts.predictor.stats.untrusted_steps == step
    before = weight.clone()
    first.forward(step, x, y, True)
    first.local_update(step)
    assert not torch.equal(before, weight)
    assert first.state_dict()["sg_trust"] == first.parts.predictor.trust  # a resumed run keeps its trust


def test_unlocked_true_updates_are_delayed_updates():
    """--sg-true-updates: a true gradient that comes back steps the layers at the weights its
    step's forward pass used, at lr x (1 - the predictor's running cosine). With a predictor
    that never predicts (it never learns: its zero-initialised output scores cosine 0) the
    layers take no step on it and the whole step on each true gradient, so unlocked at N=1
    walks exactly mode delayed's path: the same kernels on the same tensors, compared bitwise."""
    base = dict(layers=(784, 32, 32, 10), optimizer="sgd", lr=0.1, momentum=0.9, true_grad_every=1)
    unlocked = RunConfig(mode="unlocked", sg_prior="none", sg_true_updates=True, **base)  # by default off at N=1
    assert not RunConfig(mode="unlocked", **base).applies_true_gradients
    assert RunConfig(mode="unlocked", **{**base, "true_grad_every": 2}).applies_true_gradients
    delayed = RunConfig(mode="delayed", **base)
    a, b = chain(unlocked), chain(delayed)
    for stage in a[:-1]:
        for group in stage.parts.predictor.optimizer.param_groups:
            group["lr"] = 0.0
    torch.manual_seed(4)
    for step in range(4):
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        run_step(a, step, x, y, unlocked)
        run_step(b, step, x, y, delayed)
    assert a[0].parts.predictor.stats.untrusted_steps == 4 and a[0].stats.true_grads == 4 and a[0].parts.predictor.trust == 0.0
    moved = [not torch.equal(p, q) for p, q in zip(a[0].module.parameters(), chain(delayed)[0].module.parameters())]
    assert all(moved)  # stage 0 learned, from the true gradients alone
    for sa, sb in zip(a, b):
        for p, q in zip(sa.module.parameters(), sb.module.parameters()):
            assert torch.equal(p, q)


def test_a_true_update_leaves_out_what_the_predictor_got_right():
    """A true gradient steps the layers at lr x (1 - running cosine): with plain SGD the step at
    running cosine 0.25 is (1 - 0.25 x TRUST_DECAY) of the step at 0 (the gradient's own score
    joins the running cosine first, and the untrained predictor's zero prediction scores 0; no
    step on the predictor here: its lr scale is 0). Tolerance as in the test below: each delta
    is rounded to the weights' ulp when subtracted."""
    def delta(trust: float) -> torch.Tensor:
        cfg = RunConfig(mode="unlocked", sg_prior="none", layers=(784, 32, 10), optimizer="sgd", lr=0.1, momentum=0.0,
                        sg_update_lr_scale=0.0, sg_true_updates=True)
        first = chain(cfg)[0]
        first.parts.predictor.trust = trust
        torch.manual_seed(2)
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        before = first.module[0][1].weight.detach().clone()
        h = first.forward(0, x, y, True)
        first.local_update(0)
        first.receive_grad(0, torch.randn_like(h) / 16, True)
        return first.module[0][1].weight.detach() - before

    full, part = delta(0.0), delta(0.25)
    assert full.abs().max() > 0
    torch.testing.assert_close(part, full * (1 - 0.25 * TRUST_DECAY), rtol=1e-4, atol=1e-6)


def test_a_normalised_predictor_learns_alike_whatever_the_gradients_size():
    """--sg-normalize: the predictor learns the true gradients over their running RMS, so
    gradients 10,000 times smaller train it the same way and it predicts them 10,000 times
    smaller. Without it, Adam's steps (about --sg-lr per weight whatever the target's size)
    overshoot the small targets: the two predictions then differ in direction, which is what
    left the digits CNN's lower predictors at cosine 0. Tolerance: the two runs differ by the
    rounding of one division per target, far below rtol 1e-3 after a few Adam steps."""
    def predictions(normalize: bool, size: float) -> torch.Tensor:
        cfg = RunConfig(mode="unlocked", sg_prior="none", layers=(784, 32, 10), sg_normalize=normalize, sg_true_updates=False,
                        sg_update_lr_scale=0.0)
        first = chain(cfg)[0]
        torch.manual_seed(6)
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        direction = torch.randn(16, 32)
        for step in range(8):
            first.forward(step, x, y, True)
            first.local_update(step)
            first.receive_grad(step, direction * size / 16, True)
        return first.parts.predictor.predict(first.module(x), y)

    big, small = predictions(True, 1.0), predictions(True, 1e-4)
    torch.testing.assert_close(small, big * 1e-4, rtol=1e-3, atol=0.0)
    plain_big, plain_small = predictions(False, 1.0), predictions(False, 1e-4)
    cos = F.cosine_similarity(plain_big.reshape(1, -1), plain_small.reshape(1, -1)).item()
    assert cos < 0.99, cos


def test_true_updates_keep_their_own_optimiser_state_through_a_checkpoint():
    """At N=2 with Adam: the predicted steps and the true updates step two optimiser states (each
    counts only its own steps), and a stage loaded from the other's state_dict (both states,
    the running cosine, the normalising scale) continues bitwise as the original does."""
    cfg = RunConfig(mode="unlocked", sg_prior="none", layers=(784, 32, 10), true_grad_every=2, sg_lr=1e-2, sg_normalize=True)
    torch.manual_seed(8)
    data = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(12)]
    original = chain(cfg)
    for step in range(8):
        run_step(original, step, *data[step], cfg)
    first = original[0]
    true_steps = {int(s["step"]) for s in first.parts.stash.optimizer.state.values()}
    predicted_steps = {int(s["step"]) for s in first.parts.layers.optimizer.state.values()}
    assert true_steps == {4}, true_steps  # one per true gradient (steps 1, 3, 5, 7)
    assert predicted_steps == {8 - first.parts.predictor.stats.untrusted_steps} != {0}, predicted_steps
    assert first.parts.predictor.scale > 0 and first.parts.predictor.trust != 0
    resumed = chain(cfg)
    for a, b in zip(original, resumed):
        b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert resumed[0].parts.predictor.scale == first.parts.predictor.scale and resumed[0].parts.predictor.trust == first.parts.predictor.trust
    for step in range(8, 12):
        run_step(original, step, *data[step], cfg)
        run_step(resumed, step, *data[step], cfg)
    for a, b in zip(original, resumed):
        for p, q in zip(a.module.parameters(), b.module.parameters()):
            assert torch.equal(p, q)


def test_a_step_on_the_predictor_is_scaled_by_its_running_cosine():
    """--sg-trust-scale: with plain SGD the step on the same prediction at running cosine 0.5
    is half the full step; at a running cosine of 0 or below the layers do not step at all (and
    the step is counted untrusted). Tolerance: the two deltas are each rounded to the weights'
    float32 ulp when subtracted, so they agree to a few ulps, not bitwise."""
    def stage(trust_scale: bool, trust: float) -> StageLogic:
        cfg = RunConfig(mode="unlocked", sg_prior="none", layers=(784, 32, 10), optimizer="sgd", lr=0.1, momentum=0.0,
                        sg_update_lr_scale=1.0, sg_trust_scale=trust_scale, sg_true_updates=False)
        first = chain(cfg)[0]
        with torch.no_grad():  # a predictor that predicts something (its last layer starts at zero)
            for p in first.parts.predictor.model.parameters():
                p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape))
        first.parts.predictor.trust = trust
        return first

    torch.manual_seed(1)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))

    def delta(first: StageLogic) -> torch.Tensor:
        before = first.module[0][1].weight.detach().clone()
        first.forward(0, x, y, False)
        first.local_update(0)
        return first.module[0][1].weight.detach() - before

    full, half = delta(stage(False, 0.5)), delta(stage(True, 0.5))
    assert full.abs().max() > 0
    torch.testing.assert_close(half, full / 2, rtol=1e-4, atol=1e-6)
    for trust in (0.0, -0.3):
        silent = stage(True, trust)
        assert delta(silent).abs().max() == 0
        assert silent.parts.predictor.stats.untrusted_steps == 1


def test_gradient_for_unknown_step_is_refused():
    cfg = RunConfig(mode="unlocked", layers=(784, 32, 10))
    first = chain(cfg)[0]
    with pytest.raises(KeyError, match="does not hold"):
        first.receive_grad(7, torch.zeros(4, 32), True)


def test_delayed_applies_each_gradient_at_the_weights_its_forward_used():
    """Two steps run forward before either gradient arrives: both gradients are taken at the
    initial weights (weight stashing) and applied, in turn, to the current ones. With plain SGD
    that is w2 = w0 - lr*g0(w0) - lr*g1(w0), checked against autograd on a copy."""
    cfg = RunConfig(mode="delayed", layers=(784, 16, 10), optimizer="sgd", lr=0.1, momentum=0.0)
    first, last = chain(cfg)
    ref = copy.deepcopy(first.module)
    torch.manual_seed(3)
    xs, ys = [torch.randn(8, 1, 28, 28) for _ in range(2)], [torch.randint(0, 10, (8,)) for _ in range(2)]
    hs = []
    for s in range(2):
        hs.append(first.forward(s, xs[s], ys[s], cfg.true_grad_at(s)))
        assert first.local_update(s) is None  # no update until the gradient comes
    gs = [torch.randn_like(h) / 8 for h in hs]
    assert first.receive_grad(0, gs[0], True) is None  # stage 0: no dL/dx to send
    first.receive_grad(1, gs[1], True)
    grads = [torch.autograd.grad(ref(xs[s]), list(ref.parameters()), gs[s]) for s in range(2)]
    for p, p0, g0, g1 in zip(first.module.parameters(), ref.parameters(), *grads):
        # the same kernels on the same tensors; the tolerance (a few float32 ulps of weights of
        # size ~0.1) only allows SGD's in-place add to round apart from this expression's
        torch.testing.assert_close(p, p0 - 0.1 * g0 - 0.1 * g1, rtol=1e-6, atol=1e-7)
    rec = first.take_figures()
    assert rec["gradient_delay_max"] == 1 and rec["gradient_delay_mean"] == 0.5  # step 0 waited one step
    out, dx = last.last_step(0, hs[0], ys[0], True)
    assert dx is not None and dx.shape == hs[0].shape  # the last stage sends its dL/dx back


def test_local_stages_learn_from_their_own_head_and_send_nothing_back():
    cfg = RunConfig(mode="local", layers=(784, 16, 16, 10), optimizer="sgd", lr=0.1)
    stages = chain(cfg)
    assert [s.parts.head is not None for s in stages] == [True, True, False] and all(s.parts.predictor is None for s in stages)
    before = [copy.deepcopy(s.module.state_dict()) for s in stages]
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    h = x
    for s in stages[:-1]:
        h = s.forward(0, h, y, cfg.true_grad_at(0))
        assert s.local_update(0) is None and s.outstanding() == 0  # nothing kept for later
    _, dx = stages[-1].last_step(0, h, y, cfg.true_grad_at(0))
    assert dx is None  # nothing travels backward
    for s, old in zip(stages, before):
        assert any(not torch.equal(v, old[k]) for k, v in s.module.state_dict().items() if v.is_floating_point())
    assert stages[0].take_figures()["head_loss"] > 0
    state = stages[0].state_dict()  # the head is part of what a checkpoint keeps
    assert "head" in state and "head_optimizer" in state
    with pytest.raises(ValueError, match="mode local sends none back"):
        stages[0].rule.on_gradient(0, None, torch.zeros(1), True)


@pytest.mark.parametrize("shape", [(64,), (8, 7, 7)])
def test_lowrank_predictor_is_small_and_starts_at_zero(shape):
    full = SyntheticGradient(shape, "linear", 4, conditioned=True)
    low = SyntheticGradient(shape, "lowrank", 4, conditioned=True)
    assert sum(p.numel() for p in low.parameters()) < sum(p.numel() for p in full.parameters()) / 2
    h, y = torch.randn(3, *shape), torch.tensor([0, 4, 9])
    assert low(h, y).shape == h.shape and not low(h, y).any()


@pytest.mark.parametrize("mode", ["corrected", "delayed"])
def test_a_late_gradient_waits_for_the_pending_steps_own_update(mode):
    """In the worker a late true gradient can arrive between a step's forward pass and its
    update; the stage applies it after that update, so the pending step's graph (batch norm
    included) still holds the weights it ran with."""
    cfg = RunConfig(mode=mode, model="cnn", groups=(2, 2), true_grad_every=1, optimizer="sgd", lr=0.05)
    first, last = chain(cfg)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    h0 = first.forward(0, x, y, True)
    first.local_update(0)
    _, g0 = last.last_step(0, h0, y, True)
    first.forward(1, x, y, True)  # step 1 is pending when step 0's gradient arrives
    before = [p.clone() for p in first.module.parameters()]
    first.receive_grad(0, g0, True)
    assert all(torch.equal(a, b) for a, b in zip(before, first.module.parameters()))  # held
    first.local_update(1)  # would fail on a modified weight if the update had been applied
    assert any(not torch.equal(a, b) for a, b in zip(before, first.module.parameters()))


@pytest.mark.parametrize("shape", [(12,), (5, 12), (4, 6, 6), (2, 3, 4, 5)], ids=["dense", "sequence", "image", "other"])
@pytest.mark.parametrize("kind", ["linear", "lowrank", "mlp"])
def test_predictors_and_heads_for_any_activation_shape(shape, kind):
    """(B, D), (B, T, D), (B, C, H, W) and anything else (flattened): the predictor answers in
    the activation's shape, starts at zero, learns, and uses the labels; the local head gives
    one logit per class."""
    torch.manual_seed(0)
    sg = SyntheticGradient(shape, kind, 8, conditioned=True, num_classes=3)
    h, y = torch.randn(6, *shape), torch.tensor([0, 1, 2, 0, 1, 2])
    assert sg(h, y).shape == h.shape and not sg(h, y).any()
    target = torch.randn_like(h)
    opt = torch.optim.Adam(sg.parameters(), lr=1e-2)
    for _ in range(20):
        loss = F.mse_loss(sg(h, y), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.mse_loss(sg(h, y), target) < F.mse_loss(torch.zeros_like(target), target)
    assert not torch.equal(sg(h, y), sg(h, (y + 1) % 3))  # the labels are an input
    assert LocalHead(shape, 3)(h).shape == (6, 3)
