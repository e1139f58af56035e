"""gpt-1000-local-headnext-sync*.json: `local` on the small GPT with --head-next-layer 1, the
first stage's lead loaded with the second stage's current block every M steps (a stale copy
of the layer it feeds, instead of a fresh one trained as the head alone): does the head gain
from being the downstream layer as it is? A patch, not an option.
Run from the checkout: python bench/results/depth/gpt_lead_sync.py M [seed]"""
import json, math, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import torch
import bench.rules as br
from synthgrad.common.config import RunConfig
from synthgrad.common.datasets import run_dataset
from synthgrad.coordinator.train import _resolve

torch.set_num_threads(1)
every = int(sys.argv[1])
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
cfg = _resolve(RunConfig(dataset="text", model="bench.models:small_gpt", bptt=64, batch_size=32, steps=1000,
                         epochs=3, mode="local", seed=seed, head_next_layer=1))[0]
ds = run_dataset(cfg)
original = br.Probe.__init__


def patched(self, stages, every_, oracle, on_probe=None):
    original(self, stages, every_, oracle, on_probe)
    head, block = stages[0].parts.head, stages[1].parts.layers.module[0]
    lead = head.model.net[1]
    assert type(lead) is type(block)
    train = head.gradient
    calls = [0]

    def gradient(step, h, labels, x=None):
        if calls[0] % every == 0:
            lead.load_state_dict(block.state_dict())
        calls[0] += 1
        return train(step, h, labels, x)

    head.gradient = gradient


br.Probe.__init__ = patched
r = br.train_rule("local", cfg, ds, hop_delay=2)
bits = r["test_loss"] / math.log(2)
print("every", every, "bits", round(bits, 4), "accuracy", r["test_accuracy"], "seconds", round(r["seconds"]))
out = Path(__file__).with_name(f"gpt-1000-local-headnext-sync{every}{'' if seed == 0 else f'-s{seed}'}.json")
out.write_text(json.dumps({"every": every, "seed": seed, "bits": bits,
                           **{k: r[k] for k in ("test_accuracy", "test_loss", "seconds")}}))
