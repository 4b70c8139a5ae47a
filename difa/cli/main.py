"""The `difa` console script: `difa calibrate ...`, `difa generate ...`, `difa evaluate ...` are the same as
`python -m difa.calibrate ...` (and so on), with the same Hydra overrides."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

COMMANDS = {"calibrate": "difa.cli.calibrate", "generate": "difa.cli.generate", "evaluate": "difa.cli.evaluate"}
USAGE = ("usage: difa {calibrate,generate,evaluate} [key=value ...]   (the same as python -m difa.<command>; "
         "see README.md)")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] not in COMMANDS:
        print(f"difa: unknown command {args[0]!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command = importlib.import_module(COMMANDS[args[0]])
    # (the CLI edge: Hydra reads the overrides from sys.argv, as under `python -m difa.<command>`; restored after)
    saved, sys.argv = sys.argv, [f"difa-{args[0]}", *args[1:]]
    try:
        command.main()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
