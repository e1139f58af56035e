"""Every import in the checkout resolves for a static tool: mypy over synthgrad/, tests/,
bench/, examples/ and launch.py reports no module it cannot find (type errors are not judged
here). Run by CI (`make imports`); `python -m tests.static_imports` by hand.

A module that only exists at run time (a folder appended to a package's __path__, an import
hook, a directory put on sys.path by a script) is what this catches: mypy, pyright, an IDE's
go-to-definition and grep all resolve imports by path."""
from __future__ import annotations

import re
import sys

from mypy import api

TARGETS = ["synthgrad", "tests", "bench", "examples", "launch.py"]
# an import of the project's own code that mypy could not follow from the checkout: not found,
# found only as an installed (untyped) copy, or one file under two module names
OWN = r'"(synthgrad|tests|bench|examples)(\.[\w.]+)?"'
UNRESOLVED = re.compile(rf"{OWN}.*\[import-(not-found|untyped)\]|found twice under different module names")


def main() -> int:
    out, err, _ = api.run(["--explicit-package-bases", "--no-color-output", *TARGETS])
    checked = re.search(r"checked (\d+) source files", out)
    if checked is None:
        print(f"mypy did not check the sources:\n{out[-2000:]}{err[-2000:]}", file=sys.stderr)
        return 2
    bad = [line for line in out.splitlines() if UNRESOLVED.search(line)]
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{checked.group(1)} files checked by mypy: {len(bad)} unresolved imports")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
