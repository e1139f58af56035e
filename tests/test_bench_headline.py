"""bench/headline.py's summary: medians over the finished pairs, a failed pair listed and left
out (a crashed run must not vanish from the record, nor pull a median)."""
from __future__ import annotations

import argparse
import json

from bench.headline import summary


def _pair(invocation: str, rule: str, ratio: float, gap: float) -> dict:
    return {"invocation": invocation, "cores": 2, "model": "m", "seed": 0, "rule": rule, "ratio": ratio,
            "accuracy_gap_points": gap, "time_to_accuracy_ratio": None, "backprop_samples_per_s": 100.0}


def test_a_failed_pair_is_listed_and_left_out_of_the_medians(tmp_path, capsys):
    rows = [_pair("a", "local", 0.9, -0.5), _pair("b", "local", 1.1, -0.1), _pair("c", "local", 1.0, -0.3),
            {"invocation": "d", "cores": 2, "model": "m", "seed": 2, "rule": "local",
             "failed": "stage 1 sent nothing for 10.1 s", "run_folders": ["x", "y"]}]
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary(argparse.Namespace(file=str(path)))
    out = capsys.readouterr().out
    assert "left out: local (seed 2, invocation d) failed: stage 1 sent nothing for 10.1 s" in out
    assert "3 invocations" in out
    assert "1.00 [0.90-1.10]" in out and "-0.30 [-0.50--0.10]" in out


def test_only_failed_pairs_say_so(tmp_path, capsys):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps({"invocation": "d", "cores": 2, "model": "m", "seed": 0, "rule": "local",
                                "failed": "boom"}) + "\n")
    summary(argparse.Namespace(file=str(path)))
    assert "no finished pairs" in capsys.readouterr().out


def test_a_run_that_fails_is_written_down_and_the_invocation_goes_on(tmp_path, monkeypatch, capsys):
    import bench.headline as headline
    from synthgrad.common.reports import RunFailed

    def fake_train(cfg, log):
        if cfg.mode == "local":
            raise RunFailed("stage 1 sent nothing for 10.1 s")
        return None, {"samples_per_s": 100.0, "test_accuracy": 0.9, "evals": [], "layout": None}

    monkeypatch.setattr(headline, "train", fake_train)
    monkeypatch.setattr(headline, "ROOT", tmp_path)
    out = tmp_path / "h.jsonl"
    args = headline.build_parser().parse_args(["run", "--rules", "local,locked", "--dataset", "synthetic",
                                               "--out", str(out)])
    headline.run(args)
    failed, done = [json.loads(line) for line in out.read_text().splitlines()]
    assert failed["failed"] == "local: stage 1 sent nothing for 10.1 s" and failed["rule"] == "local"
    assert done["rule"] == "locked" and done["ratio"] == 1.0
    assert len({f for row in (failed, done) for f in row["run_folders"]}) == 4  # none reused
    assert all(str(tmp_path) in f for f in failed["run_folders"])
