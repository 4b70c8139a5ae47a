"""Entry point of `python -m difa.generate`; see difa/cli/generate.py."""

from difa.cli.generate import main

if __name__ == "__main__":
    main()
