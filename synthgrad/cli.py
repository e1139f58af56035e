#!/usr/bin/env python3
"""synthgrad's one entry point.

    python launch.py train --mode unlocked --true-grad-every 10     # (train is the default)
    python launch.py train --mode locked --stages 2 --dataset synthetic
    python launch.py compare --epochs 3 --contenders backprop,pipeline,locked,unlocked,unlocked:10
    python launch.py report runs/unlocked-20261124-120000            # PNG plots of a finished run
    python launch.py coordinator --bind tcp://10.0.0.1:5555 --mode unlocked   # stages on other hosts:
    python launch.py worker --coordinator tcp://10.0.0.1:5555 --stages 0,1    #   one command per host

Every option of `train` is a field of common.config.RunConfig (see `train --help`).
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
import typing
from typing import Callable, Optional, Sequence

import synthgrad
from synthgrad import ConfigError, RunConfig

SUBCOMMANDS = ("train", "compare", "report", "monitor", "coordinator", "worker", "keys", "export")


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default said once: a run option's help names its RunConfig default itself
    (its argparse default is None, meaning "not given", which is not worth printing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _or_auto(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An option the run may decide: `auto` says so (config_from_args makes it None, the default,
    while it still overrides a --config file's value; RunConfig reads it for a field whose auto
    is a value of its own, --stages)."""
    def parse_or_auto(text: str) -> object:
        return "auto" if text.strip().lower() == "auto" else parse(text)
    parse_or_auto.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in errors
    return parse_or_auto


def add_config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One --option per RunConfig field (except `skip`), typed from the field's annotation, and
    --config FILE for all of them at once."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="options from a TOML file (names as below), or a run's config.json to "
                             "start a new run like it; options given here override the file's")
    hints = typing.get_type_hints(RunConfig)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in skip or f.metadata.get("derived"):
            continue
        title = f.metadata.get("group", "options")
        section = sections.get(title) or sections.setdefault(title, parser.add_argument_group(title))
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        args = typing.get_args(t)
        base = args[0] if typing.get_origin(t) is typing.Union else t
        help_text = f.metadata.get("help", "")
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if default is not None:  # a None default's meaning is in the help text ("None = ...")
            help_text = f"{help_text} (default: {shown})" if help_text else f"(default: {shown})"
        auto = f.metadata.get("auto", False) or f.metadata.get("auto_value") is not None  # takes the word
        if base is bool:
            section.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) is tuple:
            section.add_argument(flag, type=_or_auto(_int_list) if auto else _int_list, default=None,
                                 metavar="N,N,...|auto" if auto else "N,N,...", help=help_text)
        elif isinstance(base, type) and issubclass(base, enum.Enum):  # a name: RunConfig parses it, or says why not
            section.add_argument(flag, type=str, default=None, help=help_text)
        elif auto:
            section.add_argument(flag, type=_or_auto(base), default=None, metavar="N|auto", help=help_text)
        else:
            section.add_argument(flag, type=base, default=None, help=help_text)


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(RunConfig)
             if getattr(ns, f.name, None) is not None}
    auto = {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("auto")}
    given.update({k: None for k, v in given.items() if k in auto and v == "auto"})  # given, as the default
    if given.get("resume") == "auto":  # a restarted job continues; its first start begins the run
        folder = synthgrad.auto_resume(given)
        if folder is None:
            del given["resume"]
        else:
            given["resume"] = folder
    if given.get("resume"):
        if getattr(ns, "config", None):
            raise ConfigError("--config starts a run; --resume continues one with its own saved "
                              "config (change what may change with options): drop one")
        return synthgrad.resume_config(given["resume"], given).validate()
    if getattr(ns, "config", None):  # the file's options, then the command line's over them
        given = {**synthgrad.load_config_file(ns.config), **given}
    return RunConfig(**given).validate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train one run, in any mode",
                           formatter_class=DefaultsOnce, allow_abbrev=False)
    add_config_options(train)
    compare = sub.add_parser(
        "compare", help="run several contenders one after another; write compare.json/.md and plots",
        formatter_class=DefaultsOnce, allow_abbrev=False)
    compare.add_argument("--contenders", default=None,
                         help="modes to run, in order; unlocked:N / stale:N set their --true-grad-every; "
                              "+field=value sets an option for one contender alone, e.g. "
                              "local,local+head_next_layer=1 (a list's numbers separated by /) (default: backprop,pipeline,locked,unlocked,stale; on stream data without "
                              "pipeline, which does not take it)")
    compare.add_argument("--target-accuracy", type=float, default=None,
                         help="class data: time_to_target_s is the wall clock at which a test evaluation "
                              "first reaches this accuracy (default: 0.85)")
    compare.add_argument("--target-bits", type=float, default=None,
                         help="stream data: time_to_target_s is the wall clock at which the test loss first "
                              "falls to this many bits per target (default: the best locked contender's "
                              "final bits)")
    add_config_options(compare, skip=("mode",))  # shared settings; --out is the comparison's folder
    report = sub.add_parser("report", help="draw the PNG plots of a finished run",
                            formatter_class=DefaultsOnce, allow_abbrev=False)
    report.add_argument("run_dir", help="a run folder (holds metrics.jsonl)")
    report.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR)")
    monitor = sub.add_parser("monitor", help="attach to a running coordinator's status stream",
                             formatter_class=DefaultsOnce, allow_abbrev=False)
    monitor.add_argument("--connect", required=True, help="the endpoint `train` prints after 'watch it:'")
    monitor.add_argument("--timeout", type=float, default=30.0, help="give up after this long without a record")
    monitor.add_argument("--count", type=int, default=None, help="exit after this many status records")
    monitor.add_argument("--json", action="store_true", help="print each record as one JSON line")
    monitor.add_argument("--keys", default=None, help="the keys folder the run printed after 'watch it:'")
    monitor.add_argument("--secure", action=argparse.BooleanOptionalAction, default=None,
                         help="CURVE (default: on for a tcp endpoint; --no-secure for a run started with it)")
    export = sub.add_parser("export", help="write a run's trained network as one plain PyTorch module",
                            formatter_class=DefaultsOnce, allow_abbrev=False)
    export.add_argument("run_dir", help="a finished run folder")
    export.add_argument("out", help="the file to write, e.g. model.pt")
    export.add_argument("--state-dict", action="store_true",
                        help="write only the state dict (loads with torch.load's weights_only=True)")
    keys = sub.add_parser("keys", help="make the CURVE key pairs for secure links in a folder",
                          formatter_class=DefaultsOnce, allow_abbrev=False)
    keys.add_argument("folder", help="where to write coordinator/worker/monitor .key and .key_secret")
    keys.add_argument("--force", action="store_true", help="replace keys already there")
    keys.add_argument("--split", action="store_true",
                      help="one subfolder per role (coordinator/, worker/, monitor/), each with only what "
                           "that role needs: give each host the folder of its role")
    coordinator = sub.add_parser(
        "coordinator", help="run the coordinator only; stages join with `launch.py worker`",
        formatter_class=DefaultsOnce, allow_abbrev=False)
    coordinator.add_argument("--bind", required=True,
                             help="tcp://HOST:PORT to listen on (an address of this host; port 0 picks one)")
    add_config_options(coordinator, skip=("transport", "host"))
    worker = sub.add_parser("worker", help="start stage processes here for a coordinator elsewhere",
                            formatter_class=DefaultsOnce, allow_abbrev=False)
    worker.add_argument("--coordinator", required=True, help="the tcp://HOST:PORT the coordinator printed")
    which = worker.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", type=int, help="the stage to run")
    which.add_argument("--stages", type=_int_list, metavar="I,J,...", help="several stages, one process each")
    worker.add_argument("--host", default=None,
                        help="address to receive activations on (default: this host's address towards the coordinator)")
    worker.add_argument("--out", default="", help="folder for this host's checkpoints (default: the coordinator's run folder path)")
    worker.add_argument("--connect-timeout", type=float, default=synthgrad.CONNECT_TIMEOUT_S,
                        help="a stage gives up when the coordinator has not answered within this many seconds")
    worker.add_argument("--keys", default=None, help="keys folder (launch.py keys): CURVE on every link")
    worker.add_argument("--secure", action=argparse.BooleanOptionalAction, default=None,
                        help="CURVE on every link (the default; needs --keys); --no-secure: plain tcp")
    worker.add_argument("--placement", choices=tuple(synthgrad.PLACEMENTS), default="auto",
                        help="pin this host's stages to its cores (pin), leave them to the OS (none), or "
                             "pin only when each gets a core of its own (auto)")
    return parser


def _train_live(cfg: RunConfig, train):
    """Train with the live table (rich) on a terminal: one row per worker plus a progress bar;
    log lines scroll above it."""
    from rich.live import Live
    status_table = synthgrad.status_table
    with Live(refresh_per_second=4, transient=False) as live:
        return train(cfg.replace(progress_every=1e9), log=live.console.print,
                     on_status=lambda rec: live.update(status_table(rec)))


def exit_code_of(job: Callable[[], None]) -> int:
    """Run a training job and map how it ended to the exit code (and message) users rely on:
    0 done, 2 bad config or data (before any process started), 1 run failed, 130 Ctrl-C or
    SIGTERM. SIGTERM is taken as Ctrl-C where it would otherwise kill the process where it
    stands (a backprop run, which trains in this process, or compare between its
    contenders; a stage-worker run's coordinator takes both itself and checkpoints first), so
    that a run stopped by it still writes its summary and stops what it started. Not under
    torchrun, whose SIGTERM must stop a rank waiting in its rendezvous at once, and not where
    SIGTERM is ignored or handled already."""
    import os
    import signal
    import threading
    DataError, RunFailed = synthgrad.DataError, synthgrad.RunFailed

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    under_torchrun = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    takes_sigterm = (threading.current_thread() is threading.main_thread()  # only it may set a handler
                     and not under_torchrun and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if takes_sigterm:
        signal.signal(signal.SIGTERM, interrupt)
    try:
        job()
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"run failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a full disk while writing the summary
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every worker was stopped", file=sys.stderr)
        return 130
    finally:
        if takes_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    def job() -> None:
        cfg = config_from_args(ns)  # a bad option is refused before torch is even imported
        torchrun = synthgrad.torchrun
        env = torchrun.detect()
        if env is None and cfg.mode != synthgrad.Mode.BACKPROP:  # its workers will be forked here
            synthgrad.warm_up_early()
        format_summary, train = synthgrad.format_summary, synthgrad.train
        if env is not None:  # started by torchrun: this process is the coordinator or one stage
            if env.rank == 0 and sys.stdout.isatty():
                _train_live(cfg, lambda c, **kw: torchrun.run_rank(c, env, **kw))
            else:
                torchrun.run_rank(cfg, env)
            return
        if sys.stdout.isatty():
            _, summary = _train_live(cfg, train)
        else:  # plain progress lines (logs, CI, pipes)
            _, summary = train(cfg)
        print(format_summary(summary))
    return exit_code_of(job)


def cmd_coordinator(ns: argparse.Namespace) -> int:
    format_summary, train = synthgrad.format_summary, synthgrad.train

    def job() -> None:
        cfg = config_from_args(ns)
        if sys.stdout.isatty():
            _, summary = _train_live(cfg, lambda c, **kw: train(c, bind=ns.bind, **kw))
        else:
            _, summary = train(cfg, bind=ns.bind)
        print(format_summary(summary))
    return exit_code_of(job)


def cmd_worker(ns: argparse.Namespace) -> int:
    synthgrad.warm_up_early()  # the stages are forked from it once this process has its imports
    RemoteStages, run_stages = synthgrad.RemoteStages, synthgrad.run_stages
    stages = (ns.stage,) if ns.stage is not None else ns.stages
    try:
        return run_stages(RemoteStages(ns.coordinator, tuple(stages), ns.host, ns.out, ns.placement,
                                       ns.connect_timeout, ns.keys, ns.secure))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_compare(ns: argparse.Namespace) -> int:
    run_compare = synthgrad.compare

    def job() -> None:
        folder, _ = run_compare(config_from_args(ns), ns.contenders, ns.target_accuracy,
                                target_bits=ns.target_bits)
        print((folder / "compare.md").read_text())
        print(f"written: {folder}/compare.json, compare.md, *.png")
    return exit_code_of(job)


def cmd_report(ns: argparse.Namespace) -> int:
    from pathlib import Path
    run_dir = Path(ns.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"error: {run_dir} is not a run folder (no metrics.jsonl in it)", file=sys.stderr)
        return 2
    draw_run = synthgrad.report
    for path in draw_run(run_dir, Path(ns.out) if ns.out else run_dir):
        print(f"wrote {path}")
    return 0


def cmd_monitor(ns: argparse.Namespace) -> int:
    watch = synthgrad.monitor
    try:
        return watch(ns.connect, timeout_s=ns.timeout, count=ns.count, as_json=ns.json,
                     keys_dir=ns.keys, secure=ns.secure)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0  # detaching never disturbs the run


def cmd_export(ns: argparse.Namespace) -> int:
    try:
        out = synthgrad.export(ns.run_dir, ns.out, state_dict_only=ns.state_dict)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    how = "torch.load(PATH)  # a state dict" if ns.state_dict else "torch.load(PATH, weights_only=False)  # an nn.Sequential"
    print(f"wrote {out}; load it with {how.replace('PATH', repr(str(out)))}")
    return 0


def cmd_keys(ns: argparse.Namespace) -> int:
    make_keys = synthgrad.make_keys
    try:
        written = make_keys(ns.folder, force=ns.force, split=ns.split)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    if ns.split:
        print(f"give each host the folder of its role and pass it as --keys: {ns.folder}/coordinator "
              f"to the coordinator, {ns.folder}/worker to `launch.py worker`, {ns.folder}/monitor "
              f"to `launch.py monitor`")
    else:
        print(f"copy {ns.folder} to every host of the run (each process reads only its own secret) "
              f"and pass --keys {ns.folder}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    ns = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "compare": cmd_compare, "report": cmd_report, "monitor": cmd_monitor,
                "coordinator": cmd_coordinator, "worker": cmd_worker, "keys": cmd_keys, "export": cmd_export}
    return commands[ns.command](ns)


if __name__ == "__main__":
    sys.exit(main())
