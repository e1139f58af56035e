"""--device and --precision: the device list and its errors, bf16 on the wire (half the bytes),
and bf16 runs of every mode that reproduce bf16 backprop where the fp32 ones reproduce fp32
backprop (in one process: tests/test_stage.py). CUDA itself is exercised by tests/test_cuda.py, where a GPU is present."""
from __future__ import annotations

import pytest
import torch

from synthgrad.common import wire
from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.costs import Helpers
from synthgrad.common.devices import Compute, DeviceError, check_device, stage_device
from synthgrad.common.files import load_model_state
from synthgrad.common.modes import STAGE_WORKER_MODES
from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, assert_same_evaluation, assert_states_close, run
from tests.test_stage import chain


# ---------------------------------------------------------------------------- the device list
@pytest.mark.parametrize("device, words", [
    ("gpu", "each entry must be cpu, cuda or cuda:N"),
    ("cuda:x", "each entry must be cpu, cuda or cuda:N"),
    ("cpu:0", "each entry must be cpu, cuda or cuda:N"),
    ("cpu,cpu", "lists 2 devices, but the run has 4 stages"),
])
def test_a_device_list_that_cannot_work_is_refused(device, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig(layers=(784, 32, 32, 32, 10), device=device).validate()


def test_a_device_list_gives_each_stage_its_own():
    cfg = RunConfig(layers=(784, 32, 32, 10), device="cpu, cpu ,cpu").validate()
    assert [stage_device(cfg.device, s) for s in range(3)] == ["cpu", "cpu", "cpu"]
    assert RunConfig(mode="backprop", layers=(784, 32, 32, 10), device="cpu,cpu").validate()  # backprop: the first


def test_a_bare_cuda_spreads_the_stages_over_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [stage_device("cuda", s) for s in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert stage_device("cuda", 0, local_index=3) == "cuda:1"  # torchrun: LOCAL_RANK
    assert stage_device("cuda:1,cuda:0", 1) == "cuda:0"  # a list is taken as written


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="unknown --precision 'fp16'"):
        RunConfig(precision="fp16").validate()


def test_a_device_this_host_lacks_stops_the_run_before_anything_starts(tmp_path):
    """cuda:99 exists on no machine: the error names it (the reason differs with and without
    CUDA), and no run folder is made."""
    with pytest.raises(DeviceError, match="--device cuda:99: this host has"):
        check_device("cuda:99")
    from synthgrad.coordinator.train import train
    cfg = RunConfig(dataset="synthetic", layers=(784, 32, 10), device="cpu,cuda:99", out=str(tmp_path / "run"))
    with pytest.raises(DeviceError, match=r"--device \(stage 1\) cuda:99"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_pipeline_ranks_on_mixed_kinds_of_device_are_refused(tmp_path):
    from synthgrad.coordinator.train import prepare
    cfg = RunConfig(mode="pipeline", dataset="synthetic", layers=(784, 32, 10), device="cpu,cuda:0")
    with pytest.raises(DeviceError, match="every rank on the same kind of device"):
        prepare(cfg)


def test_compare_checks_every_contenders_devices_before_the_first_runs(tmp_path):
    """A device fault of the second contender is found before the first one (backprop, on the
    list's first device, which exists) trains."""
    import synthgrad
    base = RunConfig(dataset="synthetic", layers=(784, 32, 10), device="cpu,cuda:99", out=str(tmp_path / "cmp"))
    with pytest.raises(ConfigError, match=r"contender 'local': --device \(stage 1\) cuda:99"):
        synthgrad.compare(base, "backprop,local,locked", 0.5)
    assert not (tmp_path / "cmp" / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the words for a host without CUDA")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(DeviceError, match="no usable CUDA device.*use --device cpu"):
        check_device("cuda")


# ---------------------------------------------------------------------------- bf16 on the wire
def test_bf16_activations_travel_in_half_the_bytes():
    h = torch.randn(64, 256)
    frames32 = wire.encode(wire.Activation(0, 0, wire.Phase.TRAIN, False, Compute.of("cpu", "fp32").leave(h), None))
    frames16 = wire.encode(wire.Activation(0, 0, wire.Phase.TRAIN, False, Compute.of("cpu", "bf16").leave(h), None))
    assert memoryview(frames32[1]).nbytes == 64 * 256 * 4
    assert memoryview(frames16[1]).nbytes == 64 * 256 * 2
    back = wire.decode(frames16)
    assert back.h.dtype == torch.bfloat16
    # the rounding is bf16's: 8 significant bits, a relative error of at most 2^-8
    torch.testing.assert_close(back.h.float(), h, rtol=2 ** -8, atol=0)


@pytest.mark.parametrize("mode", STAGE_WORKER_MODES)
def test_every_mode_trains_in_bf16(mode):
    """Whatever the rule, what leaves a stage is bf16 and what it keeps (weights, predictors,
    heads) float32; and the weights move."""
    cfg = RunConfig(mode=mode, layers=(784, 32, 32, 10), true_grad_every=2, precision="bf16",
                    bootstrap=mode == "unlocked")
    stages = chain(cfg)
    before = [p.detach().clone() for s in stages for p in s.module.parameters()]
    torch.manual_seed(3)
    for step in range(6):
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        true_grad = cfg.true_grad_at(step)
        h = x
        for s in stages[:-1]:
            h = s.forward(step, h, y, true_grad)
            assert h.dtype == torch.bfloat16 and h.device.type == "cpu"
            dx = s.local_update(step)
            assert dx is None or dx.dtype == torch.bfloat16
        _, g = stages[-1].last_step(step, h, y, true_grad)
        for s in reversed(stages[:-1]):
            if g is None:
                break
            assert g.dtype == torch.bfloat16
            g = s.receive_grad(step, g, true_grad)
    after = [p for s in stages for p in s.module.parameters()]
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    for s in stages:
        for helper in s.parts.helpers():
            if hasattr(helper, "model"):
                assert all(p.dtype == torch.float32 for p in helper.model.parameters())
    logits = stages[-1].eval_forward(stages[0].eval_forward(torch.randn(4, 1, 28, 28)))
    assert logits.shape == (4, 10)


# ---------------------------------------------------------------------------- real runs
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bf16_runs_reproduce_bf16_backprop_and_send_half_the_bytes(tiny_cfg, tmp_path):
    """Four locked stage processes and a one-microbatch pipeline, both in bf16, end where bf16
    backprop ends (bitwise on the machines measured, natively and under ATEN_CPU_CAPABILITY=
    default: the same kernels on the same aligned operands, as in fp32; tests/helpers.py), and
    every gradient that travels back is bf16: 2 bytes a value."""
    cfg = tiny_cfg.replace(precision="bf16", **EXACT_SGD)
    ref_dir, ref = run(cfg, mode="backprop", backprop_threads=1, out=str(tmp_path / "bp"))
    got_dir, got = run(cfg, mode="locked", out=str(tmp_path / "locked"))
    pp_dir, pp = run(cfg, mode="pipeline", schedule="gpipe", microbatches=1, stages=2, out=str(tmp_path / "pp"))
    assert ref["steps"] == got["steps"] == pp["steps"] == 20
    a = load_model_state(ref_dir)
    for other, summary in ((load_model_state(got_dir), got), (load_model_state(pp_dir), pp)):
        assert_states_close(a, other, **LOCKED_EQUALS_BACKPROP)
        assert_same_evaluation(ref, summary)
    values_back = 3 * cfg.batch_size * 64  # three stage boundaries of 64 units, every step
    assert 2 * values_back <= got["bytes_backward_per_step"] < 2 * values_back * 1.02  # + headers
    assert got["config"]["precision"] == "bf16"


def test_a_stage_started_elsewhere_checks_its_own_hosts_device(tmp_path):
    """A hand-started or torchrun stage gets --device in START; on a host without that device its
    set-up fails with the words a local run gives (run_worker reports them to the coordinator)."""
    from synthgrad.workers.worker import LayerWorker, WorkerSpec
    cfg = RunConfig(dataset="synthetic", layers=(784, 32, 10), mode="locked", device="cpu,cuda:99",
                    input_shape=(1, 28, 28), num_classes=10).validate()
    start = wire.Start(config=cfg, run_dir=str(tmp_path), core=-1, total_steps=10, helpers=Helpers())
    for stage, outcome in ((0, None), (1, r"--device cuda:99: this host has")):
        worker = LayerWorker(WorkerSpec(stage, "tcp://127.0.0.1:9", connect_timeout=1.0))
        try:
            if outcome is None:
                worker.setup(start)
                assert worker.parts.logic.dev.device == torch.device("cpu")
            else:
                with pytest.raises(DeviceError, match=outcome):
                    worker.setup(start)
        finally:
            worker.close()
