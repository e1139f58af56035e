"""How a test evaluation is said and judged. On class data by its accuracy, higher is better. On
stream data (a target at every position) by its test loss, lower is better: with cross-entropy,
the default loss, in bits per target (loss / ln 2, what a code built on the model spends per
character) and perplexity (exp(loss)), the units language models are compared in; accuracy
(next target right) comes beside them. Pure and without torch, so the monitor says it the same
way as the run."""
from __future__ import annotations

import math
from typing import Optional

LN2 = math.log(2)


def in_bits(per_position: bool, loss: str) -> bool:
    """Whether a run's test loss is said in bits: stream data under cross-entropy (a loss of the
    user's own has its own units)."""
    return bool(per_position) and loss == "cross_entropy"


def bits(loss: float) -> float:
    """Cross-entropy in nats as bits per target."""
    return loss / LN2


def perplexity(loss: float) -> float:
    """exp(cross-entropy), inf where that overflows a float."""
    return math.exp(loss) if loss < 709 else math.inf


def loss_figures(loss: Optional[float]) -> dict:
    """The fields an evaluation record gains on stream data: test_bits, test_perplexity."""
    if loss is None:
        return {"test_bits": None, "test_perplexity": None}
    return {"test_bits": bits(loss), "test_perplexity": perplexity(loss)}


def describe(rec: dict) -> str:
    """A test evaluation (an eval record, or a summary) in words: bits per target and perplexity
    when it has them, then accuracy."""
    acc = rec.get("test_accuracy")
    accuracy = "n/a" if acc is None else f"{100 * acc:.2f}%"
    if rec.get("test_bits") is None:
        return f"test accuracy {accuracy}"
    return (f"test {rec['test_bits']:.3f} bits per target, perplexity {rec['test_perplexity']:.2f}, "
            f"accuracy {accuracy}")
