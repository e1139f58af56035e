"""Configuration errors are caught before any process starts, with a message saying what to change."""
from __future__ import annotations

import json

import subprocess
import sys

import pytest

import launch
from synthgrad.common.config import ConfigError, RunConfig
from tests.helpers import ROOT


@pytest.mark.parametrize("changes, needle", [
    ({"mode": "sideways"}, "unknown mode 'sideways'"),
    ({"stages": 9}, "more than the model's 4 layers"),
    ({"groups": (2, 1)}, "covers 3 layers, but the model has 4"),
    ({"layers": (784,)}, "at least an input and an output"),
    ({"layers": (100, 10), "input_shape": (1, 28, 28)}, "must start with 784"),
    ({"layers": (784, 12), "num_classes": 10}, "must end with 10"),
    ({"layers": (784, 0, 10)}, "must be positive"),
    ({"true_grad_every": 0}, "at least 1"),
    ({"batch_size": 1}, "at least 2"),
    ({"sg_model": "transformer"}, "unknown synthetic-gradient model"),
    ({"on_failure": "retry"}, "--on-failure must be stop or restart"),
    ({"slow_stage": (7, 5)}, "--slow-stage needs STAGE,MS with STAGE in 0..3"),
    ({"heartbeat_timeout": 0.1}, "--heartbeat-timeout must be a number >= 0.5"),
    ({"heartbeat_timeout": float("inf")}, "--heartbeat-timeout must be a number >= 0.5 and <= 86400, got inf"),
    ({"checkpoint_every": -1.0}, "--checkpoint-every must be a number >= 0"),
    ({"lr": float("inf")}, "--lr must be a number > 0 and <= 100, got inf"),
    ({"sg_lr": float("nan")}, "--sg-lr must be a number > 0"),
    ({"sg_replay": -1}, "--sg-replay must be"),
    ({"sg_replay": 1.5}, "--sg-replay must be a whole number"),
    ({"sg_learn_weights": 1.5}, "--sg-learn-weights must be a number >= 0 and <= 1"),
    ({"sg_learn_weights": float("nan")}, "--sg-learn-weights must be"),
    ({"lr": 0.0}, "--lr must be a number > 0"),
    ({"momentum": 1.5}, "--momentum must be a number >= 0 and <= 1"),
    ({"metrics_every": 0.0}, "--metrics-every must be a number > 0"),
    ({"stall_timeout": -5.0}, "--stall-timeout must be a number > 0"),
    ({"start_timeout": float("nan")}, "--start-timeout must be a number > 0"),
    ({"max_message_mb": 1 << 20}, "--max-message-mb must be at most 65536"),
    ({"link_delay_ms": -1.0}, "--link-delay-ms must be between 0 and 10000"),
    ({"mode": "backprop", "resume": "/nowhere"}, "--resume continues locked, unlocked, stale, local, delayed and corrected runs, not backprop"),
])
def test_bad_config_names_the_problem(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig(**changes).validate()


def test_stage_groups():
    assert RunConfig().stage_groups == (1, 1, 1, 1)
    assert RunConfig(stages=2).stage_groups == (2, 2)
    assert RunConfig(stages=3).stage_groups == (2, 1, 1)
    assert RunConfig(groups=(1, 3)).stage_groups == (1, 3)


def test_true_grad_schedule():
    cfg = RunConfig(true_grad_every=10)
    assert [s for s in range(30) if cfg.true_grad_at(s)] == [9, 19, 29]
    assert all(RunConfig(mode="locked", true_grad_every=10).true_grad_at(s) for s in range(5))


def test_config_round_trips_through_a_dict():
    cfg = RunConfig(groups=(2, 2), conditioned=True)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown configuration fields: bogus"):
        RunConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_the_mode_is_parsed_once_where_the_config_is_made(tmp_path):
    """Python, a dict (a saved run), a --config file and the command line all give a Mode; its
    dict form is the plain name (checkpoints are read with weights_only)."""
    from synthgrad.common.modes import Mode
    assert RunConfig(mode="local").mode is Mode.LOCAL and RunConfig().mode is Mode.UNLOCKED
    assert RunConfig.from_dict({"mode": "delayed"}).mode is Mode.DELAYED
    assert type(RunConfig(mode="stale").to_dict()["mode"]) is str
    assert RunConfig(mode=Mode.LOCKED).replace(epochs=1).mode is Mode.LOCKED
    toml = tmp_path / "run.toml"
    toml.write_text('mode = "corrected"\n')
    parse = launch.build_parser().parse_args
    assert launch.config_from_args(parse(["train", "--config", str(toml)])).mode is Mode.CORRECTED
    assert launch.config_from_args(parse(["train", "--mode", "locked"])).mode is Mode.LOCKED
    with pytest.raises(ConfigError, match="unknown mode 'sideways'; choose one of backprop"):
        launch.config_from_args(parse(["train", "--mode", "sideways"]))
    with pytest.raises(ConfigError, match="unknown mode 'sideways'"):
        RunConfig.from_dict({"mode": "sideways"})


def test_declaring_the_options_loads_no_registry():
    """config.py imports neither torch nor the registries, anywhere (validation.py reads them), and
    the modules that take a RunConfig import it for annotations only: no import cycle."""
    import ast

    def imported(path, typing_too=True):
        tree = ast.parse((ROOT / path).read_text())
        typing = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                  and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                and (typing_too or id(n) not in typing)} | {
                a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    heavy = {"torch", "synthgrad.common.models", "synthgrad.common.datasets", "synthgrad.common.placement",
             "synthgrad.common.costs"}
    assert not imported("common/config.py") & heavy
    for path in ("common/models.py", "common/costs.py", "common/validation.py"):
        assert "synthgrad.common.config" not in imported(path, typing_too=False), path


def test_cli_builds_config():
    ns = launch.build_parser().parse_args(
        ["train", "--mode", "stale", "--layers", "784,32,10", "--conditioned", "--true-grad-every", "5"])
    cfg = launch.config_from_args(ns)
    assert cfg.mode == "stale" and cfg.layers == (784, 32, 10) and cfg.conditioned
    assert cfg.true_grad_every == 5 and cfg.batch_size == 256


def test_config_file_gives_options_and_the_command_line_overrides_them(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('mode = "unlocked"\ntrue-grad-every = 10\nlayers = [784, 128, 10]\n'
                    'sg_model = "linear"\nlr = 0.002\n')
    ns = launch.build_parser().parse_args(["train", "--config", str(toml), "--lr", "0.005"])
    cfg = launch.config_from_args(ns)
    assert (cfg.mode, cfg.true_grad_every, cfg.layers, cfg.sg_model) == ("unlocked", 10, (784, 128, 10), "linear")
    assert cfg.lr == 0.005  # the command line wins
    # a run's config.json starts a new run like it, in a folder of its own
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({**RunConfig(mode="local", epochs=1).to_dict(), "out": "runs/old"}))
    again = launch.config_from_args(launch.build_parser().parse_args(["compare", "--config", str(saved)]))
    assert again.mode == "local" and again.epochs == 1 and again.out is None


def test_auto_stands_for_a_default_the_run_decides(tmp_path):
    """--threads and --sg-hidden default to None, which the run decides ("auto"): the word is
    accepted for it on the command line, in a --config file and from Python, and on the command
    line it overrides the file's value."""
    parse = launch.build_parser().parse_args
    cfg = launch.config_from_args(parse(["train", "--threads", "auto", "--sg-hidden", "Auto"]))
    assert cfg.threads is None and cfg.sg_hidden is None
    assert cfg == RunConfig(threads="auto", sg_hidden="auto") == RunConfig()
    toml = tmp_path / "run.toml"
    toml.write_text('threads = "auto"\nsg-hidden = 16\n')
    cfg = launch.config_from_args(parse(["train", "--config", str(toml)]))
    assert (cfg.threads, cfg.sg_hidden) == (None, 16)
    toml.write_text('threads = [2, 1, 1, 1]\nsg-hidden = 16\n')
    cfg = launch.config_from_args(parse(["train", "--config", str(toml), "--threads", "auto", "--sg-hidden", "auto"]))
    assert (cfg.threads, cfg.sg_hidden) == (None, None)
    assert RunConfig.from_dict({**RunConfig().to_dict(), "threads": "auto"}).threads is None
    with pytest.raises(SystemExit):  # anything else is still a number
        parse(["train", "--sg-hidden", "most"])


def test_stages_auto_is_a_value_of_its_own(tmp_path):
    """--stages None is one stage per layer, so auto is a value of its own (STAGES_AUTO), read
    from the command line, a --config file, a saved config and Python alike; the run resolves
    it (coordinator/layout.py) and until then the number of stages is not known."""
    from synthgrad.common.config import STAGES_AUTO
    parse = launch.build_parser().parse_args
    cfg = launch.config_from_args(parse(["train", "--stages", "auto"]))
    assert cfg.stages == STAGES_AUTO and cfg.stages_auto and cfg == RunConfig(stages="Auto")
    assert RunConfig().stages is None and not RunConfig().stages_auto  # the default: one per layer
    toml = tmp_path / "run.toml"
    toml.write_text('stages = "auto"\n')
    assert launch.config_from_args(parse(["train", "--config", str(toml)])).stages_auto
    toml.write_text("stages = 2\n")
    assert launch.config_from_args(parse(["train", "--config", str(toml), "--stages", "auto"])).stages_auto
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="resolved when the run starts"):
        cfg.stage_groups
    with pytest.raises(SystemExit):
        parse(["train", "--stages", "many"])


@pytest.mark.parametrize("changes, needle", [
    ({"threads": (1, 2, 1, 1)}, "--stages auto decides the number of stages: give one --threads"),
    ({"replicas": (2, 1, 1, 1)}, "give one --replicas for every stage"),
    ({"device": "cpu,cpu,cpu,cpu"}, "give one --device for every stage"),
    ({"slow_stage": (0, 5)}, "--slow-stage names a stage"),
    ({"groups": (2, 2)}, "--stages and --groups disagree"),
    ({"split_at": "1"}, "give one of --stages"),
])
def test_stages_auto_takes_what_is_given_per_stage_once(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig(stages="auto", **changes).validate()
    RunConfig(stages="auto", threads=(2,), replicas=(2,), device="cpu").validate()
    with pytest.raises(ConfigError, match="--stages must be at least 1, or auto"):
        RunConfig(stages=-1).validate()


@pytest.mark.parametrize("text, needle", [
    ("lr = 0.001\nlearning_rate = 3\n", "unknown option learning_rate"),
    ("lr = \n", "not valid TOML"),
    ("lr = -1.0\n", "--lr"),
    ("layers = [784, 10]\nmode = 'fast'\n", "unknown mode"),
], ids=["unknown-key", "syntax", "bad-value", "bad-mode"])
def test_a_bad_config_file_names_the_problem(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        launch.config_from_args(launch.build_parser().parse_args(["train", "--config", str(f)]))
    with pytest.raises(ConfigError, match="No such file"):
        launch.config_from_args(launch.build_parser().parse_args(["train", "--config", str(tmp_path / "x.toml")]))
    with pytest.raises(ConfigError, match="drop one"):
        launch.config_from_args(launch.build_parser().parse_args(
            ["train", "--config", str(f), "--resume", str(tmp_path)]))


@pytest.mark.slow
def test_cli_rejects_bad_config_before_starting_anything(tmp_path):
    res = subprocess.run([sys.executable, "launch.py", "--stages", "7", "--out", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "--stages 7 is more than the model's 4 layers" in res.stderr
    assert not (tmp_path / "r").exists()
    res = subprocess.run([sys.executable, "launch.py", "--dataset", "mnist", "--data-dir",
                          str(tmp_path / "none")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_help_names_each_default_once(capsys):
    """`train --help`: a run option says its RunConfig default; argparse's None ("not given")
    is not printed beside it."""
    from synthgrad.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "--device DEVICE cpu | cuda" in text and "(default: cpu)" in text


def test_torchrun_with_a_model_by_import_path_needs_the_stage_count():
    """Every rank checks the world size before anything is built: a user's model must say how
    many stages it is cut into (--stages, or --groups)."""
    from synthgrad.common.config import ConfigError, RunConfig
    from synthgrad.coordinator.torchrun import TorchrunEnv, check_world
    env = TorchrunEnv(rank=1, world_size=3, local_rank=1, master_addr="127.0.0.1", master_port=29500)
    cfg = RunConfig(mode="locked", model="tests.user_models:small_cnn")
    with pytest.raises(ConfigError, match="needs --stages 2"):
        check_world(cfg, env)
    check_world(cfg.replace(stages=2), env)
    with pytest.raises(ConfigError, match="needs 4"):
        check_world(cfg.replace(stages=3), env)


def test_torchrun_ranks_without_keys_say_how_to_make_them_before_the_rendezvous():
    """Each rank (the coordinator's and a stage's) refuses a secure run without keys before it
    waits for the others, so a missing --keys fails every rank at once."""
    from synthgrad.common.config import ConfigError, RunConfig
    from synthgrad.coordinator.torchrun import TorchrunEnv, run_rank
    cfg = RunConfig(mode="unlocked", dataset="synthetic", layers=(784, 64, 64, 64, 10))
    for rank in (0, 1):
        with pytest.raises(ConfigError, match="tcp links are CURVE-encrypted and authenticated: make keys with"):
            run_rank(cfg, TorchrunEnv(rank, 5, rank, "127.0.0.1", 29500), log=lambda _: None)
