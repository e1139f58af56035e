"""gpt-1000-local-headlr*.json: `local` on the small GPT (the defaults: the first head led by a
copy of the next block) with the heads' learning rate F times the layers'. A patch from before
--head-lr-scale, which does the same (`bench/rules.py ... --rules local --set head_lr_scale=F`).
Run from the checkout: python bench/results/depth/gpt_head_lr.py F [seed]"""
import json, math, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import torch
import bench.rules as br
import synthgrad.common.parts as parts
from synthgrad.common.config import RunConfig
from synthgrad.common.datasets import run_dataset
from synthgrad.coordinator.train import _resolve

torch.set_num_threads(1)
factor = float(sys.argv[1])
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
cfg = _resolve(RunConfig(dataset="text", model="bench.models:small_gpt", bptt=64, batch_size=32, steps=1000,
                         epochs=3, mode="local", seed=seed, head_lr_scale=1.0))[0]  # the patch scales it
ds = run_dataset(cfg)
original = parts.Head.build.__func__


def build(cls, choice, cfg_, out_shape, seed_, device, share, stage=0):
    return original(cls, choice, cfg_.replace(lr=cfg_.lr * factor), out_shape, seed_, device, share, stage)


parts.Head.build = classmethod(build)
r = br.train_rule("local", cfg, ds, hop_delay=2)
bits = r["test_loss"] / math.log(2)
print("factor", factor, "bits", round(bits, 4), "seconds", round(r["seconds"]))
Path(__file__).with_name(f"gpt-1000-local-headlr{factor:g}{'' if seed == 0 else f'-s{seed}'}.json").write_text(
    json.dumps({"factor": factor, "seed": seed, "bits": bits, **{k: r[k] for k in ("test_accuracy", "test_loss", "seconds")}}))
