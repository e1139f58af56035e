"""Every update rule through a checkpoint, in one process: a chain of stages played as the
workers play it (tests/chain.py) runs k steps and takes the workers' cut; each stage's file is
written and read back by the workers' own code (workers/checkpointing.py); fresh stages loaded
from those files play the rest beside the stages that were never reloaded, and the two end bit
for bit alike: layers and their optimiser, and each rule's own state (the predictor, its
optimiser, the running cosine and scale, the true updates' optimiser, the local heads and
theirs, the last true gradient), with every gradient handed back at the same step.

Mode pipeline is not here: it trains with torch.distributed.pipelining (workers/pipeline.py),
not with StageLogic, and --resume refuses it (coordinator/resume.py). Mode backprop has no
stages either. A recurrent unlocked stage's state predictor is covered in
tests/test_recurrent.py (test_a_stage_carries_its_streams_through_evaluations_and_checkpoints).
"""
from __future__ import annotations

import copy

import pytest
import torch

from synthgrad.common.config import RunConfig
from synthgrad.common.data import synthetic, train_batches
from tests.chain import Chain, assert_same_state, chain, differs, one_thread, through_files

# 8 batches of 16 an epoch, two epochs; the cut after step CUT, early in the second
BATCH, STEPS_PER_EPOCH, EPOCHS, CUT = 16, 8, 2, 9
BASE = dict(dataset="synthetic", layers=(784, 32, 32, 10), batch_size=BATCH, lr=3e-3, sg_lr=1e-2)

# id: (the rule's options, how many steps late a gradient comes back)
VARIANTS = {
    "locked": (dict(mode="locked"), 0),
    # the defaults: steps on the predictor scaled by its running cosine, and (N > 1) the true
    # gradients applied at stashed weights with an optimiser of their own
    "unlocked": (dict(mode="unlocked", true_grad_every=2, sg_prior="none"), 2),
    "unlocked-at-once": (dict(mode="unlocked", true_grad_every=2, sg_prior="none"), 0),
    "unlocked-bootstrap": (dict(mode="unlocked", true_grad_every=3, bootstrap=True, sg_normalize=True,
                                sg_prior="none"), 1),
    "unlocked-dni": (dict(mode="unlocked", true_grad_every=2, sg_trust_scale=False, sg_true_updates=False,
                          sg_prior="none"), 1),
    "stale": (dict(mode="stale", true_grad_every=3), 2),
    "local": (dict(mode="local"), 0),
    "delayed": (dict(mode="delayed"), 2),
    "corrected": (dict(mode="corrected", true_grad_every=2), 1),
    # (no bar on the correction's cosine: in 16 steps it would never be taken, and the resumed
    # stages must step on it)
    "unlocked-head-prior": (dict(mode="unlocked", true_grad_every=2, sg_correction_min_cosine=0.0), 1),
    "unlocked-head-prior-bootstrap": (dict(mode="unlocked", true_grad_every=3, bootstrap=True,
                                           sg_correction_min_cosine=0.0), 1),
    # the gain that follows the step's direction: the head's running products travel too
    "unlocked-head-prior-direction": (dict(mode="unlocked", true_grad_every=2, sg_correction_min_cosine=0.0,
                                           sg_correction_gain="direction"), 1),
    # replayed true gradients: the kept pairs travel in the checkpoint
    "unlocked-head-prior-replay": (dict(mode="unlocked", true_grad_every=2, sg_replay=2, sg_normalize=True,
                                        sg_correction_min_cosine=0.0), 1),
}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _data() -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(epoch, x, labels) for every step, in the run's batch order."""
    ds = synthetic(BATCH * STEPS_PER_EPOCH, BATCH)
    return [(epoch, x, y) for epoch in range(EPOCHS) for x, y in train_batches(ds.train, BATCH, 0, epoch)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_stage_loaded_from_a_checkpoint_continues_bitwise(variant, tmp_path):
    """Uninterrupted: the stages that took the cut play on. Resumed: fresh stages loaded from the
    files saved at the cut. Every activation each stage sends, every loss, every gradient handed
    back (stage, step, true or bootstrapped, in order) and every stage's final state are
    bitwise the same; each stage's state read back from its file equals the one it saved.

    Why the uninterrupted stages take the cut too: a checkpoint is saved only once every
    gradient of the steps before it has been applied (workers/checkpointing.py), because a
    step's kept autograd graph (delayed's and corrected's stashed weights, unlocked's true
    steps) cannot go into a file. Where gradients come back late (delay > 0) that wait applies
    the last few before the next step's forward pass instead of after it, so a run that took
    no checkpoint there walks another path from the cut on, and the resumed run can only equal
    the one that took it: the strongest equality that holds. Where they come back at once
    (delay 0), nothing is travelling at the cut, so the uninterrupted stages are exactly the
    ones that took no checkpoint. The test checks which of the two it was."""
    options, delay = VARIANTS[variant]
    cfg = RunConfig(**BASE, **options)
    data = _data()
    fresh = [copy.deepcopy(s.state_dict()) for s in chain(cfg)]
    whole = Chain(chain(cfg), cfg, delay)
    for step, (epoch, x, y) in enumerate(data[:CUT + 1]):
        whole.step(step, x, y, epoch)
    cut, travelling = whole.checkpoint()
    assert travelling == 0 if delay == 0 or variant == "local" else travelling > 0, travelling
    resumed = Chain(chain(cfg), cfg, delay)
    through_files(cfg, whole.stages, resumed.stages, tmp_path, CUT)
    for i, (stage, saved) in enumerate(zip(resumed.stages, cut)):
        assert_same_state(saved, stage.state_dict(), f"stage {i}, read back from its file")

    # before the cut, everything a stage carries moved from where it started
    for i, (now, start) in enumerate(zip(cut, fresh)):
        assert set(start) <= set(now) <= set(start) | {"last_true"}, (i, list(start), list(now))
        moved = {k for k in now if k not in start or differs(now[k], start[k])}
        # the predictor's normalising scale moves only with --sg-normalize
        still = set(now) - moved - ({"sg_scale"} if not cfg.sg_normalize else set())
        assert not still, f"stage {i}: {sorted(still)} never moved before the cut"
    lower = whole.stages[:-1]
    if cfg.rule.uses_predictor:
        assert all(s.parts.predictor.trust > 0 for s in lower), [s.parts.predictor.trust for s in lower]
    if variant == "stale":
        assert all("last_true" in state for state in cut[:-1])

    first_after = len(whole.delivered)
    for step, (epoch, x, y) in enumerate(data[CUT + 1:], start=CUT + 1):
        a, b = whole.step(step, x, y, epoch), resumed.step(step, x, y, epoch)
        for i, (ha, hb) in enumerate(zip(a, b)):
            assert torch.equal(ha, hb), f"stage {i} sent another activation at step {step}"
    whole.drain()
    resumed.drain()
    assert whole.losses[CUT + 1:] == resumed.losses
    assert whole.delivered[first_after:] == resumed.delivered
    for i, (a, b) in enumerate(zip(whole.stages, resumed.stages)):
        assert_same_state(a.state_dict(), b.state_dict(), f"stage {i} at the end")
    if cfg.rule.uses_predictor and cfg.sg_trust_scale:  # the resumed stages stepped on their predictors
        steps_after = len(data) - CUT - 1
        assert all(s.parts.predictor.stats.untrusted_steps < steps_after for s in resumed.stages[:-1])

    # the gradients came back at their usual steps: each stage but the last got the true
    # gradient of exactly the true-gradient steps, and (bootstrapping) a bootstrapped one of
    # every other step
    for i in range(len(cfg.stage_groups) - 1):
        true = [s for stage, s, t in whole.delivered if stage == i and t]
        boot = [s for stage, s, t in whole.delivered if stage == i and not t]
        assert sorted(true) == [s for s in range(len(data)) if cfg.true_grad_at(s)], (i, true)
        assert sorted(boot) == ([s for s in range(len(data)) if not cfg.true_grad_at(s)] if cfg.bootstrap else [])
