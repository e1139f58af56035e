"""Run from the repository root: python bench/results/depth/orthogonal_correction.py [bench/rules.py options].
A patch, not an option: the head prior's predictor learns the part of the true gradient that
the head's gradient does not already give up to scale (the true gradient less its projection on
the head's), and the step adds that prediction in the head's units (over the running
least-squares scale of the head's gradient on the true one). Then bench/rules.py."""
import runpy, sys
from synthgrad.common.modes import Residual, bounded, true_dx, weight_products
from synthgrad.common.parts import TRUST_DECAY
from functools import partial

orig_init = Residual.__init__
def __init__(self, parts, stage):
    orig_init(self, parts, stage)
    self.head_fit = (0.0, 0.0)
Residual.__init__ = __init__

def head_scale(self):
    dot, pp = self.head_fit
    return dot / pp if pp > 0 else 0.0

def local_gradient(self, step, h, labels, kept):
    head = self.parts.head.gradient(step, h, labels, self.stage.step_input)
    predictor = self.parts.predictor
    if predictor is None:
        return head
    if kept is not None:
        kept.prior = head
    scale = predictor.correction_scale()
    scored = kept is not None and kept.h is not None
    if scale <= 0 and not scored:
        return head
    correction = predictor.predict(h, labels)
    if scored:
        kept.prediction = correction
    beta = head_scale(self)
    if scale <= 0 or beta <= 0:
        return head
    return head + bounded(correction * (scale / beta / predictor.share.rows(h)), head)

def on_gradient(self, step, kept, g, true_grad):
    predictor = self.parts.predictor
    if predictor is None:
        return true_dx(kept, g) if true_grad else None
    prior = kept.prior.to(g.dtype)
    dot, pp, _ = predictor._whole_batch_products(prior, g)
    self.head_fit = (TRUST_DECAY * self.head_fit[0] + (1 - TRUST_DECAY) * dot,
                     TRUST_DECAY * self.head_fit[1] + (1 - TRUST_DECAY) * pp)
    wanted = g - (dot / pp if pp > 0 else 0.0) * prior
    kept_graph = kept.h is not None and bool(kept.weights)
    if kept.prediction is not None:
        on_weights = (partial(weight_products, kept, share=predictor.share)
                      if predictor.settings.on_weights and kept_graph else None)
        predictor.score(step, kept.prediction, wanted, on_weights)
    predictor.learn(kept.h_detached, kept.labels, wanted, None)
    return true_dx(kept, g) if true_grad else None

Residual.local_gradient = local_gradient
Residual.on_gradient = on_gradient
sys.argv = ["bench/rules.py"] + sys.argv[1:]
runpy.run_path("bench/rules.py", run_name="__main__")
