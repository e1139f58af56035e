"""The traces in gpt-1000-replay4-weights-*-trace.txt: the GPT run of gpt_trace.py at the bar of 0.3
(--sg-normalize --sg-replay 4), every 10th step, each stage's cosine with the exact gradient of what it
stepped on, on its output (act) and on its weights' gradients (weights), the head's alone on the
weights, and of a correction taken, its cosine with the exact correction on the output and on the
weights. Options as key=value after the script (e.g. sg_correction_weights=false).
Run from the checkout: python bench/results/depth/gpt_trace_weights.py [steps=1000] [option=value ...]"""
import sys, math
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import torch
import bench.rules as br
import synthgrad.common.parts as parts
from synthgrad.common.config import RunConfig
from synthgrad.common.datasets import run_dataset
from synthgrad.coordinator.train import _resolve
torch.set_num_threads(1)
extra = dict(a.split("=") for a in sys.argv[1:])
kw = dict(sg_normalize=True, sg_replay=4, sg_correction_min_cosine=0.3)
for k, v in extra.items():
    kw[k] = {"true": True, "false": False}.get(v, None) if v in ("true", "false") else type(kw.get(k, 0.0))(v) if k in kw else float(v)
steps = int(kw.pop("steps", 600))
cfg = _resolve(RunConfig(dataset="text", model="bench.models:small_gpt", bptt=64, batch_size=32, steps=steps, epochs=3, **kw))[0]
ds = run_dataset(cfg)
stages = {}
orig_watch = br.Probe.watch
def watch(self, i, st):
    stages[i] = st
    return orig_watch(self, i, st)
br.Probe.watch = watch
heads = {}
orig_grad = parts.Head.gradient
def grad(self, step, h, labels, x=None):
    g = orig_grad(self, step, h, labels, x)
    heads[self.stage] = g
    return g
parts.Head.gradient = grad
def cos(a, b):
    a = torch.cat([t.reshape(-1) for t in a]).double(); b = torch.cat([t.reshape(-1) for t in b]).double()
    return float(a @ b / (a.norm() * b.norm() + 1e-30))
acc = {}
def note(i, step, h, labels, g, exact):
    ps = [p for p in stages[i].parts.layers.module.parameters()]
    wg = torch.autograd.grad(h, ps, g.to(h.dtype), retain_graph=True)
    we = torch.autograd.grad(h, ps, exact.to(h.dtype), retain_graph=True)
    head = heads[i]
    wh = torch.autograd.grad(h, ps, head.to(h.dtype), retain_graph=True)
    took = (g - head).norm() > 1e-12
    row = (cos([g], [exact]), cos(wg, we), cos(wh, we))
    if took:
        wc = [a - b for a, b in zip(wg, wh)]; wt = [a - b for a, b in zip(we, wh)]
        row += (cos([g - head], [exact - head]), cos(wc, wt))
    print(f"stage {i} step {step} act {row[0]:+.3f} weights {row[1]:+.3f} head-weights {row[2]:+.3f}" +
          (f" corr act {row[3]:+.3f} corr weights {row[4]:+.3f}" if took else ""), flush=True)
r = br.train_rule("residual:10", cfg, ds, hop_delay=2, probe_every=10, on_probe=note)
print("bits", r["test_loss"] / math.log(2), r["sg_cosine"])
