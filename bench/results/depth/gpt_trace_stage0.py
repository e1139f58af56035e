"""The stage-0 trace in gpt-1000-replay4-bar0.5-stage0-trace.txt: the bar-0.5 GPT run of gpt_trace.py
to step 440, logging from step 360 stage 0's head gradient norm and output RMS every step, any
correction it took (norm, and the head prior's norm), and every 2nd step the exact gradient's norm
beside what it stepped on. Run from the checkout: python bench/results/depth/gpt_trace_stage0.py"""
import sys, math
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import torch
import synthgrad.common.modes as modes
import synthgrad.common.parts as parts
from bench.rules import train_rule
from synthgrad.common.config import RunConfig
from synthgrad.common.datasets import run_dataset
from synthgrad.coordinator.train import _resolve
torch.set_num_threads(1)
cfg = _resolve(RunConfig(dataset="text", model="bench.models:small_gpt", bptt=64, batch_size=32, steps=440, epochs=10**6,
                         sg_normalize=True, sg_replay=4, sg_correction_min_cosine=0.5))[0]
ds = run_dataset(cfg)
heads = {}
log = []
orig_grad = parts.Head.gradient
def grad(self, step, h, labels, x=None):
    g = orig_grad(self, step, h, labels, x)
    heads[id(g)] = (self.stage, step)
    if self.stage == 0 and step >= 360:
        log.append(("head", self.stage, step, float(g.norm()), float(h.float().pow(2).mean().sqrt())))
    return g
parts.Head.gradient = grad
orig_b = modes.bounded
def bounded(c, prior):
    st = heads.get(id(prior), (-1, -1))
    if st[0] == 0 and st[1] >= 360:
        log.append(("corr", st[0], st[1], float(c.norm()), float(prior.norm())))
    return orig_b(c, prior)
modes.bounded = bounded
ex = {}
def note(i, step, h, labels, g, exact):
    if i == 0 and step >= 360:
        log.append(("exact", i, step, float(exact.norm()), float(g.norm())))
r = train_rule("residual:10", cfg, ds, hop_delay=2, probe_every=2, on_probe=note)
for row in log:
    print(row)
