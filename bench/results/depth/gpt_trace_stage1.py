"""The stage-1 trace in gpt-1000-replay4-bar0.5-stage1-trace.txt: the bar-0.5 GPT run of gpt_trace.py
(corrections scored on the outputs, taken whole: as before --sg-correction-weights, -center and -tangent),
steps 280-420 of stage 1 (the second block). Every step: its output's RMS, the correction's scale, and
of a correction taken, its size against the head's gradient, its cosine with the (centred) output per
position (radial) and its common part (the norm of its mean over the batch and positions over its RMS),
beside the head's. Every 2nd step the same for what it stepped on and for the exact gradient.
Run from the checkout: python bench/results/depth/gpt_trace_stage1.py"""
import sys, math
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import torch
import synthgrad.common.modes as modes
from bench.rules import train_rule
from synthgrad.common.config import RunConfig
from synthgrad.common.datasets import run_dataset
from synthgrad.coordinator.train import _resolve
torch.set_num_threads(1)
STAGE = int(sys.argv[1]) if len(sys.argv) > 1 else 1
LO, HI = 280, 420
cfg = _resolve(RunConfig(dataset="text", model="bench.models:small_gpt", bptt=64, batch_size=32, steps=HI, epochs=3,
                         sg_normalize=True, sg_replay=4, sg_correction_min_cosine=0.5,
                         sg_correction_weights=False, sg_correction_center=False, sg_correction_tangent=False))[0]
ds = run_dataset(cfg)
def radial(v, h):
    # mean over positions of cos(v_pos, centred h_pos)
    hc = h - h.mean(-1, keepdim=True)
    num = (v * hc).sum(-1); den = v.norm(dim=-1) * hc.norm(dim=-1) + 1e-30
    return float((num / den).mean())
def meanpart(v):
    return float(v.reshape(-1, v.shape[-1]).mean(0).norm() / (v.reshape(-1, v.shape[-1]).pow(2).sum(-1).mean().sqrt() + 1e-30))
orig = modes.Residual.local_gradient
def lg(self, step, h, labels, kept):
    state.pop("c", None)
    out = orig(self, step, h, labels, kept)
    if self.stage.stage == STAGE and LO <= step < HI:
        line = f"step {step} rms {float(h.detach().pow(2).mean().sqrt()):.3f} scale {self.parts.predictor.correction_scale():.3f}"
        if "c" in state:
            c, p = state["c"], state["prior"]
            line += (f" |c|/|head| {float(c.norm()/p.norm()):.2f} radial c {radial(c, h):+.3f} head {radial(p, h):+.3f}"
                     f" mean-part c {meanpart(c):.3f} head {meanpart(p):.3f}")
        print(line, flush=True)
    return out
modes.Residual.local_gradient = lg
orig_b = modes.bounded
state = {}
def bounded(c, prior):
    r = orig_b(c, prior)
    state["c"], state["prior"] = r, prior
    return r
modes.bounded = bounded
def note(i, step, h, labels, g, exact):
    if i == STAGE and LO <= step < HI:
        print(f"  probe {step}: |g| {float(g.norm()):.3e} |exact| {float(exact.norm()):.3e} cos {float((g*exact).sum()/(g.norm()*exact.norm())):+.3f} "
              f"radial g {radial(g, h):+.3f} exact {radial(exact, h):+.3f}  mean-part g {meanpart(g):.3f} exact {meanpart(exact):.3f}", flush=True)
r = train_rule("residual:10", cfg, ds, hop_delay=2, probe_every=2, on_probe=note)
