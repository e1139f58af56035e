"""A run's trained network comes back as one plain PyTorch module: from Python, and written by
`launch.py export` to a file that loads with torch alone."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import synthgrad
from synthgrad.common.config import ConfigError
from synthgrad.common.data import eval_batches
from synthgrad.common.datasets import load_dataset
from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, run
from tests.zygote import run_launch


def _accuracy(model: torch.nn.Module, cfg) -> float:
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.synthetic_train, cfg.synthetic_test)
    correct = total = 0
    with torch.no_grad():
        for x, y in eval_batches(ds.test, 256):
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.shape[0])
    return correct / total


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_export_gives_the_network_the_run_evaluated(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(backprop_threads=1, **EXACT_SGD)
    bp_dir, bp = run(cfg, mode="backprop", out=str(tmp_path / "bp"))
    model = synthgrad.trained_model(bp_dir)
    assert isinstance(model, torch.nn.Sequential) and not model.training
    assert _accuracy(model, cfg) == bp["test_accuracy"]  # the same network the run evaluated
    locked_dir, _ = run(cfg, mode="locked", stages=2, out=str(tmp_path / "locked"))  # units in two files
    locked = synthgrad.trained_model(locked_dir)
    expected, got = model.state_dict(), locked.state_dict()
    assert list(got) == list(expected)  # the same tensors, by name and in order
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **LOCKED_EQUALS_BACKPROP, msg=name)
    out = tmp_path / "export" / "model.pt"
    done = run_launch("export", str(locked_dir), str(out), timeout=60)
    assert done.returncode == 0 and "weights_only=False" in done.stdout, done.stderr
    # torch alone, in a clean interpreter: no synthgrad module is needed to load it
    check = ("import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
             "assert not any(n.split('.')[0] in ('synthgrad', 'common', 'workers', 'coordinator') for n in sys.modules); "
             "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    loaded = subprocess.run([sys.executable, "-I", "-c", check, str(out)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["Sequential", str(sum(p.numel() for p in locked.parameters()))]
    weights = synthgrad.export(locked_dir, tmp_path / "w.pt", state_dict_only=True)
    saved = torch.load(weights, weights_only=True)
    assert list(saved) == list(got) and all(torch.equal(saved[n], got[n]) for n in got)


def test_export_says_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        synthgrad.trained_model(tmp_path)
    cfg = synthgrad.RunConfig(mode="locked", dataset="synthetic")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(ConfigError, match="has not finished"):
        synthgrad.trained_model(tmp_path)
    torch.save({"stage": 0, "units": {0: {}}}, tmp_path / "stage0.pt")  # one host's stage only
    with pytest.raises(ConfigError, match=r"no weights for layers \[1, 2, 3\]"):
        synthgrad.trained_model(tmp_path)
