"""Where a stage computes (`--device`) and in what precision (`--precision`), as one object
every process kind uses: stage workers, the single-process reference and the pipeline contender.

Tensors always cross the wire through host memory: a stage moves what it receives onto its
device and what it sends back to the CPU, in the wire's dtype (bf16 under `--precision bf16`:
half the bytes of float32). Under bf16 the layers run in torch.autocast; weights, optimiser
state, predictors and local heads stay float32.

The syntax is checked by RunConfig.validate (common/validation.py, which imports no torch); whether
a device exists is checked where it will be used (`check_device`): by the launcher before
anything starts for the stages it starts itself, and by each hand-started or torchrun stage on
its own host.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.modes import Mode


class DeviceError(ConfigError):
    """A device this host does not have."""


def stage_device(spec: str, stage: int, local_index: Optional[int] = None) -> str:
    """The device of stage `stage`: its entry in a per-stage list, else the one entry. A bare
    `cuda` becomes cuda:K with K = `local_index` (torchrun's LOCAL_RANK) or the stage number,
    modulo the GPUs this host has, so the stages of one host spread over its GPUs."""
    parts = [p.strip() for p in spec.split(",")]
    name = parts[stage] if len(parts) > 1 else parts[0]
    if name != "cuda":
        return name
    count = torch.cuda.device_count()
    if count == 0:
        return name  # check_device says what is wrong
    return f"cuda:{(stage if local_index is None else local_index) % count}"


def check_device(name: str, what: str = "--device") -> torch.device:
    """The device, or DeviceError saying why it cannot be used on this host."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + (" (built without CUDA)" if torch.version.cuda is None else "")
            raise DeviceError(f"{what} {name}: this host has no usable CUDA device ({build}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{what} {name}: this host has {count} CUDA device{'s' if count != 1 else ''} "
                              f"(cuda:0..cuda:{count - 1})")
    return device


def wire_dtype(precision: str) -> torch.dtype:
    """The dtype of activations and gradients between stages under `precision`."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def check_run_devices(cfg: RunConfig) -> None:
    """Every stage's device, on this host, before any process starts (a run that starts its
    stages here). DeviceError names the stage when the device list names several."""
    stages = 1 if cfg.mode == Mode.BACKPROP else len(cfg.stage_groups)
    per_stage = "," in cfg.device
    names = [stage_device(cfg.device, stage) for stage in range(stages)]
    pipeline = cfg.mode == Mode.PIPELINE  # its ranks send to each other directly, not via host memory
    if pipeline and len({n.split(":")[0] for n in names}) > 1:
        raise DeviceError(f"mode pipeline needs every rank on the same kind of device (gloo joins CPU "
                          f"ranks, nccl GPU ranks), got {', '.join(names)}")
    for stage, name in enumerate(names):
        check_device(name, f"--device (stage {stage})" if per_stage else "--device")
    shared = sorted({n for n in names if n.startswith("cuda") and names.count(n) > 1})
    if pipeline and shared:
        raise DeviceError(f"mode pipeline on CUDA joins its ranks with nccl, which needs one GPU per "
                          f"rank; {', '.join(shared)} would hold several ({', '.join(names)}): "
                          f"give --stages at most the GPUs this host has")


@dataclass(frozen=True)
class Compute:
    """One process's device and precision: where its layers live, the autocast region they run
    in, and how tensors come off and go onto the wire."""
    device: torch.device
    precision: str = "fp32"

    @classmethod
    def of(cls, name: str, precision: str = "fp32") -> Compute:
        """The device checked; on CUDA it also becomes this process's current device (so that a
        user's layer that makes tensors on "cuda" makes them on this stage's GPU)."""
        device = check_device(name)
        if device.type == "cuda":
            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                raise DeviceError(f"--precision bf16: {torch.cuda.get_device_name(device)} ({name}) "
                                  f"does not support bf16; use --precision fp32")
            torch.cuda.set_device(device)
        return cls(device, precision)

    @property
    def wire_dtype(self) -> torch.dtype:
        return wire_dtype(self.precision)

    def autocast(self):
        """The region the layers (and the loss) run in."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def arrive(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor from the wire or the data, on this device (its dtype unchanged)."""
        return t if t.device == self.device else t.to(self.device, non_blocking=False)

    def leave(self, t: torch.Tensor) -> torch.Tensor:
        """A floating-point tensor for the wire: detached, wire dtype, host memory."""
        t = t.detach()
        if t.is_floating_point() and t.dtype != self.wire_dtype:
            t = t.to(self.wire_dtype)
        return t.cpu()

    def synchronize(self) -> None:
        """Wait for queued device work (timings measure work done, not work queued)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


CPU = Compute(torch.device("cpu"))


def device_of(module: torch.nn.Module, default: torch.device) -> str:
    """Where `module` computes, as torch names it ("cpu", "cuda:0"): the device its parameters
    are on (a module without any, its buffers'; without those either, `default`). What a
    worker reports, so a run that asked for a device shows where it really ran."""
    for t in module.parameters():
        return str(t.device)
    for t in module.buffers():
        return str(t.device)
    return str(default)
