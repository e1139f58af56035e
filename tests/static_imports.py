"""Every import in the checkout resolves for a static tool: mypy over synthgrad/, tests/,
bench/, examples/ and launch.py reports no module it cannot find, and no name the project's own
modules do not define (type errors are not judged here). Run by CI (`make imports`);
`python -m tests.static_imports` by hand.

A module that only exists at run time (a folder appended to a package's __path__, an import
hook, a directory put on sys.path by a script) is what this catches: mypy, pyright, an IDE's
go-to-definition and grep all resolve imports by path. So is a name imported from, or read off,
one of the project's modules that it does not define (renamed or removed): `from
synthgrad.common.wire import Gone` and `wire.Gone` both fail only when that line runs."""
from __future__ import annotations

import ast
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

from mypy import api

TARGETS = ["synthgrad", "tests", "bench", "examples", "launch.py"]
OWN_PACKAGES = ("synthgrad", "tests", "bench", "examples")
# an import of the project's own code that mypy could not follow from the checkout: not found,
# found only as an installed (untyped) copy, or one file under two module names
OWN = rf'"({"|".join(OWN_PACKAGES)})(\.[\w.]+)?"'
UNRESOLVED = re.compile(rf"{OWN}.*\[import-(not-found|untyped)\]|found twice under different module names")
# a name one of the project's modules does not define: mypy names the module in a from-import
# ('Module "synthgrad.common.wire" has no attribute "X"') but not on an attribute read
# ('Module has no attribute "X"'), where the line itself says which module it is
NAMED_MISSING = re.compile(rf'error: Module {OWN} has no attribute .*\[attr-defined\]')
UNNAMED_MISSING = re.compile(r'^(?P<path>.+?):(?P<line>\d+): error: Module has no attribute "(?P<name>\w+)".*'
                             r'\[attr-defined\]')
# a clean run says "Success: no issues found in N source files"; one with (type) errors says
# "Found E errors in F files (checked N source files)"
CHECKED = re.compile(r"(?:checked|no issues found in) (\d+) source files?")


def _dotted(node: ast.expr) -> Optional[str]:
    """`a.b.c` as a string (None for anything but names and attribute reads)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


@lru_cache(maxsize=None)
def _parsed(path: str) -> tuple[ast.Module, dict[str, str]]:
    """A file's syntax tree and what each name its imports bind stands for (a relative import:
    a name from this project)."""
    tree = ast.parse(Path(path).read_text(), path)
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:  # `import a.b.c` binds `a`; the expression spells out the rest
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            module = OWN_PACKAGES[0] if node.level else (node.module or "")
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{module}.{alias.name}"
    return tree, bound


def reads_own_module(path: str, line: int, name: str) -> bool:
    """Whether `path`'s line `line` reads `name` off one of the project's own modules."""
    try:
        tree, bound = _parsed(path)
    except (OSError, SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == name and node.lineno <= line <= (node.end_lineno or line):
            base = _dotted(node.value)
            if base is None:
                continue
            head, _, rest = base.partition(".")
            full = bound.get(head, head) + (f".{rest}" if rest else "")
            if head in bound and full.split(".")[0] in OWN_PACKAGES:
                return True
    return False


def problems(mypy_output: str) -> list[str]:
    """The lines of mypy's output this check fails on."""
    bad = []
    for line in mypy_output.splitlines():
        if UNRESOLVED.search(line) or NAMED_MISSING.search(line):
            bad.append(line)
        elif (m := UNNAMED_MISSING.match(line)) and reads_own_module(m["path"], int(m["line"]), m["name"]):
            bad.append(line)
    return bad


def main() -> int:
    # --check-untyped-defs: without it mypy skips the bodies of functions without annotations
    # (most tests), imports and attribute reads in them included
    out, err, _ = api.run(["--explicit-package-bases", "--no-color-output", "--check-untyped-defs", *TARGETS])
    checked = CHECKED.search(out)
    if checked is None:
        print(f"mypy did not check the sources:\n{out[-2000:]}{err[-2000:]}", file=sys.stderr)
        return 2
    bad = problems(out)
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{checked.group(1)} files checked by mypy: {len(bad)} unresolved imports or names")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
