"""Command line: python -m captioners caption | batch | models | download | convert | ui.

One module per subcommand, the options they share in :mod:`captioners.cli.options`. Nothing outside
this package imports it (the engines, the service and the UIs stand on their own).
Errors meant for users are a short message on stderr (no traceback unless --debug) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from captioners.cli import batch, caption, models, ui
from captioners.cli.options import setup_logging
from captioners.errors import CaptionerError

DESCRIPTION = ("Image captioners (CLIP-prefix / ClipCap, SBG, FuseCap). Commands: caption (print captions), "
               "batch (caption folders into caption files), models (list models and their files), download "
               "(fetch a model's files), convert (.pt to .safetensors), ui (the Captioners tab as a web app).")

SUBCOMMANDS = (caption, batch, models, ui)  # each module's add_parser(sub) registers its parser(s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captioners", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug, args.quiet)
    try:
        return args.func(args)
    except CaptionerError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
