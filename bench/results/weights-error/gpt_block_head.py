"""gpt-1000-local-blockhead*.json: `local` on the small GPT (one stage per block, the default
layout) with the first stage's head (or every stage's: `all`) a transformer block of the model's
own shape, freshly initialised and trained as the head, then a norm and a read-out: a head that
asks its stage for what the next block's attention reads (the cut after the first block holds
most of local's gap, docs/results.md). A patch of the head, not an option.
Run from the checkout: python bench/results/weights-error/gpt_block_head.py [first|all] [seed]"""
import json, math, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import torch
from torch import nn
import bench.rules as br
from bench.models import _Block
from synthgrad.common.config import RunConfig
from synthgrad.common.datasets import run_dataset
from synthgrad.common.models import make_optimizer
from synthgrad.coordinator.train import _resolve

torch.set_num_threads(1)
which = sys.argv[1] if len(sys.argv) > 1 else "first"
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0


class BlockHead(nn.Module):
    decoder = None

    def __init__(self, width, classes, heads=4):
        super().__init__()
        self.net = nn.Sequential(_Block(width, heads), nn.LayerNorm(width), nn.Linear(width, classes))

    def forward(self, h):
        return self.net(h)


cfg = _resolve(RunConfig(dataset="text", model="bench.models:small_gpt", bptt=64, batch_size=32, steps=1000,
                         epochs=3, mode="local", seed=seed))[0]
ds = run_dataset(cfg)
original = br.Probe.__init__


def patched(self, stages, every, oracle, on_probe=None):
    original(self, stages, every, oracle, on_probe)
    for st in (stages[:1] if which == "first" else stages[:-1]):
        head = st.parts.head
        torch.manual_seed(cfg.seed + 17 * st.stage)
        head.model = BlockHead(128, cfg.classes)
        head.optimizer = make_optimizer(head.model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum)


br.Probe.__init__ = patched
r = br.train_rule("local", cfg, ds, hop_delay=2)
bits = r["test_loss"] / math.log(2)
print(which, "bits", round(bits, 4), "accuracy", r["test_accuracy"], "seconds", round(r["seconds"]))
out = Path(__file__).with_name(f"gpt-1000-local-blockhead-{which}{'' if seed == 0 else f'-s{seed}'}.json")
out.write_text(json.dumps({"which": which, "bits": bits, **{k: r[k] for k in ("test_accuracy", "test_loss", "seconds")}}))
