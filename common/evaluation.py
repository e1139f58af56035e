"""One evaluation, wherever its batches are computed: the single-process reference, the last
stage of a worker pipeline, or the last rank of the pipeline contender all add their logits to an
EvalTally and report the same record."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from synthgrad.common import scores
from synthgrad.common.streams import IGNORE


def scored(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, classes], labels [N]) of the predictions that count: every sample's, or with
    targets at every position (stream data) every position that has one."""
    if labels.dim() <= 1:
        return logits, labels
    flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = targets != IGNORE
    return flat[keep], targets[keep]


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) predictions of one batch."""
    logits, labels = scored(logits, labels)
    return int((logits.argmax(-1) == labels).sum()), int(labels.shape[0])


class EvalTally:
    """Summed test loss, correct predictions and samples over the batches of one evaluation (with
    targets at every position: positions with a target, so loss / ln 2 is bits per position)."""

    def __init__(self, loss=F.cross_entropy) -> None:
        self.loss_fn = loss  # the run's loss (mean over a batch)
        self.loss_sum = 0.0
        self.correct = 0
        self.n = 0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: logits from any device, in any float dtype (bf16 runs: scored in float32)."""
        logits, labels = scored(logits.float().cpu(), labels.cpu())
        if not labels.shape[0]:
            return
        self.loss_sum += float(self.loss_fn(logits, labels)) * int(labels.shape[0])
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.n += int(labels.shape[0])

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)


def eval_record(epoch: int, step: int, wall_s: float, loss: float, accuracy: float, samples: int,
                in_bits: bool = False) -> dict:
    """The "eval" record of metrics.jsonl, the status stream and the summary's evals. `in_bits`
    (stream data under cross-entropy, common/scores.py): with test_bits and test_perplexity."""
    rec = {"event": "eval", "wall_s": wall_s, "epoch": epoch, "step": step, "test_loss": loss,
           "test_accuracy": accuracy, "test_samples": samples}
    return {**rec, **scores.loss_figures(loss)} if in_bits else rec


def eval_line(rec: dict) -> str:
    """The progress line of one evaluation."""
    return (f"eval  epoch {rec['epoch'] + 1} step {rec['step']}: {scores.describe(rec)}  "
            f"test loss {rec['test_loss']:.4f}  ({rec['wall_s']:.1f}s)")
