"""Local heads at depth (--head-depth, --head-reconstruct): what each builds, what it costs,
and that the decoder's loss reaches the gradient a stage steps on. No processes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.costs import choose_head
from synthgrad.common.models import LocalHead, Reconstruction
from synthgrad.common.parts import Head, Share


@pytest.mark.parametrize("shape", [(32, 12, 12), (300,), (16, 24)])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_a_head_has_the_hidden_layers_it_was_asked_for(shape, depth):
    head = LocalHead(shape, 10, pool=2, depth=depth)
    hidden = [m for m in head.net if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][:-1]
    assert len(hidden) == depth
    assert head(torch.randn(3, *shape)).shape == (3, 10)
    per_position = LocalHead((16, 24), 10, per_position=True, depth=depth)
    assert per_position(torch.randn(3, 16, 24)).shape == (3, 16, 10)


def test_a_wide_dense_head_stays_narrow_inside():
    head = LocalHead((9216,), 10, depth=1)
    assert head.net[0].out_features == 256  # not 9216 x 9216 weights


@pytest.mark.parametrize("out_shape,in_shape,fits", [
    ((32, 26, 26), (1, 28, 28), True),  # conv to conv: resized
    ((64, 8, 8), (32, 16, 16), True),
    ((128,), (784,), True),
    ((16, 24), (16, 9), True),  # every position to its own input
    ((9216,), (32, 26, 26), False),  # flattened: no spatial decoder
    ((4096,), (4096,), False),  # over the weight limit
])
def test_a_decoder_is_built_where_one_fits(out_shape, in_shape, fits):
    assert Reconstruction.fits(out_shape, in_shape) is fits
    if fits:
        decoder = Reconstruction(out_shape, in_shape)
        assert decoder(torch.randn(2, *out_shape)).shape == (2, *in_shape)


def test_the_layout_gives_a_decoder_only_when_asked_and_prices_it():
    cfg = RunConfig(mode="local", input_shape=(1, 28, 28), num_classes=10)
    plain = choose_head(cfg, (32, 26, 26), 1e6, in_shape=(1, 28, 28))
    asked = choose_head(cfg.replace(head_reconstruct=1.0), (32, 26, 26), 1e6, in_shape=(1, 28, 28))
    assert plain.reconstructs is None and asked.reconstructs == (1, 28, 28)
    assert asked.flops > plain.flops
    flat = choose_head(cfg.replace(head_reconstruct=1.0), (9216,), 1e6, in_shape=(32, 26, 26))
    assert flat.reconstructs is None  # no decoder of this kind fits: the classifier alone


def test_the_decoders_loss_is_part_of_the_gradient_a_stage_steps_on():
    torch.manual_seed(0)
    cfg = RunConfig(mode="local", input_shape=(1, 8, 8), num_classes=10, head_reconstruct=2.0, lr=0.0)
    choice = choose_head(cfg, (4, 8, 8), 1e9, in_shape=(1, 8, 8))
    head = Head.build(choice, cfg, (4, 8, 8), seed=0, device=torch.device("cpu"), share=Share())
    h, x, y = torch.randn(5, 4, 8, 8), torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    got = head.gradient(0, h, y, x)
    leaf = h.clone().requires_grad_(True)
    loss = F.cross_entropy(head.model(leaf), y) + 2.0 * F.mse_loss(head.model.decoder(leaf), x)
    (want,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(got, want)  # the same operations in the same order: equal
    without = head.gradient(1, h, y)  # no input given: the classifier's gradient alone
    assert not torch.allclose(without, got)


def test_head_options_are_checked():
    for bad in ({"head_depth": -1}, {"head_depth": 9}, {"head_reconstruct": -0.5},
                {"head_reconstruct": float("nan")}, {"head_budget": -0.1}, {"head_side": 0},
                {"head_side": 2.5}, {"head_narrowest": 0}, {"head_next_layer": -1}, {"head_next_layer": 1.5}):
        with pytest.raises(ConfigError, match="head"):
            RunConfig(mode="local", **bad).validate()


@pytest.mark.parametrize("shape,per_position", [((8, 12, 12), False), ((40,), False), ((6, 16), True)])
def test_a_scale_free_head_gives_no_gradient_along_the_activation(shape, per_position):
    """--head-norm: the head reads h over its RMS, so scaling h changes nothing it computes and
    its loss cannot push the stage's activations to grow (the gradient is orthogonal to h, per
    sample, or per position with targets at every position)."""
    torch.manual_seed(0)
    head = LocalHead(shape, 10, per_position=per_position, scale_free=True).double()
    h = torch.randn(4, *shape, dtype=torch.float64, requires_grad=True)
    # equal but for the RMS's epsilon (1e-12 beside a mean square of 0.03-1: under 1e-10
    # relative) and float64 rounding: the default float64 tolerances (1e-7)
    torch.testing.assert_close(head(3.0 * h), head(h))
    labels = torch.randint(0, 10, (4, shape[0]) if per_position else (4,))
    logits = head(h)
    F.cross_entropy(logits.reshape(-1, 10), labels.reshape(-1)).backward()
    dims = tuple(range(2 if per_position else 1, h.dim()))
    along = (h.grad * h).sum(dim=dims) / (h.grad.pow(2).sum(dim=dims) * h.pow(2).sum(dim=dims)).sqrt()
    # the cosine of the gradient with h: what is left comes from the RMS's epsilon and float64
    # rounding, both far under 1e-8
    assert along.abs().max() < 1e-8


def test_a_conv_heads_hidden_layers_run_on_a_small_map():
    head = LocalHead((16, 26, 26), 10, depth=1)
    conv = next(m for m in head.net if isinstance(m, torch.nn.Conv2d))
    seen = {}
    conv.register_forward_hook(lambda m, i, o: seen.update(side=i[0].shape[-1]))
    head(torch.randn(2, 16, 26, 26))
    assert seen["side"] == 8  # HEAD_CONV_SIDE: the early map is pooled first
    narrow = LocalHead((16, 26, 26), 10, depth=2, hidden=4, side=4)  # a smaller map, a narrower hidden layer
    convs = [m for m in narrow.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 4), (4, 4)]
    assert narrow.net[-1].in_features == 4 * 2 * 2
    convs[0].register_forward_hook(lambda m, i, o: seen.update(side=i[0].shape[-1]))
    assert narrow(torch.randn(2, 16, 26, 26)).shape == (2, 10) and seen["side"] == 4


def test_a_context_head_reads_earlier_positions_and_never_later_ones():
    torch.manual_seed(0)
    head = LocalHead((12, 24), 10, per_position=True, scale_free=True, attention=True)
    x = torch.randn(2, 12, 24)
    moved = x.clone()
    moved[:, 5] += 1.0
    change = (head(moved) - head(x)).abs().amax(dim=(0, 2))
    assert torch.all(change[:5] == 0)  # causal: the targets before position 5 are not read from it
    assert torch.all(change[6:] > 0)  # later positions read it, through the attention
    plain = LocalHead((12, 24), 10, per_position=True, scale_free=True)
    assert torch.all((plain(moved) - plain(x)).abs().amax(dim=(0, 2))[6:] == 0)


def test_the_context_head_is_given_on_stream_data_only_and_priced():
    stream = RunConfig(mode="local", dataset="text", model="lstm", input_shape=(64, 32), label_shape=(64,),
                       num_classes=32)
    plain = choose_head(stream, (64, 128), 1e9)
    asked = choose_head(stream.replace(head_attention=True), (64, 128), 1e9)
    from synthgrad.common.costs import _attention_flops
    assert not plain.attention and asked.attention
    assert asked.flops - plain.flops > _attention_flops((64, 128)) > 0  # the products the counter misses too
    assert any(isinstance(m, torch.nn.Linear) and m.in_features == 128 + 64
               for m in asked.build(stream.replace(head_attention=True), (64, 128)).modules())
    images = RunConfig(mode="local", input_shape=(1, 28, 28), num_classes=10, head_attention=True)
    assert not choose_head(images, (32, 26, 26), 1e9).attention  # one target per sample: nothing to read


def offer(*extras):
    """What head_depths is offered: the hidden layers' extra FLOPs, the largest first: all the
    channels at 8x8, then at 4x4, then a half, a quarter ... of them at 4x4."""
    from synthgrad.common.costs import HiddenLayer
    layers = [HiddenLayer(1, None, 8), HiddenLayer(1, None, 4), *(HiddenLayer(1, 64 >> i, 4) for i in range(6))]
    return list(zip(layers, extras))


def test_auto_head_depth_stage_by_stage_keeps_the_pace_and_the_allowance():
    """--head-fill stages (and width's fallback): one hidden layer per head, from the first
    stage on, the first offered that leaves the stage within (1 + budget) x the heaviest
    stage's FLOPs with all of them within budget x the model's."""
    from synthgrad.common.costs import HiddenLayer, head_depths
    one = HiddenLayer(1, None, 8)
    cfg = RunConfig(mode="local", head_budget=0.2, head_fill="stages")
    own = [1.0, 100.0, 10.0, 0.1]  # a cheap stem, a heavy block, a light stage, the last stage
    assert head_depths(cfg, own, [offer(3.0), offer(14.0), offer(5.0), []]) == (one, one, one, HiddenLayer(0))
    # the heaviest stage's hidden layer would slow the pipeline's pace by more than the budget
    got = head_depths(cfg, own, [offer(3.0), offer(21.0), offer(5.0), []])
    assert [layer.depth for layer in got] == [1, 0, 1, 0]
    # ... unless a smaller one is offered: the first that fits is given
    got = head_depths(cfg, own, [offer(3.0), offer(21.0, 10.5, 5.2), offer(5.0), []])
    assert got[1] == HiddenLayer(1, None, 4)
    # the model's allowance (0.2 x 111.1 = 22.2) is spent from the first stage on
    got = head_depths(cfg, own, [offer(3.0), offer(19.0), offer(5.0), []])
    assert [layer.depth for layer in got] == [1, 1, 0, 0]
    assert head_depths(cfg, [1.0, 100.0], [[], []]) == (HiddenLayer(0), HiddenLayer(0))  # none offered
    assert head_depths(cfg.replace(head_depth=2), [1.0, 100.0], [offer(3.0), []]) == (HiddenLayer(2),) * 2


def test_auto_head_depth_gives_every_head_all_its_channels_where_the_allowance_pays():
    """--head-fill width (the default): where the allowance pays for the cheapest full-width
    hidden layer in every head, each gets it, even where that slows the pipeline's pace by
    more than the budget (an eight-stage CNN's 7x7 stages: a third); then larger maps, from
    the first stage on, within both bounds. Where it does not pay, stage by stage."""
    from synthgrad.common.costs import HiddenLayer, head_depths
    cfg = RunConfig(mode="local", head_budget=0.2)
    assert cfg.head_fill == "width"
    small, large = HiddenLayer(1, None, 4), HiddenLayer(1, None, 8)
    own = [10.0, 100.0, 100.0, 100.0, 0.1]  # allowance 62.02; the pace allows a stage 120
    offered = [offer(12.0, 3.0, 1.5), offer(40.0, 30.0, 15.0), offer(40.0, 15.0, 7.5), offer(40.0, 14.0, 7.0), []]
    # stage by stage: stage 0 takes its 8x8 map first, and the pace narrows stage 1 to a half
    stages = head_depths(cfg.replace(head_fill="stages"), own, offered)
    assert stages == (large, HiddenLayer(1, 64, 4), small, small, HiddenLayer(0))
    # all the channels everywhere costs 3 + 30 + 15 + 14 = 62: stage 1 goes to 130, past the
    # pace; stage 0's 8x8 (+9) would then take the total past the allowance
    assert head_depths(cfg, own, offered) == (small, small, small, small, HiddenLayer(0))
    # with room for it (allowance 93, pace 130), the larger map goes where it fits both
    assert head_depths(cfg.replace(head_budget=0.3), own, offered) == (large, small, small, small, HiddenLayer(0))
    # where the allowance cannot pay for every head's full width (3 + 30 + 15 + 20 = 68): stage by stage
    tight = [*offered[:3], offer(40.0, 20.0, 10.0), []]
    assert head_depths(cfg, own, tight) == head_depths(cfg.replace(head_fill="stages"), own, tight)
    assert head_depths(cfg, [1.0, 100.0], [[], []]) == (HiddenLayer(0), HiddenLayer(0))  # none offered


def test_head_fill_is_checked_and_old_runs_keep_their_rule():
    with pytest.raises(ConfigError, match="--head-fill"):
        RunConfig(mode="local", head_fill="widest").validate()
    saved = RunConfig(mode="local").to_dict()
    del saved["head_fill"]
    assert RunConfig.from_dict(saved).head_fill == "stages"  # a run folder from before --head-fill


def test_a_conv_head_is_offered_narrower_hidden_layers_at_lower_prices():
    from synthgrad.common.costs import hidden_layer_options
    cfg = RunConfig(mode="local", input_shape=(1, 28, 28), num_classes=10)
    options = hidden_layer_options(cfg, (128, 7, 7), 4e7)
    # at --head-side (8: the 7x7 map as it is), then at 4x4: all of the channels (None), a half, a quarter
    assert [(o.hidden, o.side) for o, _ in options] == [(None, 8), (None, 4), (64, 4), (32, 4)]
    prices = [extra for _, extra in options]
    assert prices[0] > prices[1] > prices[2] > 0
    # a 3x3 conv of 128 channels on a 7x7 map, then a 4x4 one, forward and backward (3x its forward's 2 x MACs)
    assert prices[0] == pytest.approx(3 * 2 * 128 * 128 * 9 * 49, rel=0.05)
    assert prices[1] == pytest.approx(3 * 2 * 128 * 128 * 9 * 16, rel=0.05)
    assert [o for o, _ in hidden_layer_options(cfg, (256,), 1e6)] == [(1, None, 8)]  # dense: one (side unused)
    assert [o.hidden for o, _ in hidden_layer_options(cfg, (3, 7, 7), 1e6)] == [None, None, 1]  # 3 // 4 is none
    assert [o.hidden for o, _ in hidden_layer_options(cfg.replace(head_narrowest=8), (128, 7, 7), 4e7)][-1] == 16
    assert len(hidden_layer_options(cfg.replace(head_narrowest=1), (128, 7, 7), 4e7)) == 1  # as before: 8x8 or none


@pytest.mark.parametrize("hidden,side", [(None, 4), (32, 4), (16, 8), (None, 2)])
def test_a_conv_head_costs_what_the_layout_priced(hidden, side):
    """The FLOPs the layout charges a stage for its head are those of the head the stage builds."""
    from synthgrad.common.costs import _head_of_depth, training_flops
    cfg = RunConfig(mode="local", input_shape=(1, 28, 28), num_classes=10, head_side=side)
    choice = _head_of_depth(cfg, (64, 14, 14), 1e8, None, 1, hidden)
    assert (choice.hidden, choice.side) == (hidden, side)
    built = choice.build(cfg, (64, 14, 14))
    assert choice.flops == pytest.approx(training_flops(built, (64, 14, 14)))
    convs = [m for m in built.net if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == (hidden or 64)


def test_a_given_head_depth_overrides_the_width_auto_chose():
    cfg = RunConfig(mode="local", input_shape=(1, 28, 28), num_classes=10)
    assert choose_head(cfg, (64, 14, 14), 1e8, depth=1, hidden=16).hidden == 16
    given = choose_head(cfg.replace(head_depth=1), (64, 14, 14), 1e8, depth=1, hidden=16)
    assert (given.depth, given.hidden) == (1, None)
    dense = choose_head(cfg, (300,), 1e8, depth=1, hidden=16)
    assert (dense.hidden, dense.side) == (None, None)  # a width and a side are a conv head's


def test_a_conv_head_refuses_a_zero_width_or_side():
    for bad in ({"hidden": 0}, {"side": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            LocalHead((16, 8, 8), 10, depth=1, **bad)


def test_the_layout_gives_the_depths_it_chose_to_every_stage():
    from synthgrad.coordinator.layout import plan_layout
    cnn = RunConfig(mode="local", model="bench.models:digits_cnn", model_layers=4, input_shape=(1, 28, 28),
                    num_classes=10)
    heads = [h.head for h in plan_layout(cnn)[1].helpers]
    assert [h.depth for h in heads[:-1]] == [1, 0, 1] and heads[-1] is None  # the heavy stage's is over budget
    # the CNNs of the README's first rows get the same heads under either --head-fill
    dominant = RunConfig(mode="unlocked", model="bench.models:dominant_cnn", model_layers=5,
                         input_shape=(1, 28, 28), num_classes=10)
    for run in (cnn, cnn.replace(mode="unlocked"), dominant, dominant.replace(mode="local")):
        assert plan_layout(run)[1].helpers == plan_layout(run.replace(head_fill="stages"))[1].helpers
    deep = RunConfig(mode="local", model="bench.models:deep_cnn", model_layers=9, input_shape=(1, 28, 28),
                     num_classes=10, stages=8)
    layout = plan_layout(deep)[1]
    heads = [h.head for h in layout.helpers[:-1]]
    # the allowance pays for a full-width 3x3 conv at 4x4 in every head, so every head gets one
    # (the 7x7 stages' go a third past the pace); no 8x8 map fits what is left
    assert [(h.depth, h.hidden, h.side) for h in heads] == [(1, None, 4)] * 7
    assert layout.record()["heads"][5]["hidden"] is None and layout.record()["heads"][5]["side"] == 4
    assert "5: hidden layer at 4x4 32.7%" in layout.describe() and "4: hidden layer at 4x4 65" in layout.describe()
    stages = [h.head for h in plan_layout(deep.replace(head_fill="stages"))[1].helpers[:-1]]
    # stage by stage: 8x8 on the early maps, 4x4 on the 7x7 ones, the last two narrower
    assert [(h.depth, h.hidden, h.side) for h in stages] == [(1, None, 8)] * 3 + [(1, None, 4)] * 2 + [(1, 64, 4),
                                                                                                       (1, 32, 4)]
    narrow = plan_layout(deep.replace(head_narrowest=1))[1]  # 8x8 with all of the channels, or none
    assert [h.head.depth for h in narrow.helpers[:-1]] == [1, 1, 1, 0, 0, 0, 0]
    assert [h.head.depth for h in plan_layout(cnn.replace(head_depth=0))[1].helpers[:-1]] == [0, 0, 0]
    stream = RunConfig(mode="local", dataset="text", model="lstm", input_shape=(16, 11), label_shape=(16,),
                       num_classes=11, groups=(1, 1))
    assert [h.head.depth for h in plan_layout(stream)[1].helpers[:-1]] == [0]  # per position: none offered


def test_a_run_folder_from_before_auto_depth_resumes_with_linear_heads():
    import dataclasses
    saved = RunConfig(mode="local").to_dict()
    del saved["head_depth"]  # config.json from before the field had an auto default
    assert RunConfig.from_dict(saved).head_depth == 0
    del saved["head_side"], saved["head_budget"], saved["head_narrowest"]  # from before --head-side
    old = RunConfig.from_dict(saved)  # hidden convs at 8x8, all of the channels or none, by sg_budget
    assert (old.head_side, old.head_narrowest, old.head_budget) == (8, 1, saved["sg_budget"])
    assert RunConfig().head_depth is None  # a new run: auto
    assert dataclasses.replace(RunConfig(), head_depth=None).validate().head_depth is None


def test_a_run_folder_from_before_narrower_heads_resumes_with_the_heads_it_had():
    """The digits CNN under the rule before --head-side: hidden layers in the heads of stages 0
    and 2, all channels, at 8x8; its heavy stage's head linear, as its checkpoint holds them."""
    from synthgrad.coordinator.layout import plan_layout
    saved = RunConfig(mode="local", model="bench.models:digits_cnn", model_layers=4, input_shape=(1, 28, 28),
                      num_classes=10).to_dict()
    for field in ("head_side", "head_budget", "head_narrowest"):
        del saved[field]
    heads = [h.head for h in plan_layout(RunConfig.from_dict(saved))[1].helpers[:-1]]
    assert [(h.depth, h.hidden, h.side) for h in heads] == [(1, None, 8), (0, None, None), (1, None, None)]


def _gpt(**options) -> RunConfig:
    return RunConfig(mode="local", dataset="text", model="bench.models:small_gpt", input_shape=(16, 32),
                     label_shape=(16,), num_classes=32, **options)


def test_a_head_can_begin_with_a_fresh_copy_of_the_layer_after_its_stage():
    """--head-next-layer 1: the first stage's head runs a block of the model's own shape (its
    own weights, drawn from the head's seed), then reads out every position; the layout prices
    it at that block's cost on top of the head's; the other stages keep theirs."""
    from synthgrad.common.costs import unit_costs
    from synthgrad.common.models import build_units
    from synthgrad.coordinator.layout import plan_layout
    cfg = _gpt(head_next_layer=1)
    units = build_units(cfg)
    layout = plan_layout(cfg)[1]
    plain = plan_layout(cfg.replace(head_next_layer=0))[1]
    heads, plains = [h.head for h in layout.helpers[:-1]], [h.head for h in plain.helpers[:-1]]
    assert layout.groups == (2, 1, 1, 1, 1) and heads[0].lead == 2 and not heads[0].lead_is_output
    assert heads[1:] == plains[1:]  # only the first stage's head
    assert heads[0].flops == pytest.approx(plains[0].flops + unit_costs(cfg, units)[2])
    assert layout.record()["heads"][0]["next_layer"] == 2 and "0: layer 2 copied " in layout.describe()
    model = heads[0].build(cfg, (16, 128), seed=5)
    lead = model.net[1]  # after the norm: the head reads the stage's output over its RMS first
    assert type(lead) is type(units[2])
    pairs = list(zip(lead.state_dict().values(), units[2].state_dict().values()))
    assert all(a.shape == b.shape for a, b in pairs)
    assert any(not torch.equal(a, b) for a, b in pairs)  # a fresh draw, not the next stage's own start
    assert model(torch.randn(3, 16, 128)).shape == (3, 16, 32)
    again = heads[0].build(cfg, (16, 128), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_the_first_stages_lead_can_copy_more_than_one_layer():
    """--head-lead-depth 2: the first stage's head runs fresh copies of the next two blocks, the
    later led stages' heads one each; a lead never takes the read-out (the head reads out
    itself), and the layout prices each lead at the layers it copies."""
    from synthgrad.common.costs import unit_costs
    from synthgrad.common.models import build_units
    from synthgrad.coordinator.layout import plan_layout
    cfg = _gpt(head_next_layer=3, head_lead_depth=2)
    units, costs = build_units(cfg), unit_costs(cfg, build_units(cfg))
    layout = plan_layout(cfg)[1]
    plain = [h.head for h in plan_layout(cfg.replace(head_next_layer=0))[1].helpers[:-1]]
    heads = [h.head for h in layout.helpers[:-1]]
    assert [(h.lead, h.lead_depth) for h in heads] == [(2, 2), (3, 1), (4, 1), (None, 1)]
    assert heads[0].flops == pytest.approx(plain[0].flops + costs[2] + costs[3])
    assert heads[1].flops == pytest.approx(plain[1].flops + costs[3])
    assert "0: layers 2-3 copied " in layout.describe() and layout.record()["heads"][0]["next_layers"] == 2
    model = heads[0].build(cfg, (16, 128), seed=5)
    lead = model.net[1]
    assert [type(m) for m in lead] == [type(units[2]), type(units[3])]
    assert model(torch.randn(3, 16, 128)).shape == (3, 16, 32)
    # deeper than the layers before the read-out: as deep as there are
    deep = plan_layout(cfg.replace(head_next_layer=1, head_lead_depth=9))[1].helpers[0].head
    assert (deep.lead, deep.lead_depth, deep.lead_is_output) == (2, 3, False)
    from synthgrad.common.validation import check_synthetic
    with pytest.raises(ConfigError, match="--head-lead-depth"):
        check_synthetic(cfg.replace(head_lead_depth=0))


def test_heads_learn_at_their_own_scale_of_the_learning_rate():
    """--head-lr-scale: the head's optimiser runs at that times --lr; the layers keep --lr.
    Auto is HEAD_LR_SCALE_STREAM for per-position heads of stages without a recurrent layer
    and 1 elsewhere (images; an LSTM's stage); a run folder from before the option resumes at 1."""
    from synthgrad.common.costs import HEAD_LR_SCALE_STREAM, head_lr_scale
    from synthgrad.common.validation import check_synthetic
    from synthgrad.coordinator.layout import plan_layout

    def scales(cfg):
        return [h.head.lr_scale for h in plan_layout(cfg)[1].helpers[:-1]]

    assert HEAD_LR_SCALE_STREAM > 1 and scales(_gpt()) == [HEAD_LR_SCALE_STREAM] * 4
    assert head_lr_scale(_gpt(head_lr_scale=0.5), recurrent=False) == 0.5
    old = {k: v for k, v in _gpt().to_dict().items() if k != "head_lr_scale"}
    assert head_lr_scale(RunConfig.from_dict(old), recurrent=False) == 1.0
    cnn = RunConfig(mode="local", model="bench.models:digits_cnn", model_layers=4, input_shape=(1, 28, 28),
                    num_classes=10)
    assert scales(cnn) == [1.0] * 3
    lstm = RunConfig(mode="local", dataset="text", model="lstm", input_shape=(16, 32), label_shape=(16,),
                     num_classes=32)
    assert scales(lstm) == [1.0]
    cfg = _gpt(head_lr_scale=3.0, lr=2e-3)
    choice = plan_layout(cfg)[1].helpers[1].head
    head = Head.build(choice, cfg, (16, 128), seed=1, device=torch.device("cpu"), share=Share())
    assert [g["lr"] for g in head.optimizer.param_groups] == [pytest.approx(6e-3)]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="--head-lr-scale"):
            check_synthetic(cfg.replace(head_lr_scale=bad))


def test_the_lead_is_a_fresh_draw_at_the_runs_own_seed_too():
    """Stage 0's head seed is the run's at --seed 0; the lead is still not the next stage's
    starting layer."""
    from synthgrad.common.models import build_units
    from synthgrad.coordinator.layout import plan_layout
    cfg = _gpt(head_next_layer=1, seed=0)
    choice = plan_layout(cfg)[1].helpers[0].head
    head = Head.build(choice, cfg, (16, 128), seed=cfg.seed * 7919 + 0, device=torch.device("cpu"), share=Share())
    lead, block = head.model.net[1], build_units(cfg)[2]
    assert any(not torch.equal(a, b) for a, b in zip(lead.state_dict().values(), block.state_dict().values()))


def test_a_conv_head_with_a_lead_is_offered_no_other_hidden_layer():
    """Under --head-depth auto the lead is the head's hidden depth: the budget's hidden conv
    goes to the heads without one, and what a lead costs is the next layer's training."""
    from synthgrad.coordinator.layout import plan_layout
    cnn = RunConfig(mode="local", model="bench.models:digits_cnn", model_layers=4, input_shape=(1, 28, 28),
                    num_classes=10)
    plain = [h.head for h in plan_layout(cnn)[1].helpers[:-1]]
    led = [h.head for h in plan_layout(cnn.replace(head_next_layer=1))[1].helpers[:-1]]
    assert plain[0].depth == 1 and led[0].depth == 0 and led[0].lead == 1
    assert [(h.depth, h.lead) for h in plain[1:]] == [(0, None), (1, None)]
    # what stage 0 no longer spends pays for a hidden layer in every other head (the heavy
    # stage's, past the pace: all of its channels, --head-fill width)
    assert [(h.depth, h.lead) for h in led[1:]] == [(1, None), (1, None)]
    assert led[0].build(cnn, (32, 26, 26), seed=3)(torch.randn(2, 32, 26, 26)).shape == (2, 10)


def test_a_lead_is_refused_only_where_the_rule_has_heads():
    from synthgrad.common.costs import helper_models
    from synthgrad.common.recurrent import Recurrent
    cfg = RunConfig(mode="locked", dataset="text", input_shape=(8, 4), label_shape=(8,), num_classes=5,
                    groups=(1, 1, 1), head_next_layer=1)
    units = [torch.nn.Linear(4, 16), Recurrent(torch.nn.LSTM(16, 16, batch_first=True)), torch.nn.Linear(16, 5)]
    helper_models(cfg, units, [1.0, 1.0, 1.0])  # locked has no heads: nothing to refuse


def test_a_head_whose_next_layer_is_the_read_out_is_that_layer_alone():
    from synthgrad.coordinator.layout import plan_layout
    heads = [h.head for h in plan_layout(_gpt(head_next_layer=99))[1].helpers[:-1]]
    assert [h.lead for h in heads] == [2, 3, 4, 5]
    assert [h.lead_is_output for h in heads] == [False, False, False, True]
    last = heads[-1].build(_gpt(head_next_layer=99), (16, 128), seed=1)
    assert len(last.net) == 2 and isinstance(last.net[1][-1], torch.nn.Linear)  # the norm, then the read-out
    assert last(torch.randn(2, 16, 128)).shape == (2, 16, 32)


def test_by_default_only_a_stream_models_first_head_begins_with_its_next_layer():
    """--head-next-layer auto: 1 on stream data where the layer after the first stage is a
    hidden one without a recurrent state (the GPT's second block); 0 on images, before a
    recurrent layer and before the read-out."""
    from synthgrad.common.costs import helper_models
    from synthgrad.common.recurrent import Recurrent
    from synthgrad.coordinator.layout import plan_layout
    assert _gpt().head_next_layer is None
    assert [h.head.lead for h in plan_layout(_gpt())[1].helpers[:-1]] == [2, None, None, None]
    assert [h.head.lead for h in plan_layout(_gpt(head_next_layer=0))[1].helpers[:-1]] == [None] * 4
    cnn = RunConfig(mode="local", model="bench.models:digits_cnn", model_layers=4, input_shape=(1, 28, 28),
                    num_classes=10)
    assert all(h.head.lead is None for h in plan_layout(cnn)[1].helpers[:-1])
    lstm = RunConfig(mode="local", dataset="text", input_shape=(8, 4), label_shape=(8,), num_classes=5,
                     groups=(1, 1, 1))
    units = [torch.nn.Linear(4, 16), Recurrent(torch.nn.LSTM(16, 16, batch_first=True)), torch.nn.Linear(16, 5)]
    assert all(h.head is None or h.head.lead is None for h in helper_models(lstm, units, [1.0, 1.0, 1.0])[1])
    # nor where the layer after the first stage is the read-out: that would be a linear head
    assert [h.head.lead for h in plan_layout(_gpt(groups=(5, 1)))[1].helpers[:-1]] == [None]
    saved = _gpt().to_dict()
    del saved["head_next_layer"]  # a run folder from before the option: no lead
    assert RunConfig.from_dict(saved).head_next_layer == 0


def test_a_recurrent_next_layer_is_refused_by_name():
    from synthgrad.common.costs import helper_models
    from synthgrad.common.recurrent import Recurrent
    cfg = RunConfig(mode="local", dataset="text", input_shape=(8, 4), label_shape=(8,), num_classes=5,
                    groups=(1, 1, 1), head_next_layer=1)
    units = [torch.nn.Linear(4, 16), Recurrent(torch.nn.LSTM(16, 16, batch_first=True)), torch.nn.Linear(16, 5)]
    with pytest.raises(ConfigError, match="layer 1 .*recurrent"):
        helper_models(cfg, units, [1.0, 1.0, 1.0])
