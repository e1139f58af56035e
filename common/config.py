"""One frozen run configuration, built by launch.py, validated before any process starts.

The coordinator sends it to every worker in the START handshake (the wire checks every field
against the annotations here), so a worker needs nothing but the coordinator's endpoint and its
stage index.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from synthgrad.common.modes import DEFAULT_SG_PRIOR, MODE_NAMES, SG_PRIORS, Mode, UpdateRule
from synthgrad.common.validation import ConfigError, check  # ConfigError: imported from here by most

DEFAULT_SAMPLE_SHAPE = (1, 28, 28)  # the built-in sets' (Fashion-MNIST, MNIST, synthetic) until read
DEFAULT_CLASSES = 10
STAGES_AUTO = 0  # --stages auto, until the run counts what it can use (coordinator/layout.py)


@dataclass(frozen=True)
class Group:
    """A concern the options are grouped by (one section of `launch.py train --help`)."""
    title: str

    def opt(self, default: Any, help: str, *, resume: bool = False, derived: bool = False,
            auto: bool = False, auto_value: Any = None) -> Any:
        """A config field with its help text and group (launch.py builds its options from these).
        `resume`: `--resume` may change it, because it does not change what the run computes.
        `derived`: the run fills it in (from the data) before anything starts; not an option.
        `auto`: its default, None, is decided by the run, and the word "auto" stands for it (on
        the command line, in a --config file and from Python alike). `auto_value`: the word
        "auto" stands for this value instead, where None already means something else."""
        return field(default=default, metadata={"help": help, "group": self.title, "resume": resume,
                                                "derived": derived, "auto": auto, "auto_value": auto_value})


MODEL = Group("model and update rule")
DATA = Group("data")
SCHEDULE = Group("schedule")
OPTIMISER = Group("layers' optimiser")
SYNTHETIC = Group("synthetic gradients")
PIPELINE = Group("mode=pipeline (PyTorch's own pipeline parallelism, the strongest locked peer)")
PROCESSES = Group("processes and transport")
LIMITS = Group("limits and fault handling")
OUTPUT = Group("output and monitoring")
TESTING = Group("testing only")


@dataclass(frozen=True)
class RunConfig:
    """Every option of a run, grouped by concern (the field's metadata says which; access stays
    flat, cfg.lr, so that code reads as the command line does)."""
    mode: Mode = MODEL.opt(Mode.UNLOCKED, " | ".join(MODE_NAMES) + " (README: Modes; each is a Mode in common/modes.py)")
    model: str = MODEL.opt("mlp", "mlp (sizes from --layers) | cnn (two conv blocks, two linear) | lstm (stream "
                                  "data: an LSTM, then a read-out at every position) | "
                                  "package.module:factory (your own: returns an nn.Sequential or a list of "
                                  "modules, one per layer; called with input_shape, num_classes)")
    layers: tuple[int, ...] = MODEL.opt((784, 256, 256, 256, 10), "MLP sizes: input, hidden..., classes")
    loss: str = MODEL.opt("cross_entropy", "cross_entropy | package.module:function: your loss, called as "
                                           "loss(logits [B, classes], class indices [B]) -> the batch's mean loss")
    stages: Optional[int] = MODEL.opt(None, "number of stage processes, layers split by cost (default: one per "
                                            "layer with parameters; a layer without rides with the one before); "
                                            "auto: as many as this host's usable cores (its CUDA devices with "
                                            "--device cuda) can run side by side, never more than the layers "
                                            "(0 in a saved config)", auto_value=STAGES_AUTO)
    groups: Optional[tuple[int, ...]] = MODEL.opt(None, "explicit layers per stage, e.g. 2,1,1")
    split_at: Optional[str] = MODEL.opt(None, "the layers where a new stage begins, by name, e.g. conv2,head "
                                              "(names of your nn.Sequential's children; built-in layers: 0, 1, ...)")
    untie_weights: bool = MODEL.opt(False, "train weights your layers share (a GPT's embedding and read-out tied) as "
                                           "separate copies from the same start: every stage holds its own layers, "
                                           "so a tie across layers cannot hold; without this such a model is refused")

    dataset: str = DATA.opt("fashion-mnist", "fashion-mnist | mnist (IDX files of any image size; needs --data-dir) | "
                                             "cifar10 (the binary version; needs --data-dir) | synthetic (generated in "
                                             "memory) | package.module:function (your own: returns (train, test) "
                                             "map-style datasets of (float tensor, class index); given data_dir if it "
                                             "takes it)")
    data_dir: Optional[str] = DATA.opt(None, "folder of the data's files; None = the Debian package's Fashion-MNIST",
                                       resume=True)
    input_shape: Optional[tuple[int, ...]] = DATA.opt(
        None, "one sample's shape, read from the data's header when the run starts", derived=True)
    num_classes: Optional[int] = DATA.opt(
        None, "classes in the data, read from its labels when the run starts", derived=True)
    label_shape: Optional[tuple[int, ...]] = DATA.opt(
        None, "one sample's targets: () a class per sample, (T,) a class per position of a stream window; "
              "read from the data when the run starts", derived=True)
    model_layers: Optional[int] = MODEL.opt(
        None, "layers of a model given by import path, counted when the run starts", derived=True)
    bptt: int = DATA.opt(16, "stream data (copy, repeat-copy, text, your own Streams): T, the window of truncated "
                             "backprop through time; one sample is T positions of a stream, and a recurrent "
                             "layer carries its state from each window to the next")
    copy_length: int = DATA.opt(8, "copy / repeat-copy: symbols per sequence (N)")
    copy_repeats: int = DATA.opt(3, "repeat-copy: each sequence is written 1..R times (R, drawn per sequence)")
    text_chars: Optional[int] = DATA.opt(None, "text: the first N characters of the Python standard library's "
                                               "sources (None = all; 90%% train, 5%% valid, 5%% test)")
    synthetic_train: int = DATA.opt(12800, "samples in the generated set (dataset=synthetic; a generated stream: "
                                           "windows of --bptt positions)")
    synthetic_test: int = DATA.opt(2560, "test samples in the generated set")
    eval_samples: Optional[int] = DATA.opt(None, "evaluate on the first N test samples (None = all)", resume=True)
    eval_every: Optional[int] = DATA.opt(None, "also evaluate every N training steps (None = after each epoch only)",
                                         resume=True)

    epochs: int = SCHEDULE.opt(3, "passes over the training set; the test set is evaluated after each", resume=True)
    steps: Optional[int] = SCHEDULE.opt(None, "stop after this many steps (overrides epochs when smaller)", resume=True)
    batch_size: int = SCHEDULE.opt(256, "samples per step (the last partial batch of an epoch is dropped)")
    seed: int = SCHEDULE.opt(0, "seeds weights and batch order: same seed, same batches in every mode")

    optimizer: str = OPTIMISER.opt("adam", "adam | sgd, for the layers")
    lr: float = OPTIMISER.opt(1e-3, "learning rate of the layers")
    momentum: float = OPTIMISER.opt(0.9, "sgd only")

    true_grad_every: int = SYNTHETIC.opt(1, "N: every N-th step's true gradient trains the SG models (and, "
                                         "with --sg-true-updates, steps the layers)")
    sg_model: str = SYNTHETIC.opt("lowrank", "linear (full map) | lowrank (d -> r -> d; a 1x1 bottleneck for conv "
                                  "activations) | mlp (one ReLU hidden layer); last layer zero-initialised")
    sg_hidden: Optional[int] = SYNTHETIC.opt(None, "the rank r (lowrank: width or channels of its bottleneck), or "
                                             "the hidden width of mlp on dense activations; auto (the default): "
                                             "the largest up to 64 within --sg-budget of its stage's FLOPs",
                                             auto=True)
    sg_budget: float = SYNTHETIC.opt(0.2, "with --sg-hidden auto: a predictor (its forward every step, its "
                                     "training on true-gradient steps) costs at most this fraction of its "
                                     "stage's training FLOPs; a conv predictor projects back with a 3x3 "
                                     "kernel when that leaves it rank 8 or more, else 1x1")
    sg_lr: float = SYNTHETIC.opt(1e-3, "learning rate of the synthetic-gradient models")
    sg_optimizer: str = SYNTHETIC.opt("adam", "adam | sgd, for the synthetic-gradient models")
    conditioned: bool = SYNTHETIC.opt(True, "cDNI: the SG model also sees the labels (one-hot)")
    sg_update_lr_scale: float = SYNTHETIC.opt(0.2, "layers stepped by a synthetic or stale gradient use lr x this "
                                              "(Adam gives a predicted gradient's errors full-size steps); 0: "
                                              "no step on predictions (with --no-sg-true-updates the lower "
                                              "stages are then frozen: a control of what the last stage learns "
                                              "alone)")
    sg_min_cosine: float = SYNTHETIC.opt(0.0, "a stage steps on its predictor only while the predictor's running "
                                         "cosine with the true gradients (over true-gradient steps) is at "
                                         "least this; below it the layers keep their weights (0 = no bar)")
    sg_correction_min_cosine: float = SYNTHETIC.opt(0.3, "with --sg-prior head: the predictor's correction is "
                                                    "taken only while its running cosine with the true "
                                                    "corrections is at least this (below it the stage steps "
                                                    "on its head alone)")
    sg_correction_weights: bool = SYNTHETIC.opt(True, "with --sg-prior head: once the correction's running "
                                                "cosine on the output passes its bar, it must pass it again on "
                                                "the layers' gradients it gives beside the true correction's, "
                                                "and is taken at its gain there: what the step changes is the "
                                                "weights, and an error the output's cosine hardly sees can add "
                                                "up over the batch there (docs/results.md); two more backward "
                                                "passes through the stage per true gradient while measured")
    sg_correction_weights_every: int = SYNTHETIC.opt(1, "with --sg-correction-weights: measure the weights' "
                                                     "gradients on every this-many-th true gradient that reaches "
                                                     "the output's bar (1 = each): each measure is two backward "
                                                     "passes through the stage, on the stage that bounds the "
                                                     "pipeline")
    sg_correction_gain: str = SYNTHETIC.opt("fit", "with --sg-correction-weights: the size at which a correction "
                                            "is taken, on the layers' gradients: fit (the gain at which it best "
                                            "fits the true correction: least squares) | direction (the gain, "
                                            "0-1, at which the step, head plus correction, points nearest the "
                                            "true gradient: 0 where the correction only turns it away; one "
                                            "backward pass more per measure)")
    sg_learn_weights: float = SYNTHETIC.opt(0.0, "with --sg-prior head and --sg-correction-weights: the "
                                            "predictor learns this share (0-1) of the error of the weights' "
                                            "gradients its corrections give, ||J^T (p - t)||^2, beside the "
                                            "output's squared error, and its corrections are judged on the "
                                            "weights alone; one backward and two forward passes through the "
                                            "stage more per true gradient (docs/results.md)")
    sg_correction_center: bool = SYNTHETIC.opt(False, "with --sg-prior head: a correction loses its mean over the "
                                               "batch before it is taken and scored (an error common to every "
                                               "sample adds up in the weights' gradient); off by default: "
                                               "where the true gradient's batch mean is large it takes that "
                                               "too (docs/results.md)")
    sg_correction_tangent: bool = SYNTHETIC.opt(False, "with --sg-prior head: a correction loses its part along "
                                                "the stage's output, sample by sample, before it is taken and "
                                                "scored (a step on that part changes the output's size, which a "
                                                "predictor of the output can feed); off by default, as "
                                                "--sg-correction-center (docs/results.md)")
    sg_trust_scale: bool = SYNTHETIC.opt(True, "a step on the predictor is taken at lr x --sg-update-lr-scale x the "
                                         "predictor's running cosine with the true gradients (clamped to 0..1): "
                                         "one that does not predict yet moves nothing (off: full steps from the "
                                         "start, the DNI paper's rule)")
    sg_normalize: bool = SYNTHETIC.opt(False, "the predictor learns the true gradients divided by their running RMS "
                                       "and predicts in those units times it, so --sg-lr means the same "
                                       "whatever the size of a stage's gradients")
    sg_replay: int = SYNTHETIC.opt(0, "each true gradient that comes back also replays the last this many (activation, "
                                   "true gradient) pairs to the predictor, one step each: it learns from more than "
                                   "one step in N (0: from each once)")
    sg_true_updates: Optional[bool] = SYNTHETIC.opt(None, "a true gradient that comes back also steps the layers, at "
                                                    "the weights its forward pass used (as mode delayed), at lr x "
                                                    "(1 - the predictor's running cosine); off: it only trains the "
                                                    "predictor (the DNI paper's rule); default: on when N > 1")
    sg_discount: float = SYNTHETIC.opt(0.2, "a recurrent layer's state synthetic gradient enters its window's "
                                       "backward pass x this; below 1 it keeps the bootstrapped targets (each "
                                       "holds the next window's prediction) from growing without bound. Lower, "
                                       "the future gets in too little to learn past the window; higher, Copy-like "
                                       "tasks can lock at their targets' marginal (docs/results.md, the recurrent "
                                       "claim with a curriculum)")
    sg_prior: str = SYNTHETIC.opt(DEFAULT_SG_PRIOR, "mode unlocked: what a stage's synthetic gradient adds "
                                  "its predictor's output to: head (the gradient of a small local classifier "
                                  "head, which holds where a predictor alone cannot learn the gradient: "
                                  "docs/results.md) | none (the predictor alone, as in the DNI paper)")
    bootstrap: bool = SYNTHETIC.opt(False, "train SG_i also on the next stage's synthetic gradient")
    head_depth: Optional[int] = SYNTHETIC.opt(None, "local heads (modes local, corrected, unlocked): hidden "
                                              "layers before the classifier, each a 3x3 conv (conv "
                                              "activations, on a map of at most --head-side a side) or a dense "
                                              "layer of its width; default auto: one per head, together within "
                                              "--head-budget x the model's FLOPs, chosen as --head-fill says; "
                                              "none on stream data", auto=True)
    head_budget: float = SYNTHETIC.opt(0.2, "with --head-depth auto: what the heads' hidden layers may add, "
                                       "as a fraction of the model's FLOPs (all of them) and, for all but a "
                                       "full-width layer under --head-fill width, of the heaviest stage's "
                                       "(each stage); a hidden 3x3 conv at 4x4 costs a third of a "
                                       "same-width conv stage on a 7x7 map")
    head_fill: str = SYNTHETIC.opt("width", "with --head-depth auto: how the heads' hidden layers are chosen "
                                   "within --head-budget. width: where the budget pays for a hidden layer "
                                   "of all its channels (on a conv map the smallest) in every head, each "
                                   "gets one, then larger maps from the first stage on where they keep "
                                   "the pace; else as stages | stages: each stage in turn the largest "
                                   "offered that keeps the pace and the budget (runs from before this "
                                   "option)")
    head_side: int = SYNTHETIC.opt(8, "a conv head's hidden layers run on the stage's output average-pooled "
                                   "to at most this many pixels a side")
    head_narrowest: int = SYNTHETIC.opt(4, "with --head-depth auto: where a conv head's hidden layer at "
                                        "--head-side is over the budget, it is offered one on a 4x4 map, of the "
                                        "activation's channels, a half, a quarter, ... down to 1/this (1: "
                                        "none of these)")
    head_reconstruct: float = SYNTHETIC.opt(0.0, "local heads: the weight of a second local loss, the mean "
                                            "squared error of decoding the stage's input from its output "
                                            "(InfoPro's reconstruction term: an early stage keeps what later "
                                            "ones need); 0: none")
    head_attention: bool = SYNTHETIC.opt(False, "local heads on stream data (a target at every position) "
                                         "also read the earlier positions, through one causal attention "
                                         "layer: a stage whose layers mix positions is then asked for what "
                                         "a later layer's attention reads, not only for what its own "
                                         "position predicts")
    head_next_layer: Optional[int] = SYNTHETIC.opt(None, "local heads: the first this many stages' heads begin "
                                                   "with a freshly initialised copy of the layer after their "
                                                   "stage (on a GPT, a transformer block), then read out as "
                                                   "usual: the stage is asked for what that layer reads, not "
                                                   "for what a classifier reads off it (the first stage's head "
                                                   "held most of local's gap on the small GPT: "
                                                   "docs/results.md); costs that layer's work again; 0: none; "
                                                   "default auto: 1 on stream data where that layer is a "
                                                   "hidden one without a recurrent state, else 0", auto=True)
    head_lead_depth: int = SYNTHETIC.opt(1, "local heads with a lead (--head-next-layer): the first stage's "
                                         "lead copies this many layers after it, not one (the later stages' "
                                         "leads stay one layer), never the read-out: a deeper lookahead "
                                         "where the first cut costs most (AugLocal's deeper auxiliary nets "
                                         "early); costs those layers' work again")
    head_lr_scale: Optional[float] = SYNTHETIC.opt(None, "local heads learn at this times the layers' "
                                                   "learning rate, so a head keeps up with the stage it "
                                                   "reads; default auto: 3 for the per-position heads "
                                                   "of stages without a recurrent layer on stream data "
                                                   "(on the small GPT it narrowed local's gap in every "
                                                   "seed: docs/results.md), 1 elsewhere", auto=True)
    head_norm: bool = SYNTHETIC.opt(True, "local heads read the stage's output over its root mean square, so "
                                    "their loss cannot grow the stage's activations (a classifier's loss "
                                    "otherwise grows an early stage's, and the next stage's units die: "
                                    "docs/results.md); --no-head-norm: the output as it is")

    microbatches: int = PIPELINE.opt(4, "pipeline: microbatches per batch (must divide --batch-size)")
    schedule: str = PIPELINE.opt("1f1b", "pipeline: gpipe | 1f1b")

    transport: str = PROCESSES.opt("ipc", "ipc (one host) | tcp", resume=True)
    host: str = PROCESSES.opt("127.0.0.1", "address to bind tcp endpoints on", resume=True)
    secure: Optional[bool] = PROCESSES.opt(None, "CURVE-encrypt and authenticate every link (default: every tcp link, "
                                           "with keys made for the run unless --keys; --no-secure: plain)",
                                           resume=True)
    keys: Optional[str] = PROCESSES.opt(None, "folder made by `launch.py keys DIR` (secret keys stay there); "
                                        "needed where stages are started by hand or by torchrun", resume=True)
    threads: Optional[tuple[int, ...]] = PROCESSES.opt(None, "torch threads per stage process: N for every "
                                                       "stage, or N,N,... one per stage; auto (the default): "
                                                       "cores follow each stage's share of the run's FLOPs "
                                                       "(common/placement.py)", auto=True)
    replicas: Optional[tuple[int, ...]] = PROCESSES.opt(None, "processes per stage, each training on an equal part "
                                                        "of every batch's rows, gradients summed over them "
                                                        "(torch.distributed, gloo) before every step: N for every "
                                                        "stage, or N,N,... one per stage (None = 1 each); a "
                                                        "stage's threads are split among its replicas")
    backprop_threads: Optional[int] = PROCESSES.opt(None, "torch threads for mode=backprop (None = all cores)")
    placement: str = PROCESSES.opt("auto", "auto | pin | none: pin stages to cores balancing their cost (pin), "
                                   "leave them to the OS (none), or pin only when every stage gets a core "
                                   "of its own (auto)", resume=True)
    device: str = PROCESSES.opt("cpu", "cpu | cuda | cuda:N | one per stage, e.g. cuda:0,cuda:1 (backprop: the "
                                "first); a bare cuda spreads the stages of a host over its GPUs "
                                "(stage or torchrun's LOCAL_RANK, modulo the GPUs)", resume=True)
    precision: str = PROCESSES.opt("fp32", "fp32 | bf16: bf16 runs the layers under autocast and sends "
                                   "activations and gradients as bf16 (half the bytes); weights stay float32")
    queue_depth: int = PROCESSES.opt(2, "ZeroMQ high-water mark per link, in messages (bounds run-ahead)")

    max_message_mb: int = LIMITS.opt(256, "upper bound on one message's tensor bytes", resume=True)
    start_timeout: float = LIMITS.opt(120.0, "seconds for all workers to register and be ready", resume=True)
    stall_timeout: float = LIMITS.opt(120.0, "fail the run after this many seconds without progress (no worker "
                                      "reports a new highest step, no evaluation, no stage finishes) although "
                                      "every stage is alive (silence is --heartbeat-timeout's); pipeline: "
                                      "without a report from its ranks", resume=True)
    heartbeat_timeout: float = LIMITS.opt(10.0, "a worker or coordinator that sends nothing for this many seconds "
                                          "during training is dead or hung: the run stops (heartbeats every "
                                          "timeout/10 s, at most 1 s; keep it above the longest compute step)",
                                          resume=True)
    checkpoint_every: float = LIMITS.opt(300.0, "save every stage at one step about this often, in seconds "
                                         "(0: only at the end and on Ctrl-C / SIGTERM)", resume=True)
    resume: Optional[str] = LIMITS.opt(None, "continue the run in this folder from its last complete checkpoint "
                                       "(its config; only run length and monitoring options may change); "
                                       "'auto' with --out DIR: continue DIR when it holds a checkpoint, else "
                                       "start a new run there (for jobs torchrun or Slurm restart)")
    on_failure: str = LIMITS.opt("stop", "when a stage process dies or hangs: stop the run, or restart every "
                                 "stage from the last complete checkpoint (local stages; up to --max-restarts)")
    max_restarts: int = LIMITS.opt(3, "with --on-failure restart: give up after this many restarts")

    out: Optional[str] = OUTPUT.opt(None, "run folder; None = runs/<mode>-<time>")
    progress_every: float = OUTPUT.opt(2.0, "seconds between progress lines", resume=True)
    metrics_every: float = OUTPUT.opt(1.0, "seconds between a worker's metric reports", resume=True)
    tensorboard: bool = OUTPUT.opt(False, "also write the status stream as TensorBoard scalars to "
                                   "RUN_DIR/tensorboard", resume=True)
    timeline_steps: int = OUTPUT.opt(48, "record each worker's compute/wait/send spans for this many first "
                                     "steps (timeline.json)", resume=True)

    slow_stage: Optional[tuple[int, ...]] = TESTING.opt(None, "testing: STAGE,MS makes stage STAGE sleep MS ms "
                                                        "in every training step (a slow stage)", resume=True)
    fail_saves: Optional[tuple[int, ...]] = TESTING.opt(None, "testing: STAGE,N makes stage STAGE's periodic "
                                                        "checkpoint saves fail after its first N (as on a "
                                                        "full disk)", resume=True)
    link_delay_ms: float = TESTING.opt(0.0, "testing: deliver each activation and gradient this long after it "
                                       "was sent, to simulate link latency between hosts on one machine",
                                       resume=True)

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Mode):  # a name, from Python, a file or the command line: parsed once, here
            try:
                object.__setattr__(self, "mode", Mode(self.mode))
            except ValueError:
                raise ConfigError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODE_NAMES)}") from None
        for f in dataclasses.fields(self):  # "auto": the default, None, or the field's own auto_value
            value = getattr(self, f.name)
            if (f.metadata.get("auto") or f.metadata.get("auto_value") is not None) and \
                    isinstance(value, str) and value.strip().lower() == "auto":
                object.__setattr__(self, f.name, f.metadata.get("auto_value"))

    @property
    def heartbeat_every(self) -> float:
        """Seconds between heartbeats: ten per timeout, at most one a second."""
        return min(1.0, self.heartbeat_timeout / 10)

    # ---------------------------------------------------------------- validation
    def validate(self) -> RunConfig:
        """Raise ConfigError naming the option and what to change; return self when valid. The
        checks, one per option group, are in common/validation.py."""
        check(self)
        return self

    def stage_thread_counts(self) -> Optional[tuple[int, ...]]:
        """--threads per stage (one number stands for every stage); None = auto."""
        if self.threads is None:
            return None
        return tuple(self.threads) * len(self.stage_groups) if len(self.threads) == 1 else tuple(self.threads)

    def stage_replica_counts(self) -> tuple[int, ...]:
        """--replicas per stage (one number stands for every stage; None: 1 each)."""
        n = len(self.stage_groups)
        if self.replicas is None:
            return (1,) * n
        return tuple(self.replicas) * n if len(self.replicas) == 1 else tuple(self.replicas)

    # ---------------------------------------------------------------- derived values
    @property
    def num_layers(self) -> Optional[int]:
        """Layers that can be placed on stages (MLP: Linear blocks; CNN: four blocks; a model
        given by import path: its units, once the run has built it; None before)."""
        if self.model == "mlp":
            return len(self.layers) - 1
        return {"cnn": 4, "lstm": 2}.get(self.model, self.model_layers)

    @property
    def stages_auto(self) -> bool:
        """--stages auto, not resolved yet: the number of stages is not known before the run
        counts this host's cores or devices."""
        return self.stages == STAGES_AUTO and self.groups is None

    @property
    def stage_groups(self) -> tuple[int, ...]:
        """Layers per stage: explicit groups, or an even split into `stages` (default one each).
        A run replaces the even split by its split by cost (coordinator/layout.py) before it starts."""
        if self.groups is not None:
            return tuple(self.groups)
        n = self.num_layers
        if n is None:
            raise ValueError(f"the layers of {self.model} are counted when the run starts (coordinator/train.py)")
        if self.stages_auto:
            raise ValueError("--stages auto is resolved when the run starts (coordinator/layout.py)")
        k = self.stages or n
        base, extra = divmod(n, k)
        return tuple(base + (1 if i < extra else 0) for i in range(k))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape: from the data once the run has read it, else the built-in sets'."""
        return tuple(self.input_shape) if self.input_shape else DEFAULT_SAMPLE_SHAPE

    @property
    def per_position(self) -> bool:
        """Targets at every position of a window (stream data), not one per sample."""
        return bool(self.label_shape)

    @property
    def classes(self) -> int:
        return self.num_classes or DEFAULT_CLASSES

    @property
    def num_stages(self) -> int:
        return 1 if self.mode == Mode.BACKPROP else len(self.stage_groups)

    @property
    def rule(self) -> type[UpdateRule]:
        """The stage update rule of this run (stage-worker modes only)."""
        rule = self.stage_rule
        if rule is None:
            raise ValueError(f"mode {self.mode} does not run on stage workers")
        return rule

    @property
    def stage_rule(self) -> Optional[type[UpdateRule]]:
        """The run's update rule, None for the modes with processes of their own: the mode's,
        and for mode unlocked the one of its predictor's prior (--sg-prior)."""
        if self.mode == Mode.UNLOCKED:
            return SG_PRIORS.get(self.sg_prior, self.mode.rule)
        return self.mode.rule

    @property
    def applies_true_gradients(self) -> bool:
        """--sg-true-updates as it applies: by default on when N > 1. At N=1 every step's true
        gradient trains the predictor, which then carries it; stepping on it as well would cost
        a weight gradient every step, and bought nothing there (slower and less accurate on the
        row transformer: docs/results.md, its table)."""
        return self.true_grad_every > 1 if self.sg_true_updates is None else self.sg_true_updates

    def true_grad_at(self, step: int) -> bool:
        """Whether step `step`'s true gradient comes back (every step for locked, every N-th
        otherwise: N-1, 2N-1, ...)."""
        rule = self.stage_rule
        return rule.true_grad_at(step, self.true_grad_every) if rule is not None else True

    def mid_epoch_eval(self, steps_done: int, per_epoch: int, total: int) -> bool:
        """An evaluation is due after `steps_done` steps besides the one after each epoch."""
        return (self.eval_every is not None and steps_done % self.eval_every == 0
                and steps_done % per_epoch != 0 and steps_done < total)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mode"] = self.mode.value  # a plain str: checkpoints are loaded with weights_only
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)} | {"pin_cores", "threads_per_worker"}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown configuration fields: {', '.join(sorted(unknown))}")
        kwargs = dict(d)
        if "pin_cores" in kwargs:  # a run folder from before --placement
            kwargs.setdefault("placement", "auto" if kwargs.pop("pin_cores") else "none")
        if "threads_per_worker" in kwargs:  # a run folder from before --threads
            kwargs.setdefault("threads", [kwargs.pop("threads_per_worker")])
        if "sg_trust_scale" not in kwargs:  # a run folder from before --sg-trust-scale and
            kwargs.update(sg_trust_scale=False, sg_true_updates=False)  # --sg-true-updates: its rule, the DNI paper's
        kwargs.setdefault("head_depth", 0)  # a run folder from before --head-depth auto: linear heads
        if "head_side" not in kwargs:  # from before --head-side, --head-budget and --head-narrowest:
            # their hidden convs ran at 8x8, all of the channels or none, by the predictors' budget
            kwargs.update(head_side=8, head_narrowest=1,
                          head_budget=kwargs.get("sg_budget", cls.__dataclass_fields__["sg_budget"].default))
        kwargs.setdefault("head_fill", "stages")  # a run folder from before --head-fill: its heads' rule
        kwargs.setdefault("head_next_layer", 0)  # from before --head-next-layer: heads without a lead
        kwargs.setdefault("head_lr_scale", 1.0)  # from before --head-lr-scale: heads at the layers' rate
        for k in ("layers", "groups", "slow_stage", "fail_saves", "input_shape", "label_shape", "threads",
                  "replicas"):
            if kwargs.get(k) is not None and not isinstance(kwargs[k], str):  # "auto": __post_init__
                kwargs[k] = tuple(int(v) for v in kwargs[k])
        return cls(**kwargs).validate()

    @classmethod
    def may_change_on_resume(cls) -> tuple[str, ...]:
        """The fields `--resume` may change (marked on each field: they do not change what is computed)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume"))

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes).validate()


# the fields whose default (None) the run decides, for which "auto" may be written
AUTO_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("auto"))


def default_backprop_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def field_value(text: str) -> tuple[str, Any]:
    """`field=value` (a bench script's `--set` item, a compare contender's `+field=value`) as a
    RunConfig field and its value: JSON where it parses (numbers, true/false, null; a list as a
    tuple), a number as Python reads it (.5, inf), else the word itself (sgd, lowrank). A
    tuple field (groups, replicas, ...) also takes numbers separated by "/" (where ","
    already separates contenders) and one number alone. Raises ConfigError naming an unknown
    field."""
    import json
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"{text!r}: expected field=value, e.g. head_next_layer=1")
    if key not in RunConfig.__dataclass_fields__:
        raise ConfigError(f"{text!r}: unknown option {key} (the names are those of `launch.py train --help`)")

    def parsed(word: str) -> Any:
        try:
            return json.loads(word)
        except json.JSONDecodeError:
            pass
        try:
            return float(word)
        except ValueError:
            return word

    if "tuple" in str(RunConfig.__dataclass_fields__[key].type):
        if "/" in value:
            return key, tuple(parsed(v) for v in value.split("/"))
        got = parsed(value)
        return key, tuple(got) if isinstance(got, list) else (got,) if isinstance(got, int) else got
    got = parsed(value)
    return key, tuple(got) if isinstance(got, list) else got


def rule_options(item: str) -> tuple[str, dict[str, Any]]:
    """`local+head_next_layer=1+groups=2/2` -> ("local", {"head_next_layer": 1, "groups": (2, 2)}):
    a rule (a compare contender, a bench script's rule) with options of its own, each
    `+field=value` (field_value)."""
    rule, *options = item.split("+")
    return rule.strip(), dict(field_value(o) for o in options)


# the fields a run's config.json holds that belong to that run, not to a new one started from it
NOT_CARRIED_OVER = ("out", "resume")


def load_config_file(path: str) -> dict[str, Any]:
    """Options from a file, as `--config FILE` reads them: TOML (`lr = 0.001`, `layers = [784,
    256, 10]`; dashes or underscores in names), or a run's config.json, which starts a new run
    with the same settings (its `out` and `resume` are left out: the new run gets its own folder).
    Options given on the command line override the file's. Errors name the file."""
    import json
    import sys
    from pathlib import Path
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the same parser before it joined the standard library (pyproject's conditional dependency)
        import tomli as tomllib
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    try:
        if file.suffix == ".json":
            values = json.loads(raw)
        else:
            values = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSON errors are ValueErrors
        raise ConfigError(f"--config {path}: not valid {'JSON' if file.suffix == '.json' else 'TOML'}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a table of options, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    if file.suffix == ".json":
        values = {k: v for k, v in values.items() if k not in NOT_CARRIED_OVER}
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)} (the names are those of `launch.py train --help`)")
    derived = [k for k in values if RunConfig.__dataclass_fields__[k].metadata.get("derived")]
    if derived and file.suffix != ".json":
        raise ConfigError(f"--config {path}: {', '.join(derived)} come from the data, not from options")
    for k in derived:  # a run's config.json: read again from the data when the new run starts
        del values[k]
    for k in ("layers", "groups", "slow_stage", "fail_saves", "threads", "replicas"):
        if isinstance(values.get(k), list):
            values[k] = tuple(values[k])
    return values
