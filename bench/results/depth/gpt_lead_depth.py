"""gpt-1000-local-leaddepth-*.json: `local` on the small GPT with each led head's lead made of
the next D layers (not one): per stage depths "D0,D1,...". A patch from before --head-lead-depth,
which gives the first stage's depth (the later leads one layer); "2,2,1" needs the patch.
Run from the checkout: python bench/results/depth/gpt_lead_depth.py 2,1,1 [seed] [steps]"""
import json, math, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import torch
from torch import nn
import bench.rules as br
import synthgrad.common.costs as costs
from synthgrad.common.config import RunConfig
from synthgrad.common.datasets import run_dataset
from synthgrad.common.models import build_units
from synthgrad.coordinator.train import _resolve

torch.set_num_threads(1)
depths = [int(d) for d in sys.argv[1].split(",")]
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
rule = sys.argv[4] if len(sys.argv) > 4 else "local"
led = sum(1 for d in depths if d > 0)
cfg = _resolve(RunConfig(dataset="text", model="bench.models:small_gpt", bptt=64, batch_size=32, steps=steps,
                         epochs=3, mode="local", seed=seed, head_next_layer=led, head_lr_scale=1.0))[0]
ds = run_dataset(cfg)
first_lead = 2  # stage 0 is the embedding and block 1: its next layer is unit 2


def build(self, cfg_, out_shape, seed_=0):
    if self.lead is None:
        return original(self, cfg_, out_shape, seed_)
    stage = self.lead - first_lead
    d = depths[stage]
    units = build_units(cfg_.replace(seed=costs.LEAD_SEED + seed_))
    lead = nn.Sequential(*units[self.lead:self.lead + d])
    print("stage", stage, "lead units", list(range(self.lead, self.lead + d)), flush=True)
    return costs.LocalHead(out_shape, cfg_.classes, self.pool, cfg_.per_position, self.depth, self.reconstructs,
                           self.scale_free, self.attention, self.hidden, self.side, lead, self.lead_is_output)


original = costs.HeadChoice.build
costs.HeadChoice.build = build
r = br.train_rule(rule, cfg, ds, hop_delay=2)
bits = r["test_loss"] / math.log(2)
print("depths", depths, "rule", rule, "bits", round(bits, 4), "accuracy", r["test_accuracy"], "seconds", round(r["seconds"]))
tag = "-".join(map(str, depths))
out = Path(__file__).with_name(f"gpt-{steps}-{rule.replace(':', '')}-leaddepth{tag}{'' if seed == 0 else f'-s{seed}'}.json")
out.write_text(json.dumps({"depths": depths, "seed": seed, "steps": steps, "rule": rule, "bits": bits,
                           **{k: r[k] for k in ("test_accuracy", "test_loss", "seconds")}}))
