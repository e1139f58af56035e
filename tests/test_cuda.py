"""The CUDA path, on a host that has a GPU (skipped elsewhere: CI has none; tests/test_devices.py
checks the same code on the CPU). Locked stages on the GPU reproduce backprop on the GPU, bf16
sends half the bytes, and the pipeline contender runs its ranks over nccl."""
from __future__ import annotations

import pytest
import torch

from synthgrad.common.files import load_model_state
from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, assert_same_evaluation, assert_states_close, run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_locked_stages_on_the_gpu_reproduce_backprop_on_the_gpu(tiny_cfg, tmp_path, precision):
    """The same kernels on the same shapes in the same order on one GPU (cuBLAS picks its
    algorithm by shape, and TF32 is off for matmuls by default): the tolerance is the CPU's."""
    cfg = tiny_cfg.replace(device="cuda", precision=precision, **EXACT_SGD)
    ref_dir, ref = run(cfg, mode="backprop", out=str(tmp_path / "bp"))
    got_dir, got = run(cfg, mode="locked", out=str(tmp_path / "locked"))
    assert got["steps"] == ref["steps"] == 20
    assert_states_close(load_model_state(ref_dir), load_model_state(got_dir), **LOCKED_EQUALS_BACKPROP)
    assert_same_evaluation(ref, got)
    width = 2 if precision == "bf16" else 4
    values_back = 3 * cfg.batch_size * 64
    assert width * values_back <= got["bytes_backward_per_step"] < width * values_back * 1.02


@pytest.mark.timeout(300)
def test_unlocked_and_local_train_on_the_gpu(tiny_cfg):
    for mode in ("unlocked", "local"):
        _, s = run(tiny_cfg, mode=mode, device="cuda", precision="bf16", steps=60, epochs=2,
                   true_grad_every=5, lr=5e-3)
        assert s["status"] == "done" and s["test_accuracy"] > 0.3, (mode, s["evals"])


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs one GPU per pipeline rank")
def test_pipeline_ranks_on_two_gpus(tiny_cfg, tmp_path):
    _, s = run(tiny_cfg, mode="pipeline", stages=2, device="cuda:0,cuda:1", out=str(tmp_path / "pp"))
    assert s["status"] == "done" and s["steps"] == 20
