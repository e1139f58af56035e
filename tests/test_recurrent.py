"""Recurrent stages on stream data: locked is plain truncated BPTT, a stage's streams survive
evaluations, epochs and checkpoints, and bad stream input is refused before anything starts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.data import DataError, eval_batches, train_batches
from synthgrad.common.datasets import StreamOptions, load_dataset
from synthgrad.common.models import LSTM_HIDDEN
from synthgrad.common.streams import IGNORE, SYMBOLS
from tests.helpers import EXACT_SGD, LOCKED_EQUALS_BACKPROP, assert_states_close, run

COPY = RunConfig(dataset="copy", model="lstm", bptt=4, copy_length=3, batch_size=8, synthetic_train=96,
                 synthetic_test=24, epochs=2, start_timeout=60, stall_timeout=30, **EXACT_SGD)


def plain_tbptt(cfg: RunConfig) -> tuple[dict, float]:
    """Truncated BPTT written directly in PyTorch: an nn.LSTM and a read-out built from the seed as
    `--model lstm` builds them, the copy stream read window after window, the state detached
    between windows and zeroed at each epoch's start; SGD with momentum. Returns the trained
    units (as load_model_state gives them) and the last epoch's test loss."""
    torch.manual_seed(cfg.seed)
    lstm, readout = nn.LSTM(SYMBOLS + 1, LSTM_HIDDEN, batch_first=True), nn.Linear(LSTM_HIDDEN, SYMBOLS + 1)
    params = [*lstm.parameters(), *readout.parameters()]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    ds = load_dataset("copy", None, cfg.synthetic_train, cfg.synthetic_test, StreamOptions.of(cfg))

    def loss_of(x, y, state):
        out, state = lstm(x, state)
        logits = readout(out).reshape(-1, SYMBOLS + 1)
        counted = (y != IGNORE).sum()
        return F.cross_entropy(logits, y.reshape(-1), reduction="sum", ignore_index=IGNORE), counted, state

    for epoch in range(cfg.epochs):
        state = None
        for x, y in train_batches(ds.train, cfg.batch_size, cfg.seed, epoch):
            total, counted, state = loss_of(x, y, state)
            opt.zero_grad()
            (total / counted.clamp_min(1)).backward()
            opt.step()
            state = tuple(s.detach() for s in state)
    with torch.no_grad():
        state, loss_sum, n = None, 0.0, 0
        for x, y in eval_batches(ds.test, cfg.batch_size):
            total, counted, state = loss_of(x, y, state)
            loss_sum, n = loss_sum + float(total), n + int(counted)
    units = {0: {f"core.{k}": v for k, v in lstm.state_dict().items()}, 1: readout.state_dict()}
    return units, loss_sum / n


def test_locked_on_a_recurrent_stage_is_plain_truncated_bptt(tmp_path):
    """An LSTM stage and a read-out stage in two processes, two epochs of the copy task with an
    evaluation after each: the weights equal plain TBPTT's within LOCKED_EQUALS_BACKPROP (the
    same operations in the same order; tests/helpers.py says why a tolerance at all), and so
    does the test loss, read from the test streams' start with a state of its own."""
    from synthgrad.common.files import load_model_state
    expected, test_loss = plain_tbptt(COPY)
    run_dir, summary = run(COPY, mode="locked", out=str(tmp_path / "locked"))
    assert summary["steps"] == 2 * (COPY.synthetic_train // COPY.batch_size)
    assert_states_close(expected, load_model_state(run_dir), **LOCKED_EQUALS_BACKPROP)
    assert summary["evals"][-1]["test_loss"] == pytest.approx(test_loss, rel=1e-5)


def prepared(cfg: RunConfig) -> RunConfig:
    from synthgrad.coordinator.train import prepare
    return prepare(cfg)[0]


def test_a_stage_carries_its_streams_through_evaluations_and_checkpoints():
    """In one process: a stage's training streams do not see its evaluations, a new epoch starts
    them from zero, and a stage loaded from a checkpoint continues them bitwise."""
    from synthgrad.common.devices import CPU
    from synthgrad.workers.stage import build_stage
    cfg = prepared(COPY.replace(mode="unlocked"))
    ds = load_dataset("copy", None, cfg.synthetic_train, cfg.synthetic_test, StreamOptions.of(cfg))
    batches = list(train_batches(ds.train, cfg.batch_size, cfg.seed, 0))
    test_x = next(iter(eval_batches(ds.test, cfg.batch_size)))[0]

    def steps(logic, first, last, evaluate=False):
        outs = []
        for step in range(first, last):
            logic.begin_epoch(0)
            outs.append(logic.forward(step, *batches[step], cfg.true_grad_at(step)).clone())
            logic.local_update(step)
            if evaluate:
                logic.eval_forward(test_x, fresh=True)
        return outs

    plain, _ = build_stage(cfg, 0, 12, CPU)
    assert plain.state_synths, "an unlocked recurrent stage predicts its state's gradient"
    with_evals, _ = build_stage(cfg, 0, 12, CPU)
    steps(plain, 0, 3)
    steps(with_evals, 0, 3, evaluate=True)
    saved = with_evals.state_dict()
    resumed, _ = build_stage(cfg, 0, 12, CPU)
    resumed.load_state_dict(saved)
    for a, b in zip(steps(plain, 3, 6), steps(resumed, 3, 6)):
        assert torch.equal(a, b)
    assert plain.stats.take()["state_sg_loss"] is not None  # the state predictor trained
    layer = plain.module[0]
    before = layer.carried()
    plain.begin_epoch(1)
    assert before is not None and layer.carried() is None


def test_bad_stream_input_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="--bptt must be at least 1"):
        COPY.replace(bptt=0)
    with pytest.raises(DataError, match="test stream has 3 positions, fewer than one window of 4"):
        prepared(COPY.replace(dataset="tests.user_data:short_stream", model="tests.user_models:gru_cell_then_readout"))
    with pytest.raises(ConfigError, match="must give \\(4, 9\\)"):  # per-position targets, per-sample logits
        prepared(COPY.replace(model="tests.user_models:plain_mlp"))
    with pytest.raises(ConfigError, match="mode pipeline cannot carry"):
        prepared(COPY.replace(mode="pipeline"))


def test_a_users_stream_and_cell_train_in_every_stage_worker_mode(tmp_path):
    """Token ids in, next-token classes out, a GRU cell unrolled over each window: the user's
    pieces run as the built-in ones do."""
    cfg = COPY.replace(dataset="tests.user_data:streams", model="tests.user_models:gru_cell_then_readout",
                       epochs=1, steps=6)
    _, summary = run(cfg, mode="unlocked", out=str(tmp_path / "u"))
    assert summary["steps"] == 6 and summary["status"] == "done"
