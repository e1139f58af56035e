"""bench/curriculum.py's curriculum: N rises only on a held-out score under the threshold, and
the training and held-out streams are generated at the current N."""
from __future__ import annotations

import torch

from bench.curriculum import CopyData, CopyRun, Curriculum, copy_run
from synthgrad.common.streams import IGNORE


def test_n_rises_only_when_the_current_n_is_solved():
    cur = Curriculum(max_length=3, threshold=0.15)
    assert not cur.judge(0.15, 10) and cur.length == 1 and cur.longest == 0
    assert not cur.judge(float("nan"), 20) and cur.length == 1
    assert cur.judge(0.149, 30) and cur.length == 2 and cur.solved == [(1, 30)]
    assert not cur.judge(2.0, 40) and cur.length == 2
    assert cur.judge(0.0, 50) and cur.judge(0.0, 60)
    assert cur.solved == [(1, 30), (2, 50), (3, 60)] and cur.longest == 3 and cur.done
    assert not cur.judge(0.0, 70) and cur.longest == 3


def _read_phase(targets: torch.Tensor) -> int:
    """Positions before the first target: N symbols and the go position."""
    return int((targets != IGNORE).long().argmax())


def test_every_row_starts_an_episode_of_the_asked_length():
    data = CopyData(repeats=1, window=3, seed=0)
    for n in (1, 4):
        for split in (data.held_out(n, rows=4), data.train(n, rows=4, steps=5, chunk=0)):
            per_row = len(split.stream) // 4
            assert per_row % 3 == 0
            for r in range(4):
                row = split.stream.targets[r * per_row:(r + 1) * per_row]
                assert _read_phase(row) == n + 1
    assert not torch.equal(data.train(2, 4, 5, 0).stream.inputs, data.train(2, 4, 5, 1).stream.inputs)
    assert not torch.equal(data.train(2, 4, 5, 0).stream.inputs[:40], data.held_out(2, 4).stream.inputs[:40])


TRAIN = CopyData.train


def _run(threshold: float, monkeypatch) -> tuple[dict, list[int]]:
    lengths: list[int] = []

    def spy(self, length, rows, steps, chunk):
        lengths.append(length)
        return TRAIN(self, length, rows, steps, chunk)

    monkeypatch.setattr(CopyData, "train", spy)
    run = CopyRun("copy", window=2, mode="unlocked", seed=0, steps=30, eval_every=10, eval_rows=4, max_length=8,
                  fields=dict(model="tests.user_models:small_lstm", batch_size=4), threshold=threshold)
    return copy_run(run), lengths


def test_the_generator_follows_n_within_one_run(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        never, never_lengths = _run(0.0, monkeypatch)
        always, always_lengths = _run(100.0, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert never["longest"] == 0 and never["solved"] == [] and set(never_lengths) == {1}
    assert [n for _, n, _, _ in never["scores"]] == [1, 1, 1]
    assert always["solved"] == [(1, 10), (2, 20), (3, 30)] and always["longest"] == 3
    assert always_lengths == [1, 2, 3]  # a new stream at each new N
    assert [n for _, n, _, _ in always["scores"]] == [1, 2, 3] and always["steps"] == 30
