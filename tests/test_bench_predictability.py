"""bench/predictability.py, the offline bound on what a predictor can learn of a stage's
correction: on records whose correction is a known function of the activation a predictor that
can express it learns it, and on records whose correction is noise none finds anything."""
from __future__ import annotations

import torch

from bench.predictability import fit
from tests.chain import one_thread


def _records(n: int, correction, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        h = torch.randn(8, 6, 16, generator=g)  # [batch, positions, features]
        labels = torch.randint(0, 5, (8, 6), generator=g)
        head = torch.randn(8, 6, 16, generator=g) / 8
        fix = correction(h, g) / 8
        out.append({"h": h.half(), "labels": labels, "head": head, "exact": head + fix, "correction": fix})
    return out


def test_a_learnable_correction_is_learnt_and_noise_is_not():
    weights = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) / 4
    later = torch.ones(6, 6).triu()  # position t's correction sums what the positions after it hold
    with one_thread():
        linear = fit("linear", _records(60, lambda h, g: h @ weights), classes=5, epochs=6, lr=1e-2)
        reading = fit("later", _records(60, lambda h, g: torch.einsum("ts,bsd->btd", later, h @ weights)),
                      classes=5, epochs=6, lr=1e-2)
        noise = fit("linear", _records(60, lambda h, g: torch.randn(h.shape, generator=g)), classes=5,
                    epochs=6, lr=1e-2)
    assert linear["correction_cosine"] > 0.9, linear
    assert linear["head_plus_prediction_cosine"] > linear["head_cosine"] + 0.3, linear
    assert reading["correction_cosine"] > 0.5, reading  # a sum over later positions: attention reads it
    assert abs(noise["correction_cosine"]) < 0.1 and noise["gain"] < 0.2, noise
