"""Which option values can run: RunConfig.validate() applies these checks, one function per
option group, before any process starts, and each error names the option and what to change.

Apart from common/config.py so that declaring the options loads nothing: the registries of
models, data sets and placements (they import torch and psutil) are read only by the check of
the names that choose them, when a config is validated.
"""
from __future__ import annotations

import importlib.util
import math
import re
from typing import TYPE_CHECKING, Callable, Optional

from synthgrad.common.imports import is_import_path
from synthgrad.common.modes import CORRECTION_GAINS, HEAD_FILLS, SG_PRIORS, STAGE_WORKER_MODES, Mode, spoken

if TYPE_CHECKING:
    from synthgrad.common.config import RunConfig

SCHEDULES = ("gpipe", "1f1b")
SG_MODELS = ("linear", "lowrank", "mlp")
OPTIMIZERS = ("adam", "sgd")
TRANSPORTS = ("ipc", "tcp")
PRECISIONS = ("fp32", "bf16")  # common/devices.py says what each does
MAX_SAMPLE_DIMS = 7  # a message's tensor has at most 8 dimensions (common/wire.py), the batch's included
_DEVICE_ENTRY = re.compile(r"^(cpu|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def within(cfg: RunConfig, name: str, lo: float, hi: float, lo_open: bool = False) -> None:
    """A finite number in [lo, hi] ((lo, hi] with lo_open); the message names the option."""
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    need(ok, f"--{name.replace('_', '-')} must be a number {'>' if lo_open else '>='} {lo:g} "
             f"and <= {hi:g}, got {v!r}")


def device_syntax_problem(spec: str, num_stages: Optional[int]) -> Optional[str]:
    """Why `spec` is not a valid --device for a run of `num_stages` stages (None: it is).
    Whether the device exists is asked where it is used (common/devices.py check_device)."""
    parts = [p.strip() for p in spec.split(",")]
    bad = [p for p in parts if not _DEVICE_ENTRY.match(p)]
    if bad:
        return f"--device {spec!r}: each entry must be cpu, cuda or cuda:N (not {', '.join(map(repr, bad))})"
    if len(parts) > 1 and num_stages is not None and len(parts) != num_stages:
        return (f"--device lists {len(parts)} devices, but the run has {num_stages} stages: give one "
                f"device for every stage, or one per stage")
    return None


# ---------------------------------------------------------------------------- option groups
def check_model(cfg: RunConfig) -> None:
    """Model and update rule: the loss, the model and the options only some rules take."""
    need(cfg.loss == "cross_entropy" or is_import_path(cfg.loss),
         f"unknown --loss {cfg.loss!r}: cross_entropy, or your own as package.module:function")
    from synthgrad.common.models import BUILT_IN_MODELS as MODELS  # the registry (imports torch: here only)
    need(cfg.model in MODELS or is_import_path(cfg.model),
         f"unknown model {cfg.model!r}: choose {' or '.join(MODELS)}, or give your own as "
         f"package.module:factory (a function returning an nn.Sequential or a list of modules)")
    need(cfg.split_at is None or (cfg.groups is None and cfg.stages is None),
         "give one of --stages (split by cost), --groups (layers per stage) and --split-at (by name)")
    need(not cfg.resume or cfg.mode.on_stage_workers,
         f"--resume continues {spoken(STAGE_WORKER_MODES)} runs, not {cfg.mode}")


def check_layers(cfg: RunConfig) -> None:
    """--layers of the built-in MLP, against the data once the run has read it."""
    if cfg.model != "mlp":
        return
    need(len(cfg.layers) >= 2, "--layers needs at least an input and an output size, e.g. 784,256,10")
    need(all(int(s) > 0 for s in cfg.layers), f"--layers sizes must be positive, got {cfg.layers}")
    if cfg.input_shape is not None:  # known once the run has read the data's header
        shape, size = cfg.sample_shape, math.prod(cfg.sample_shape)
        need(cfg.layers[0] == size, f"--layers must start with {size} (the {cfg.dataset} samples' "
                                    f"{'x'.join(map(str, shape))} values), got {cfg.layers[0]}")
    if cfg.num_classes is not None:
        need(cfg.layers[-1] == cfg.classes,
             f"--layers must end with {cfg.classes} ({cfg.dataset}'s classes), got {cfg.layers[-1]}")


def check_data(cfg: RunConfig) -> None:
    """The data set, its shapes once read, stream and generated data, evaluation."""
    from synthgrad.common.datasets import BUILTIN as DATASETS  # the registry (imports torch: here only)
    need(cfg.dataset in DATASETS or is_import_path(cfg.dataset),
         f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}, or give your own as "
         f"package.module:function returning (train, test) map-style datasets")
    need(cfg.input_shape is None or (1 <= len(cfg.input_shape) <= MAX_SAMPLE_DIMS
                                     and all(int(d) > 0 for d in cfg.input_shape)),
         f"a sample must have 1 to {MAX_SAMPLE_DIMS} dimensions of positive size, got {cfg.input_shape}")
    need(cfg.num_classes is None or cfg.num_classes >= 2, f"num_classes must be at least 2, got {cfg.num_classes}")
    need(cfg.bptt >= 1, f"--bptt must be at least 1 (positions per window), got {cfg.bptt}")
    need(cfg.copy_length >= 1, f"--copy-length must be at least 1, got {cfg.copy_length}")
    need(cfg.copy_repeats >= 1, f"--copy-repeats must be at least 1, got {cfg.copy_repeats}")
    need(cfg.text_chars is None or cfg.text_chars >= 2, "--text-chars must be at least 2")
    need(cfg.synthetic_train >= cfg.batch_size, "--synthetic-train must hold at least one batch")
    need(cfg.synthetic_test >= 1, "--synthetic-test must be at least 1")
    need(cfg.eval_samples is None or cfg.eval_samples >= 1, "--eval-samples must be at least 1")
    need(cfg.eval_every is None or cfg.eval_every >= 1, "--eval-every must be at least 1")


def check_schedule(cfg: RunConfig) -> None:
    """Batch size and run length."""
    need(cfg.batch_size >= 2, "--batch-size must be at least 2 (batch norm needs two samples)")
    need(cfg.batch_size <= 1 << 20, "--batch-size must be at most 1048576")
    need(cfg.epochs >= 1, "--epochs must be at least 1")
    need(cfg.steps is None or cfg.steps >= 1, "--steps must be at least 1")


def check_optimiser(cfg: RunConfig) -> None:
    """The layers' and the synthetic-gradient models' optimisers."""
    need(cfg.optimizer in OPTIMIZERS and cfg.sg_optimizer in OPTIMIZERS,
         f"optimizers must be one of {', '.join(OPTIMIZERS)}")
    within(cfg, "lr", 0, 100, lo_open=True)
    within(cfg, "momentum", 0, 1)


def check_synthetic(cfg: RunConfig) -> None:
    """Synthetic gradients: the predictor, its training and how far a stage trusts it."""
    need(cfg.sg_model in SG_MODELS,
         f"unknown synthetic-gradient model {cfg.sg_model!r}; choose one of {', '.join(SG_MODELS)}")
    within(cfg, "sg_lr", 0, 100, lo_open=True)
    within(cfg, "sg_update_lr_scale", 0, 100)
    within(cfg, "sg_discount", 0, 1)
    within(cfg, "sg_min_cosine", 0, 1)
    within(cfg, "sg_correction_min_cosine", 0, 1)
    within(cfg, "sg_learn_weights", 0, 1)
    within(cfg, "sg_budget", 0, 10, lo_open=True)
    need(type(cfg.sg_replay) is int, f"--sg-replay must be a whole number, got {cfg.sg_replay!r}")
    need(type(cfg.sg_correction_weights_every) is int,
         f"--sg-correction-weights-every must be a whole number, got {cfg.sg_correction_weights_every!r}")
    within(cfg, "sg_correction_weights_every", 1, 1000)
    within(cfg, "sg_replay", 0, 64)
    need(cfg.true_grad_every >= 1, "--true-grad-every must be at least 1")
    need(cfg.sg_hidden is None or cfg.sg_hidden >= 1, "--sg-hidden must be at least 1")
    if cfg.head_depth is not None:
        within(cfg, "head_depth", 0, 8)
    within(cfg, "head_reconstruct", 0, 1000)
    within(cfg, "head_budget", 0, 10)
    if cfg.head_lr_scale is not None:
        within(cfg, "head_lr_scale", 0, 1000, lo_open=True)
    need(cfg.head_next_layer is None or (type(cfg.head_next_layer) is int and cfg.head_next_layer >= 0),
         f"--head-next-layer must be a whole number of stages, 0 or more, got {cfg.head_next_layer!r}")
    need(type(cfg.head_lead_depth) is int and cfg.head_lead_depth >= 1,
         f"--head-lead-depth must be a whole number of layers, 1 or more, got {cfg.head_lead_depth!r}")
    for name in ("head_side", "head_narrowest"):
        need(type(getattr(cfg, name)) is int, f"--{name.replace('_', '-')} must be a whole number, "
                                               f"got {getattr(cfg, name)!r}")
        within(cfg, name, 1, 64)
    need(cfg.head_fill in HEAD_FILLS, f"unknown --head-fill {cfg.head_fill!r}; choose one of {', '.join(HEAD_FILLS)}")
    need(cfg.sg_correction_gain in CORRECTION_GAINS, f"unknown --sg-correction-gain {cfg.sg_correction_gain!r}; "
                                                     f"choose one of {', '.join(CORRECTION_GAINS)}")
    need(cfg.sg_correction_gain == "fit" or cfg.sg_correction_weights,
         "--sg-correction-gain direction is measured on the layers' gradients: it needs --sg-correction-weights")
    need(cfg.sg_prior in SG_PRIORS, f"unknown --sg-prior {cfg.sg_prior!r}; choose one of {', '.join(SG_PRIORS)}")
    rule = cfg.stage_rule
    need(not cfg.bootstrap or (rule is not None and rule.uses_predictor),
         "--bootstrap trains synthetic-gradient models on each other: only mode unlocked has them")


def check_pipeline(cfg: RunConfig) -> None:
    """mode=pipeline: microbatches and schedule."""
    need(cfg.schedule in SCHEDULES,
         f"unknown pipeline schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    need(cfg.microbatches >= 1, "--microbatches must be at least 1")
    if cfg.mode != Mode.PIPELINE:
        return
    need(cfg.batch_size % cfg.microbatches == 0,
         f"--microbatches {cfg.microbatches} must divide --batch-size {cfg.batch_size}")
    need(cfg.batch_size // cfg.microbatches >= 2, "pipeline microbatches need at least two samples each (batch norm)")
    need(cfg.schedule != "1f1b" or cfg.stages_auto or cfg.microbatches >= len(cfg.stage_groups),
         f"--schedule 1f1b needs --microbatches >= stages ({len(cfg.stage_groups)}); "
         f"raise --microbatches or use --schedule gpipe")


def check_processes(cfg: RunConfig) -> None:
    """Processes and transport, as far as they do not depend on the number of stages."""
    from synthgrad.common.placement import PLACEMENTS  # the registry (imports psutil: here only)
    need(cfg.placement in PLACEMENTS,
         f"unknown --placement {cfg.placement!r}; choose one of {', '.join(PLACEMENTS)}")
    need(cfg.precision in PRECISIONS, f"unknown --precision {cfg.precision!r}; choose one of {', '.join(PRECISIONS)}")
    need(cfg.transport in TRANSPORTS, f"unknown transport {cfg.transport!r}; choose one of {', '.join(TRANSPORTS)}")
    need(cfg.threads is None or (len(cfg.threads) >= 1 and all(t >= 1 for t in cfg.threads)),
         f"--threads entries must be at least 1, got {cfg.threads}")
    need(cfg.replicas is None or (len(cfg.replicas) >= 1 and all(r >= 1 for r in cfg.replicas)),
         f"--replicas entries must be at least 1, got {cfg.replicas}")
    need(cfg.queue_depth >= 1, "--queue-depth must be at least 1")


def check_limits(cfg: RunConfig) -> None:
    """Limits, timeouts, checkpoints, resume and restarts."""
    need(1 <= cfg.max_message_mb <= 1 << 16, "--max-message-mb must be at least 1" if cfg.max_message_mb < 1
         else "--max-message-mb must be at most 65536 (64 GiB)")
    for name in ("start_timeout", "stall_timeout"):
        within(cfg, name, 0, 1e9, lo_open=True)
    within(cfg, "checkpoint_every", 0, 1e9)
    within(cfg, "heartbeat_timeout", 0.5, 86400)
    need(cfg.resume != "auto", "resume='auto' is decided before the run: pass the folder "
                               "(synthgrad.auto_resume finds it), or use --resume auto on the command line")
    need(cfg.on_failure in ("stop", "restart"), f"--on-failure must be stop or restart, got {cfg.on_failure!r}")
    need(cfg.max_restarts >= 0, "--max-restarts must be 0 or more")


def check_output(cfg: RunConfig) -> None:
    """Output and monitoring."""
    for name in ("metrics_every", "progress_every"):
        within(cfg, name, 0, 1e9, lo_open=True)
    need(cfg.timeline_steps >= 0, "--timeline-steps must be 0 or more")
    if cfg.tensorboard:
        need(importlib.util.find_spec("tensorboard") is not None, "--tensorboard needs the tensorboard package: "
             "pip install 'synthgrad[tensorboard]' (or pip install tensorboard)")


def check_testing(cfg: RunConfig) -> None:
    """The faults tests inject (common/faults.py)."""
    if cfg.slow_stage is not None:
        last = len(cfg.stage_groups) - 1
        need(len(cfg.slow_stage) == 2 and 0 <= cfg.slow_stage[0] <= last and cfg.slow_stage[1] >= 0,
             f"--slow-stage needs STAGE,MS with STAGE in 0..{last}, got {cfg.slow_stage}")
    if cfg.fail_saves is not None:
        last = len(cfg.stage_groups) - 1
        need(len(cfg.fail_saves) == 2 and 0 <= cfg.fail_saves[0] <= last and cfg.fail_saves[1] >= 0,
             f"--fail-saves needs STAGE,N with STAGE in 0..{last}, got {cfg.fail_saves}")
    need(0.0 <= cfg.link_delay_ms <= 10_000, "--link-delay-ms must be between 0 and 10000")


def check_auto_stages(cfg: RunConfig) -> None:
    """--stages auto: the run decides how many stages there are (coordinator/layout.py), so what
    is given per stage must be given once for every stage."""
    need(cfg.stages is None or cfg.stages >= 0, f"--stages must be at least 1, or auto; got {cfg.stages}")
    if not cfg.stages_auto:
        return
    why = "--stages auto decides the number of stages"
    need("," not in cfg.device, f"{why}: give one --device for every stage (a bare cuda spreads the stages "
                                f"over this host's GPUs), or --stages K with one device per stage")
    for name in ("threads", "replicas"):
        given = getattr(cfg, name)
        need(given is None or len(given) == 1, f"{why}: give one --{name} for every stage, or --stages K "
                                               f"with one per stage")
    for name in ("slow_stage", "fail_saves"):
        need(getattr(cfg, name) is None, f"{why}: --{name.replace('_', '-')} names a stage; give --stages K")


def check_split(cfg: RunConfig) -> None:
    """--groups and --stages against the model's layers (once they are known)."""
    n_layers = cfg.num_layers
    if n_layers is None:  # a model given by import path, not built yet: the run checks again
        return
    if cfg.groups is not None:
        need(all(g >= 1 for g in cfg.groups), f"--groups entries must be >= 1, got {cfg.groups}")
        need(sum(cfg.groups) == n_layers, f"--groups {','.join(map(str, cfg.groups))} covers {sum(cfg.groups)} "
                                          f"layers, but the model has {n_layers}")
        need(cfg.stages is None or cfg.stages == len(cfg.groups), "--stages and --groups disagree; give one of them")
    if cfg.stages is not None and not cfg.stages_auto:
        need(cfg.stages >= 1, "--stages must be at least 1, or auto")
        need(cfg.stages <= n_layers, f"--stages {cfg.stages} is more than the model's {n_layers} layers; "
                                     f"use --stages {n_layers} or fewer")


def check_per_stage(cfg: RunConfig) -> None:
    """--device and --threads: one for every stage, or one per stage (once the stages are known)."""
    known = cfg.num_layers is not None and cfg.mode != Mode.BACKPROP and not cfg.stages_auto
    problem = device_syntax_problem(cfg.device, len(cfg.stage_groups) if known else None)
    need(problem is None, problem or "")
    if not known:
        return
    n = len(cfg.stage_groups)
    need(cfg.threads is None or len(cfg.threads) in (1, n),
         f"--threads lists {len(cfg.threads or ())} counts, but the run has {n} stages: "
         f"give one for every stage, or one per stage")


def check_replicas(cfg: RunConfig) -> None:
    """--replicas: per stage, on stage workers, dividing the batch, on the CPU in float32."""
    if cfg.num_layers is None:
        return
    if not cfg.stages_auto:  # auto: one count for every stage (check_auto_stages)
        n = len(cfg.stage_groups)
        need(cfg.replicas is None or len(cfg.replicas) in (1, n),
             f"--replicas lists {len(cfg.replicas or ())} counts, but the run has {n} "
             f"stages: give one for every stage, or one per stage")
    if cfg.replicas is None or max(cfg.replicas) == 1:
        return
    need(cfg.mode not in (Mode.BACKPROP, Mode.PIPELINE),
         f"--replicas runs stage workers; mode {cfg.mode} has none (use a stage-worker mode)")
    bad = [r for r in cfg.replicas if cfg.batch_size % r]
    need(not bad, f"--replicas {bad[0] if bad else ''} does not divide --batch-size {cfg.batch_size}: "
                  f"each replica takes an equal part of every batch")
    need(cfg.precision == "fp32", "--replicas needs --precision fp32 (the replicas' collectives run in float32)")
    need(cfg.device == "cpu", "--replicas runs on the CPU (gloo); --device must be cpu")


CHECKS: tuple[Callable[[RunConfig], None], ...] = (
    check_model, check_auto_stages, check_data, check_layers, check_schedule, check_optimiser, check_synthetic, check_pipeline,
    check_processes, check_limits, check_output, check_testing, check_split, check_per_stage, check_replicas)


def check(cfg: RunConfig) -> None:
    """Raise ConfigError at the first option group with a value that cannot run."""
    for group in CHECKS:
        group(cfg)
