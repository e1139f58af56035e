"""`--tensorboard`: the status stream as TensorBoard scalars, in RUN_DIR/tensorboard.

    tensorboard --logdir RUN_DIR/tensorboard

Tags: run/<figure> for the run as a whole (samples_per_s, steps_per_s, loss, eta_s, staleness_steps, progress,
test_accuracy, test_loss; on stream data test_bits, test_perplexity) and stageI/<figure> for every
worker (samples_per_s, steps_per_s, busy_fraction, wait_*_fraction, send/recv_fraction,
outstanding_steps, cpu_percent, rss_mb, loss, sg_loss, sg_cosine). The x axis is the training step the last stage has finished.
"""
from __future__ import annotations

from pathlib import Path

RUN_FIGURES = ("samples_per_s", "steps_per_s", "coordinator_rss_mb", "loss", "eta_s", "staleness_steps", "progress")
WORKER_FIGURES = ("samples_per_s", "steps_per_s", "busy_fraction", "wait_input_fraction", "wait_send_fraction",
                  "wait_grad_fraction", "send_fraction", "recv_fraction", "outstanding_steps",
                  "cpu_percent", "rss_mb", "loss", "sg_loss", "sg_cosine")


class TensorBoardWriter:
    def __init__(self, logdir: Path):
        # torch's writer (replaces hand-encoding the TFRecord/protobuf event format)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(logdir), flush_secs=5)

    def status(self, rec: dict) -> None:
        step = rec["step"]
        for name in RUN_FIGURES:
            if rec.get(name) is not None:
                self.writer.add_scalar(f"run/{name}", rec[name], step, walltime=None)
        for w in rec.get("workers", []):
            for name in WORKER_FIGURES:
                if w.get(name) is not None:
                    self.writer.add_scalar(f"stage{w['stage']}/{name}", w[name], step)

    def eval(self, rec: dict) -> None:
        self.writer.add_scalar("run/test_accuracy", rec["test_accuracy"], rec["step"])
        self.writer.add_scalar("run/test_loss", rec["test_loss"], rec["step"])
        for name in ("test_bits", "test_perplexity"):  # stream data
            if rec.get(name) is not None:
                self.writer.add_scalar(f"run/{name}", rec[name], rec["step"])

    def close(self) -> None:
        self.writer.close()

