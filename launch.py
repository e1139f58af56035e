#!/usr/bin/env python3
"""synthgrad's command line, from a checkout: `python launch.py train ...` (installed, the same
is the `synthgrad` command). Everything lives in synthgrad/cli.py."""
import sys

from synthgrad.cli import build_parser, config_from_args, main  # noqa: F401 (tests and scripts use them)

if __name__ == "__main__":
    sys.exit(main())
