"""The trace in gpt-1000-replay4-bar*-trace.txt: bench/rules.py's in-process GPT run (residual:10,
--sg-normalize --sg-replay 4, bar from argv) with every 25th step's output RMS and the cosine and
norm ratio of what each stage stepped on against the exact gradient. Run from the checkout:
python bench/results/depth/gpt_trace.py 0.5"""
import sys, json, math
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import torch
from bench.rules import train_rule
from synthgrad.common.config import RunConfig
from synthgrad.common.datasets import run_dataset
from synthgrad.coordinator.train import _resolve
torch.set_num_threads(1)
bar = float(sys.argv[1])
cfg = _resolve(RunConfig(dataset="text", model="bench.models:small_gpt", bptt=64, batch_size=32, steps=1000, epochs=10**6,
                         sg_normalize=True, sg_replay=4, sg_correction_min_cosine=bar))[0]
ds = run_dataset(cfg)
rows = []
def note(i, step, h, labels, g, exact):
    a, b = g.reshape(-1).double(), exact.reshape(-1).double()
    rows.append((i, step, float(h.float().pow(2).mean().sqrt()), float(a @ b / (a.norm() * b.norm() + 1e-30)),
                 float(a.norm() / (b.norm() + 1e-30))))
r = train_rule("residual:10", cfg, ds, hop_delay=2, probe_every=25, on_probe=note)
print("bits", r["test_loss"] / math.log(2), r["sg_cosine"])
for i, step, rms, cos, ratio in rows:
    if step % 100 == 0:
        print(f"stage {i} step {step}: h rms {rms:.3f}  stepped-on vs exact cos {cos:+.3f}  norm ratio {ratio:.2f}")
