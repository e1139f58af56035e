"""The documentation holds together: every relative link in README.md and docs/ resolves (a
file, or a heading of that file), README stays a front door, and each docs page has headings."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import re
import shlex
import sys
from collections.abc import Iterator
from typing import NamedTuple, Optional

from tests.helpers import ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto: not checked here (no network)
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_door_and_every_page_is_linked_with_headings():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    quick = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split()[0:2] for line in quick.strip().splitlines()] == [["make", "train"], ["make", "test"]]
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"
        assert sum(line.startswith("## ") for line in page.read_text().splitlines()) >= 1, page.name


# ---------------------------------------------------------------- the documented commands run
# Every command line shown in README.md and docs/*.md (code blocks of shell, and inline code) is
# parsed with the real parser of what it runs: launch.py / the `synthgrad` command / `make train
# ARGS=...` with synthgrad/cli.py's, bench/ and examples/ scripts with their own build_parser()
# (importing them starts nothing). A run's options are then validated as the command line does
# before anything starts (RunConfig.validate: no data, no process), except where the command
# names a file the docs only stand for: with --config FILE it is parsed only, and with --resume
# FOLDER only what a resumed run may change may be given. Inline option fragments (`--threads
# auto`) are parsed as `train` options when every flag in them is one; placeholders (N, DIR, r)
# are not values and leave a fragment out. TOML blocks are --config files and are validated.

SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
SEPARATORS = (";", "&&", "||", "|", "&")
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")  # may wrap within a paragraph, not across one
SCRIPT = re.compile(r"^(?:\./)?(bench|examples)/(\w+)\.py$")


class Shown(NamedTuple):
    where: str  # file:line
    text: str  # the command as shown, continuation lines joined
    block: bool  # in a code block (else inline code)
    variables: dict


def _shown(page) -> Iterator[Shown]:
    """Every code block line (continuations joined) and inline code span of a page."""
    name = page.relative_to(ROOT)
    lines = page.read_text().splitlines()
    prose = []
    fence, variables, pending, start = None, {}, "", 0
    for i, line in enumerate(lines, 1):
        if fence is None and line.startswith("```"):
            fence, variables = line[3:].strip().lower(), {}
            prose.append("")
            continue
        if fence is not None:
            prose.append("")
            if line.startswith("```"):
                fence = None
            elif fence in SHELL_BLOCKS:
                pending, start = (pending + " " + line.strip(), start) if pending else (line.strip(), i)
                if pending.endswith("\\"):
                    pending = pending[:-1]
                    continue
                text, pending = pending.removeprefix("$ "), ""
                assign = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", text)
                if assign:  # NAME="..." on its own line: later lines of the block use $NAME
                    variables[assign[1]] = " ".join(shlex.split(assign[2]))
                yield Shown(f"{name}:{start}", text, True, dict(variables))
            continue
        prose.append(line)
    text = "\n".join(prose)
    for m in INLINE.finditer(text):
        yield Shown(f"{name}:{text.count(chr(10), 0, m.start()) + 1}", " ".join(m[1].split()), False, {})


def _words(shown: Shown) -> list[list[str]]:
    """The simple commands of a shown line, as argv lists (shell variables of its block expanded,
    comments dropped, `...` elisions left out, [optional] parts of a usage line taken as given)."""
    text = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: shown.variables.get(m[1], m[0]), shown.text)
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        tokens = list(lex)
    except ValueError:  # an unbalanced quote: prose, not a command
        return []
    if any(tok.startswith("[-") for tok in tokens):  # `report RUN_DIR [--out DIR]`: a usage line
        tokens = [tok.removeprefix("[").rstrip("]") if tok not in ("[", "]") else "" for tok in tokens]
        tokens = [tok for tok in tokens if tok]
    out, current = [], []
    for tok in [*tokens, ";"]:
        if tok in SEPARATORS:
            if current:
                out.append(current)
            current = []
        elif tok == "...":  # an elision: of the rest, or of an option's value (then the option goes too)
            if current and current[-1].startswith("--") and "=" not in current[-1]:
                current.pop()
        else:
            current.append(tok)
    return out


class Command(NamedTuple):
    where: str
    program: str  # "launch.py", "bench/NAME.py", "examples/NAME.py"
    argv: list


def _commands(shown: Shown) -> Iterator[Command]:
    for command in _raw_commands(shown):
        if not shown.block and len(command.argv) <= 1 and not any(a.startswith("-") for a in command.argv):
            # inline `bench/headline.py` or `launch.py worker` names a program or subcommand, not a
            # run: that it exists is what is checked
            command = command._replace(argv=[*command.argv, "--help"])
        yield command


def _raw_commands(shown: Shown) -> Iterator[Command]:
    for words in _words(shown):
        while words and (words[0] in ("do", "then", "else", "time", "exec", "sudo")
                         or re.fullmatch(r"[A-Za-z_]\w*=.*", words[0])):
            words = words[1:]  # shell keywords, environment assignments
        if not words:
            continue
        if words[0] == "make":
            if words[1:2] == ["train"]:
                args = [w.partition("=")[2] for w in words[2:] if w.startswith("ARGS=")]
                yield Command(shown.where, "launch.py", ["train", *shlex.split(" ".join(args))])
            continue
        if words[0] == "synthgrad" and (len(words) > 1 or shown.block):
            yield Command(shown.where, "launch.py", words[1:])
            continue
        for i, word in enumerate(words):
            if word == "launch.py" or word.endswith("/launch.py"):
                yield Command(shown.where, "launch.py", words[i + 1:])
                break
            if SCRIPT.match(word):
                yield Command(shown.where, word.removeprefix("./"), words[i + 1:])
                break


def _parser(program: str):
    if program == "launch.py":
        from synthgrad.cli import build_parser
        return build_parser()
    kind, name = SCRIPT.match(program).groups()
    path = list(sys.path)
    try:
        module = importlib.import_module(f"{kind}.{name}")
    finally:
        sys.path[:] = path  # the scripts put the checkout first on the path, as the tests already have it
    return module.build_parser()


def _parse(parser, argv: list):
    """(namespace, None), or (None, the parser's message); --help is fine (namespace None too)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(argv), None
        except SystemExit as exc:
            if exc.code == 0:
                return None, None
            lines = err.getvalue().strip().splitlines()
            return None, lines[-1] if lines else f"exit {exc.code}"


def _validate(ns: argparse.Namespace) -> Optional[str]:
    """What the command line refuses before anything starts, short of files the docs stand for."""
    from synthgrad.cli import config_from_args
    from synthgrad.common.config import ConfigError, RunConfig
    if ns.command not in ("train", "compare", "coordinator") or getattr(ns, "config", None):
        return None
    given = {f.name for f in dataclasses.fields(RunConfig) if getattr(ns, f.name, None) is not None}
    if ns.resume not in (None, "auto"):  # continues a run folder: only what may change may be given
        changed = sorted(given - set(RunConfig.may_change_on_resume()) - {"resume", "out"})
        return f"--resume cannot change {', '.join(changed)}" if changed else None
    if ns.resume == "auto":
        if ns.out is None:
            return "--resume auto needs --out DIR"
        ns = argparse.Namespace(**{**vars(ns), "resume": None})  # the first start: a new run into --out
    try:
        config_from_args(ns)
    except ConfigError as exc:
        return str(exc)
    return None


def _documented_commands() -> list[Command]:
    return [c for page in PAGES for shown in _shown(page) for c in _commands(shown)]


def test_every_documented_command_parses_and_validates():
    commands = _documented_commands()
    assert len(commands) >= 80, f"found only {len(commands)} commands: is the collector broken?"
    parsers: dict = {}
    broken = []
    for c in commands:
        parser = parsers.get(c.program) or parsers.setdefault(c.program, _parser(c.program))
        ns, problem = _parse(parser, c.argv)
        if problem is None and ns is not None and c.program == "launch.py":
            problem = _validate(ns)
        if problem:
            broken.append(f"{c.where}: {c.program} {' '.join(c.argv)}\n    {problem}")
    assert not broken, f"{len(broken)} of {len(commands)} documented commands fail:\n" + "\n".join(broken)


PLACEHOLDER = re.compile(r"^([A-Z][A-Z_,]*|[a-z]|.*[…×].*)$")  # N, DIR, STAGE,MS, r; `--lr ×` this


def _fragments(train_options) -> Iterator[tuple[str, list]]:
    """Inline code made only of `train` options (`--threads auto`, `--groups 2,1,1`), with values
    that are values (not placeholders): where it is shown, and its words."""
    for page in PAGES:
        for shown in _shown(page):
            if shown.block or not shown.text.startswith("--") or "|" in shown.text:
                continue  # a|b|c: alternatives, not a value
            for words in _words(shown):
                flags = [w.partition("=")[0] for w in words if w.startswith("--")]
                values = [w for w in words if not w.startswith("-")]
                if len(words) == 1 and train_options.get(words[0], None) is not None \
                        and train_options[words[0]].nargs != 0:
                    continue  # `--model` alone names the option: its value is in the prose
                if all(f in train_options for f in flags) and not any(PLACEHOLDER.match(v) for v in values):
                    yield shown.where, words


def test_every_documented_train_option_fragment_parses():
    """`--threads auto` shown in a sentence is accepted by `train` (parsed, not validated: a
    fragment leaves out the rest of its command, e.g. the --groups its --threads fits)."""
    from synthgrad.cli import build_parser
    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    fragments = list(_fragments(train._option_string_actions))
    assert len(fragments) >= 30, f"found only {len(fragments)} option fragments: is the collector broken?"
    broken = []
    for where, words in fragments:
        _, problem = _parse(parser, ["train", *words])
        if problem:
            broken.append(f"{where}: {' '.join(words)}\n    {problem}")
    assert not broken, f"{len(broken)} of {len(fragments)} documented options fail:\n" + "\n".join(broken)


def test_every_documented_config_file_loads(tmp_path):
    """A TOML block in the docs is a --config file: it loads and validates as given."""
    from synthgrad.common.config import ConfigError, RunConfig, load_config_file
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"^```toml\n(.*?)^```", text, re.M | re.S):
            blocks.append((f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}", m[1]))
    assert blocks
    broken = []
    for i, (where, text) in enumerate(blocks):
        f = tmp_path / f"{i}.toml"
        f.write_text(text)
        try:
            RunConfig(**load_config_file(str(f))).validate()
        except ConfigError as exc:
            broken.append(f"{where}: {exc}")
    assert not broken, "\n".join(broken)
