"""Mode unlocked with its default prior (common/modes.py Residual, --sg-prior head): the local
head's gradient plus a learned correction.
Without true gradients it is mode local; with them its predictor learns what the head's
gradient misses, and the stage steps on both at once."""
from __future__ import annotations

import torch

from synthgrad.common.config import RunConfig
from tests.chain import Chain, chain, one_thread

BASE = dict(dataset="synthetic", layers=(784, 32, 32, 10), batch_size=16, sg_lr=1e-2)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 784, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def test_without_true_gradients_it_is_local_bit_for_bit():
    """N larger than the run: no true gradient comes back, the predictor stays at its zero start
    and adds nothing, so every weight and every head equals mode local's."""
    with one_thread():
        runs = {}
        for mode in ("local", "unlocked"):
            cfg = RunConfig(**BASE, mode=mode, true_grad_every=10 ** 6)
            played = Chain(chain(cfg), cfg)
            for step, (x, y) in enumerate(_batches(6)):
                played.step(step, x, y)
            played.drain()
            runs[mode] = played.stages
    for local, residual in zip(runs["local"], runs["unlocked"]):
        for name, value in local.module.state_dict().items():
            assert torch.equal(value, residual.module.state_dict()[name]), name
        if local.parts.head is not None:
            for name, value in local.parts.head.model.state_dict().items():
                assert torch.equal(value, residual.parts.head.model.state_dict()[name]), name
    assert all(s.parts.predictor is None or s.parts.predictor.stats.loss_n == 0 for s in runs["unlocked"])


def test_its_predictor_learns_what_the_head_misses():
    """Layers and head held still (lr 0): each true gradient g trains the predictor towards
    g - the head's gradient, which it then predicts (the running cosine with that correction
    climbs past 0.9), while the stage's step is the head's gradient plus that prediction."""
    cfg = RunConfig(**{**BASE, "sg_lr": 3e-2}, mode="unlocked", true_grad_every=1, lr=0.0)
    with one_thread():
        first = chain(cfg)[0]
        x, y = _batches(1)[0]
        start = first.parts.head.gradient(-1, first.module(x), y)  # lr 0: the head's gradient throughout
        noise = torch.randn(16, 32)
        g = noise * start.norm() / noise.norm()  # as large as the head's part, in another direction
        for step in range(60):
            first.forward(step, x, y, True)
            first.local_update(step)
            first.receive_grad(step, g, True)
        predictor, head = first.parts.predictor, first.parts.head
        assert predictor.trust > 0.9, predictor.trust
        h = first.module(x)
        prior = head.gradient(60, h, y)
        wanted = (g - prior) * 16
        predicted = predictor.predict(h, y)
        cosine = torch.nn.functional.cosine_similarity(predicted.flatten(), wanted.flatten(), dim=0)
        assert cosine > 0.9, float(cosine)
        # the true gradient itself is not what it learned: the head's part is left out
        unlike = torch.nn.functional.cosine_similarity(predicted.flatten(), (g * 16).flatten(), dim=0)
        assert unlike < cosine - 0.05, (float(unlike), float(cosine))


def test_a_stage_that_affords_no_useful_predictor_steps_on_its_head_alone():
    """With a head's gradient to step on, a stage whose budget buys only a rank-1 or
    pixel-by-pixel conv predictor goes without one (common/costs.py choose_helpers); the DNI
    rule, with nothing else to step on, keeps it. Such a stage is `local` and still passes
    the true gradients on."""
    from synthgrad.common.costs import choose_helpers
    cheap = dict(out_shape=(32, 26, 26), stage_flops=1.2e6, is_last=False)
    prior = RunConfig(mode="unlocked", true_grad_every=10, input_shape=(1, 28, 28), num_classes=10)
    assert choose_helpers(prior, **cheap).predictor is None and choose_helpers(prior, **cheap).head is not None
    assert choose_helpers(prior.replace(sg_prior="none"), **cheap).predictor.rank == 1
    assert choose_helpers(prior, out_shape=(64, 12, 12), stage_flops=6e7, is_last=False).predictor.rank >= 8
    assert choose_helpers(prior.replace(sg_hidden=2), **cheap).predictor.rank == 2  # asked for: built


def test_a_correction_counts_by_its_least_squares_gain_not_its_cosine():
    """A correction pointing the right way at a hundred times the right size has cosine 1 but
    would swamp the head's gradient: the head prior takes it at its gain E[p.t]/E[p.p] (about
    0.01 here), one of the right size in full, one pointing the wrong way not at all."""
    cfg = RunConfig(**BASE, mode="unlocked", true_grad_every=1, sg_correction_weights=False)  # the outputs' gain
    with one_thread():
        predictor = chain(cfg)[0].parts.predictor
    g = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) / 16  # a batch mean's gradient
    for size, gain in ((1.0, 1.0), (-1.0, 0.0), (100.0, 0.01)):
        for step in range(40):  # long enough for the running means to forget the last case
            predictor.score(step, g * 16 * size, g)
        assert abs(predictor.trust - (1.0 if size > 0 else -1.0)) < 1e-3, predictor.trust
        assert abs(predictor.correction_scale() - gain) < 1e-3 + 0.02 * gain, (size, predictor.correction_scale())


def test_a_correction_is_never_larger_than_the_prior():
    """One prediction far out of line on a new batch (a spike Adam would turn into several
    outsized steps) is shrunk to the head's gradient's norm; one within it is left alone."""
    from synthgrad.common.modes import bounded
    prior = torch.full((4, 8), 0.1)
    spike = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 1e3
    shrunk = bounded(spike, prior)
    assert torch.allclose(shrunk.norm(), prior.norm()) and torch.allclose(shrunk / shrunk.norm(), spike / spike.norm())
    small = prior * 0.5
    assert torch.equal(bounded(small, prior), small)


def test_a_correction_below_its_cosine_bar_is_not_taken():
    """--sg-correction-min-cosine: a correction running at cosine about 0.3 is taken at its gain
    under the default bar (0.1) and not at all under a bar of 0.5."""
    g = torch.randn(16, 32, generator=torch.Generator().manual_seed(2)) / 16
    noise = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    noisy = g * 16 + noise * (3 * (g * 16).norm() / noise.norm())  # cosine about 1/sqrt(10)
    scales = {}
    for bar in (0.1, 0.5):
        cfg = RunConfig(**BASE, mode="unlocked", true_grad_every=1, sg_correction_min_cosine=bar,
                        sg_correction_weights=False)  # the outputs' bar alone
        with one_thread():
            predictor = chain(cfg)[0].parts.predictor
        for step in range(20):
            predictor.score(step, noisy, g)
        assert 0.2 < predictor.trust < 0.45, predictor.trust
        scales[bar] = predictor.correction_scale()
    assert 0.05 < scales[0.1] < 0.2 and scales[0.5] == 0.0, scales


def test_a_correction_loses_its_part_along_the_output():
    """Sample by sample, what is left of a correction is orthogonal to the stage's output; a
    correction along the output (the push that grew the small GPT's residual stream without
    end) is dropped, and one already orthogonal to it is left as it is."""
    from synthgrad.common.modes import tangent
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(6, 4, 5, generator=gen)
    c = torch.randn(6, 4, 5, generator=gen)
    left = tangent(c, h)
    assert (left * h).sum((1, 2)).abs().max() < 1e-5 * c.norm() * h.norm()
    assert tangent(h * torch.linspace(-3, 3, 6).view(6, 1, 1), h).abs().max() < 1e-5
    assert torch.allclose(tangent(left, h), left, atol=1e-6)
    assert torch.equal(tangent(c, torch.zeros_like(h)), c)  # no output, nothing to leave out


def test_the_stage_steps_on_the_head_alone_where_the_correction_is_along_its_output():
    """Through the rule: a predictor whose correction is -3 x the output (taken in full) adds
    nothing to the head's gradient with --sg-correction-tangent, and is taken, up to the head's
    norm, without it (the default)."""
    x, y = _batches(1)[0]
    stepped = {}
    for keep in (True, False):
        cfg = RunConfig(**BASE, mode="unlocked", true_grad_every=1, sg_correction_tangent=keep,
                        sg_correction_center=False)
        with one_thread():
            first = chain(cfg)[0]
            predictor = first.parts.predictor
            predictor.predict = lambda h, labels: -3.0 * h.detach()
            predictor.correction_scale = lambda: 1.0
            heads = []  # the head's gradient the rule got (a head steps itself when asked for one)
            own = first.parts.head.gradient
            first.parts.head.gradient = lambda *a: heads.append(own(*a)) or heads[-1]
            h = first.module(x)
            stepped[keep] = (first.rule.local_gradient(0, h, y, None), heads[0], (3.0 * h / 16).norm())
    # what is left of a correction along the output is float32 rounding of its size: a few eps
    took, head, size = stepped[True]
    assert (took - head).norm() < 1e-5 * size, (float((took - head).norm()), float(size))
    took, head, _ = stepped[False]
    assert (took - head).norm() > 0.5 * head.norm()


def test_a_correction_common_to_the_batch_is_not_taken():
    """--sg-correction-center: a correction that is the same for every sample
    (the GPT's runaway: one vector for all) adds nothing to the head's gradient; each sample's
    own part is taken as predicted."""
    from synthgrad.common.modes import centered
    gen = torch.Generator().manual_seed(5)
    own = torch.randn(16, 32, generator=gen)
    own -= own.mean(0)
    common = torch.randn(1, 32, generator=gen).expand(16, 32)
    assert centered(common).abs().max() < 1e-6
    assert torch.allclose(centered(own + 5 * common), own, atol=1e-5)
    x, y = _batches(1)[0]
    cfg = RunConfig(**BASE, mode="unlocked", true_grad_every=1, sg_correction_center=True)
    with one_thread():
        first = chain(cfg)[0]
        predictor = first.parts.predictor
        predictor.predict = lambda h, labels: common.clone()
        predictor.correction_scale = lambda: 1.0
        heads = []
        own_head = first.parts.head.gradient
        first.parts.head.gradient = lambda *a: heads.append(own_head(*a)) or heads[-1]
        took = first.rule.local_gradient(0, first.module(x), y, None)
    assert (took - heads[0]).norm() < 1e-5 * common.norm() / 16


def test_a_correction_is_scored_on_the_layers_gradients_it_gives():
    """--sg-correction-weights (the default): the bar and the gain read the cosine of the
    weights' gradients a correction and the true one give, which an error shared over the
    batch can turn round while the outputs' cosine stays high; the records still report the
    outputs' cosine. weight_products is that product, computed through a kept graph."""
    from types import SimpleNamespace
    from synthgrad.common.modes import weight_products
    from synthgrad.common.parts import Share, WeightProducts
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(16, 8, generator=gen)
    w, b = torch.randn(4, 8, generator=gen).requires_grad_(), torch.zeros(4).requires_grad_()
    kept = SimpleNamespace(h=x @ w.T + b, weights={"w": w, "b": b})
    p, t = torch.randn(16, 4, generator=gen), torch.randn(16, 4, generator=gen)
    (wp, bp), (wt, bt) = (p.T @ x, p.sum(0)), (t.T @ x, t.sum(0))
    expect = ((wp * wt).sum() + bp @ bt, (wp * wp).sum() + bp @ bp, (wt * wt).sum() + bt @ bt)
    got = weight_products(kept, p, t, Share())
    assert got.head is None
    assert all(abs(a - float(e)) < 1e-4 * abs(float(e)) + 1e-6
               for a, e in zip((got.pt, got.pp, got.tt), expect)), (got, expect)
    cfg = RunConfig(**BASE, mode="unlocked", true_grad_every=1, sg_correction_weights_every=1)
    with one_thread():
        predictor = chain(cfg)[0].parts.predictor
    g = torch.randn(16, 32, generator=gen) / 16
    for step in range(20):
        cos = predictor.score(step, g * 16, g, on_weights=lambda p, t: WeightProducts(-1.0, 1.0, 1.0))
    assert abs(cos - 1.0) < 1e-6 and predictor.trust > 0.98 and predictor.weight_trust < -0.9
    assert predictor.correction_scale() == 0.0  # right on the outputs, turned round on the weights
    assert abs(predictor.stats.take()["sg_cosine"] - 1.0) < 1e-6
    for step in range(20, 40):  # agreeing on both: taken, at the weights' gain
        predictor.score(step, g * 16, g, on_weights=lambda p, t: WeightProducts(0.5, 1.0, 1.0))
    assert abs(predictor.correction_scale() - 0.5) < 0.03, predictor.correction_scale()  # 0.8^20 of the last
    asked = []
    for step in range(40, 80):  # below the bar on the outputs: the weights are not asked (no backward)
        predictor.score(step, -g * 16, g, on_weights=lambda p, t: asked.append(step) or WeightProducts(1.0, 1.0, 1.0))
    assert predictor.trust < 0 and predictor.correction_scale() == 0.0 and max(asked) < 45, asked


def test_the_weights_are_measured_on_every_kth_true_gradient_at_the_bar():
    """--sg-correction-weights-every K: of the true gradients whose outputs' running cosine is
    at the bar, the first and then every K-th pay the two backward passes; the count travels
    in the checkpoint, so a resumed stage measures on the same ones."""
    cfg = RunConfig(**BASE, mode="unlocked", true_grad_every=1, sg_correction_weights_every=3)
    with one_thread():
        predictor = chain(cfg)[0].parts.predictor
    from synthgrad.common.parts import WeightProducts
    g = torch.randn(16, 32, generator=torch.Generator().manual_seed(7)) / 16
    asked: list[int] = []
    for step in range(10):
        predictor.score(step, g * 16, g, on_weights=lambda p, t: asked.append(step) or WeightProducts(0.5, 1.0, 1.0))
    assert asked == [1, 4, 7], asked  # the running cosine reaches the bar (0.3) at the second
    state = predictor.state_dict()
    assert state["sg_weight_asks"] == 9
    predictor.weight_asks = 0
    predictor.load_state_dict(state)
    predictor.score(10, g * 16, g, on_weights=lambda p, t: asked.append(10) or WeightProducts(0.5, 1.0, 1.0))
    predictor.score(11, g * 16, g, on_weights=lambda p, t: asked.append(11) or WeightProducts(0.5, 1.0, 1.0))
    assert asked[-1] == 10 and 11 not in asked, asked  # the 10th and 11th at the bar: the 10th


def test_the_direction_gain_takes_a_correction_only_where_it_turns_the_step_towards_the_true_gradient():
    """--sg-correction-gain direction: the gain in [0, 1] that brings the step, head plus
    correction, nearest the true gradient in direction, from the products of their weights'
    gradients. Checked on vectors against a fine grid of gains; and on the case that broke the
    least-squares gain on the deeper CNN: a head many times the true gradient's size whose
    target (true less head) is mostly minus the head, predicted well enough to pass the bar."""
    import math

    from synthgrad.common.parts import direction_gain

    def products(h, p, t):
        return float(p @ t), float(p @ p), float(h @ h), float(h @ p), float(h @ t)

    def cosine(h, p, t, c):
        steps, exact = h + torch.as_tensor(c, dtype=h.dtype).reshape(-1, 1) * p, h + t
        return (steps @ exact) / (steps.norm(dim=1) * exact.norm())
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    for _ in range(200):
        h, p, t = (torch.randn(12, generator=gen, dtype=torch.float64) * math.exp(float(torch.randn(1, generator=gen)))
                   for _ in range(3))
        gain = direction_gain(*products(h, p, t))
        best = float(cosine(h, p, t, grid).max())
        assert 0 <= gain <= 1 and float(cosine(h, p, t, gain)) >= best - 1e-9, (gain, best)
    exact = torch.randn(64, generator=gen, dtype=torch.float64)
    h = exact + 2 * torch.randn(64, generator=gen, dtype=torch.float64)
    assert direction_gain(*products(h, exact - h, exact - h)) == 1.0  # a perfect correction: in full
    assert direction_gain(*products(exact, torch.randn(64, generator=gen, dtype=torch.float64),
                                    torch.zeros(64, dtype=torch.float64))) == 0.0  # an exact head: none
    noise = torch.randn(64, generator=gen, dtype=torch.float64)
    h = 10 * (exact + 1.7 * noise / noise.norm() * exact.norm())  # 10x the size, cosine 0.5 with it
    t = exact - h
    p = t + 0.9 * t.norm() * torch.randn(64, generator=gen, dtype=torch.float64) / 8  # cosine about 0.75
    pt, pp = float(p @ t), float(p @ p)
    assert 0.3 < pt / math.sqrt(pp * float(t @ t)) and pt / pp > 0.5  # the bar and the fit would take it
    gain = direction_gain(*products(h, p, t))
    assert cosine(h, p, t, gain) >= cosine(h, p, t, 0.0) and cosine(h, p, t, pt / pp) < cosine(h, p, t, 0.0)


def test_the_direction_gain_reads_the_heads_products_kept_through_the_run():
    """weight_products with the head's gradient gives H.H, H.P and H.T through the kept graph;
    the predictor folds them beside its fit, keeps them in its checkpoint, and with
    --sg-correction-gain direction takes no correction that turns the step away."""
    from types import SimpleNamespace

    from synthgrad.common.modes import weight_products
    from synthgrad.common.parts import Share, WeightProducts
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(16, 8, generator=gen)
    w = torch.randn(4, 8, generator=gen).requires_grad_()
    p, t, head = (torch.randn(16, 4, generator=gen) for _ in range(3))
    kept = SimpleNamespace(h=x @ w.T, weights={"w": w}, prior=head)
    got = weight_products(kept, p, t, Share(), with_head=True)
    wh, wp, wt = head.T @ x, p.T @ x, t.T @ x
    expect = ((wh * wh).sum(), (wh * wp).sum(), (wh * wt).sum())
    assert all(abs(a - float(e)) < 1e-4 * abs(float(e)) + 1e-6 for a, e in zip(got.head, expect)), (got, expect)
    cfg = RunConfig(**BASE, mode="unlocked", true_grad_every=1, sg_correction_gain="direction")
    with one_thread():
        predictor = chain(cfg)[0].parts.predictor
    g = torch.randn(16, 32, generator=gen) / 16
    # the correction fits its target (cosine 0.8, gain 0.8), and the target is mostly minus
    # the head (H.T = -0.9): taking it cancels the head and turns the step away from the true
    # gradient (cos(c) = (0.1 - 0.1 c) / |H + cP|, largest at c = 0)
    turned = WeightProducts(0.8, 1.0, 1.0, (1.0, -0.9, -0.9))
    for step in range(20):
        predictor.score(step, g * 16, g, on_weights=lambda p, t: turned)
    assert predictor.weight_trust > 0.75 and predictor.correction_scale() == 0.0
    state = predictor.state_dict()
    assert state["sg_weight_head"] == list(predictor.weight_head)
    helping = WeightProducts(1.0, 1.0, 1.0, (1.0, 0.0, 0.0))  # a correction at right angles to the head
    for step in range(20, 60):
        predictor.score(step, g * 16, g, on_weights=lambda p, t: helping)
    assert abs(predictor.correction_scale() - 1.0) < 1e-3  # cos(c) = (1 + c) / sqrt(1 + c^2): most at 1
    # (0.8^40 of the turned products is still in the running means)
    predictor.load_state_dict(state)
    assert predictor.correction_scale() == 0.0
    with_fit = RunConfig(**BASE, mode="unlocked", true_grad_every=1)
    with one_thread():
        fit = chain(with_fit)[0].parts.predictor
    for step in range(20):
        fit.score(step, g * 16, g, on_weights=lambda p, t: turned)
    assert abs(fit.correction_scale() - 0.8) < 0.01  # the least-squares gain takes it


def test_through_weights_is_j_jt_of_the_kept_forward_pass():
    """--sg-learn-weights follows J J^T (p - t): r back to the stashed weights, then forward
    again along them by a central difference of the forward pass rerun from its kept input and
    random state. The rerun draws the same dropout masks (it equals the kept output), and the
    product equals the one double backward gives. Tolerance: the difference's rounding is
    float32's (about 1e-7 of the output) over a step of 1e-3 of the weights, so about 1e-4 of
    the product per element whatever the CPU's kernels; 1e-3 of its norm holds that with room."""
    from types import SimpleNamespace

    from torch.func import functional_call

    from synthgrad.common.modes import through_weights
    from synthgrad.common.parts import Rerun, Share
    torch.manual_seed(3)
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                 torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 5)).train()
    x = torch.randn(16, 6)
    rerun = Rerun.before(x, torch.device("cpu"), module)
    weights = {n: p.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    h = functional_call(module, {**weights, **buffers}, (x,))
    assert torch.equal(rerun.output(module, {n: w.detach() for n, w in weights.items()}), h.detach())
    r = torch.randn(16, 5)
    got = through_weights(SimpleNamespace(h=h, weights=weights, rerun=rerun), module, r, Share())
    ws = list(weights.values())
    u = [d.detach() for d in torch.autograd.grad(h, ws, r, retain_graph=True)]
    leaf = r.clone().requires_grad_(True)
    back = torch.autograd.grad(h, ws, leaf, create_graph=True)
    (exact,) = torch.autograd.grad(sum((a * b).sum() for a, b in zip(back, u)), leaf)
    assert float((got - exact).norm() / exact.norm()) < 1e-3


def test_a_predictor_that_learns_the_weights_error_is_judged_on_the_weights():
    """--sg-learn-weights 1: a true-gradient step keeps what reruns its forward pass, the
    predictor learns the error of the weights' gradients its correction gives, and the
    correction is measured and judged on the weights alone: with the layers and head held
    still (lr 0) its running cosine there climbs past 0.9 and it is taken at a gain near 1."""
    cfg = RunConfig(**{**BASE, "sg_lr": 3e-2}, mode="unlocked", true_grad_every=1, lr=0.0, sg_learn_weights=1.0)
    with one_thread():
        first = chain(cfg)[0]
        x, y = _batches(1)[0]
        start = first.parts.head.gradient(-1, first.module(x), y)
        noise = torch.randn(16, 32, generator=torch.Generator().manual_seed(8))
        g = noise * start.norm() / noise.norm()
        for step in range(60):
            first.forward(step, x, y, True)
            assert first.kept[step].rerun is not None
            first.local_update(step)
            first.receive_grad(step, g, True)
        predictor = first.parts.predictor
        assert predictor.weight_asks == 60 and predictor.weight_trust > 0.9, predictor.weight_trust
        assert predictor.correction_scale() > 0.8, predictor.weight_fit
    plain = RunConfig(**BASE, mode="unlocked", true_grad_every=1)
    with one_thread():
        first = chain(plain)[0]
        first.forward(0, x, y, True)
        assert first.kept[0].rerun is None  # nothing kept for it unless asked


def test_a_rerun_starts_from_the_streams_state_of_its_step_and_leaves_the_run_s():
    """A recurrent stage carries its state from window to window: the rerun of a kept step
    starts from the state that step began with, not the state the stream has reached since,
    and leaves the stream where it is."""
    from synthgrad.common.parts import Rerun
    from synthgrad.common.recurrent import Recurrent, stream_through
    torch.manual_seed(4)
    module = torch.nn.Sequential(Recurrent(torch.nn.LSTM(3, 5, batch_first=True))).train()
    stream_through(module)
    layer = module[0]
    windows = torch.randn(3, 2, 4, 3)
    with torch.no_grad():
        module(windows[0])
        rerun = Rerun.before(windows[1], torch.device("cpu"), module)
        kept = module(windows[1])
        module(windows[2])
    reached = layer.carried()
    again = rerun.output(module, {n: p.detach() for n, p in module.named_parameters()})
    assert torch.equal(again, kept)
    assert all(a is b for a, b in zip(layer.carried(), reached))


def test_a_correction_neither_taken_nor_scored_is_not_predicted():
    """Below its bar a correction is only needed on the steps whose true gradient will score
    it (every N-th): the predictor runs on those alone, and every step still counts as one not
    taken. Once it passes the bar, it runs on every step."""
    cfg = RunConfig(**BASE, mode="unlocked", true_grad_every=5, sg_correction_weights=False)
    with one_thread():
        stage = chain(cfg)[0]
        predictor = stage.parts.predictor
        calls = []
        real = predictor.predict
        predictor.predict = lambda h, labels: calls.append(1) or real(h, labels)
        for step, (x, y) in enumerate(_batches(10)):
            true_grad = cfg.rule.true_grad_at(step, cfg.true_grad_every)
            stage.forward(step, x, y, true_grad)
            stage.local_update(step)
            assert len(calls) == (step + 1) // 5, (step, len(calls))  # steps 4 and 9 only
        assert predictor.stats.untrusted_steps == 10
        predictor.trust, predictor.fit = 1.0, (1.0, 1.0)  # past the bar, at a gain of 1
        for step, (x, y) in enumerate(_batches(3), start=10):
            stage.forward(step, x, y, False)
            stage.local_update(step)
        assert len(calls) == 2 + 3 and predictor.stats.untrusted_steps == 10
